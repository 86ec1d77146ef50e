"""The embeddings format: parquet parts plus `embeddings.json`, written last (run complete).

Row columns: id (int64: content hash, or the manifest's id), uri, sha256, width, height, error (null
when ok), vector (fixed-size list of float32, null on error rows), metadata (JSON of the manifest's
other columns, or null).

Resumable runs: the catalogue is cut into chunks of part_rows images in a stable order. A chunk is written
in one or more pieces: whenever part_seconds of work have passed (so a killed run loses under a minute at any
speed), and when the chunk is complete. The piece of chunk i starting at row r is
`parts/part-<i>-<digest of the chunk's uris>[-at-<r>].parquet` (no suffix for r = 0), then its marker
`done/<same name>.json` (rows, errors, the part's checksum, a checksum of the marker itself). A rerun
keeps each chunk's verified pieces from row 0 on and embeds the rest, so a killed run loses at most the piece
in flight, nothing is embedded twice, and a damaged or missing part is embedded again from where it starts.
Markers live in `done/` (not beside the parts) so `parts/` stays a plain parquet dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.common.checksums import read_sealed_json, sealed_json, sha256_bytes, verified_bytes
from services.common.errors import Corrupt, InvalidInput, NotFound
from services.common.faults import crash_point
from services.common.store import Store

META_KEY = "embeddings.json"
FORMAT = 1


ERRORS_KEY = "errors.parquet"


def schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("uri", pa.string()), ("sha256", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim)), ("metadata", pa.string())])


@dataclass
class Chunk:
    """part_rows consecutive catalogue entries: the unit of writing and of resuming."""
    number: int
    uris: list[str]
    ids: list[int] | None = None
    metadata: list[str | None] | None = None

    @property
    def name(self) -> str:
        h = hashlib.sha256("\n".join(self.uris).encode())
        h.update(json.dumps([self.ids, self.metadata]).encode())
        return f"part-{self.number:06d}-{h.hexdigest()[:12]}"


def plan_chunks(uris: list[str], rows: int, ids: list[int] | None = None,
                metadata: list[str | None] | None = None) -> list[Chunk]:
    return [Chunk(n, uris[i:i + rows], None if ids is None else ids[i:i + rows],
                  None if metadata is None else metadata[i:i + rows])
            for n, i in enumerate(range(0, len(uris), rows))]


def piece_name(chunk: Chunk, start: int) -> str:
    return chunk.name if start == 0 else f"{chunk.name}-at-{start:06d}"


def _part_order(part: dict) -> tuple[int, int, str]:
    """Parts in catalogue order: by chunk number, then by the row their piece starts at."""
    m = re.search(r"part-(\d+)(?:-[0-9a-f]+)?(?:-at-(\d+))?\.parquet$", part["key"])
    return (int(m.group(1)), int(m.group(2) or 0), part["key"]) if m else (-1, 0, part["key"])


@dataclass
class Finished:
    """What an earlier run wrote of one chunk, verified, from its row 0 on: the pieces' done markers and
    their rows' uri, sha256 and error columns."""
    markers: list[dict]
    table: pa.Table

    @property
    def rows(self) -> int:
        return self.table.num_rows


@dataclass
class Resume:
    done: dict[int, Finished]  # chunk number -> what earlier runs wrote of it (verified): all of it, or a start
    redo: list[str]  # pieces with a marker that failed verification, and why: embedded again

    def written(self, chunk: Chunk) -> int:
        """Rows of chunk already written."""
        return self.done[chunk.number].rows if chunk.number in self.done else 0


def marker_bytes(part: dict, model: str) -> bytes:
    """A done marker: the part's key, rows and checksum, the model, and a checksum of the marker itself."""
    return sealed_json({**part, "model": model})


def _read_marker(data: bytes) -> dict:
    marker = read_sealed_json(data)
    if not isinstance(marker.get("sha256"), str):
        raise ValueError("marker names no part checksum")
    return marker


