"""Batch embedding of a catalogue: list -> read + decode (CPU) -> model -> parquet parts.

The same two stage functions run in-process (small catalogues: Ray start-up costs seconds)
or as Ray Data `map_batches` stages: decode as CPU tasks, the model as an actor pool
(one GPU per actor when there are GPUs).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow.compute as pc

from services.common.checksums import sha256_bytes
from services.common.config import Settings, get_settings
from services.common.errors import ImsearchError, Incompatible, InvalidInput, NotFound, Unavailable
from services.common.folders import IMAGE_EXTENSIONS, is_image_name
from services.common.images import decode_image, probe_image
from services.common.store import open_store, read_uri
from services.embedder.embeddings import META_KEY, Finished, PartWriter, plan_chunks, resume_state
from services.embedder.gpu_decode import JPEG_MODES
from services.embedder.spec import resolve_spec

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
Batch = dict[str, np.ndarray]
Progress = Callable[[int, int, int], None]  # (rows done, total, errors so far)
PREFETCH = 2  # batches whose bytes are fetched ahead of the model


@dataclass
class Catalogue:
    """What to embed, in a stable order: uris, and from a manifest optionally ids and metadata."""
    uris: list[str]
    ids: list[int] | None = None
    metadata: list[str | None] | None = None


def list_images(source: str, settings: Settings | None = None) -> list[str]:
    """Image uris of a folder, an s3://bucket/prefix, or a manifest file (parquet/csv/txt of uris)."""
    return list_catalogue(source, settings).uris


def list_catalogue(source: str, settings: Settings | None = None) -> Catalogue:
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        return read_manifest(source, settings)
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


def fetch_batch(batch: Batch, settings: Settings) -> Batch:
    """I/O stage: the bytes of every uri. A missing or unreadable file is that row's error; storage that
    stays unreachable (after the store's retries) stops the run instead — a rerun resumes it, whereas
    error rows would be final."""
    data, err = [], []
    for uri in batch["uri"]:
        try:
            data.append(read_uri(str(uri), settings))
            err.append("")
        except Unavailable:
            raise
        except ImsearchError as e:
            data.append(b"")
            err.append(str(e))
    return {**batch, "data": np.array(data, dtype=object), "read_error": np.array(err, dtype=object)}


def decode_batch(batch: Batch, size: int, settings: Settings, defer_jpeg: bool = False) -> Batch:
    """CPU stage: read bytes (unless fetched already), hash, decode. A bad image becomes an error row,
    never an exception. defer_jpeg (the model runs on a GPU): plain JPEGs are only checked here and
    travel as bytes in a `jpeg` column, for the model stage to decode on the device."""
    if "data" not in batch:
        batch = fetch_batch(batch, settings)
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    sha, err, jpeg = [""] * n, [str(e) for e in batch["read_error"]], [b""] * n
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    limits = (settings.max_image_bytes, settings.max_image_pixels)
    for i, data in enumerate(batch["data"]):
        if err[i]:
            continue
        try:
            sha[i] = sha256_bytes(data)
            if defer_jpeg:
                fmt, mode, width[i], height[i] = probe_image(data, *limits)
                if fmt == "JPEG" and mode in JPEG_MODES:
                    jpeg[i] = data
                    continue
            d = decode_image(data, size, *limits)
            pixels[i], width[i], height[i] = d.pixels, d.width, d.height
        except ImsearchError as e:
            err[i] = str(e)
    out = {"uri": np.array(uris, dtype=object), "sha256": np.array(sha, dtype=object),
           "width": width, "height": height, "error": np.array(err, dtype=object), "pixels": pixels}
    if defer_jpeg:
        out["jpeg"] = np.array(jpeg, dtype=object)
    return out


