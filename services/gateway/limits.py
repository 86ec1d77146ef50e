"""API keys and a token-bucket rate limit per key (or per client address when keys are off)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from services.common.errors import Forbidden, InvalidInput, RateLimited, Unauthenticated

log = logging.getLogger(__name__)
# Failed key attempts per client address, whatever the configured rate limit: 10 at once, then one a second.
AUTH_FAILURES_PER_S = 1.0
AUTH_FAILURE_BURST = 10


def _entries(secret):
    """(key, its collections or None, its nprobe cap or None) of each entry of IMSEARCH_GATEWAY_API_KEYS."""
    for entry in (secret.get_secret_value().split(",") if secret else []):
        key, *options = entry.strip().split(":")
        if not key.strip():
            continue
        caps = [o for o in options if o.strip().startswith("nprobe=")]
        names = [o for o in options if o not in caps and o.strip()]
        try:
            cap = int(caps[-1].strip()[len("nprobe="):]) if caps else None
        except ValueError:
            raise InvalidInput(f"IMSEARCH_GATEWAY_API_KEYS: {caps[-1].strip()!r} is not nprobe=N") from None
        yield key.strip(), frozenset(n.strip() for n in names[0].split("|") if n.strip()) if names else None, cap


def parse_keys(secret) -> dict[str, frozenset[str] | None]:
    """IMSEARCH_GATEWAY_API_KEYS: comma-separated keys, each `KEY` (every collection) or `KEY:shoes|bags` (only
    those collections), either followed by `:nprobe=N` (nprobe_caps) -> {key: its collections or None}."""
    return {key: names for key, names, _ in _entries(secret)}


def nprobe_caps(secret) -> dict[str, int]:
    """The keys given a lower nprobe cap than IMSEARCH_MAX_NPROBE (`KEY:nprobe=32`, `KEY:shoes:nprobe=32`): a cheap
    key cannot ask every search to probe as many lists as the deployment allows its own."""
    return {key: cap for key, _, cap in _entries(secret) if cap is not None}


def check_collection(keys: dict[str, frozenset[str] | None], caller: str | None, collection: str | None) -> None:
    """A key limited to collections may only reach them, by name (`collection` None: a route of the default
    collection, which such a key must name instead)."""
    allowed = keys.get(caller) if caller else None
    if allowed is None or (collection is not None and collection in allowed):
        return
    names = ", ".join(sorted(allowed))
    if collection is None:
        raise Forbidden(f"this API key may search only collection(s) {names}: use /v1/collections/NAME/...")
    raise Forbidden(f"this API key may not use collection {collection!r} (only {names})")


def caller_id(key: str | None, address: str) -> str:
    """Who a rate limit counts: an API key by a hash of it (limit windows live in Redis, whose key names must not
    hand the keys to anyone who can list them), else the client's address."""
    return f"key {hashlib.sha256(key.encode()).hexdigest()[:32]}" if key else f"address {address}"


def key_of(headers, keys: dict[str, frozenset[str] | None]) -> str | None:
    """The caller's key from `Authorization: Bearer KEY` or `X-API-Key: KEY`; Unauthenticated when keys are
    configured and it is missing or unknown (compared in constant time)."""
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not keys:
        return None
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise Unauthenticated("missing or unknown API key (send Authorization: Bearer KEY or X-API-Key: KEY)")
    return given


class RateLimit:
    """Calls per caller (an API key, or a client address) in a moving window, counted in Redis when a URL is
    given — every gateway then shares one count — else in this process (the `limits` library, either way).

    rate calls/s with bursts of `burst`: a window of ceil(burst / rate) s holding max(burst, rate × window)
    calls. A store that fails lets the call through (logged): a cache outage must not become an outage."""

    def __init__(self, rate: float, burst: int, redis_url: str | None = None):
        self.rate = rate
        if rate <= 0:
            return
        from limits import RateLimitItemPerSecond
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        window = max(1, math.ceil(burst / rate))
        self.item = RateLimitItemPerSecond(max(burst, math.floor(rate * window)), window)
        # redis-py's asyncio client (already here for the router's cache), not limits' default coredis
        storage = (storage_from_string(f"async+{redis_url}", implementation="redispy") if redis_url
                   else storage_from_string("async+memory://"))
        self.limiter = MovingWindowRateLimiter(storage)

    async def take(self, caller: str) -> None:
        """Count a call of caller's; RateLimited when its window is full."""
        await self._limit(caller, self.limiter.hit if self.rate > 0 else None)

    async def check(self, caller: str) -> None:
        """RateLimited when caller's window is full now, counting nothing."""
        await self._limit(caller, self.limiter.test if self.rate > 0 else None)

    async def _limit(self, caller: str, allows) -> None:
        if allows is None:
            return
        try:
            if await allows(self.item, caller):
                return
            stats = await self.limiter.get_window_stats(self.item, caller)
        except Exception as e:  # noqa: BLE001 - the limit store is down: serve rather than refuse
            log.warning("rate-limit store unavailable (%s): not limiting", e)
            return
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        error = RateLimited(f"rate limit {self.rate:g}/s exceeded; retry in {retry} s")
        error.retry_after = retry
        raise error