def resume_state(store: Store, chunks: list[Chunk]) -> Resume:
    """What earlier runs wrote, each piece verified before it is trusted: its marker matches its own
    checksum, its part is there and matches the checksum in the marker, and it holds the chunk's next uris.
    A chunk is kept up to its first piece that fails; the rest is embedded again. (One listing, not one
    request per chunk; each finished part is read once, here.)"""
    present = set(store.list("parts")) | set(store.list("done"))
    resume = Resume({}, [])
    for c in chunks:
        markers, tables, start = [], [], 0
        while start < len(c.uris) and f"done/{piece_name(c, start)}.json" in present:
            name = piece_name(c, start)
            problem, marker, table = _verify_piece(store, name, c.uris[start:])
            if problem:
                resume.redo.append(f"{name}: {problem}")
                break
            markers.append(marker)
            tables.append(table)
            start += table.num_rows
        if markers:
            resume.done[c.number] = Finished(markers, pa.concat_tables(tables))
    return resume


def _verify_piece(store: Store, name: str, due: list[str]) -> tuple[str, dict, pa.Table | None]:
    """(what is wrong with it or "", its marker, its uri/sha256/error rows)."""
    try:
        marker = _read_marker(store.get_bytes(f"done/{name}.json"))
    except (ValueError, UnicodeDecodeError):
        return "damaged done marker", {}, None
    try:
        data = verified_bytes(store, f"parts/{name}.parquet", marker["sha256"])
    except NotFound:
        return "part missing", marker, None
    except Corrupt:
        return "damaged part (checksum mismatch)", marker, None
    table = pq.read_table(io.BytesIO(data), columns=["uri", "sha256", "error"])
    if table["uri"].to_pylist() != due[:table.num_rows]:
        return "holds other images than the catalogue's next ones", marker, None
    return "", marker, table


