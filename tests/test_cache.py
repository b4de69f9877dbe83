"""esmc_server.cache: identical calls in flight share one computation; a bounded cache answers
repeats, evicts by size, is partitioned per caller unless shared; counters say what happened."""

from __future__ import annotations

import asyncio

import pytest
import torch

from esmc.types import LogitsConfig
from esmc_server.cache import ResponseCache, logits_key, result_bytes
from esmc_server.calls import Caller, Cost, LogitsCall

pytestmark = pytest.mark.unit


def call(tokens=(0, 5, 6, 2), caller="alice", **config) -> LogitsCall:
    config = config or {"return_mean_embedding": True}
    return LogitsCall(
        tokens=torch.tensor(tokens), config=LogitsConfig(**config), caller=Caller(caller),
        cost=Cost(tokens=len(tokens)),
    )


class Counter:
    """A computation that counts its runs and returns a tensor of ``floats`` float32 values."""

    def __init__(self, floats: int = 4, delay: float = 0.0, error: Exception | None = None):
        self.runs = 0
        self.floats, self.delay, self.error = floats, delay, error

    async def __call__(self):
        self.runs += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return torch.full((self.floats,), float(self.runs))


def test_keys_hold_what_the_result_depends_on():
    base = logits_key(call(), "m")
    assert logits_key(call(), "m") == base
    assert logits_key(call(), "other-model") != base
    assert logits_key(call(tokens=(0, 5, 7, 2)), "m") != base
    assert logits_key(call(sequence=True), "m") != base
    assert logits_key(call(caller="bob"), "m") != base  # partitioned per caller
    assert logits_key(call(caller="bob"), "m", shared=True) == logits_key(call(), "m", shared=True)


async def test_identical_calls_in_flight_ride_one_computation():
    cache = ResponseCache(0)  # keeps nothing, still joins
    compute = Counter(delay=0.05)
    key = logits_key(call(), "m")
    results = await asyncio.gather(*(cache.get(key, compute) for _ in range(5)))
    assert compute.runs == 1 and all(torch.equal(r, results[0]) for r in results)
    assert (cache.stats.misses, cache.stats.joins, cache.stats.hits) == (1, 4, 0)
    await cache.get(key, compute)  # nothing kept: computed again
    assert compute.runs == 2 and cache.stats.entries == 0


async def test_repeats_are_answered_from_the_cache_and_equal_the_first_answer():
    cache = ResponseCache(1 << 20)
    compute = Counter()
    key = logits_key(call(), "m")
    first = await cache.get(key, compute)
    again = await cache.get(key, compute)
    assert compute.runs == 1 and torch.equal(first, again)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.bytes) == (1, 1, 16)


async def test_eviction_by_size_least_recently_used_first():
    cache = ResponseCache(40)  # room for two 16-byte results
    keys = [logits_key(call(tokens=(0, i, 2)), "m") for i in range(5, 8)]
    for key in keys[:2]:
        await cache.get(key, Counter())
    await cache.get(keys[0], Counter())  # keys[0] now most recently used
    await cache.get(keys[2], Counter())  # evicts keys[1]
    assert cache.stats.evictions == 1 and cache.stats.bytes == 32 and cache.stats.entries == 2
    recompute = Counter()
    await cache.get(keys[1], recompute)
    assert recompute.runs == 1
    kept = Counter()
    await cache.get(keys[2], kept)
    assert kept.runs == 0


async def test_a_result_larger_than_the_cache_is_not_kept():
    cache = ResponseCache(8)
    key = logits_key(call(), "m")
    await cache.get(key, Counter(floats=4))
    assert cache.stats.entries == 0 and cache.stats.bytes == 0


async def test_an_error_reaches_every_waiter_and_is_not_cached():
    cache = ResponseCache(1 << 20)
    key = logits_key(call(), "m")
    failing = Counter(delay=0.02, error=ValueError("bad protein"))
    outcomes = await asyncio.gather(
        *(cache.get(key, failing) for _ in range(3)), return_exceptions=True
    )
    assert failing.runs == 1 and all(isinstance(o, ValueError) for o in outcomes)
    assert cache.stats.entries == 0
    assert torch.equal(await cache.get(key, Counter()), torch.full((4,), 1.0))


async def test_a_cancelled_caller_leaves_the_others_their_answer():
    cache = ResponseCache(1 << 20)
    key = logits_key(call(), "m")
    compute = Counter(delay=0.1)
    leaver = asyncio.ensure_future(cache.get(key, compute))
    stayer = asyncio.ensure_future(cache.get(key, compute))
    await asyncio.sleep(0.02)
    leaver.cancel()
    assert torch.equal(await stayer, torch.full((4,), 1.0)) and compute.runs == 1
    with pytest.raises(asyncio.CancelledError):
        await leaver


async def test_the_computation_stops_when_nobody_waits():
    cache = ResponseCache(1 << 20)
    key = logits_key(call(), "m")
    started = asyncio.Event()

    async def slow():
        started.set()
        await asyncio.sleep(10)

    only = asyncio.ensure_future(cache.get(key, slow))
    await started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    await asyncio.sleep(0)
    assert cache.stats.entries == 0
    assert torch.equal(await cache.get(key, Counter()), torch.full((4,), 1.0))  # not stuck


def test_result_bytes_counts_nested_tensors():
    assert result_bytes({"a": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.float16)]}) == 16
    with pytest.raises(ValueError):
        ResponseCache(-1)
