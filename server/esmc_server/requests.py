"""Work items of the engine and the plain results it hands back.

A work item is one sequence waiting for (or riding in) a forward. It lives on two threads:
the event loop creates it and awaits its future or stream; the device thread forwards it and
settles it through ``loop.call_soon_threadsafe``. Nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from esmc.types import LogitsConfig, LogitsOutput
from esmc_server.errors import DeadlineExceeded
from esmc_server.policy import PendingEntry

if TYPE_CHECKING:
    from esmc.generation import GenerationState, GenerationStep

GENERATION_LOGITS = LogitsConfig(sequence=True)
"""What a generation step needs from its forward: the sequence logits only."""


# -- deadlines: the one place that decides whether one passed and what the caller is told ----


def deadline_passed(deadline: float | None, now: float) -> bool:
    """True when ``deadline`` (monotonic seconds, None: none) is at or before ``now``."""
    return deadline is not None and now >= deadline


def deadline_error(when: str) -> DeadlineExceeded:
    """The error a caller gets when its deadline passed ``when`` (e.g. "during the generation")."""
    return DeadlineExceeded(f"the deadline passed {when}")


@dataclasses.dataclass(frozen=True)
class Timing:
    queue_ms: float  # from ready (arrival, or the previous step's end) to the forward's start
    compute_ms: float  # the pass: forward(s), copy to the host, slicing
    batch_size: int  # sequences in the forward it rode in
    batch_tokens: int  # tokens that forward paid (padded: count * max length)
    forwards: int = 1  # forwards the pass took (> 1 after an out-of-memory split)


def combine_timings(
    timings: Sequence[Timing], *, concurrent: bool, compute_ms: float | None = None
) -> Timing:
    """The timing of a response that took several forwards, the one rule for all of them.

    ``concurrent=False`` (a generation's steps, one after the other): queue and compute times
    are summed, the batch is the last one's. ``concurrent=True`` (a plan's masked copies, in
    flight together): the longest queue time, ``compute_ms`` the wall time of the whole
    (given), the largest batch, and each pass counted once (copies sharing a forward share
    its timing). Forwards are summed either way.
    """
    if not timings:
        return Timing(0.0, compute_ms or 0.0, 0, 0, 0)
    if not concurrent:
        last = timings[-1]
        return Timing(
            queue_ms=sum(t.queue_ms for t in timings),
            compute_ms=sum(t.compute_ms for t in timings) if compute_ms is None else compute_ms,
            batch_size=last.batch_size,
            batch_tokens=last.batch_tokens,
            forwards=sum(t.forwards for t in timings),
        )
    passes = {(t.compute_ms, t.batch_size, t.batch_tokens): t.forwards for t in timings}
    return Timing(
        queue_ms=max(t.queue_ms for t in timings),
        compute_ms=max(t.compute_ms for t in timings) if compute_ms is None else compute_ms,
        batch_size=max(t.batch_size for t in timings),
        batch_tokens=max(t.batch_tokens for t in timings),
        forwards=sum(passes.values()),
    )


@dataclasses.dataclass(frozen=True)
class LogitsResult:
    output: LogitsOutput  # per protein, CPU tensors in the dtype asked for (float32 default)
    timing: Timing


@dataclasses.dataclass(frozen=True)
class GenerationEvent:
    step: GenerationStep
    timing: Timing
    final: bool


@dataclasses.dataclass
class EngineStats:
    """Counters, written by the device thread only (plain ints: safe to read anywhere)."""

    forwards: int = 0
    sequences: int = 0  # sequences forwarded, generation steps included
    tokens: int = 0  # tokens paid (padding included when padded)
    real_tokens: int = 0  # tokens of the sequences themselves
    generation_steps: int = 0
    generation_forwards: int = 0  # forwards that carried at least one generation step
    active_generations: int = 0
    queue_depth: int = 0  # work items waiting for a forward
    dropped: int = 0  # cancelled or past their deadline before costing a forward
    oom_splits: int = 0

    @property
    def steps_per_generation_forward(self) -> float:
        """Generation steps sharing each forward that carried any (forwards shared per step)."""
        return self.generation_steps / max(1, self.generation_forwards)


def settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any = None,
           error: BaseException | None = None) -> None:
    """Resolve ``future`` from any thread, unless it is already done (cancelled, timed out)."""

    def apply() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


@dataclasses.dataclass(eq=False, kw_only=True)
class Work:
    """One sequence for one forward; subclasses say what happens with its outputs."""

    key: int
    tokens: torch.Tensor  # (L+2,) int64 on the CPU
    config: LogitsConfig
    layers: Sequence[int]  # hidden blocks this request needs (reference numbering)
    deadline: float | None  # monotonic seconds
    ready: float  # monotonic seconds when it (or its current step) became ready
    priority: int = 0
    dtype: torch.dtype = torch.float32  # of its outputs (means are taken in float32 first)
    caller: str = "anonymous"  # whom its forwards are charged to (the fair policy's unit)
    start_tag: float = 0.0  # its place in the fair order (set by the pending set when queued)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def entry(self) -> PendingEntry:
        return PendingEntry(
            self.key, self.length, self.ready, self.priority, self.caller, self.start_tag
        )

    finish_stage = "building the result"
    """What :meth:`finish` does, named in the error the caller gets if it fails."""

    def gone(self, now: float) -> bool:
        """True when nobody wants the result any more (checked before each forward)."""
        raise NotImplementedError

    def finish(self, output: LogitsOutput, timing: Timing) -> bool:
        """Hand the outputs on; True to queue again (a generation's next step)."""
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        raise NotImplementedError


@dataclasses.dataclass(eq=False, kw_only=True)
class OneShotWork(Work):
    """A unary call: one forward, then ``make_result`` (on the device thread) settles the future."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    make_result: Callable[[LogitsOutput, Timing], Any]
    finish_stage: str = "building the result"

    def gone(self, now: float) -> bool:
        if self.future.done():  # cancelled by the caller or failed by the deadline timer
            return True
        if deadline_passed(self.deadline, now):
            self.fail(deadline_error("before the request was computed"))
            return True
        return False

    def finish(self, output: LogitsOutput, timing: Timing) -> bool:
        settle(self.loop, self.future, self.make_result(output, timing))
        return False

    def fail(self, error: BaseException) -> None:
        settle(self.loop, self.future, error=error)


class StreamChannel:
    """What a generation's producer (device thread) and consumer (event loop) share.

    ``closed`` says the consumer went away or the deadline passed: the device thread drops
    the generation before its next step. Items are queued on the loop. ``produced`` (device
    thread) and ``consumed`` (event loop) count items, so the device thread can hold back a
    generation whose consumer has not taken its earlier steps (:attr:`unread`); the consumer
    wakes it (``on_read``) when it takes one.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[], None],
        on_read: Callable[[], None] = lambda: None,
    ):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.produced = 0  # items pushed (device thread)
        self.consumed = 0  # items taken by the consumer (event loop)
        self.ended = False  # the final event or an error was pushed
        self._on_close = on_close
        self._on_read = on_read
        self.timer: asyncio.TimerHandle | None = None

    @property
    def unread(self) -> int:
        """Items pushed that the consumer has not taken yet (plain ints: any thread)."""
        return self.produced - self.consumed

    def push(self, item: GenerationEvent | BaseException) -> None:
        """From the device thread: queue an event, or the error that ends the stream."""
        if self.ended:
            return  # an error (a deadline, a fatal fault) already ended it
        self.ended = isinstance(item, BaseException) or item.final
        self.produced += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening
            pass

    def taken(self) -> None:
        """On the loop: the consumer took one item."""
        self.consumed += 1
        self._on_read()

    def expire(self) -> None:
        """On the loop, at the deadline: end the stream and stop the generation."""
        self.queue.put_nowait(deadline_error("during the generation"))
        self.close()

    def close(self) -> None:
        """On the loop (or from a finalizer): stop producing; idempotent."""
        if self.timer is not None:
            self.timer.cancel()
        if not self.closed:
            self.closed = True
            self._on_close()


