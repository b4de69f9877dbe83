"""Running a scoring plan on the engine: its masked copies as ordinary one-forward work.

The copies share the batcher's token-budget forwards with Logits, Embed and generation steps,
under their caller's fair share. A plan keeps at most a window of copies queued (about two
forwards' worth, and never more than a quarter of the queue), so one big request cannot fill
the queue. Each copy's logits are reduced at once to the few log-probability rows the scores
need; the final reduce runs off the event loop. No protobuf here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import torch

from esmc.scoring import ScoringPlan, ScoringResult
from esmc.types import LogitsConfig
from esmc_server.config import BatchingConfig
from esmc_server.requests import LogitsResult, Timing, combine_timings

SEQUENCE_LOGITS = LogitsConfig(sequence=True)


PLAN_ON_LOOP_ITEMS = 2048
"""Variants plus residues a plan may have and still be built on the event loop (a few ms);
larger plans are built in a thread so that they never hold the loop."""


async def off_loop_if_large(items: int, build, *args):
    if items <= PLAN_ON_LOOP_ITEMS:
        return build(*args)
    return await asyncio.to_thread(build, *args)


def copy_window(batching: BatchingConfig, tokens_per_copy: int) -> int:
    """Copies one request keeps queued: two forwards' worth, at most a quarter of the queue."""
    per_forward = min(batching.max_batch_size, batching.max_batch_tokens // tokens_per_copy)
    return max(1, min(2 * max(1, per_forward), batching.max_queue // 4))


async def run_plan(
    forward: Callable[[torch.Tensor], Awaitable[LogitsResult]],
    plan: ScoringPlan,
    batching: BatchingConfig,
    deadline: float | None = None,
) -> tuple[ScoringResult, Timing]:
    """Every copy through ``forward`` (a bounded window at a time), then the reduce; the
    timing combines the copies' (:func:`combine_timings`, concurrent). The first error of a
    copy (a deadline, a full queue) answers for the plan, and the other copies stop."""
    start = time.perf_counter()
    timings: list[Timing] = []
    reads: list = [None] * len(plan.copies)
    todo = iter(range(len(plan.copies)))
    length = len(plan.wild_type) + 2

    async def worker() -> None:
        for k in todo:
            tokens = await off_loop_if_large(length, plan.tokens, k)
            result = await forward(tokens)
            timings.append(result.timing)
            logits = result.output.logits.sequence  # a few rows of 64 are read from it
            reads[k] = await off_loop_if_large(len(plan.copies[k].reads), plan.read, k, logits)

    window = min(len(plan.copies), copy_window(batching, length))
    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the other workers
            for _ in range(window):
                group.create_task(worker())
    except* Exception as group:
        raise _first_error(group) from None
    result = await asyncio.to_thread(plan.reduce, reads)
    wall_ms = (time.perf_counter() - start) * 1000.0
    return result, combine_timings(timings, concurrent=True, compute_ms=wall_ms)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
