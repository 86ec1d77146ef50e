import asyncio
import threading

import numpy as np
import pytest

from services.common.batching import DynamicBatcher
from services.common.errors import TooLarge


def fake_embed(calls: list):
    def embed(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        return pixels.reshape(len(pixels), -1)[:, :2].astype(np.float32)
    return embed


def test_concurrent_requests_share_model_batches_and_get_their_own_rows():
    calls: list[int] = []

    async def main():
        b = DynamicBatcher(fake_embed(calls), max_batch=8, max_wait_s=0.05, max_queue=100)
        b.start()
        inputs = [np.full((1, 2, 2, 3), i, np.uint8) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        await b.stop()
        return inputs, outs

    inputs, outs = asyncio.run(main())
    assert [int(o[0, 0]) for o in outs] == list(range(20))  # each caller gets its own rows back
    assert sum(calls) == 20 and len(calls) <= 5 and max(calls) <= 8  # batched, never over the limit


def test_multi_row_requests_never_overflow_a_batch_and_keep_their_rows():
    calls: list[int] = []

    async def main():
        b = DynamicBatcher(fake_embed(calls), max_batch=10, max_wait_s=0.05, max_queue=100)
        b.start()
        sizes = [6, 3, 5, 12, 1, 4, 4, 9]
        inputs = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        await b.stop()
        return sizes, outs

    sizes, outs = asyncio.run(main())
    assert [len(o) for o in outs] == sizes
    assert all((o[:, 0] == i).all() for i, o in enumerate(outs))
    assert sum(calls) == sum(sizes) and 12 in calls  # the oversize request went alone
    assert all(c <= 10 for c in calls if c != 12) and len(calls) < len(sizes)


def test_a_full_queue_refuses_at_once_and_recovers():
    gate = threading.Event()

    def slow(pixels):
        gate.wait(5)
        return np.zeros((len(pixels), 2), np.float32)

    async def main():
        b = DynamicBatcher(slow, max_batch=1, max_wait_s=0, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1, 1, 3), np.uint8)))
        await asyncio.sleep(0.05)  # the worker takes it and blocks in the model
        queued = [asyncio.ensure_future(b.submit(np.zeros((1, 1, 1, 3), np.uint8))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(TooLarge, match="busy"):
            await b.submit(np.zeros((1, 1, 1, 3), np.uint8))
        gate.set()
        await asyncio.gather(first, *queued)
        ok = await b.submit(np.zeros((1, 1, 1, 3), np.uint8))  # recovered
        await b.stop()
        return ok

    assert asyncio.run(main()).shape == (1, 2)


def test_a_model_failure_reaches_every_waiting_caller():
    def broken(pixels):
        raise RuntimeError("CUDA out of memory")

    async def main():
        b = DynamicBatcher(broken, max_batch=4, max_wait_s=0.01, max_queue=10)
        b.start()
        results = await asyncio.gather(*(b.submit(np.zeros((1, 1, 1, 3), np.uint8)) for _ in range(3)),
                                       return_exceptions=True)
        await b.stop()
        return results

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_zero_wait_still_takes_everything_already_queued():
    calls: list[int] = []

    async def main():
        b = DynamicBatcher(fake_embed(calls), max_batch=64, max_wait_s=0.0, max_queue=100)
        futures = [asyncio.ensure_future(b.submit(np.zeros((1, 2, 2, 3), np.uint8))) for _ in range(10)]
        await asyncio.sleep(0)  # all ten are queued before the worker starts
        b.start()
        await asyncio.gather(*futures)
        await b.stop()

    asyncio.run(main())
    assert calls == [10]


def test_async_batch_functions_run_on_the_loop():
    async def double(rows):
        await asyncio.sleep(0)
        return rows * 2

    async def main():
        b = DynamicBatcher(double, max_batch=8, max_wait_s=0.01, max_queue=10, workers=2, name="test")
        b.start()
        out = await asyncio.gather(*(b.submit(np.full((1, 1), i)) for i in range(5)))
        await b.stop()
        return [int(o[0, 0]) for o in out]

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
