"""A small Python client for the router (any language can use the protos directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common.convert import columns_from_proto, hits_from_proto
from services.common.hits import Hit
from services.common.server import open_channel


@dataclass
class Result:
    hits: list[Hit]
    index_version: str
    coverage: float
    missing_shards: list[int]
    cached: bool = False

    @property
    def partial(self) -> bool:
        return self.coverage < 1.0

    @classmethod
    def from_proto(cls, r: pb.SearchResponse) -> "Result":
        return cls(hits_from_proto(pb.HitList(hits=r.hits)), r.index_version, r.coverage, list(r.missing_shards),
                   r.cached)


@dataclass
class Columns:
    """A batch's hits as (nq, k) arrays, best first; id -1 and uri "" where fewer than k results."""
    scores: np.ndarray
    ids: np.ndarray
    shards: np.ndarray
    uris: np.ndarray
    index_version: str
    coverage: float
    missing_shards: list[int]


def _query(item: bytes | np.ndarray | int) -> pb.Query:
    if isinstance(item, bytes):
        return pb.Query(image=item)
    if isinstance(item, (int, np.integer)):
        return pb.Query(id=int(item))
    return pb.Query(vector=pb.Vector(values=np.asarray(item, np.float32).ravel().tolist()))


class SearchClient:
    """search(image bytes | vector | id) -> Result; errors are grpc.RpcError with the server's status."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0,
                 max_message_bytes: int = 16 * 1024 * 1024, tls_ca: str | Path | None = None):
        """tls_ca: the CA file to verify a TLS server with (plaintext without it)."""
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = open_channel(address, tls_ca, options, aio=False)
        self.stub = pb_grpc.SearcherStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def search(self, query: bytes | np.ndarray | int, k: int = 10, nprobe: int = 0,
               relevant: list[int] = (), not_relevant: list[int] = ()) -> Result:
        """relevant / not_relevant: catalogue ids for a Rocchio re-query (relevance feedback)."""
        feedback = pb.Feedback(relevant=relevant, not_relevant=not_relevant)
        reply = self.stub.Search(pb.SearchRequest(query=_query(query), k=k, nprobe=nprobe, feedback=feedback),
                                 timeout=self.timeout, metadata=self.metadata)
        return Result.from_proto(reply)

    def search_batch(self, queries: list, k: int = 10, nprobe: int = 0) -> list[Result]:
        reply = self.stub.SearchBatch(pb.SearchBatchRequest(queries=[_query(q) for q in queries], k=k, nprobe=nprobe),
                                      timeout=self.timeout, metadata=self.metadata)
        return [Result.from_proto(r) for r in reply.results]

    def search_columns(self, queries: list, k: int = 10, nprobe: int = 0) -> Columns:
        """Like search_batch, answered as arrays: the cheap form for bulk work."""
        reply = self.stub.SearchBatch(pb.SearchBatchRequest(queries=[_query(q) for q in queries], k=k,
                                                            nprobe=nprobe, columnar=True),
                                      timeout=self.timeout, metadata=self.metadata)
        return Columns(*columns_from_proto(reply.columns), reply.index_version, reply.coverage,
                       list(reply.missing_shards))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
