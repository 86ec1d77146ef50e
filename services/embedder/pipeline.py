"""Batch embedding of a catalogue: list -> read + decode (CPU) -> model -> parquet parts.

The stages (services.embedder.stages) run on the engine the cluster calls for (services.embedder.engines);
this module lists the catalogue, resumes what an earlier run finished and writes the parts.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow.compute as pc

from services.common.config import Settings, get_settings
from services.common.errors import Incompatible, InvalidInput, NotFound
from services.common.folders import IMAGE_EXTENSIONS, is_image_name
from services.common.store import open_store, read_uri
from services.embedder import gatesample
from services.embedder.embeddings import META_KEY, Finished, PartWriter, plan_chunks, resume_state
from services.embedder.engines import Engine, choose_engine, run_local, run_ray
from services.embedder.runtime import choose as choose_runtime
from services.embedder.runtime import decide as decide_runtime
from services.embedder.runtime import embedder_for
from services.embedder.spec import resolve_spec

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
Progress = Callable[[int, int, int], None]  # (rows done, total, errors so far)


@dataclass
class Catalogue:
    """What to embed, in a stable order: uris, and from a manifest optionally ids and metadata."""
    uris: list[str]
    ids: list[int] | None = None
    metadata: list[str | None] | None = None


def list_images(source: str, settings: Settings | None = None) -> list[str]:
    """Image uris of a folder, an s3://bucket/prefix, or a manifest file (parquet/csv/txt of uris)."""
    return list_catalogue(source, settings).uris


