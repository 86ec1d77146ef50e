"""Query cache in Redis, and single-flight for concurrent identical misses.

Keys hash the query together with k, nprobe and the index version, so a newly published
index never serves stale hits. Redis being down costs nothing but the cache: calls are
skipped for a short while after a failure, then tried again.

Values are sealed: a format tag, the index version and a checksum over the key, the version and the
answer. Whatever else Redis returns — garbage, a truncated value, another version's answer, another
key's answer copied here — is a miss (counted by reason) and overwritten, never an error or a wrong hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


TAG = b"imsearch-cache/1\n"


def seal(key: str, version: str, answer: bytes) -> bytes:
    """TAG, version, newline, sha256(key | version | answer) (32 bytes), answer."""
    v = version.encode()
    return TAG + v + b"\n" + hashlib.sha256(key.encode() + b"|" + v + b"|" + answer).digest() + answer


# Why a cached value is refused: unseal's reasons, and "parse" for a sealed answer that is not a SearchResponse.
REJECTIONS = ("format", "truncated", "version", "checksum", "parse")


def unseal(key: str, version: str, value: bytes) -> tuple[bytes | None, str]:
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
    if hashlib.sha256(key.encode() + b"|" + v + b"|" + answer).digest() != digest:
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
    def __init__(self, url: str, ttl_s: int = 3600, retry_after_s: float = 1.0):
        import redis.asyncio as redis

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


class SingleFlight:
    """Concurrent calls with the same key share one execution of fn."""

    def __init__(self):
        self.inflight: dict[str, asyncio.Future] = {}

    async def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        if key in self.inflight:
            return await asyncio.shield(self.inflight[key])
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        self.inflight[key] = future
        try:
            result = await fn()
            future.set_result(result)
            return result
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            del self.inflight[key]
