"""The filterable fields of an index: which metadata columns, of what kind, and their values per shard.

At build, a catalogue's manifest columns (the JSON `metadata` of each embedded row) become compact Columns
(services.index.filters.Column) stored in each shard's docs file beside its ids and uris, so they are
versioned and checksummed with the shard and follow it through add and delete.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from services.common.errors import InvalidInput
from services.index.filters import Column, column, kind_of, kind_of_kinds, value_kind

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


SAMPLE_ROWS = 200_000  # the "different string on most rows" rule is judged on the catalogue's first rows


class FieldStats:
    """What choosing the fields needs to know of a catalogue's metadata, gathered a batch of rows at a time in
    bounded memory (so a streaming build sees what an in-memory one sees): the columns present, the kinds of
    their values, their longest string, and the values of the first SAMPLE_ROWS rows."""

    def __init__(self) -> None:
        self.rows = 0
        self.kinds: dict[str, set] = {}
        self.longest: dict[str, int] = {}
        self.sample: list[dict] = []

    def update(self, rows: list[dict]) -> None:
        for name in {k for r in rows for k in r if k not in RESERVED}:
            values = [r.get(name) for r in rows]
            self.kinds.setdefault(name, set()).update({value_kind(v) for v in values if v is not None})
            self.longest[name] = max(self.longest.get(name, 0), _longest(values))
        self.sample.extend(rows[:max(0, SAMPLE_ROWS - len(self.sample))])
        self.rows += len(rows)

    def kind(self, name: str) -> str | None:
        """As filters.kind_of over every row of the field."""
        return kind_of_kinds(self.kinds.get(name, set()))

    def mostly_unique(self, name: str) -> bool:
        values = [r.get(name) for r in self.sample]
        return len(values) > 1000 and len(set(values)) > UNIQUE_SHARE * len(values)


def stats_of(rows: list[dict]) -> FieldStats:
    stats = FieldStats()
    stats.update(rows)
    return stats


def choose_fields(stats: FieldStats | list[dict], asked: str, step: Callable[[str], None]) -> dict[str, str]:
    """{field: kind} to index: the fields asked for (comma-separated; every one must exist and hold values of
    one kind), or with "*" every scalar column that is not a unique string; "" none. stats: of the catalogue's
    rows (or the rows themselves)."""
    asked = asked.strip()
    if not asked:
        return {}
    if isinstance(stats, list):
        stats = stats_of(stats)
    present = sorted(stats.kinds)
    if asked == AUTO:
        return _auto(stats, present, step)
    names = [a.strip() for a in asked.split(",") if a.strip()]
    kinds = {}
    for name in names:
        if name not in present:
            raise InvalidInput(f"--filterable {name}: the catalogue's metadata has no column {name!r} "
                               f"(columns: {', '.join(present) or 'none: embed from a manifest with columns'})")
        kind = stats.kind(name)
        if kind is None:
            raise InvalidInput(f"--filterable {name}: its values are not all of one kind (strings, numbers or "
                               "true/false)")
        if kind == "str" and stats.longest[name] > MAX_STRING:
            raise InvalidInput(f"--filterable {name}: holds strings of over {MAX_STRING} characters (text, not "
                               "a value to filter on)")
        kinds[name] = kind
    if len(kinds) > MAX_FIELDS:
        raise InvalidInput(f"--filterable names {len(kinds)} fields; at most {MAX_FIELDS}")
    return kinds


def _auto(stats: FieldStats, present: list[str], step: Callable[[str], None]) -> dict[str, str]:
    kinds, skipped = {}, []
    for name in present:
        kind = stats.kind(name)
        if kind is None:
            skipped.append(f"{name} (not one scalar kind)")
        elif kind == "str" and stats.longest[name] > MAX_STRING:
            skipped.append(f"{name} (text over {MAX_STRING} characters)")
        elif kind == "str" and stats.mostly_unique(name):
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


def added_columns(kinds: dict[str, str], rows: list[dict], where: str = "") -> tuple[dict[str, Column], list[str]]:
    """(the Columns of rows added to an index whose fields are kinds — new values of a field are welcome, a
    value of another kind is InvalidInput —, the fields those rows have that the index does not filter on)."""
    extra = sorted({k for r in rows for k in r if k not in kinds and k not in RESERVED})
    return columns_of(rows, kinds, where), extra


def take(columns: dict[str, Column], rows: np.ndarray) -> dict[str, Column]:
    return {name: col.take(rows) for name, col in columns.items()}


def concat(kinds: dict[str, str], first: dict[str, Column], second: dict[str, Column]) -> dict[str, Column]:
    """first's rows then second's, per field (string dictionaries merged)."""
    return {name: column(kind, first[name].python() + second[name].python()) for name, kind in kinds.items()}
