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

    async def work(timeout):
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return "answer"

    async def main():
        flights = SingleFlight()
        return await asyncio.gather(*(flights.run("k", work) for _ in range(20)))

    assert asyncio.run(main()) == ["answer"] * 20 and runs == 1


def test_the_first_callers_cancellation_leaves_the_shared_answer_to_the_others():
    """Before: the execution ran in the first caller's task, so its cancellation reached every follower."""
    runs = []

    async def work(timeout):
        runs.append(timeout)
        await asyncio.sleep(0.05)
        return "answer"

    async def main():
        flights = SingleFlight()
        leader = asyncio.ensure_future(flights.run("k", work, timeout=5.0))
        await asyncio.sleep(0.01)
        followers = [asyncio.ensure_future(flights.run("k", work, timeout=5.0)) for _ in range(5)]
        await asyncio.sleep(0.01)
        leader.cancel()
        answers = await asyncio.gather(*followers)
        return leader.cancelled(), answers

    cancelled, answers = asyncio.run(main())
    assert cancelled and answers == ["answer"] * 5 and len(runs) == 1


def test_a_caller_with_more_time_than_the_shared_execution_had_runs_it_again_with_its_own():
    """Before: a caller with a 1 ms deadline made the execution every identical caller shared fail (or answer
    partially) within that 1 ms."""
    from services.common.errors import DeadlineExceeded

    runs = []

    async def work(timeout):
        runs.append(timeout)
        if timeout < 0.1:
            await asyncio.sleep(timeout / 4)
            return "partial"  # what a fan-out cut short gives
        await asyncio.sleep(0.02)
        return "full"

    async def main():
        flights = SingleFlight()
        hurried = asyncio.ensure_future(flights.run("k", work, timeout=0.05, complete=lambda r: r == "full"))
        await asyncio.sleep(0)
        patient = [asyncio.ensure_future(flights.run("k", work, timeout=5.0, complete=lambda r: r == "full"))
                   for _ in range(3)]
        late = flights.run("j", lambda timeout: asyncio.sleep(1), timeout=0.02)
        with pytest.raises(DeadlineExceeded):  # a caller waits until its own deadline, no longer
            await late
        return await hurried, await asyncio.gather(*patient)

    hurried, patient = asyncio.run(main())
    assert hurried == "partial" and patient == ["full"] * 3
    assert len(runs) == 2 and runs[0] < 0.1 <= runs[1]  # the patient callers shared one run of their own


def test_cache_keys_change_with_version_k_and_nprobe():
    base = cache_key("v1", 10, 0, b"q")
    assert len({base, cache_key("v2", 10, 0, b"q"), cache_key("v1", 11, 0, b"q"), cache_key("v1", 10, 4, b"q"),
                cache_key("v1", 10, 0, b"r")}) == 5
    assert base == cache_key("v1", 10, 0, b"q")


def test_a_sealed_value_opens_only_under_its_own_key_and_version():
    from services.searcher.cache import seal, unseal

    secret = b"s" * 32
    value = seal("k1", "v1", b"answer", secret)
    assert unseal("k1", "v1", value, secret) == (b"answer", "")
    assert unseal("k2", "v1", value, secret) == (None, "checksum")  # another key's answer copied here
    assert unseal("k1", "v2", value, secret) == (None, "version")
    assert unseal("k1", "v1", value[:-1], secret) == (None, "checksum")
    assert unseal("k1", "v1", value[:20], secret) == (None, "truncated")
    assert unseal("k1", "v1", b"\x08\x01garbage", secret) == (None, "format")
    # whoever writes Redis without the secret cannot seal an answer the router takes
    assert unseal("k1", "v1", seal("k1", "v1", b"forged", b"guess"), secret) == (None, "checksum")
    forged = value[:-len(b"answer")] + b"ANSWER"  # same header, other payload
    assert unseal("k1", "v1", forged, secret) == (None, "checksum")


def test_a_router_reachable_from_other_hosts_needs_a_cache_secret_and_one_on_loopback_makes_its_own():
    from pydantic import SecretStr

    from services.common.config import Settings
    from services.common.errors import InvalidInput
    from services.searcher.service import cache_secret

    shared = Settings(redis_url="redis://redis:6379/0")
    with pytest.raises(InvalidInput, match="set IMSEARCH_CACHE_SECRET"):
        cache_secret(shared, "0.0.0.0")
    own = cache_secret(shared, "127.0.0.1")
    assert len(own) == 32 and own != cache_secret(shared, "127.0.0.1")  # random, per process
    keyed = Settings(redis_url="redis://redis:6379/0", cache_secret=SecretStr("k" * 40))
    assert cache_secret(keyed, "0.0.0.0") == b"k" * 40
