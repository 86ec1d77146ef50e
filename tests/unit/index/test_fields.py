"""Filterable fields: which manifest columns an index takes, their kinds, and their columns surviving the docs
file (dictionary-encoded strings, nulls) and an add."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.checksums import sha256_bytes
from services.common.errors import InvalidInput
from services.common.store import LocalStore
from services.index import fields
from services.index.docs import docs_bytes, read_docs
from services.index.manifest import Manifest, ShardEntry

ROWS = [{"category": "shoes", "price": 10, "in_stock": True, "title": f"item {i}", "tags": ["a"], "note": "x" * 300}
        for i in range(1200)]
ROWS[3]["price"] = 12.5  # ints and floats: a float field
del ROWS[4]["category"]  # a row without a value


def test_star_takes_every_scalar_column_but_unique_strings_and_text():
    said: list[str] = []
    kinds = fields.choose_fields(ROWS, "*", said.append)
    assert kinds == {"category": "str", "in_stock": "bool", "price": "float"}
    assert "title (a different string on most rows)" in said[1] and "tags (not one scalar kind)" in said[1]
    assert "note (text over 256 characters)" in said[1]
    assert fields.choose_fields(ROWS, "", said.append) == {}


def test_fields_chosen_from_statistics_gathered_part_by_part_are_those_chosen_from_all_rows():
    """A streaming build (one embeddings part at a time) must choose what the in-memory build chooses."""
    rows = [dict(r) for r in ROWS]
    rows[1100]["price"] = "n/a"  # a late part makes price mixed: not filterable
    stats = fields.FieldStats()
    for start in range(0, len(rows), 250):
        stats.update(rows[start:start + 250])
    for asked in ("*", "category,in_stock"):
        assert fields.choose_fields(stats, asked, print) == fields.choose_fields(rows, asked, print)
    assert "price" not in fields.choose_fields(stats, "*", print)


def test_the_unique_string_rule_is_judged_on_the_first_rows_only(monkeypatch):
    monkeypatch.setattr(fields, "SAMPLE_ROWS", 1500)
    rows = [{"sku": f"s{i}" if i < 1500 else "same"} for i in range(10_000)]  # unique at first, then repeated
    stats = fields.FieldStats()
    for start in range(0, len(rows), 1000):
        stats.update(rows[start:start + 1000])
    assert len(stats.sample) == 1500 and stats.rows == 10_000
    assert fields.choose_fields(stats, "*", print) == {}


def test_named_fields_must_exist_and_be_of_one_kind():
    assert fields.choose_fields(ROWS, "title, price", print) == {"title": "str", "price": "float"}
    with pytest.raises(InvalidInput, match="--filterable colour: .*no column 'colour'"):
        fields.choose_fields(ROWS, "colour", print)
    with pytest.raises(InvalidInput, match="--filterable tags: its values are not all of one kind"):
        fields.choose_fields(ROWS, "tags", print)


def test_an_added_value_of_another_kind_is_refused_naming_the_field():
    kinds = {"price": "float", "in_stock": "bool"}
    assert fields.columns_of([{"price": 3, "in_stock": False}], kinds)["price"].python() == [3.0]
    with pytest.raises(InvalidInput, match="new/: field in_stock holds bool values in the index, int values here"):
        fields.columns_of([{"in_stock": 1}], kinds, "new/: ")


def test_columns_survive_the_docs_file_in_id_order(tmp_path):
    kinds = {"category": "str", "price": "float", "in_stock": "bool"}
    rows = ROWS[:6]
    columns = fields.columns_of(rows, kinds)
    ids = np.array([50, 10, 40, 20, 30, 60])
    blob = docs_bytes(ids, [f"u{i}" for i in ids], columns)
    store = LocalStore(tmp_path)
    store.put_bytes("versions/v1/shard-00000.docs.parquet", blob)
    entry = ShardEntry(shard=0, file="", sha256="", bytes=0, count=6, docs_file="shard-00000.docs.parquet",
                       docs_sha256=sha256_bytes(blob))
    manifest = Manifest(version="v1", created_at="", model={}, dim=4, factory="Flat", params={}, count=6,
                        shards=[entry], fields=kinds)
    got_ids, uris, got = read_docs(store, manifest, entry)
    order = np.argsort(ids)
    assert got_ids.tolist() == sorted(ids.tolist()) and uris.tolist() == [f"u{i}" for i in sorted(ids)]
    for name in kinds:
        assert got[name].python() == [columns[name].python()[i] for i in order], name
    assert got["category"].python()[order.tolist().index(4)] is None  # row 4 had no category
