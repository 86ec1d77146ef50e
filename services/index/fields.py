"""The filterable fields of an index: which metadata columns, of what kind, and their values per shard.

At build, a catalogue's manifest columns (the JSON `metadata` of each embedded row) become compact Columns
(services.common.filters.Column) stored in each shard's docs file beside its ids and uris, so they are
versioned and checksummed with the shard and follow it through add and delete.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from services.common.errors import InvalidInput
from services.common.filters import Column, column, kind_of

AUTO = "*"
MAX_STRING = 256  # longer strings are text (a description), not something to filter on by equality
MAX_FIELDS = 64
UNIQUE_SHARE = 0.5  # under "*", a string column with more distinct values than this share of rows is skipped
RESERVED = ("id", "uri")


def decode(metadata: list[str | None] | None, n: int) -> list[dict]:
    """The rows' metadata as dicts ({} for rows without)."""
    if metadata is None:
        return [{}] * n
    try:
        return [json.loads(m) if m else {} for m in metadata]
    except json.JSONDecodeError as e:
        raise InvalidInput(f"embeddings metadata is not valid JSON: {e.msg}") from None


def choose_fields(rows: list[dict], asked: str, step: Callable[[str], None]) -> dict[str, str]:
    """{field: kind} to index: the fields asked for (comma-separated; every one must exist and hold values of
    one kind), or with "*" every scalar column that is not a unique string; "" none."""
    asked = asked.strip()
    if not asked:
        return {}
    present = sorted({k for r in rows for k in r if k not in RESERVED})
    if asked == AUTO:
        return _auto(rows, present, step)
    names = [a.strip() for a in asked.split(",") if a.strip()]
    kinds = {}
    for name in names:
        if name not in present:
            raise InvalidInput(f"--filterable {name}: the catalogue's metadata has no column {name!r} "
                               f"(columns: {', '.join(present) or 'none: embed from a manifest with columns'})")
        values = [r.get(name) for r in rows]
        kind = kind_of(values)
        if kind is None:
            raise InvalidInput(f"--filterable {name}: its values are not all of one kind (strings, numbers or "
                               "true/false)")
        if kind == "str" and _longest(values) > MAX_STRING:
            raise InvalidInput(f"--filterable {name}: holds strings of over {MAX_STRING} characters (text, not "
                               "a value to filter on)")
        kinds[name] = kind
    if len(kinds) > MAX_FIELDS:
        raise InvalidInput(f"--filterable names {len(kinds)} fields; at most {MAX_FIELDS}")
    return kinds


def _auto(rows: list[dict], present: list[str], step: Callable[[str], None]) -> dict[str, str]:
    kinds, skipped = {}, []
    for name in present:
        values = [r.get(name) for r in rows]
        kind = kind_of(values)
        if kind is None:
            skipped.append(f"{name} (not one scalar kind)")
        elif kind == "str" and _longest(values) > MAX_STRING:
            skipped.append(f"{name} (text over {MAX_STRING} characters)")
        elif kind == "str" and len(rows) > 1000 and len(set(values)) > UNIQUE_SHARE * len(rows):
            skipped.append(f"{name} (a different string on most rows)")
        elif len(kinds) >= MAX_FIELDS:
            skipped.append(f"{name} (over {MAX_FIELDS} fields)")
        else:
            kinds[name] = kind
    if kinds:
        step("filterable fields: " + ", ".join(f"{k} ({v})" for k, v in kinds.items()))
    if skipped:
        step("not filterable: " + ", ".join(skipped) + " (--filterable names the fields to index)")
    return kinds


def _longest(values: list) -> int:
    return max((len(v) for v in values if isinstance(v, str)), default=0)


def columns_of(rows: list[dict], kinds: dict[str, str], where: str = "") -> dict[str, Column]:
    """The Columns of rows for the fields kinds declares (an absent value is None); a value of another kind
    than the field's is InvalidInput naming it (ints are welcome in a float field)."""
    out = {}
    for name, kind in kinds.items():
        values = [r.get(name) for r in rows]
        got = kind_of(values)
        if got is not None and got != kind and not (kind == "float" and got == "int"):
            raise InvalidInput(f"{where}field {name} holds {kind} values in the index, {got} values here")
        if got is None and any(v is not None for v in values):
            raise InvalidInput(f"{where}field {name} holds {kind} values in the index; these are of mixed kinds")
        if kind == "float":
            values = [None if v is None else float(v) for v in values]
        out[name] = column(kind, values)
    return out


def take(columns: dict[str, Column], rows: np.ndarray) -> dict[str, Column]:
    return {name: col.take(rows) for name, col in columns.items()}


def concat(kinds: dict[str, str], first: dict[str, Column], second: dict[str, Column]) -> dict[str, Column]:
    """first's rows then second's, per field (string dictionaries merged)."""
    return {name: column(kind, first[name].python() + second[name].python()) for name, kind in kinds.items()}
