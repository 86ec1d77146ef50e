"""The shards a router searches, behind one interface: in this process (localshards.LocalShards: the one-host
router) or on shard servers (remote.RemoteShards: replicas, hedging, fan-out, merge). The Router (router.py) is
written against this protocol alone — embed, into the index's space, `shards.search`, answer — as Qdrant's
collection is against its ShardOperation (LocalShard, RemoteShard).

The version a ShardSet names is the one a new request pins: each search may pin an older one it was projected
for, which the shards answer from while they still hold it (index/follower.py says how long).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.index.manifest import Manifest
from services.index.projection import Projection


@dataclass
class Answer:
    """Merged results, each array (nq, k) best first (id -1 where fewer than k), and how complete."""
    scores: np.ndarray
    ids: np.ndarray
    shards: np.ndarray
    uris: np.ndarray | None
    version: str
    coverage: float
    missing: list[int]
    expanded: np.ndarray | None = None  # (nq,) bool: the query was expanded (αQE, expansion.py); None: none was

    def __getitem__(self, rows: slice) -> "Answer":
        """The answer of some queries (a DynamicBatcher hands each caller its own rows)."""
        return Answer(self.scores[rows], self.ids[rows], self.shards[rows],
                      None if self.uris is None else self.uris[rows], self.version, self.coverage, self.missing,
                      None if self.expanded is None else self.expanded[rows])

    def top(self, k: int) -> "Answer":
        """The first k hits of every query (a search asked for more, e.g. the neighbours αQE needs), as arrays of
        its own: a merge may hand out read-only views of a shard's reply buffer, and an expansion writes rows."""
        return Answer(self.scores[:, :k].copy(), self.ids[:, :k].copy(), self.shards[:, :k].copy(),
                      None if self.uris is None else self.uris[:, :k].copy(), self.version, self.coverage,
                      list(self.missing), self.expanded)

    def columns(self, rows=slice(None)) -> list[np.ndarray]:
        """scores, ids, shards (and uris when known) of these rows (all: views of the answer's own arrays)."""
        return [c[rows] for c in (self.scores, self.ids, self.shards, self.uris) if c is not None]

    def replace(self, rows: np.ndarray, columns: list[np.ndarray], other: "Answer") -> None:
        """Put columns (as columns() gives them, same k) in place of these rows, from the round `other` answered;
        the whole is as complete as the less of both."""
        for mine, theirs in zip(self.columns(), columns):
            mine[rows] = theirs
        self.coverage = min(self.coverage, other.coverage)
        self.missing = sorted(set(self.missing) | set(other.missing))


class ShardSet(Protocol):
    @property
    def version(self) -> str:
        """The version a new request pins ("" until one is known)."""

    @property
    def fanouts(self) -> int:
        """Searches worth having in flight at once (the router batches the requests that arrive meanwhile)."""

    async def start(self) -> list[pb.ShardInfo | None]:
        """Learn the version served and start following it; each shard's Info now (None: no answer)."""

    async def search(self, queries: np.ndarray, k: int, nprobe: int = 0, timeout: float | None = None,
                     version: str = "", where: str = "") -> Answer:
        """The merged top-k of every shard; version: pinned ("" the current one); where: a filter in the JSON
        language, applied during the search. DeadlineExceeded / Unavailable when no shard answered."""

    async def fetch(self, ids: list[int], timeout: float | None = None) -> tuple[list, list[int]]:
        """(each id's stored vector, None where no shard that answered holds it; the shards that did not
        answer)."""

    async def infos(self, timeout: float = 2.0) -> list[pb.ShardInfo | None]:
        """Each shard's Info (None for a shard that did not answer)."""

    async def space(self, version: str) -> tuple[Manifest, Projection | None] | None:
        """A version's manifest and learned projection (the space its vectors live in), or None when this set
        cannot read them (shard servers without the index root)."""

    async def close(self) -> None:
        ...
