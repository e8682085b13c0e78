"""The dynamic batcher: every caller gets its own rows back; concurrent calls share batches."""

import asyncio
import time

import numpy as np
import pytest

from services.runtime.batching import DynamicBatcher


def slow_double(rows):
    time.sleep(0.01)  # long enough for callers to queue up behind a running batch
    return [rows * 2, rows.sum(axis=1)]


async def call_many(batcher, n):
    inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(n)]
    results = await asyncio.gather(*(batcher(x) for x in inputs))
    return inputs, results


@pytest.mark.parametrize("enabled", [True, False])
def test_each_caller_gets_its_own_rows(enabled):
    sizes = []
    batcher = DynamicBatcher(slow_double, enabled=enabled, max_rows=16, wait_ms=0, on_batch=sizes.append)
    inputs, results = asyncio.run(call_many(batcher, 40))
    for x, (doubled, summed) in zip(inputs, results):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(summed, x.sum(axis=1))
    assert sum(sizes) == sum(len(x) for x in inputs)
    if enabled:
        assert max(sizes) > 3 and max(sizes) <= 16  # batches formed, capped at max_rows
    else:
        assert max(sizes) <= 3  # one request per run


def test_an_error_reaches_every_caller_of_that_batch_and_the_batcher_goes_on():
    calls = {"n": 0}

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return [rows]

    async def scenario():
        batcher = DynamicBatcher(flaky, enabled=True, max_rows=8, wait_ms=5)
        first = await asyncio.gather(batcher(np.ones((1, 1))), batcher(np.ones((1, 1))), return_exceptions=True)
        second = await batcher(np.ones((1, 1)))
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first)
    np.testing.assert_array_equal(second[0], np.ones((1, 1)))
