import asyncio

import pytest

from services.searcher.cache import Coalescer, SingleFlight, cache_key


def test_calls_arriving_during_a_round_trip_share_the_next_one():
    batches: list[list[int]] = []

    async def double(items):
        batches.append(items)
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    async def main():
        c = Coalescer(double)
        first = asyncio.ensure_future(c.submit(1))
        await asyncio.sleep(0)  # the first goes alone, at once
        rest = [asyncio.ensure_future(c.submit(i)) for i in range(2, 7)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == 2 and rest == [4, 6, 8, 10, 12]
    assert batches == [[1], [2, 3, 4, 5, 6]]


def test_a_failed_round_trip_reaches_its_callers_and_the_next_still_runs():
    async def flaky(items):
        if 0 in items:
            raise ConnectionError("down")
        return items

    async def main():
        c = Coalescer(flaky)
        with pytest.raises(ConnectionError):
            await c.submit(0)
        return await c.submit(5)

    assert asyncio.run(main()) == 5


def test_single_flight_runs_once_for_concurrent_callers():
    runs = 0

    async def work():
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return "answer"

    async def main():
        flights = SingleFlight()
        return await asyncio.gather(*(flights.run("k", work) for _ in range(20)))

    assert asyncio.run(main()) == ["answer"] * 20 and runs == 1


def test_cache_keys_change_with_version_k_and_nprobe():
    base = cache_key("v1", 10, 0, b"q")
    assert len({base, cache_key("v2", 10, 0, b"q"), cache_key("v1", 11, 0, b"q"), cache_key("v1", 10, 4, b"q"),
                cache_key("v1", 10, 0, b"r")}) == 5
    assert base == cache_key("v1", 10, 0, b"q")


def test_a_sealed_value_opens_only_under_its_own_key_and_version():
    from services.searcher.cache import seal, unseal

    value = seal("k1", "v1", b"answer")
    assert unseal("k1", "v1", value) == (b"answer", "")
    assert unseal("k2", "v1", value) == (None, "checksum")  # another key's answer copied here
    assert unseal("k1", "v2", value) == (None, "version")
    assert unseal("k1", "v1", value[:-1]) == (None, "checksum")
    assert unseal("k1", "v1", value[:20]) == (None, "truncated")
    assert unseal("k1", "v1", b"\x08\x01garbage") == (None, "format")
    forged = value[:-len(b"answer")] + b"ANSWER"  # same header, other payload
    assert unseal("k1", "v1", forged) == (None, "checksum")
