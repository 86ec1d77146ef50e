"""A shard's docs: the ids it holds and their uris, as a small parquet file beside the shard (no faiss)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.checksums import verified_bytes
from services.common.store import Store
from services.index.layout import version_key
from services.index.manifest import Manifest, ShardEntry


def docs_bytes(ids: np.ndarray, uris: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())}), buf)
    return buf.getvalue()


def read_docs(store: Store, manifest: Manifest, entry: ShardEntry) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (ids sorted, their uris), checksum verified."""
    data = verified_bytes(store, version_key(manifest.version, entry.docs_file), entry.docs_sha256)
    docs = pq.read_table(io.BytesIO(data))
    ids = docs["id"].to_numpy()
    order = np.argsort(ids)
    return ids[order], np.asarray(docs["uri"].to_pylist(), dtype=object)[order]


def all_docs(store: Store, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's ids (sorted) and uris, as one catalogue."""
    parts = [read_docs(store, manifest, e) for e in manifest.shards]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    uris = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=object)
    order = np.argsort(ids)
    return ids[order], uris[order]