class GenerationStream:
    """Async iterator of a generation's :class:`GenerationEvent` s, ending after the final one.

    ``aclose()``, cancelling the task waiting in ``__anext__``, or dropping the stream removes
    the generation before its next step. Also an async context manager (closes on exit).
    """

    def __init__(self, channel: StreamChannel):
        self._channel = channel
        self._finished = False  # final event or error handed to the consumer

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        channel = self._channel
        if self._finished or (channel.closed and channel.queue.empty()):
            raise StopAsyncIteration
        try:
            item = await channel.queue.get()
        except asyncio.CancelledError:
            channel.close()
            raise
        channel.taken()
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.final:
            self._end()
        return item

    async def aclose(self) -> None:
        """Stop iterating; the generation leaves before its next step."""
        self._finished = True
        self._channel.close()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def __del__(self) -> None:
        channel = self._channel
        if channel.closed:
            return
        try:
            channel.loop.call_soon_threadsafe(channel.close)  # finalizers may run on any thread
        except RuntimeError:  # loop closed
            channel.closed = True

    def _end(self) -> None:
        self._finished = True
        self._channel.close()


@dataclasses.dataclass(eq=False, kw_only=True)
class GenerationWork(Work):
    """An active generation: one step per forward it rides in, then queued again."""

    state: GenerationState
    stream: StreamChannel
    finish_stage: str = "sampling the next generation step"

    def gone(self, now: float) -> bool:
        if self.stream.closed:
            return True
        if deadline_passed(self.deadline, now):
            self.fail(deadline_error("during the generation"))
            return True
        return False

    def finish(self, output: LogitsOutput, timing: Timing) -> bool:
        """Sample this step alone (the device pass samples all steps at once: :meth:`publish`)."""
        if self.stream.closed:
            return False
        return self.publish(self.state.advance(output.logits.sequence), timing)

    def publish(self, step: GenerationStep, timing: Timing) -> bool:
        """Hand a step the state already took to the consumer; True when another follows."""
        if self.stream.closed:
            return False
        self.stream.push(GenerationEvent(step=step, timing=timing, final=self.state.done))
        if self.state.done:
            return False
        self.tokens = self.state.tokens
        self.ready = time.monotonic()
        self.priority = 1
        return True

    def fail(self, error: BaseException) -> None:
        self.stream.push(error)