def id_from_sha256(sha: str) -> int:
    """Content-hash id: the first 63 bits of the sha256 (faiss ids are int64)."""
    return int(sha[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def reason_of(error: str) -> str:
    """Group error messages for the summary ('file too large: 123 bytes' -> 'file too large')."""
    return error.split(":")[0]


class PartWriter:
    """Buffers embedded rows, drops duplicate images, writes parquet parts atomically.

    With a plan (the chunks still to embed, in order) parts are pieces of chunks: cut at chunk boundaries
    and whenever part_seconds passed since the last one, named by chunk and first row, each followed by its
    done marker; `done` holds what earlier runs wrote of each chunk (a chunk of the plan with rows in `done`
    continues after them). Without a plan, a part every part_rows rows (synthetic data)."""

    def __init__(self, store: Store, spec, part_rows: int = 5000, plan: list[Chunk] | None = None,
                 done: dict[int, Finished] | None = None, part_seconds: float = float("inf")):
        self.store, self.spec, self.part_rows, self.part_seconds = store, spec, part_rows, part_seconds
        self.plan = list(plan) if plan is not None else None
        self.written = {n: f.rows for n, f in (done or {}).items()}  # rows of each chunk already in parts
        self.offset = self._written_of_next()  # rows of plan[0] in parts, before the buffer
        self.last_write = time.monotonic()
        self.done = [m for n in sorted(done or {}) for m in done[n].markers]
        self.buffer: list[dict] = []
        self.parts: list[dict] = []
        self.seen: dict[str, str] = {}  # sha256 -> first uri
        self.failed: list[tuple[str, str]] = []  # (uri, error) of this run
        self.rows = self.embedded = self.errors = self.duplicates = 0
        self.reasons: dict[str, int] = {}
        for n in sorted(done or {}):
            self._resume(done[n].table)

    def _resume(self, table: pa.Table) -> None:
        """Count a finished part (from its verified rows, not the marker's figures) and remember its images,
        so later duplicates are still caught."""
        for uri, sha, err in zip(*(table[c].to_pylist() for c in ("uri", "sha256", "error"))):
            self.rows += 1
            if err is None:
                self.seen.setdefault(sha, uri)
                self.embedded += 1
            else:
                self.failed.append((uri, err))
                self.errors += 1
                self.reasons[reason_of(err)] = self.reasons.get(reason_of(err), 0) + 1

    def mark_duplicates(self, batch: dict) -> None:
        """Before the model: with content ids, a row whose image was already seen (earlier, or higher in
        this batch) becomes a duplicate row, so the same image is never embedded twice. User ids keep
        every row (two catalogue entries may share an image); `add` still counts those."""
        if self.plan and self.plan[0].ids is not None:
            return
        first: dict[str, str] = {}
        for i, sha in enumerate(batch["sha256"]):
            if batch["error"][i] or not sha:
                continue
            earlier = self.seen.get(sha) or first.get(sha)
            if earlier:
                batch["error"][i] = f"duplicate: same content as {earlier}"
                self.duplicates += 1
            else:
                first[sha] = str(batch["uri"][i])

    def add(self, batch: dict) -> None:
        for i, uri in enumerate(batch["uri"]):
            chunk, pos = (self.plan[0] if self.plan else None), self.offset + len(self.buffer)
            if chunk is not None and chunk.uris[pos] != uri:
                raise Corrupt(f"embedding pipeline returned {uri} where {chunk.uris[pos]} was due")
            user_id = chunk.ids[pos] if chunk is not None and chunk.ids is not None else None
            sha, err = str(batch["sha256"][i]), str(batch["error"][i])
            if not err and sha in self.seen:
                self.duplicates += 1
                if user_id is None:  # content ids: the same image twice is one catalogue entry
                    err = f"duplicate: same content as {self.seen[sha]}"
            row = {"id": user_id if user_id is not None else id_from_sha256(sha) if sha else None,
                   "uri": str(uri), "sha256": sha or None, "width": int(batch["width"][i]),
                   "height": int(batch["height"][i]), "error": err or None,
                   "vector": None if err else batch["vector"][i],
                   "metadata": chunk.metadata[pos] if chunk is not None and chunk.metadata
                   else batch["metadata"][i] if "metadata" in batch else None}
            if err:
                self.errors += 1
                self.reasons[reason_of(err)] = self.reasons.get(reason_of(err), 0) + 1
                self.failed.append((str(uri), err))
            else:
                self.seen.setdefault(sha, str(uri))
                self.embedded += 1
            self.buffer.append(row)
            self.rows += 1
            if chunk is not None and pos + 1 == len(chunk.uris):
                self._flush_piece()
                self.plan.pop(0)
                self.offset = self._written_of_next()
            elif chunk is None and len(self.buffer) >= self.part_rows:
                self._flush(f"part-{len(self.parts):05d}")
        if self.plan and self.buffer and time.monotonic() - self.last_write >= self.part_seconds:
            self._flush_piece()  # a slow chunk is written in pieces: a kill loses under part_seconds of work

    def _written_of_next(self) -> int:
        return self.written.get(self.plan[0].number, 0) if self.plan else 0

    def _flush_piece(self) -> None:
        rows = len(self.buffer)
        self._flush(piece_name(self.plan[0], self.offset), marker=True)
        self.offset += rows

    def _flush(self, name: str, marker: bool = False) -> None:
        self.last_write = time.monotonic()
        if not self.buffer:
            return
        cols = {name: [r[name] for r in self.buffer] for name in schema(self.spec.dim).names}
        cols["vector"] = [None if v is None else np.asarray(v, np.float32) for v in cols["vector"]]
        table = pa.Table.from_pydict(cols, schema=schema(self.spec.dim))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        self.store.put_bytes(f"parts/{name}.parquet", data)
        crash_point("embed.part-written")
        reasons: dict[str, int] = {}
        for e in cols["error"]:
            if e:
                reasons[reason_of(e)] = reasons.get(reason_of(e), 0) + 1
        part = {"key": f"parts/{name}.parquet", "rows": table.num_rows, "reasons": reasons,
                "embedded": sum(e is None for e in cols["error"]), "sha256": sha256_bytes(data)}
        if marker:  # written after the part: a marker always names a complete part
            self.store.put_bytes(f"done/{name}.json", marker_bytes(part, self.spec.fingerprint))
            crash_point("embed.marker-written")
        self.parts.append(part)
        self.buffer = []

    def close(self, source: str) -> dict:
        if self.plan:
            raise Corrupt(f"the embedding pipeline ended with {len(self.plan)} chunk(s) unwritten")
        self._flush(f"part-{len(self.parts):05d}")
        uris, errors = zip(*self.failed) if self.failed else ((), ())
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": pa.array(uris, pa.string()), "error": pa.array(errors, pa.string())}), buf)
        self.store.put_bytes(ERRORS_KEY, buf.getvalue())
        parts = sorted(self.done + self.parts, key=_part_order)
        meta = {"format": FORMAT, "model": self.spec.describe(), "dim": self.spec.dim, "source": source,
                "rows": self.rows, "embedded": self.embedded, "errors": self.errors, "reasons": self.reasons,
                "duplicates": self.duplicates, "errors_file": ERRORS_KEY, "resumed_parts": len(self.done),
                "parts": [{k: p[k] for k in ("key", "rows", "sha256")} for p in parts],
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.put_bytes(META_KEY, json.dumps(meta, indent=1).encode())
        return meta


@dataclass
class Embeddings:
    meta: dict
    ids: np.ndarray  # int64 (N,)
    vectors: np.ndarray  # float32 (N, dim)
    uris: list[str]
    errors: pa.Table  # the error rows: uri, error
    metadata: list[str | None] | None = None  # per row: JSON of the manifest's other columns (None: none)


def read_meta(store: Store) -> dict:
    try:
        meta = json.loads(store.get_bytes(META_KEY))
    except NotFound:
        raise NotFound(f"{store.url} holds no {META_KEY}: not an embeddings folder, or the embed run "
                       "did not finish") from None
    except json.JSONDecodeError as e:
        raise Corrupt(f"{store.uri(META_KEY)} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise InvalidInput(f"{store.uri(META_KEY)}: unsupported embeddings format {meta.get('format')}")
    return meta


def read_embeddings(store: Store) -> Embeddings:
    """All embedded rows of a finished run, checksums verified."""
    meta = read_meta(store)
    tables = []
    for part in meta["parts"]:
        tables.append(pq.read_table(io.BytesIO(verified_bytes(store, part["key"], part["sha256"]))))
    table = pa.concat_tables(tables) if tables else schema(meta["dim"]).empty_table()
    ok = table.filter(pc.is_null(table["error"]))
    vectors = vectors_of(ok, meta["dim"])
    errors = table.filter(pc.invert(pc.is_null(table["error"]))).select(["uri", "error"])
    metadata = ok["metadata"].to_pylist() if "metadata" in ok.column_names else None
    if metadata is not None and not any(metadata):
        metadata = None
    return Embeddings(meta, ok["id"].to_numpy().astype(np.int64), vectors, ok["uri"].to_pylist(), errors,
                      metadata)


def read_part(store: Store, part: dict, columns: list[str]) -> pa.Table:
    """The embedded (not error) rows of one part, its checksum verified."""
    data = io.BytesIO(verified_bytes(store, part["key"], part["sha256"]))
    present = set(pq.read_schema(data).names)
    table = pq.read_table(data, columns=[c for c in dict.fromkeys(["error", *columns]) if c in present])
    return table.filter(pc.is_null(table["error"])).select([c for c in columns if c in present])


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """The vector column of embedded rows as one (rows, dim) float32 array."""
    if not table.num_rows:
        return np.zeros((0, dim), np.float32)
    flat = table["vector"].combine_chunks().values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(table.num_rows, dim)
