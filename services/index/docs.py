"""A shard's docs: the ids it holds, their uris and their filterable fields, as a small parquet file beside the
shard (no faiss). A field is the column `field.<name>`: strings dictionary-encoded, nulls where a row has no
value."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.checksums import verified_bytes
from services.common.errors import Corrupt
from services.common.store import Store
from services.index.filters import Column
from services.index.layout import version_key
from services.index.manifest import Manifest, ShardEntry

FIELD = "field."
_ARROW = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def docs_bytes(ids: np.ndarray, uris: list[str], columns: dict[str, Column] | None = None) -> bytes:
    table = {"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())}
    for name, col in (columns or {}).items():
        table[FIELD + name] = _arrow(col)
    buf = io.BytesIO()
    pq.write_table(pa.table(table), buf)
    return buf.getvalue()


def _arrow(col: Column) -> pa.Array:
    mask = ~col.present
    if col.kind == "str":
        return pa.DictionaryArray.from_arrays(pa.array(col.values, pa.int32(), mask=mask),
                                              pa.array(col.dictionary.tolist(), pa.string()))
    return pa.array(col.values, _ARROW[col.kind], mask=mask)


def read_docs(store: Store, manifest: Manifest,
              entry: ShardEntry) -> tuple[np.ndarray, np.ndarray, dict[str, Column]]:
    """A shard's (ids sorted, their uris, their filterable fields' Columns), checksum verified."""
    data = verified_bytes(store, version_key(manifest.version, entry.docs_file), entry.docs_sha256)
    docs = pq.read_table(io.BytesIO(data))
    ids = docs["id"].to_numpy()
    order = np.argsort(ids)
    columns = {}
    for name, kind in manifest.fields.items():
        if FIELD + name not in docs.column_names:
            raise Corrupt(f"shard {entry.shard} of {manifest.version} has no column for field {name!r}")
        columns[name] = _column(kind, docs[FIELD + name].combine_chunks()).take(order)
    return ids[order], np.asarray(docs["uri"].to_pylist(), dtype=object)[order], columns


def _column(kind: str, arr: pa.Array) -> Column:
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if kind != "str":
        values = arr.fill_null(False if kind == "bool" else 0).to_numpy(zero_copy_only=False)
        return Column(kind, np.asarray(values, dtype={"int": np.int64, "float": np.float64, "bool": bool}[kind]),
                      present)
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    dictionary = np.asarray(arr.dictionary.to_pylist(), dtype=object)
    codes = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.argsort(dictionary) if len(dictionary) else np.zeros(0, np.int64)
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)  # codes into the sorted dictionary filters search
    return Column(kind, rank[codes] if len(order) else codes, present, dictionary[order])


def all_docs(store: Store, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's ids (sorted) and uris, as one catalogue."""
    parts = [read_docs(store, manifest, e)[:2] for e in manifest.shards]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    uris = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=object)
    order = np.argsort(ids)
    return ids[order], uris[order]
