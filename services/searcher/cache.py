"""Query cache in Redis, and single-flight for concurrent identical misses.

Keys hash the query together with k, nprobe and the index version, so a newly published
index never serves stale hits. Redis being down costs nothing but the cache: calls are
skipped for a short while after a failure, then tried again.

Values are sealed: a format tag, the index version and an HMAC over the key, the version and the answer,
keyed with IMSEARCH_CACHE_SECRET: whoever can write Redis but lacks the secret cannot make an entry the router
accepts. Whatever else Redis returns — garbage, a truncated value, another version's answer, another key's
answer copied here, a forgery — is a miss (counted by reason) and overwritten, never an error or a wrong hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from services.common.errors import DeadlineExceeded

log = logging.getLogger(__name__)
T = TypeVar("T")


TAG = b"imsearch-cache/2\n"


def _mac(secret: bytes, key: str, version: bytes, answer: bytes) -> bytes:
    return hmac.new(secret, key.encode() + b"|" + version + b"|" + answer, hashlib.sha256).digest()


def seal(key: str, version: str, answer: bytes, secret: bytes) -> bytes:
    """TAG, version, newline, HMAC-SHA256(secret, key | version | answer) (32 bytes), answer."""
    v = version.encode()
    return TAG + v + b"\n" + _mac(secret, key, v, answer) + answer


# Why a cached value is refused: unseal's reasons, and "parse" for a sealed answer that is not a SearchResponse.
REJECTIONS = ("format", "truncated", "version", "checksum", "parse")


def unseal(key: str, version: str, value: bytes, secret: bytes) -> tuple[bytes | None, str]:
    """(the answer, "") when value is a sealed answer to this key at this version, else (None, why not)."""
    if not value.startswith(TAG):
        return None, "format"
    rest = value[len(TAG):]
    v, sep, rest = rest.partition(b"\n")
    if not sep or len(rest) < 32:
        return None, "truncated"
    if v != version.encode():
        return None, "version"
    digest, answer = rest[:32], rest[32:]
    if not hmac.compare_digest(_mac(secret, key, v, answer), digest):
        return None, "checksum"
    return answer, ""


def cache_key(version: str, k: int, nprobe: int, query: bytes) -> str:
    h = hashlib.sha256(f"{version}|{k}|{nprobe}|".encode() + query).hexdigest()
    return f"imsearch:q:{h}"


class Coalescer:
    """Calls arriving while a round trip is in flight go together in the next one (natural
    batching: no wait when idle, one MGET / one pipeline for many requests under load)."""

    def __init__(self, fn: Callable[[list], Awaitable[list]]):
        self.fn = fn
        self.pending: list[tuple[object, asyncio.Future]] = []
        self.running = False

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    results = await self.fn([item for item, _ in batch])
                except Exception as e:  # every caller of the batch hears it
                    for _, future in batch:
                        future.done() or future.set_exception(e)
                    continue
                for (_, future), result in zip(batch, results):
                    future.done() or future.set_result(result)
        finally:
            self.running = False


class QueryCache:
    def __init__(self, url: str, secret: bytes, ttl_s: int = 3600, retry_after_s: float = 1.0):
        """secret: the key of the entries' seal (IMSEARCH_CACHE_SECRET)."""
        import redis.asyncio as redis

        self.secret = secret
        self.client = redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.25)
        self.ttl_s, self.retry_after_s = ttl_s, retry_after_s
        self.down_until = 0.0
        self.gets, self.sets = Coalescer(self._mget), Coalescer(self._mset)

    async def _call(self, fn, *args):
        if time.monotonic() < self.down_until:
            return None
        from redis.exceptions import RedisError

        try:
            return await fn(*args)
        except (RedisError, OSError) as e:
            log.warning("redis unavailable (%s): serving uncached for %.1fs", e, self.retry_after_s)
            self.down_until = time.monotonic() + self.retry_after_s
            return None

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        return await self._call(self.client.mget, keys) or [None] * len(keys)

    async def _mset(self, items: list[tuple[str, bytes]]) -> list[None]:
        async def write():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.setex(key, self.ttl_s, value)
                return await pipe.execute()

        await self._call(write)
        return [None] * len(items)

    async def get(self, key: str) -> bytes | None:
        return await self.gets.submit(key)

    async def set(self, key: str, value: bytes) -> None:
        await self.sets.submit((key, value))

    async def close(self) -> None:
        await self.client.aclose()


class CallerDeadline(DeadlineExceeded):
    """This caller's own deadline passed while it waited for a shared execution (which goes on for the others)."""


@dataclass
class _Flight:
    task: asyncio.Task  # the shared execution: a task of its own, whoever started it
    deadline: float | None  # the loop time it was given (None: no deadline)


class SingleFlight:
    """Concurrent calls with the same key share one execution of fn(timeout).

    The execution is a task of its own, not the first caller's: a caller that goes away (its client cancelled, its
    deadline passed) stops waiting, and the others still get the answer. Each caller waits until its own deadline
    only. The execution is given the deadline of the caller that started it; a caller with more time than that,
    whose shared answer failed or came back incomplete (`complete`), runs it again with its own time — a caller with
    a 1 ms deadline cannot fail or partialise everyone asking the same thing."""

    def __init__(self):
        self.inflight: dict[str, _Flight] = {}

    async def run(self, key: str, fn: Callable[[float | None], Awaitable[T]], timeout: float | None = None,
                  complete: Callable[[T], bool] = lambda result: True) -> T:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        flight = self.inflight.get(key) or self._start(key, fn, deadline)
        try:
            result = await self._wait(flight, deadline)
        except CallerDeadline:
            raise
        except Exception:  # the shared execution failed: again, when this caller has more time than it had
            if not self._outlasts(deadline, flight):
                raise
        else:  # an incomplete answer: again likewise
            if complete(result) or not self._outlasts(deadline, flight):
                return result
        return await self._wait(self._again(key, fn, deadline, flight), deadline)

    def _again(self, key: str, fn: Callable[[float | None], Awaitable[T]], deadline: float | None,
               before: _Flight) -> _Flight:
        """The execution that follows `before`: one another caller of it started already, else a new one."""
        flight = self.inflight.get(key)
        return flight if flight is not None and flight is not before else self._start(key, fn, deadline)

    def _start(self, key: str, fn: Callable[[float | None], Awaitable[T]], deadline: float | None) -> _Flight:
        loop = asyncio.get_running_loop()
        task = loop.create_task(fn(None if deadline is None else max(0.0, deadline - loop.time())))
        flight = _Flight(task, deadline)
        self.inflight[key] = flight

        def done(t: asyncio.Task) -> None:
            if self.inflight.get(key) is flight:
                del self.inflight[key]
            if not t.cancelled():
                t.exception()  # retrieved: no "never retrieved" noise when every caller went away

        task.add_done_callback(done)
        return flight

    @staticmethod
    async def _wait(flight: _Flight, deadline: float | None) -> T:
        """The execution's answer, waited for until this caller's deadline; the caller's cancellation cancels only
        its wait."""
        remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(flight.task), remaining)
        except asyncio.TimeoutError:
            raise CallerDeadline("the deadline passed before the answer came") from None

    @staticmethod
    def _outlasts(deadline: float | None, flight: _Flight) -> bool:
        """This caller may wait for longer than the execution was given."""
        return flight.deadline is not None and (deadline is None or deadline > flight.deadline + MARGIN_S)


MARGIN_S = 0.005  # deadlines closer than this are the same deadline: re-running would gain the caller nothing
