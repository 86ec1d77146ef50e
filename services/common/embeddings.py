"""The embeddings format: parquet parts plus `embeddings.json`, written last (run complete).

Row columns: id (int64, content hash), uri, sha256, width, height, error (null when ok),
vector (fixed-size list of float32, null on error rows).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.common.checksums import sha256_bytes
from services.common.errors import Corrupt, InvalidInput, NotFound
from services.common.store import Store

META_KEY = "embeddings.json"
FORMAT = 1


def schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("uri", pa.string()), ("sha256", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim))])


def id_from_sha256(sha: str) -> int:
    """Content-hash id: the first 63 bits of the sha256 (faiss ids are int64)."""
    return int(sha[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def reason_of(error: str) -> str:
    """Group error messages for the summary ('file too large: 123 bytes' -> 'file too large')."""
    return error.split(":")[0]


class PartWriter:
    """Buffers embedded rows, drops duplicate images, writes parquet parts atomically."""

    def __init__(self, store: Store, spec, part_rows: int = 5000):
        self.store, self.spec, self.part_rows = store, spec, part_rows
        self.buffer: list[dict] = []
        self.parts: list[dict] = []
        self.seen: dict[str, str] = {}  # sha256 -> first uri
        self.rows = self.embedded = self.errors = 0
        self.reasons: dict[str, int] = {}

    def add(self, batch: dict) -> None:
        for i, uri in enumerate(batch["uri"]):
            sha, err = str(batch["sha256"][i]), str(batch["error"][i])
            if not err and sha in self.seen:
                err = f"duplicate: same content as {self.seen[sha]}"
            row = {"id": id_from_sha256(sha) if sha else None, "uri": str(uri), "sha256": sha or None,
                   "width": int(batch["width"][i]), "height": int(batch["height"][i]), "error": err or None,
                   "vector": None if err else batch["vector"][i]}
            if err:
                self.errors += 1
                self.reasons[reason_of(err)] = self.reasons.get(reason_of(err), 0) + 1
            else:
                self.seen[sha] = str(uri)
                self.embedded += 1
            self.buffer.append(row)
            self.rows += 1
            if len(self.buffer) >= self.part_rows:
                self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        cols = {name: [r[name] for r in self.buffer] for name in schema(self.spec.dim).names}
        cols["vector"] = [None if v is None else np.asarray(v, np.float32) for v in cols["vector"]]
        table = pa.Table.from_pydict(cols, schema=schema(self.spec.dim))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        key = f"parts/part-{len(self.parts):05d}.parquet"
        data = buf.getvalue()
        self.store.put_bytes(key, data)
        self.parts.append({"key": key, "rows": table.num_rows, "sha256": sha256_bytes(data)})
        self.buffer = []

    def close(self, source: str) -> dict:
        self._flush()
        meta = {"format": FORMAT, "model": self.spec.describe(), "dim": self.spec.dim, "source": source,
                "rows": self.rows, "embedded": self.embedded, "errors": self.errors, "reasons": self.reasons,
                "parts": self.parts, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.put_bytes(META_KEY, json.dumps(meta, indent=1).encode())
        return meta


@dataclass
class Embeddings:
    meta: dict
    ids: np.ndarray  # int64 (N,)
    vectors: np.ndarray  # float32 (N, dim)
    uris: list[str]
    errors: pa.Table  # the error rows: uri, error


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
        data = store.get_bytes(part["key"])
        if sha256_bytes(data) != part["sha256"]:
            raise Corrupt(f"{store.uri(part['key'])}: checksum mismatch (file changed or damaged)")
        tables.append(pq.read_table(io.BytesIO(data)))
    table = pa.concat_tables(tables) if tables else schema(meta["dim"]).empty_table()
    ok = table.filter(pc.is_null(table["error"]))
    dim = meta["dim"]
    flat = ok["vector"].combine_chunks().values.to_numpy(zero_copy_only=False) if ok.num_rows else np.zeros(0)
    vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(ok.num_rows, dim)
    errors = table.filter(pc.invert(pc.is_null(table["error"]))).select(["uri", "error"])
    return Embeddings(meta, ok["id"].to_numpy().astype(np.int64), vectors, ok["uri"].to_pylist(), errors)