def list_catalogue(source: str, settings: Settings | None = None, images_root: str | None = None) -> Catalogue:
    """images_root: where a manifest's relative uris live (`imsearch embed photos/ --manifest items.parquet`)."""
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        catalogue = read_manifest(source, settings)
        if images_root:
            catalogue.uris = [under(images_root, u) for u in catalogue.uris]
        return catalogue
    if "://" not in source and not Path(source).expanduser().exists():
        raise NotFound(f"{source} does not exist")
    if "://" not in source and Path(source).expanduser().is_file():
        raise InvalidInput(f"{source} is a file: give a folder of images, an s3:// prefix, or a manifest "
                           f"({', '.join(MANIFEST_EXTENSIONS)})")
    store = open_store(source, settings)
    uris = sorted(store.uri(k) for k in store.list() if is_image_name(k))
    if not uris:
        raise NotFound(f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return Catalogue(uris)


def under(root: str, uri: str) -> str:
    """A manifest's uri under the images' root folder or s3:// prefix (absolute paths and urls as they are)."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    if "://" in root:
        return root.rstrip("/") + "/" + uri.lstrip("/")
    return str(Path(root).expanduser() / uri)


def read_manifest(path: str, settings: Settings | None = None) -> Catalogue:
    """A .txt of uris, or a parquet/csv table with a `uri` column, an optional integer `id` column
    (the catalogue's own ids instead of content hashes) and any other columns (kept as metadata)."""
    import io

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    data = read_uri(path, settings)
    if path.lower().endswith(".txt"):
        uris = [line.strip() for line in data.decode().splitlines() if line.strip() and not line.startswith("#")]
        if not uris:
            raise NotFound(f"manifest {path} lists no images")
        return Catalogue(uris)
    table = pq.read_table(io.BytesIO(data)) if path.endswith(".parquet") else pcsv.read_csv(io.BytesIO(data))
    if "uri" not in table.column_names:
        raise InvalidInput(f"manifest {path} has no 'uri' column (columns: {table.column_names})")
    table = table.filter(pc.invert(pc.is_null(table["uri"])))
    if table.num_rows == 0:
        raise NotFound(f"manifest {path} lists no images")
    ids = None
    if "id" in table.column_names:
        ids = _manifest_ids(table["id"], path)
    extra = [c for c in table.column_names if c not in ("uri", "id")]
    metadata = None
    if extra:
        rows = table.select(extra).to_pylist()
        metadata = [json.dumps(r, default=str, sort_keys=True) for r in rows]
    return Catalogue(table["uri"].to_pylist(), ids, metadata)


def _manifest_ids(column, path: str) -> list[int]:
    import pyarrow as pa

    if not pa.types.is_integer(column.type) or column.null_count:
        raise InvalidInput(f"manifest {path}: 'id' must be integers with no gaps (got {column.type}, "
                           f"{column.null_count} missing)")
    ids = column.to_pylist()
    if min(ids) < 0:
        raise InvalidInput(f"manifest {path}: ids must be >= 0 (faiss keeps -1 for 'no result')")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise InvalidInput(f"manifest {path}: {len(dupes)} id(s) appear more than once, e.g. {dupes[:3]}")
    return ids


@dataclass
class EmbedSummary:
    out: str
    total: int = 0
    embedded: int = 0
    reasons: Counter = field(default_factory=Counter)
    engine: str = "local"
    resumed: int = 0  # images a previous run had already embedded (or failed)
    resumed_embedded: int = 0  # ... of which embedded
    duplicates: int = 0
    redone: list[str] = field(default_factory=list)  # chunks of an earlier run that failed verification
    nodes: Counter = field(default_factory=Counter)  # Ray node id -> images it embedded in this run
    gate_sample: int = 0  # catalogue images the expansion gate sample holds (gatesample.py; 0: none)
    seconds: float = 0.0  # from the first embedded batch to the last (after the engine's start-up), this run

    def per_node(self) -> str:
        """Each Ray node's share and rate (after start-up), when more than one node worked."""
        if len(self.nodes) < 2 or not self.seconds:
            return ""
        return "; Ray nodes: " + ", ".join(f"{node[:8]} {n} images ({n / self.seconds:.1f} img/s)"
                                           for node, n in self.nodes.most_common())

    @property
    def skipped(self) -> int:
        return self.total - self.embedded

    @property
    def embedded_now(self) -> int:
        return self.embedded - self.resumed_embedded

    def line(self) -> str:
        """What this run did, then what the folder holds (when an earlier run did part of it)."""
        if self.total and self.resumed == self.total:
            text = (f"nothing to embed: all {self.total} images were done by an earlier run "
                    f"({self.embedded} embedded, {self.skipped} skipped)")
        elif self.resumed:
            now = self.total - self.resumed
            text = (f"{self.embedded_now} embedded, {now - self.embedded_now} skipped in this run; {self.resumed} "
                    f"done by an earlier run ({self.embedded} embedded, {self.skipped} skipped in all)")
        else:
            text = f"{self.embedded} embedded, {self.skipped} skipped"
        if self.redone:
            text += f"; {len(self.redone)} chunk(s) of an earlier run embedded again ({', '.join(self.redone[:3])})"
        if self.reasons:
            text += ": " + "; ".join(f"{n}× {r}" for r, n in self.reasons.most_common(8))
        return text + self.per_node()


def embed_catalogue(source: str | Iterable[str], out: str, model: str | None = None,
                    weights: str | None = None, engine: str = "auto",
                    settings: Settings | None = None, progress: Progress | None = None,
                    say: Callable[[str], None] | None = None, images_root: str | None = None) -> EmbedSummary:
    """Embed every image of source into parquet parts under out; returns what happened. say (if given)
    hears the run's first line: how many images, which model, which engine and why. images_root: where a
    manifest source's relative uris are.

    Resumes: chunks a previous run over the same catalogue finished are skipped, not re-embedded."""
    settings = settings or get_settings()
    model = model or settings.model
    weights = weights or (str(settings.model_weights) if settings.model_weights else None)
    catalogue = list_catalogue(source, settings, images_root) if isinstance(source, str) else Catalogue(list(source))
    spec = resolve_spec(model, weights)
    store = open_store(out, settings)
    chunks = plan_chunks(catalogue.uris, settings.part_rows, catalogue.ids, catalogue.metadata)
    resume = resume_state(store, chunks)
    done = resume.done
    _check_same_model(store, spec, done)
    for reason in resume.redo:
        log.warning("embedding a chunk again: %s", reason)
    pending = [c for c in chunks if resume.written(c) < len(c.uris)]
    todo = [u for c in pending for u in c.uris[resume.written(c):]]
    chosen = choose_engine(len(todo), settings, engine) if todo else Engine("local", "nothing left to embed")
    summary = EmbedSummary(out=out, total=len(catalogue.uris), engine=chosen.name,
                           resumed=len(catalogue.uris) - len(todo), redone=resume.redo)
    writer = PartWriter(store, spec, settings.part_rows, plan=pending, done=done, part_seconds=settings.part_seconds)
    summary.resumed_embedded = writer.embedded
    run = run_ray if chosen.name == "ray" else run_local
    runtime = (decide_runtime if todo else choose_runtime)(settings.runtime, settings.device, spec,
                                                          settings.model_cache())
    first = (f"embedding {len(todo)} images with {spec.name} on the {chosen.name} engine ({chosen.why}) into {out}"
             f"; runtime {runtime}"
             + (f"; {summary.resumed} done by an earlier run" if summary.resumed else ""))
    log.info(first)
    if say:
        say(first)
    if progress:
        progress(writer.rows, summary.total, writer.errors)
    if todo:
        start = None
        for batch in run(todo, model, weights, settings, writer.mark_duplicates):
            start = start or time.monotonic()
            writer.add(batch)
            summary.nodes.update(n for n in batch.get("node", ()) if n)
            if progress:
                progress(writer.rows, summary.total, writer.errors)
        summary.seconds = time.monotonic() - start if start else 0.0
    summary.gate_sample = ensure_gate_sample(store, catalogue.uris, spec, model, weights, settings)
    stats = writer.close(source if isinstance(source, str) else "<list>")
    summary.embedded, summary.reasons = stats["embedded"], Counter(stats["reasons"])
    summary.duplicates = stats["duplicates"]
    return summary


def ensure_gate_sample(store, uris: list[str], spec, model: str, weights: str | None, settings: Settings) -> int:
    """The sample an index build learns its query-expansion gate from (gatesample.py), made before the run is
    marked finished, unless an earlier run of the same model made it; returns its size (0: none made)."""
    n = settings.qe_gate_sample
    rec = gatesample.record(store)
    if rec is not None and rec.get("model") == spec.fingerprint:
        return int(rec["count"])
    if n == 0 or not uris:
        return 0
    chosen = gatesample.choose(uris, n)
    log.info("query-expansion gate sample: %d catalogue images and a synthetic copy of each", len(chosen))
    embedder = embedder_for(model, weights, settings)  # the in-process engine's, cached: no second load
    originals, copies = gatesample.make(chosen, embedder.embed, spec.image_size, settings)
    if len(copies):
        gatesample.write(store, originals, copies, spec.fingerprint)
    return len(copies)


def _check_same_model(store, spec, done: dict[int, Finished]) -> None:
    """A rerun into a folder written by another model would mix vector spaces: refuse it, whether the
    earlier run finished (embeddings.json) or was killed (its chunks' done markers)."""
    try:
        meta = json.loads(store.get_bytes(META_KEY))
    except (NotFound, ValueError):
        meta = {}
    found = {meta.get("model", {}).get("fingerprint")} | {m.get("model") for f in done.values() for m in f.markers}
    other = found - {None, spec.fingerprint}
    if other:
        raise Incompatible(f"{store.url} holds embeddings of another model ({', '.join(sorted(other))}); this "
                           f"run uses {spec.name} ({spec.fingerprint}) — use another --out")
