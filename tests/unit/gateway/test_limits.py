import pytest
from pydantic import SecretStr

from services.common.errors import Forbidden, InvalidInput, RateLimited, Unauthenticated, http_status
from services.gateway.limits import RateLimit, check_collection, key_of, parse_keys


def test_keys_from_either_header_and_refused_when_wrong():
    keys = parse_keys(SecretStr(" alpha, beta ,"))
    assert keys == {"alpha": None, "beta": None}
    assert key_of({"authorization": "Bearer beta"}, keys) == "beta"
    assert key_of({"x-api-key": "alpha"}, keys) == "alpha"
    for headers in ({}, {"authorization": "Bearer gamma"}, {"authorization": "Basic alpha"}):
        with pytest.raises(Unauthenticated):
            key_of(headers, keys)
    assert key_of({}, {}) is None  # keys off: anyone


def test_a_key_limited_to_collections_reaches_only_them_and_by_name():
    keys = parse_keys(SecretStr("admin, shop:shoes|bags"))
    assert keys == {"admin": None, "shop": frozenset({"shoes", "bags"})}
    check_collection(keys, "admin", "hats")  # unlimited
    check_collection(keys, "admin", None)
    check_collection(keys, "shop", "shoes")
    with pytest.raises(Forbidden, match="may not use collection 'hats' \\(only bags, shoes\\)") as e:
        check_collection(keys, "shop", "hats")
    assert http_status(e.value) == (403, "PERMISSION_DENIED")
    with pytest.raises(Forbidden, match="use /v1/collections/NAME/"):
        check_collection(keys, "shop", None)  # the default collection's routes: name one instead


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


def test_a_key_may_carry_a_lower_nprobe_cap_beside_its_collections():
    from services.gateway.limits import nprobe_caps

    secret = SecretStr("admin, shop:shoes|bags:nprobe=16, cheap:nprobe=4")
    assert parse_keys(secret) == {"admin": None, "shop": frozenset({"shoes", "bags"}), "cheap": None}
    assert nprobe_caps(secret) == {"shop": 16, "cheap": 4}
    with pytest.raises(InvalidInput, match="nprobe=many"):
        nprobe_caps(SecretStr("k:nprobe=many"))


def test_the_gateway_refuses_an_nprobe_past_the_callers_cap_before_calling_the_router():
    """Before: nprobe was clamped only to the index's list count: any caller could make every search exhaustive."""
    import asyncio

    from services.common.config import Settings
    from services.gateway.app import Feedback, Gateway

    settings = Settings(gateway_api_keys=SecretStr("admin, cheap:nprobe=4"), max_nprobe=64)
    gw = Gateway.from_settings("127.0.0.1:1", "/nonexistent", settings)  # no router: a refusal never calls it
    for caller, nprobe in (("cheap", 5), ("admin", 65), (None, 65)):
        with pytest.raises(InvalidInput, match="nprobe must be between 0"):
            asyncio.run(gw.search(None, 10, nprobe, Feedback(), caller=caller))
    assert (gw.nprobe_cap("cheap"), gw.nprobe_cap("admin"), gw.nprobe_cap(None)) == (4, 64, 64)
