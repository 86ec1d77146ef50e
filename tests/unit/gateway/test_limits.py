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


def test_token_bucket_per_caller():
    now = [0.0]
    limit = RateLimit(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limit.take("a")
    with pytest.raises(RateLimited) as e:
        limit.take("a")
    assert http_status(e.value) == (429, "RESOURCE_EXHAUSTED")
    limit.take("b")  # another caller has its own bucket
    now[0] = 0.5  # 2/s for 0.5 s: one token back
    limit.take("a")
    with pytest.raises(RateLimited):
        limit.take("a")
    unlimited = RateLimit(rate=0, burst=1)  # rate 0: no limit at all
    for _ in range(10):
        unlimited.take("x")
