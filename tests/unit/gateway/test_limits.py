import pytest
from pydantic import SecretStr

from services.common.errors import RateLimited, Unauthenticated, http_status
from services.gateway.limits import RateLimit, key_of, parse_keys


def test_keys_from_either_header_and_refused_when_wrong():
    keys = parse_keys(SecretStr(" alpha, beta ,"))
    assert keys == ["alpha", "beta"]
    assert key_of({"authorization": "Bearer beta"}, keys) == "beta"
    assert key_of({"x-api-key": "alpha"}, keys) == "alpha"
    for headers in ({}, {"authorization": "Bearer gamma"}, {"authorization": "Basic alpha"}):
        with pytest.raises(Unauthenticated):
            key_of(headers, keys)
    assert key_of({}, []) is None  # keys off: anyone


def test_a_moving_window_per_caller_with_a_real_retry_after():
    import asyncio

    async def main():
        limit = RateLimit(rate=2.0, burst=3)  # a window of 2 s holding 4 calls
        for _ in range(4):
            await limit.take("a")
        with pytest.raises(RateLimited) as e:
            await limit.take("a")
        assert http_status(e.value) == (429, "RESOURCE_EXHAUSTED") and 1 <= e.value.retry_after <= 2
        await limit.take("b")  # another caller has its own window
        unlimited = RateLimit(rate=0, burst=1)  # rate 0: no limit at all
        for _ in range(10):
            await unlimited.take("x")

    asyncio.run(main())
