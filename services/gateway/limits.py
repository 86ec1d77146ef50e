"""API keys and a token-bucket rate limit per key (or per client address when keys are off)."""

from __future__ import annotations

import hmac
import time

from services.common.errors import RateLimited, Unauthenticated

# Failed key attempts per client address, whatever the configured rate limit: 10 at once, then one a second.
AUTH_FAILURES_PER_S = 1.0
AUTH_FAILURE_BURST = 10


def parse_keys(secret) -> list[str]:
    return [k.strip() for k in secret.get_secret_value().split(",") if k.strip()] if secret else []


def key_of(headers, keys: list[str]) -> str | None:
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
    """rate tokens per second, up to burst; one bucket per caller."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time)

    def take(self, caller: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, then = self.buckets.get(caller, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[caller] = (tokens, now)
            raise RateLimited(f"rate limit {self.rate:g}/s exceeded; retry in {(1 - tokens) / self.rate:.1f} s")
        self.buckets[caller] = (tokens - 1, now)
        if len(self.buckets) > 100_000:  # forget idle callers so the table cannot grow without bound
            self.buckets = {c: v for c, v in self.buckets.items() if now - v[1] < 60}
