"""The engine: async calls on the event loop, one device thread that owns the model.

Calls validate what depends on the model (layer indices, sampling and generation configs)
and raise :class:`InvalidRequest` before anything is queued; then they queue a work item and
await its future (or return a generation's stream). The device thread
(:mod:`esmc_server.device_loop`) batches everything pending, logits work and one step of every
active generation alike, under one token budget. No protobuf here, and no torch compute on
the event loop (building a generation's state only copies its tokens and seeds a generator).

A fatal fault of the device thread (see :mod:`esmc_server.device_loop`) fails every call with
:class:`Unavailable`, sets :attr:`Engine.fatal` and calls the fatal listeners on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from esmc.generation import GenerationState, logits_config_for, sample_from_logits
from esmc import ESMC
from esmc.scoring import ScoringResult
from esmc.tokenizer import MASK_ID, encode
from esmc.types import (
    ForwardAndSampleOutput,
    GenerationConfig,
    LogitsConfig,
    LogitsOutput,
    SamplingConfig,
)
from esmc_server.admission import Admission, AdmissionLimits, Lease
from esmc_server.calls import (
    INTERNAL,
    Call,
    GenerateCall,
    LogitsCall,
    SampleCall,
    ScoreCall,
    checked_layers,
    generate_call,
    logits_call,
    sample_call,
)
from esmc_server.config import BatchingConfig
from esmc_server.device_loop import DeviceLoop
from esmc_server.errors import InvalidRequest, Unavailable
from esmc_server.execute import BatchExecutor
from esmc_server.observer import EngineObserver, GuardedObserver
from esmc_server.requests import (
    GENERATION_LOGITS,
    EngineStats,
    GenerationEvent,
    GenerationStream,
    GenerationWork,
    LogitsResult,
    OneShotWork,
    StreamChannel,
    Timing,
    deadline_error,
    deadline_passed,
)
from esmc_server.score_run import SEQUENCE_LOGITS, run_plan

log = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineObserver",
    "EngineStats",
    "GenerationEvent",
    "GenerationStream",
    "LogitsResult",
    "Timing",
]


class Engine:
    """Dynamic batching of logits calls and continuous batching of generations on one model."""

    def __init__(
        self,
        model: ESMC,
        batching: BatchingConfig,
        observer: EngineObserver | None = None,
        *,
        forward_timeout_s: float | None = None,
        on_fatal: Callable[[str], None] | None = None,
        executor: BatchExecutor | None = None,
        admission: AdmissionLimits | None = None,
    ):
        """``forward_timeout_s``: a forward (or the handing on of its results) running longer
        is fatal (None: no limit). ``on_fatal(reason)``: see :meth:`add_fatal_listener`.
        ``executor``: the steps of a pass (default :class:`BatchExecutor`; tests inject faults).
        ``admission``: the cost limits every call is admitted by (:mod:`esmc_server.admission`)."""
        self.model = model
        self.batching = batching
        self.stats = EngineStats()
        self.admission = Admission(admission)
        self._observer = GuardedObserver(observer or EngineObserver())
        self._device = DeviceLoop(
            model,
            batching,
            self._observer,
            self.stats,
            generation_window=batching.generation_window,
            forward_timeout_s=forward_timeout_s,
            on_fatal=self._on_device_fatal,
            executor=executor,
        )
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._fatal_listeners: list[Callable[[str], None]] = []
        if on_fatal is not None:
            self._fatal_listeners.append(on_fatal)

    # -- health ------------------------------------------------------------------------------

    @property
    def fatal(self) -> str | None:
        """None while healthy; after a fatal fault, the reason (a plain sentence)."""
        return self._device.fatal

    def add_fatal_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` on the engine's event loop once a fatal fault happened
        (at once, soon, if it already has). By then every call in flight has failed with
        Unavailable and new calls are refused with Unavailable."""
        self._fatal_listeners.append(listener)
        if self.fatal is not None and self._loop is not None:
            _call_soon(self._loop, lambda: listener(self.fatal))

    def _on_device_fatal(self, reason: str) -> None:
        """From the device or watchdog thread: hop to the event loop for the listeners."""
        if self._loop is None:
            return

        def notify() -> None:
            for listener in list(self._fatal_listeners):
                try:
                    listener(reason)
                except Exception:  # noqa: BLE001 - one listener must not stop the others
                    logging.getLogger(__name__).exception("a fatal-fault listener failed")

        _call_soon(self._loop, notify)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the device thread (work is refused with Unavailable before this)."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        loop, idle = self._loop, self._idle
        self._device.start(on_idle=lambda: _call_soon(loop, idle.set))

    async def warmup(self) -> None:
        """Two logits calls of different lengths (one batched forward) and a generation step."""
        config = LogitsConfig(sequence=True, return_embeddings=True, return_mean_embedding=True)
        await asyncio.gather(
            self.logits(encode("MKTAYIAKQR"), config),
            self.logits(encode("MSHHWGYGKHNGPEHWHKDFPIAKGERQSPVDIDT"), config),
        )
        masked = encode("MKTAYIAKQR")
        masked[3:6] = MASK_ID
        async for _ in self.generate(masked, GenerationConfig(track="sequence", num_steps=1), 0):
            pass

    async def stop(self, grace_s: float) -> None:
        """Refuse new work (Unavailable), let queued and in-flight work finish within
        ``grace_s``, then fail what is left with Unavailable and end the device thread."""
        if self._loop is None:
            return
        self._device.drain()
        if self.fatal is None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except TimeoutError:
                pass
        self._device.halt()
        await asyncio.to_thread(self._device.join)

    # -- calls -------------------------------------------------------------------------------
    # Each takes its validated call as is (:mod:`esmc_server.calls`); the raw forms (tokens,
    # config, ...) build the same call first, for callers inside this process.

    async def logits(
        self,
        call: LogitsCall | torch.Tensor,
        config: LogitsConfig | None = None,
        *,
        deadline: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LogitsResult:
        """One protein's outputs per its config and how it was served: CPU tensors in the
        call's dtype (cast on the device, means taken in float32 first), only the parts the
        config asks for."""
        if not isinstance(call, LogitsCall):
            layers = checked_layers(config, self.model.config.n_layers)
            call = logits_call(call, config, layers, dtype=dtype, deadline=deadline)
        with self._admit(call):
            return await self._unary(call, call.tokens, call.config, call.layers, LogitsResult,
                                     dtype=call.dtype)

    async def forward_and_sample(
        self,
        call: SampleCall | torch.Tensor,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        *,
        deadline: float | None = None,
    ) -> tuple[ForwardAndSampleOutput, Timing]:
        """One forward shared with other work, then sampling of this protein's logits."""
        if not isinstance(call, SampleCall):
            call = sample_call(call, sampling, seed, deadline=deadline)
        tokens, config, drawn = call.tokens, call.sampling, call.seed

        def sample(output: LogitsOutput, timing: Timing) -> tuple[ForwardAndSampleOutput, Timing]:
            return sample_from_logits(tokens, output, config, drawn), timing

        with self._admit(call):
            return await self._unary(
                call, tokens, logits_config_for(config), (), sample,
                finish_stage="sampling the logits",
            )

    def generate(
        self,
        call: GenerateCall | torch.Tensor,
        config: GenerationConfig | None = None,
        seed: int | None = None,
        *,
        deadline: float | None = None,
    ) -> GenerationStream:
        """Start a generation now; its steps arrive on the returned async iterator.

        Invalid configs or inputs without masks raise InvalidRequest here, before queueing.
        Closing the iterator (or cancelling its reader) stops the generation before its next
        step; the call's deadline bounds the whole stream.
        """
        if not isinstance(call, GenerateCall):
            call = generate_call(call, config, seed, deadline=deadline)
        loop = self._running_loop()
        try:
            state = GenerationState(call.tokens, call.config, call.seed)
        except ValueError as error:
            raise InvalidRequest(str(error)) from error
        now = time.monotonic()
        _check_deadline(call.deadline, now)
        lease = self._admit(call)

        def closed() -> None:  # the stream ended, failed, was cancelled or dropped
            lease.release()
            self._device.wake()

        channel = StreamChannel(loop, on_close=closed, on_read=self._device.wake)
        work = GenerationWork(
            key=next(self._keys),
            tokens=state.tokens,
            config=GENERATION_LOGITS,
            layers=(),
            deadline=call.deadline,
            ready=now,
            caller=call.caller.name,
            state=state,
            stream=channel,
        )
        try:
            self._device.submit(work)
        except BaseException:
            lease.release()
            raise
        if call.deadline is not None:
            channel.timer = loop.call_later(call.deadline - now, channel.expire)
        return GenerationStream(channel)

    async def score(self, call: ScoreCall) -> tuple[ScoringResult, Timing]:
        """Every masked copy of the call's plan as ordinary work (a bounded window queued at a
        time, charged to the call's caller), then the reduce (off the event loop)."""

        async def forward(tokens: torch.Tensor) -> LogitsResult:
            return await self._unary(call, tokens, SEQUENCE_LOGITS, (), LogitsResult)

        with self._admit(call):
            return await run_plan(forward, call.plan, self.batching, call.deadline)

    async def check_forward_time(self, max_tokens: int) -> int | None:
        """The start check: time the longest forward this server admits (one sequence of
        ``max(max_tokens, max_batch_tokens)`` tokens, the watchdog held off meanwhile). When
        it takes more than half of ``forward_timeout_s``, cap what is admitted from now on
        (requests and the batch budget) to a length that fits, log a warning saying so, and
        return the cap; None when everything fits (or there is no timeout)."""
        limit = self._device.forward_timeout_s
        if limit is None:
            return None
        longest = max(max_tokens, self.batching.max_batch_tokens)
        tokens = encode("A" * (longest - 2))
        call = logits_call(tokens, SEQUENCE_LOGITS, (), caller=INTERNAL)
        self._device.forward_timeout_s = None  # this one may be long: it is what we measure
        try:
            started = time.perf_counter()
            await self._unary(call, call.tokens, call.config, (), LogitsResult)
            elapsed = time.perf_counter() - started
        finally:
            self._device.forward_timeout_s = limit
        allowed = limit / 2
        if elapsed <= allowed:
            return None
        # time grows at least linearly with length: the scaled length takes at most ``allowed``
        cap = max(3, int(longest * allowed / elapsed))
        reason = (
            f"a forward of {longest:,} tokens took {elapsed:.1f} s at start, over half of "
            f"forward_timeout_s={limit:g}"
        )
        self.admission.cap_forward(cap, reason)
        self._device.set_budget(min(self.batching.max_batch_tokens, cap))
        log.warning("%s: requests and forwards are capped at %d tokens from now on", reason, cap)
        return cap

    # -- helpers -----------------------------------------------------------------------------

    async def _unary(
        self,
        call: Call,
        tokens: torch.Tensor,
        config: LogitsConfig,
        layers: tuple[int, ...],
        make_result: Callable[[LogitsOutput, Timing], Any],
        *,
        dtype: torch.dtype = torch.float32,
        finish_stage: str = "building the result",
    ) -> Any:
        loop = self._running_loop()
        now = time.monotonic()
        deadline = call.deadline
        _check_deadline(deadline, now)
        future = loop.create_future()
        work = OneShotWork(
            key=next(self._keys),
            tokens=tokens,
            config=config,
            layers=layers,
            deadline=deadline,
            ready=now,
            caller=call.caller.name,
            loop=loop,
            future=future,
            make_result=make_result,
            dtype=dtype,
            finish_stage=finish_stage,
        )
        self._device.submit(work)
        future.add_done_callback(self._on_settled)
        timer = None if deadline is None else loop.call_later(deadline - now, _expire, future)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    def _admit(self, call: Call) -> Lease:
        lease = self.admission.admit(call)
        self._observer.on_call(call.caller.name, call.cost.token_forwards)
        return lease

    def _on_settled(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self._device.wake()  # cancelled or timed out: drop it now, not at the next pass

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise Unavailable("the engine has not been started")
        return self._loop


def _check_deadline(deadline: float | None, now: float) -> None:
    if deadline_passed(deadline, now):
        raise deadline_error("before the request was queued")


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(deadline_error("before the result was ready"))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # loop closed
        pass
