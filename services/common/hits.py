"""One search result, shared by the searchers, the proto conversions and the CLI."""

from __future__ import annotations

from typing import NamedTuple


class Hit(NamedTuple):  # a tuple: built for every result, so it must be cheap to make
    score: float
    id: int
    shard: int
    uri: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "uri": self.uri, "score": self.score, "shard": self.shard}
