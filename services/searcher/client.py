"""Python clients of the router (any language can use the protos directly): `RouterClient` for asyncio code
(the gateway, the load generator) and the blocking `SearchClient`, both over the same request builders,
channel settings and call metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common.config import Settings
from services.common.convert import columns_from_proto, hits_from_proto
from services.common.hits import Hit
from services.common.server import bearer_metadata, open_channel

Query = bytes | np.ndarray | int | pb.Query  # an image, a vector, a catalogue id, or a ready message


@dataclass
class Result:
    hits: list[Hit]
    index_version: str
    coverage: float
    missing_shards: list[int]
    cached: bool = False
    expanded: bool = False  # the search expanded the query (αQE)

    @property
    def partial(self) -> bool:
        return self.coverage < 1.0

    @classmethod
    def from_proto(cls, r: pb.SearchResponse) -> "Result":
        return cls(hits_from_proto(pb.HitList(hits=r.hits)), r.index_version, r.coverage, list(r.missing_shards),
                   r.cached, r.expanded)


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
    expanded: np.ndarray  # (nq,) bool: which queries the search expanded (αQE)

    @classmethod
    def from_proto(cls, reply: pb.SearchBatchResponse) -> "Columns":
        return cls(*columns_from_proto(reply.columns), reply.index_version, reply.coverage,
                   list(reply.missing_shards), np.array(reply.expanded, bool))


def to_query(item: Query) -> pb.Query:
    if isinstance(item, pb.Query):
        return item
    if isinstance(item, bytes):
        return pb.Query(image=item)
    if isinstance(item, (int, np.integer)):
        return pb.Query(id=int(item))
    return pb.Query(vector=pb.Vector(values=np.asarray(item, np.float32).ravel().tolist()))


def search_request(query: Query, k: int = 10, nprobe: int = 0, relevant: list[int] = (),
                   not_relevant: list[int] = (), qe: int | None = None, where: str = "",
                   collection: str = "") -> pb.SearchRequest:
    """relevant / not_relevant: catalogue ids for a Rocchio re-query (relevance feedback); qe: αQE neighbours
    (None: the gated default, 0: off, N: always); where: a filter (JSON text or an expression, "" none);
    collection: a named collection ("" the router's default)."""
    return pb.SearchRequest(query=to_query(query), k=k, nprobe=nprobe, qe=qe, filter=where, collection=collection,
                            feedback=pb.Feedback(relevant=relevant, not_relevant=not_relevant))


def batch_request(queries: list, k: int = 10, nprobe: int = 0, columnar: bool = False,
                  qe: int | None = None, where: str = "", collection: str = "") -> pb.SearchBatchRequest:
    return pb.SearchBatchRequest(queries=[to_query(q) for q in queries], k=k, nprobe=nprobe, columnar=columnar,
                                 qe=qe, filter=where, collection=collection)


class _Client:
    aio = False

    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0,
                 max_message_bytes: int = 16 * 1024 * 1024, tls_ca: str | Path | None = None):
        """token: the bearer token calls carry; tls_ca: the CA file to verify a TLS server with (plaintext
        without it)."""
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = open_channel(address, tls_ca, options, aio=self.aio)
        self.stub = pb_grpc.SearcherStub(self.channel)
        self.metadata = bearer_metadata(token)
        self.timeout = timeout


class RouterClient(_Client):
    """The router from asyncio code; answers are the reply messages. Errors are grpc.aio.AioRpcError with
    the server's status."""
    aio = True

    @classmethod
    def from_settings(cls, address: str, settings: Settings, timeout: float | None = None) -> "RouterClient":
        """With this deployment's token, TLS CA and message limit."""
        return cls(address, settings.token(), timeout or settings.gateway_timeout_s, settings.max_message_bytes,
                   settings.tls_ca)

    async def call(self, method: str, request, timeout: float | None = None):
        """Any Searcher method by name (Search, SearchBatch, Info) with a ready request."""
        return await getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)

    async def search(self, query: Query, k: int = 10, nprobe: int = 0, relevant: list[int] = (),
                     not_relevant: list[int] = (), qe: int | None = None, where: str = "",
                     collection: str = "") -> pb.SearchResponse:
        return await self.call("Search", search_request(query, k, nprobe, relevant, not_relevant, qe, where,
                                                        collection))

    async def search_batch(self, queries: list, k: int = 10, nprobe: int = 0, columnar: bool = False,
                           qe: int | None = None, where: str = "", collection: str = "") -> pb.SearchBatchResponse:
        return await self.call("SearchBatch", batch_request(queries, k, nprobe, columnar, qe, where, collection))

    async def info(self, timeout: float | None = None) -> pb.IndexInfo:
        return await self.call("Info", pb.InfoRequest(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "RouterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SearchClient(_Client):
    """search(image bytes | vector | id) -> Result; errors are grpc.RpcError with the server's status."""

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)

    def search(self, query: Query, k: int = 10, nprobe: int = 0, relevant: list[int] = (),
               not_relevant: list[int] = (), qe: int | None = None, where: str = "", collection: str = "") -> Result:
        """relevant / not_relevant: catalogue ids for a Rocchio re-query (relevance feedback); qe: αQE; where:
        a filter (a JSON filter as text, or an expression such as 'in_stock and price < 120'); collection: a
        named collection ("" the router's default)."""
        return Result.from_proto(self._call("Search", search_request(query, k, nprobe, relevant, not_relevant, qe,
                                                                     where, collection)))

    def search_batch(self, queries: list, k: int = 10, nprobe: int = 0, qe: int | None = None,
                     where: str = "", collection: str = "") -> list[Result]:
        request = batch_request(queries, k, nprobe, qe=qe, where=where, collection=collection)
        return [Result.from_proto(r) for r in self._call("SearchBatch", request).results]

    def search_columns(self, queries: list, k: int = 10, nprobe: int = 0, qe: int | None = None) -> Columns:
        """Like search_batch, answered as arrays: the cheap form for bulk work."""
        return Columns.from_proto(self._call("SearchBatch", batch_request(queries, k, nprobe, True, qe)))

    def info(self, collection: str = "") -> pb.IndexInfo:
        return self._call("Info", pb.InfoRequest(collection=collection))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