class EmbedStage:
    """Model stage (a Ray actor in the Ray path): embeds the rows that decoded."""

    def __init__(self, model: str, weights: str | None = None, device: str = "auto"):
        from services.embedder.models import load_embedder  # torch: only where images get embedded

        self.embedder = load_embedder(model, weights, device)

    @property
    def on_gpu(self) -> bool:
        return self.embedder.device.type == "cuda"

    def __call__(self, batch: Batch) -> Batch:
        error = batch["error"].copy()
        pixels = self._device_pixels(batch, error)
        ok = np.array([not e for e in error], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.spec.dim), np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed(pixels[ok])
        out = {k: v for k, v in batch.items() if k not in ("pixels", "jpeg")}
        out["error"], out["vector"] = error, vectors
        return out

    def _device_pixels(self, batch: Batch, error: np.ndarray):
        """The batch's pixels; JPEGs left undecoded by decode_batch(defer_jpeg) are decoded on the
        model's device here (a decode failure becomes that row's error)."""
        jpeg = batch.get("jpeg")
        rows = [i for i in range(len(error)) if jpeg is not None and len(jpeg[i]) and not error[i]]
        if not rows:
            return batch["pixels"]
        import torch

        from services.embedder.gpu_decode import decode_on_device

        size, device = batch["pixels"].shape[1], self.embedder.device
        pixels = torch.from_numpy(batch["pixels"]).to(device)
        try:  # one batched call (nvjpeg's fast path); it fails whole, so then row by row
            pixels[rows] = decode_on_device([jpeg[i] for i in rows], size, device)
        except RuntimeError:
            for i in rows:
                try:
                    pixels[i] = decode_on_device([jpeg[i]], size, device)[0]
                except RuntimeError as e:
                    error[i] = f"corrupt JPEG data: {str(e).splitlines()[0]}"
        return pixels


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
        return text


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _run_local(uris: list[str], model: str, weights: str | None, settings: Settings,
               before_model: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
    size = resolve_spec(model, weights).image_size
    stage = EmbedStage(model, weights, settings.device)
    # Threads fetch the next batches' bytes (I/O: S3 latency hides behind the model); decoding runs
    # here, between forwards. Decoding in threads beside torch's own threads measured slower: every
    # intra-op barrier waits for the core a decode thread took.
    with ThreadPoolExecutor(max_workers=PREFETCH) as pool:  # one thread per batch in flight
        batches = [{"uri": np.array(c, dtype=object)} for c in _chunks(uris, settings.batch_size)]
        futures = [pool.submit(fetch_batch, b, settings) for b in batches[:PREFETCH]]
        for i in range(len(batches)):
            fetched = futures[i].result()
            if i + PREFETCH < len(batches):
                futures.append(pool.submit(fetch_batch, batches[i + PREFETCH], settings))
            futures[i] = None  # free the bytes
            batch = decode_batch(fetched, size, settings, defer_jpeg=stage.on_gpu)
            if before_model:
                before_model(batch)
            yield stage(batch)


def _run_ray(uris: list[str], model: str, weights: str | None, settings: Settings,
             before_model: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
    """before_model is not called: the stages run in other processes. Duplicates are still dropped
    when written (PartWriter.add), after the actors embedded them."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own bar
    ctx.execution_options.preserve_order = True  # parts are cut at chunk boundaries, in catalogue order
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # Settings travel as stage arguments, so no IMSEARCH_* secrets go into Ray's runtime env.
        # No address: a private instance ("local"), never whatever `ray start` left running on this host.
        ray.init(address=settings.ray_address or "local", include_dashboard=False, log_to_driver=False)
    from services.embedder.models import pick_device

    gpus = 1 if pick_device(settings.device).type == "cuda" else 0
    size = resolve_spec(model, weights).image_size
    ds = ray.data.from_items([{"uri": u} for u in uris])
    ds = ds.map_batches(decode_batch, batch_size=settings.batch_size, batch_format="numpy",
                        fn_kwargs={"size": size, "settings": settings, "defer_jpeg": bool(gpus)}, num_cpus=1)
    ds = ds.map_batches(EmbedStage, batch_size=settings.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model": model, "weights": weights, "device": settings.device},
                        compute=ray.data.ActorPoolStrategy(size=settings.ray_actors),  # `concurrency`: deprecated
                        num_gpus=gpus, num_cpus=0 if gpus else 1)
    yield from ds.iter_batches(batch_size=settings.batch_size, batch_format="numpy")


def choose_engine(n: int, settings: Settings, engine: str = "auto") -> str:
    if engine not in ("auto", "local", "ray"):
        raise InvalidInput(f"engine must be auto, local or ray, not {engine!r}")
    if engine == "auto":
        return "ray" if settings.ray_address or n >= settings.ray_min_images else "local"
    return engine


def embed_catalogue(source: str | Iterable[str], out: str, model: str | None = None,
                    weights: str | None = None, engine: str = "auto",
                    settings: Settings | None = None, progress: Progress | None = None) -> EmbedSummary:
    """Embed every image of source into parquet parts under out; returns what happened.

    Resumes: chunks a previous run over the same catalogue finished are skipped, not re-embedded."""
    settings = settings or get_settings()
    model = model or settings.model
    weights = weights or (str(settings.model_weights) if settings.model_weights else None)
    catalogue = list_catalogue(source, settings) if isinstance(source, str) else Catalogue(list(source))
    spec = resolve_spec(model, weights)
    store = open_store(out, settings)
    chunks = plan_chunks(catalogue.uris, settings.part_rows, catalogue.ids, catalogue.metadata)
    resume = resume_state(store, chunks)
    done = resume.done
    _check_same_model(store, spec, done)
    for reason in resume.redo:
        log.warning("embedding a chunk again: %s", reason)
    pending = [c for c in chunks if c.number not in done]
    todo = [u for c in pending for u in c.uris]
    summary = EmbedSummary(out=out, total=len(catalogue.uris), engine=choose_engine(len(todo), settings, engine),
                           resumed=len(catalogue.uris) - len(todo), redone=resume.redo)
    writer = PartWriter(store, spec, settings.part_rows, plan=pending, done=done)
    summary.resumed_embedded = writer.embedded
    run = _run_ray if summary.engine == "ray" else _run_local
    log.info("embedding %d images with %s via %s into %s (%d already done)", len(todo), spec.name,
             summary.engine, out, summary.resumed)
    if progress:
        progress(writer.rows, summary.total, writer.errors)
    if todo:
        for batch in run(todo, model, weights, settings, writer.mark_duplicates):
            writer.add(batch)
            if progress:
                progress(writer.rows, summary.total, writer.errors)
    stats = writer.close(source if isinstance(source, str) else "<list>")
    summary.embedded, summary.reasons = stats["embedded"], Counter(stats["reasons"])
    summary.duplicates = stats["duplicates"]
    return summary


def _check_same_model(store, spec, done: dict[int, Finished]) -> None:
    """A rerun into a folder written by another model would mix vector spaces: refuse it, whether the
    earlier run finished (embeddings.json) or was killed (its chunks' done markers)."""
    try:
        meta = json.loads(store.get_bytes(META_KEY))
    except (NotFound, ValueError):
        meta = {}
    found = {meta.get("model", {}).get("fingerprint")} | {f.marker.get("model") for f in done.values()}
    other = found - {None, spec.fingerprint}
    if other:
        raise Incompatible(f"{store.url} holds embeddings of another model ({', '.join(sorted(other))}); this "
                           f"run uses {spec.name} ({spec.fingerprint}) — use another --out")
