"""One pass of the device thread: schedule -> execute -> update (see :mod:`esmc_server.device_loop`).

- schedule: the pending set (:mod:`esmc_server.pending`) takes a batch out of the queue, per
  the pure policy; it is collated outside the lock (the event loop never waits on collation);
- execute: one packed (or padded) forward; an error bisects the batch so that it lands on
  the requests it concerns (out of memory: halves are retried, one sequence alone gets
  :class:`SequenceTooLargeForDevice`, a non-retryable status);
- update: split the outputs per request, settle futures / advance generations (results go to
  the event loop with ``call_soon_threadsafe``), queue (or park) every unfinished generation.

An ``Exception`` at any stage fails exactly the requests it concerns with a
:class:`ServiceError` whose message names the stage (the traceback is logged once at ERROR).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from esmc.batch import TokenBatch
from esmc.generation import GenerationStep
from esmc.inference import as_logits_output
from esmc import ESMC
from esmc.types import LogitsOutput
from esmc_server.errors import InternalError, SequenceTooLargeForDevice, ServiceError
from esmc_server.execute import BatchExecutor
from esmc_server.observer import EngineObserver
from esmc_server.pending import PendingSet
from esmc_server.policy import batch_cost
from esmc_server.requests import EngineStats, GenerationWork, Timing, Work

log = logging.getLogger(__name__)

Outcome = LogitsOutput | ServiceError
"""What a pass gives one request: its outputs, or the error that fails it alone."""
StepOutcome = GenerationStep | ServiceError
"""What a pass gives one generation: its next step, or the error that ends it."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A scheduled batch, collated and on its way to the device."""

    works: list[Work]
    tokens: int  # as the backend pays
    batch: TokenBatch
    keep: list[int]  # hidden blocks any request needs, sorted

    @property
    def generation_steps(self) -> int:
        return sum(isinstance(w, GenerationWork) for w in self.works)

    @property
    def wants_logits(self) -> bool:
        """False when no request needs the sequence head (the forward skips it)."""
        return any(w.config.sequence for w in self.works)


@dataclasses.dataclass(frozen=True)
class PassOutcome:
    """One request's outcome of a pass: its outputs, or the error that fails it."""

    work: Work
    output: Outcome
    batch_size: int
    batch_tokens: int


@dataclasses.dataclass(frozen=True)
class Executed:
    """What a pass computed: per-request outcomes, forwards run, tokens paid."""

    served: list[PassOutcome]
    forwards: int
    paid: int


def service_error(error: BaseException, stage: str, detail: str = "") -> ServiceError:
    """``error`` as the caller sees it: service errors pass, anything else is logged once
    (with its traceback) and becomes an :class:`InternalError` naming ``stage``."""
    if isinstance(error, ServiceError):
        return error
    log.error("%s failed%s", stage, detail, exc_info=error)
    return InternalError(stage)


