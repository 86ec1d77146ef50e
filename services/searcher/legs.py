"""The router's searches of one shard replica as tagged messages on one long-lived gRPC stream.

A unary call costs both sides more CPU than a message on an open stream (call set-up, metadata, status), and a
fan-out sends the same request to every shard, so a query pays for several legs (README Performance: bench_shard's
row for a shard server's CPU per message, the transport row for the router's rate).

The stream carries no deadline of its own: the caller (ReplicaSet.ask) waits for an answer only until its
deadline or a hedge wins, then forgets the tag — the replica may still answer it, and the answer is dropped.
The stream ending (the replica died, restarted, stopped) fails every waiting search with its status, so a
replica that goes away is failed over at once, as a unary call would be; the next search opens a new stream.
A replica too old to have SearchStream answers UNIMPLEMENTED: its searches go back to unary calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
METHOD = "/imsearch.v1.Shard/SearchStream"
_TAGS = itertools.count(1)
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class Outgoing:
    """One fan-out's request to every shard: tagged and serialized once for all of their streams."""

    __slots__ = ("request", "tag", "_data")

    def __init__(self, request: pb.ShardSearchRequest):
        self.request, self.tag, self._data = request, next(_TAGS), None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = pb.ShardStreamRequest(tag=self.tag, request=self.request).SerializeToString()
        return self._data


def status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary call would have raised: the caller handles both alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class StreamLeg:
    """Searches of one replica on one stream (opened on first use, reopened after it ends)."""

    def __init__(self, channel: grpc.aio.Channel, stub: pb_grpc.ShardStub, metadata, limit: int):
        self.stub, self.metadata, self.limit = stub, metadata, limit
        self._open_stream = channel.stream_stream(METHOD, request_serializer=None,
                                                  response_deserializer=pb.ShardStreamResponse.FromString)
        self.call: grpc.aio.StreamStreamCall | None = None
        self.opened: asyncio.Task | None = None  # the handshake of the current call (_handshake)
        self.reader: asyncio.Task | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.writing = asyncio.Lock()  # one write at a time on a call (gRPC refuses a second)
        self.streams = True  # False once the replica said it has no SearchStream

    async def search(self, out: Outgoing, timeout: float) -> pb.ShardSearchResponse:
        # A message over the size limit would end the stream with every search on it: it goes alone, and fails
        # alone, as a unary call.
        if self.streams and len(out.data) <= self.limit:
            try:
                return await self._on_stream(out)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.warning("shard replica has no SearchStream (an older server?): unary calls from now on")
                self.streams = False
        return await self.stub.Search(out.request, timeout=timeout, metadata=self.metadata)

    async def _on_stream(self, out: Outgoing) -> pb.ShardSearchResponse:
        if self.call is None:
            self._open()
        call, opened = self.call, self.opened
        refused = await asyncio.shield(opened)  # shielded: one caller giving up must not fail the others
        if refused is not None:
            raise refused
        if call is not self.call:  # it ended meanwhile: its reader has failed the searches it had
            raise status_error(grpc.StatusCode.UNAVAILABLE, "the shard's stream ended")
        answer = asyncio.get_running_loop().create_future()
        self.waiting[out.tag] = answer
        try:
            # Shielded: a caller giving up mid-write must not cancel the write (and with it the stream).
            await asyncio.shield(self._write(call, out))
            return await answer
        finally:
            self.waiting.pop(out.tag, None)

    def _open(self) -> None:
        self.call = self._open_stream(metadata=self.metadata)
        self.opened = asyncio.get_running_loop().create_task(self._handshake(self.call))
        self.reader = asyncio.get_running_loop().create_task(self._read(self.call))

    @staticmethod
    async def _handshake(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError | None:
        """None once the replica has accepted the stream (its server sends its headers at once), else the error
        it refused it with. Nothing is written before: a refusal (UNIMPLEMENTED from an older server,
        UNAUTHENTICATED) racing a first write can reach the caller as INTERNAL instead."""
        try:
            await call.initial_metadata()
            if not call.done():
                return None
            return status_error(await call.code(), await call.details())
        except grpc.aio.AioRpcError as e:
            return e

    async def _write(self, call: grpc.aio.StreamStreamCall, out: Outgoing) -> None:
        async with self.writing:
            if call is not self.call or out.tag not in self.waiting:  # the stream ended, or the caller gave up
                return
            try:
                await call.write(out.data)
            except Exception as e:  # noqa: BLE001 - the stream ended under the write: its reader says why
                log.debug("write on an ended shard stream: %s", e)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error = status_error(grpc.StatusCode.UNAVAILABLE, "the shard's stream ended")
        try:
            async for reply in call:
                answer = self.waiting.get(reply.tag)
                if answer is None or answer.done():  # given up on (deadline, lost hedge): dropped
                    continue
                if reply.code:
                    answer.set_exception(status_error(_STATUS.get(reply.code, grpc.StatusCode.UNKNOWN),
                                                      reply.details))
                else:
                    answer.set_result(reply.response)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = status_error(grpc.StatusCode.CANCELLED, "the router is closing")
            raise
        finally:
            if self.call is call:
                self.call = self.opened = self.reader = None
            for tag, answer in list(self.waiting.items()):
                if not answer.done():
                    answer.set_exception(error)
                    self.waiting.pop(tag)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