class Busy:
    """When the device thread started its current stage (None: waiting for work)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.what = ""

    def enter(self, what: str) -> None:
        self.what = what
        self.since = time.monotonic()

    def leave(self) -> None:
        self.since = None


class DevicePass:
    """Schedule -> execute -> update; runs on the device thread only."""

    def __init__(
        self,
        model: ESMC,
        pending: PendingSet,
        observer: EngineObserver,
        stats: EngineStats,
        busy: Busy,
        executor: BatchExecutor,
    ):
        self._run_steps = executor
        self._model = model
        self._pending = pending
        self._limits = pending.limits
        self._observer = observer
        self.stats = stats
        self._busy = busy
        self._lookahead: Prepared | None = None

    def take_lookahead(self) -> Prepared | None:
        """The batch scheduled during the last forward (once)."""
        prepared, self._lookahead = self._lookahead, None
        return prepared

    # -- schedule ----------------------------------------------------------------------------

    def schedule(self, block: bool, on_idle: Callable[[], None]) -> Prepared | None:
        """The next batch, collated; None when stopped (or, not blocking, when none is due).
        A batch whose collation fails is failed and the next one is scheduled."""
        while True:
            works = self._pending.next_batch(block, on_idle)
            if works is None:
                return None
            prepared = self._prepare(works)
            if prepared is not None or not block:
                return prepared

    def _prepare(self, works: list[Work]) -> Prepared | None:
        """Collate ``works``. When that fails, each work is collated alone: those that fail
        alone are failed, the others are collated again together (None: none left)."""
        try:
            batch = self._collate(works)
        except Exception as error:  # noqa: BLE001 - located, then handed to those concerned
            if len(works) == 1:
                self._fail(works, service_error(error, "preparing the batch"))
                return None
            works = [w for w in works if self._prepare([w]) is not None]
            return self._prepare(works) if works else None
        keep = sorted({i for w in works for i in w.layers})
        return Prepared(works, batch_cost(batch.lengths, self._limits.packed), batch, keep)

    def _collate(self, works: list[Work]) -> TokenBatch:
        return self._run_steps.collate(
            [w.tokens for w in works], self._limits.packed, self._model.device
        )

    # -- execute -----------------------------------------------------------------------------

    def run(self, prepared: Prepared, on_idle: Callable[[], None]) -> Prepared | None:
        """Execute and update one batch; returns the looked-ahead next batch, if any."""
        alive = self._pending.recheck(prepared.works)
        if len(alive) < len(prepared.works):
            prepared = self._prepare(alive) if alive else None
            if prepared is None:
                return None
        started = time.monotonic()

        def look_ahead() -> None:
            if not prepared.generation_steps:
                self._lookahead = self.schedule(block=False, on_idle=on_idle)

        executed = self.execute(prepared, look_ahead)
        compute_ms = (time.monotonic() - started) * 1000.0
        self._busy.enter("handing results on")
        self.update(executed, started, compute_ms)
        return self.take_lookahead()

    def execute(self, prepared: Prepared, between: Callable[[], None] = lambda: None) -> Executed:
        """One forward and its per-request outputs; ``between`` runs while the forward runs.
        Errors bisect the batch (:meth:`_bisect`)."""
        self._busy.enter("a forward")
        works, keep = prepared.works, prepared.keep
        try:
            out = self._run_steps.forward(
                self._model, prepared.batch, keep, return_logits=prepared.wants_logits
            )
            between()
            self._busy.enter("a forward")
            selected = [self._select(out, prepared, i, w) for i, w in enumerate(works)]
            host = iter(self._run_steps.to_host([s for s in selected if isinstance(s, dict)]))
        except Exception as error:  # noqa: BLE001 - located by bisection, then handed on
            return self._bisect(prepared, error)
        served = [
            PassOutcome(w, as_logits_output(next(host)) if isinstance(s, dict) else s, len(works),
                   prepared.tokens)
            for w, s in zip(works, selected)
        ]
        return Executed(served, 1, prepared.tokens)

    def _select(self, out, prepared: Prepared, index: int, work: Work
                ) -> dict[str, torch.Tensor] | ServiceError:
        """One request's outputs on the device (a dict), or the error that fails it alone."""
        try:
            layers = [prepared.keep.index(i) for i in work.layers]
            return self._run_steps.select(
                out, prepared.batch, index, work.config, layers, work.dtype
            )
        except Exception as error:  # noqa: BLE001 - fails this request only
            return service_error(error, "splitting the batch's outputs")

    def _bisect(self, prepared: Prepared, error: Exception) -> Executed:
        """A failed forward: retry each half; a single sequence gets the error itself.

        Out of memory frees the allocator cache first, and alone becomes
        :class:`SequenceTooLargeForDevice` (the sequence can never fit: not retryable).
        """
        works = prepared.works
        oom = isinstance(error, torch.OutOfMemoryError)
        if len(works) == 1:
            length = works[0].length
            if oom:
                log.warning("a sequence of %d tokens does not fit in device memory alone", length)
                failure = SequenceTooLargeForDevice(length)
            else:
                failure = service_error(error, "running the forward", f" ({length} tokens)")
            return Executed([PassOutcome(works[0], failure, 1, prepared.tokens)], 1, prepared.tokens)
        if oom:
            self.stats.oom_splits += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        served, forwards, paid = [], 1, prepared.tokens  # the failed forward counts too
        half = len(works) // 2
        for part in (works[:half], works[half:]):
            sub = self._prepare(part)
            if sub is not None:
                result = self.execute(sub)
                served += result.served
                forwards += result.forwards
                paid += result.paid
        return Executed(served, forwards, paid)

    # -- update ------------------------------------------------------------------------------

    def update(self, executed: Executed, started: float, compute_ms: float) -> None:
        """Count the pass, hand each result on, queue every unfinished generation's next step.

        Counters and ``on_batch`` come first, so that they already include a request's
        forward when its caller sees the result.
        """
        served = executed.served
        timings = [
            Timing(
                queue_ms=max(started - item.work.ready, 0.0) * 1000.0,
                compute_ms=compute_ms,
                batch_size=item.batch_size,
                batch_tokens=item.batch_tokens,
                forwards=executed.forwards,
            )
            for item in served
        ]
        self._count(executed, compute_ms, [t.queue_ms for t in timings])
        if self._pending.failed:
            return  # a fatal fault failed these works already
        steps = self._sample_steps(served)
        again, done = [], []
        for item, timing in zip(served, timings):
            output = steps.get(item.work.key, item.output)
            (again if self._finish(item.work, output, timing) else done).append(item.work)
        active = self._pending.settle(again, done)
        self._observer.on_active_generations(active)

    def _sample_steps(self, served: list[PassOutcome]) -> dict[int, StepOutcome]:
        """The next step of every generation in the pass, sampled over all their rows at once
        (only each request's random draws are its own). If that fails, each is sampled alone
        so that the error lands on the generation it concerns. {key: GenerationStep or error}"""
        works = [
            s.work
            for s in served
            if isinstance(s.work, GenerationWork)
            and not isinstance(s.output, ServiceError)
            and not s.work.stream.closed
        ]
        if not works:
            return {}
        outputs = {s.work.key: s.output for s in served}
        states = [w.state for w in works]
        logits = [outputs[w.key].logits.sequence for w in works]  # (L+2, 64) each
        try:
            rows = self._run_steps.prepare_steps(states, logits)
        except Exception:  # noqa: BLE001 - located below, one generation at a time
            rows = [self._prepare_step(w, state, x) for w, state, x in zip(works, states, logits)]
        steps: dict[int, StepOutcome] = {}
        for work, prepared in zip(works, rows):
            if isinstance(prepared, ServiceError):
                steps[work.key] = prepared
                continue
            try:
                steps[work.key] = work.state.advance_from(prepared)
            except Exception as error:  # noqa: BLE001 - this generation only
                steps[work.key] = service_error(error, work.finish_stage)
        return steps

    def _prepare_step(self, work: GenerationWork, state, logits):
        try:
            return self._run_steps.prepare_steps([state], [logits])[0]
        except Exception as error:  # noqa: BLE001 - this generation only
            return service_error(error, work.finish_stage)

    @staticmethod
    def _finish(work: Work, output: Outcome | GenerationStep, timing: Timing) -> bool:
        if isinstance(output, ServiceError):
            work.fail(output)
            return False
        try:
            if isinstance(output, GenerationStep):
                return work.publish(output, timing)
            return work.finish(output, timing)
        except Exception as error:  # noqa: BLE001 - sampling / result building, this one only
            work.fail(service_error(error, work.finish_stage))
            return False

    def _count(self, executed: Executed, compute_ms: float, queue_ms: list[float]) -> None:
        stats, served = self.stats, executed.served
        steps = sum(isinstance(s.work, GenerationWork) for s in served)
        real = sum(s.work.length for s in served)
        stats.forwards += executed.forwards
        stats.sequences += len(served)
        stats.tokens += executed.paid
        stats.real_tokens += real
        stats.generation_steps += steps
        stats.generation_forwards += executed.forwards if steps else 0
        self._observer.on_batch(len(served), executed.paid, real, queue_ms, compute_ms, steps)
        for item, waited in zip(served, queue_ms):
            self._observer.on_served(item.work.caller, item.work.length, waited)

    def _fail(self, works: list[Work], error: ServiceError) -> None:
        for work in works:
            work.fail(error)
        self._pending.forget(works)
