"""The device thread: the only code that runs the model.

One pass is schedule -> execute -> update:

- schedule: under the lock, drop work nobody wants any more, ask the pure policy
  (:func:`esmc_server.policy.select_batch`) for a batch and take it out of the pending set;
  collate it outside the lock (the event loop never waits on collation);
- execute: one packed (or padded) forward; an error bisects the batch so that it lands on
  the requests it concerns (out of memory: halves are retried, one sequence alone gets
  :class:`DeviceOutOfMemory`);
- update: split the outputs per request, settle futures / advance generations (results go to
  the event loop with ``call_soon_threadsafe``), queue every unfinished generation's next step.

Lookahead: when the batch carries no generation step, the next batch is scheduled and
collated right after the forward is launched and before its outputs are read. On CUDA the
forward runs asynchronously, so that collation and its non-blocking copy overlap the running
forward; on the CPU the forward is synchronous and the lookahead only reorders the work.
A batch with generation steps is not looked ahead of: its generations' next steps need its
outputs, and they ride in the very next forward.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from esmc.model import ESMC
from esmc_server.config import BatchingConfig
from esmc_server.errors import DeviceOutOfMemory, QueueFull, Unavailable
from esmc_server.execute import Collated, collate, forward, slice_output, to_host
from esmc_server.policy import batch_cost, next_wakeup, select_batch
from esmc_server.requests import EngineStats, GenerationWork, Timing, Work

NEW, RUNNING, DRAINING, STOPPED = "new", "running", "draining", "stopped"

log = logging.getLogger(__name__)


class EngineObserver:
    """Receives plain numbers for metrics. Every method is a no-op here.

    Hooks run on the device thread, except ``on_queue_depth``, which a submission also calls
    on the caller's thread: keep them cheap and thread-safe (Prometheus metrics are).
    """

    def on_batch(
        self,
        sequences: int,
        tokens: int,
        real_tokens: int,
        queue_ms_list: list[float],
        compute_ms: float,
        generation_steps: int,
    ) -> None:
        """One pass: sequences and tokens paid (padded when padding), real tokens, each
        request's queue time, the pass's compute time, and how many were generation steps."""

    def on_queue_depth(self, n: int) -> None:
        """Work items waiting for a forward."""

    def on_active_generations(self, n: int) -> None:
        """Generations started and not yet finished, failed or closed."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A scheduled batch, collated and on its way to the device."""

    works: list[Work]
    tokens: int  # as the backend pays
    collated: Collated
    keep: list[int]  # hidden blocks any request needs, sorted

    @property
    def generation_steps(self) -> int:
        return sum(isinstance(w, GenerationWork) for w in self.works)


@dataclasses.dataclass(frozen=True)
class Served:
    work: Work
    output: object  # LogitsOutput, or the exception that failed this request
    batch_size: int
    batch_tokens: int


class DeviceLoop:
    """Pending set, lock and the device thread. Submitting is thread-safe."""

    def __init__(
        self, model: ESMC, limits: BatchingConfig, observer: EngineObserver, stats: EngineStats
    ):
        self._model = model
        self._limits = limits
        self._observer = observer
        self.stats = stats
        self._cond = threading.Condition()
        self._pending: dict[int, Work] = {}
        self._generations: set[int] = set()  # keys of active generations
        self._waiting_unary = 0  # one-shot works in the pending set
        self._state = NEW
        self._thread: threading.Thread | None = None
        self._on_idle: Callable[[], None] = lambda: None

    # -- control (any thread) ----------------------------------------------------------------

    def start(self, on_idle: Callable[[], None]) -> None:
        """Start the device thread; ``on_idle`` is called from it once draining has finished."""
        self._on_idle = on_idle
        with self._cond:
            self._state = RUNNING
        self._thread = threading.Thread(target=self._main, name="esmc-device", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> None:
        """Queue ``work``; raises :class:`Unavailable` unless running, :class:`QueueFull`."""
        generation = isinstance(work, GenerationWork)
        with self._cond:
            if self._state != RUNNING:
                raise Unavailable("the engine is not accepting work (starting or shutting down)")
            waiting = self._waiting_unary + len(self._generations)
            limit = self._limits.max_queue
            if waiting >= limit:
                raise QueueFull(f"{waiting} requests are waiting (max_queue={limit})")
            self._pending[work.key] = work
            if generation:
                self._generations.add(work.key)
            else:
                self._waiting_unary += 1
            depth = self.stats.queue_depth = len(self._pending)
            self._cond.notify()
        self._notify("on_queue_depth", depth)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def drain(self) -> None:
        """Refuse new work; run what is pending without waiting for company."""
        with self._cond:
            if self._state == RUNNING:
                self._state = DRAINING
            self._cond.notify()

    def halt(self) -> None:
        """Finish the pass under way, fail everything else with :class:`Unavailable`, exit."""
        with self._cond:
            self._state = STOPPED
            self._cond.notify()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # -- the device thread -------------------------------------------------------------------

    def _main(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        prepared = None
        try:
            while True:
                if prepared is None:
                    prepared = self._schedule(block=True)
                    if prepared is None:
                        return
                prepared = self._run_pass(prepared)
        except BaseException:
            log.exception("the device loop failed; the engine refuses work from now on")
            raise
        finally:
            self._fail_all(Unavailable("the engine stopped before this request was computed"))

    def _schedule(self, block: bool) -> Prepared | None:
        """Next batch, collated; None when stopped (or, not blocking, when nothing is due)."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_gone(now)
                if self._state == STOPPED:
                    return None
                entries = [w.entry() for w in self._pending.values()]
                limits = self._limits
                if self._state == DRAINING:
                    limits = dataclasses.replace(limits, max_wait_ms=0.0)
                batch = select_batch(entries, limits, now)
                if batch is not None:
                    works = [self._take(key) for key in batch.keys]
                    depth = len(self._pending)
                    break
                if not block:
                    return None
                if self._state == DRAINING and not self._generations and not self._pending:
                    self._on_idle()
                wakeup = next_wakeup(entries, limits, now)
                self._cond.wait(None if wakeup is None else max(wakeup - now, 0.0))
        self.stats.queue_depth = depth
        self._notify("on_queue_depth", depth)
        return self._prepare(works)

    def _take(self, key: int) -> Work:
        work = self._pending.pop(key)
        if not isinstance(work, GenerationWork):
            self._waiting_unary -= 1
        return work

    def _drop_gone(self, now: float) -> None:
        """Under the lock: remove cancelled / timed-out / closed work before it costs a forward."""
        for work in [w for w in self._pending.values() if w.gone(now)]:
            self._take(work.key)
            self._generations.discard(work.key)
            self.stats.dropped += 1

    def _prepare(self, works: list[Work]) -> Prepared | None:
        """Collate ``works`` (a failure here fails them all: it is not their forward's fault)."""
        lengths = [w.length for w in works]
        keep = sorted({i for w in works for i in w.layers})
        try:
            collated = collate([w.tokens for w in works], self._limits.packed, self._model.device)
        except Exception as error:  # noqa: BLE001 - handed to the requests concerned
            with self._cond:
                self._generations.difference_update(w.key for w in works)
            for work in works:
                work.fail(error)
            return None
        return Prepared(works, batch_cost(lengths, self._limits.packed), collated, keep)

    def _recheck(self, prepared: Prepared) -> Prepared | None:
        """Drop works that went away since they were scheduled (a looked-ahead batch waited)."""
        now = time.monotonic()
        with self._cond:
            alive = [w for w in prepared.works if not w.gone(now)]
            for work in prepared.works:
                if work not in alive:
                    self._generations.discard(work.key)
                    self.stats.dropped += 1
        if len(alive) == len(prepared.works):
            return prepared
        return self._prepare(alive) if alive else None

    def _run_pass(self, prepared: Prepared) -> Prepared | None:
        """Execute and update one batch; returns the looked-ahead next batch, if any."""
        prepared = self._recheck(prepared)
        if prepared is None:
            return None
        started = time.monotonic()
        lookahead: list[Prepared | None] = [None]

        def look_ahead() -> None:
            if not prepared.generation_steps:
                lookahead[0] = self._schedule(block=False)

        served, forwards, paid = self._execute(prepared, look_ahead)
        compute_ms = (time.monotonic() - started) * 1000.0
        self._update(served, started, compute_ms, forwards, paid)
        return lookahead[0]

    def _execute(self, prepared: Prepared, between: Callable[[], None] = lambda: None):
        """One forward and its per-request outputs; ``between`` runs while the forward runs.

        Returns ([Served], forwards run, tokens paid). Errors bisect the batch (:meth:`_bisect`).
        """
        try:
            out = forward(self._model, prepared.collated, prepared.keep)
            between()
            host = to_host(out, [w.config for w in prepared.works])
        except Exception as error:  # noqa: BLE001 - located by bisection, then handed on
            return self._bisect(prepared, error)
        rows = prepared.collated.rows()
        served = [self._serve(w, host, row, prepared) for w, row in zip(prepared.works, rows)]
        return served, 1, prepared.tokens

    def _serve(self, work: Work, host, row: tuple, prepared: Prepared) -> Served:
        try:
            layers = [prepared.keep.index(i) for i in work.layers]
            output = slice_output(host, row, work.config, layers)
        except Exception as error:  # noqa: BLE001 - fails this request only
            output = error
        return Served(work, output, len(prepared.works), prepared.tokens)

    def _bisect(self, prepared: Prepared, error: Exception):
        """A failed forward: retry each half; a single sequence gets the error itself.

        Out of memory frees the allocator cache first, and alone becomes DeviceOutOfMemory.
        """
        works = prepared.works
        oom = isinstance(error, torch.OutOfMemoryError)
        if len(works) == 1:
            if oom:
                error = DeviceOutOfMemory(
                    f"a sequence of {works[0].length} tokens does not fit in device memory alone"
                )
            return [Served(works[0], error, 1, prepared.tokens)], 1, prepared.tokens
        if oom:
            self.stats.oom_splits += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        served, forwards, paid = [], 1, prepared.tokens  # the failed forward counts too
        half = len(works) // 2
        for part in (works[:half], works[half:]):
            sub = self._prepare(part)
            if sub is not None:
                part_served, part_forwards, part_paid = self._execute(sub)
                served += part_served
                forwards += part_forwards
                paid += part_paid
        return served, forwards, paid

    def _update(
        self, served: list[Served], started: float, compute_ms: float, forwards: int, paid: int
    ) -> None:
        """Count the pass, hand each result on, queue every unfinished generation's next step.

        Counters and ``on_batch`` come first, so that they already include a request's
        forward when its caller sees the result.
        """
        timings = [
            Timing(
                queue_ms=max(started - item.work.ready, 0.0) * 1000.0,
                compute_ms=compute_ms,
                batch_size=item.batch_size,
                batch_tokens=item.batch_tokens,
                forwards=forwards,
            )
            for item in served
        ]
        self._count(served, forwards, paid, compute_ms, [t.queue_ms for t in timings])
        again, finished = [], []
        for item, timing in zip(served, timings):
            (again if self._finish(item.work, item.output, timing) else finished).append(item.work)
        with self._cond:
            for work in again:
                self._pending[work.key] = work
            for work in finished:
                self._generations.discard(work.key)
            active = len(self._generations)
        self.stats.active_generations = active
        self._notify("on_active_generations", active)

    @staticmethod
    def _finish(work: Work, output: object, timing: Timing) -> bool:
        if isinstance(output, BaseException):
            work.fail(output)
            return False
        try:
            return work.finish(output, timing)
        except Exception as error:  # noqa: BLE001 - sampling / slicing failed for this one
            work.fail(error)
            return False

    def _count(self, served, forwards, paid, compute_ms, queue_ms) -> None:
        stats = self.stats
        steps = sum(isinstance(s.work, GenerationWork) for s in served)
        real = sum(s.work.length for s in served)
        stats.forwards += forwards
        stats.sequences += len(served)
        stats.tokens += paid
        stats.real_tokens += real
        stats.generation_steps += steps
        stats.generation_forwards += forwards if steps else 0
        self._notify("on_batch", len(served), paid, real, queue_ms, compute_ms, steps)

    def _notify(self, hook: str, *args) -> None:
        """Call an observer hook; a failing observer is logged, never fails the device loop."""
        try:
            getattr(self._observer, hook)(*args)
        except Exception:  # noqa: BLE001 - metrics must not stop the model
            log.exception("engine observer %s failed", hook)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            self._state = STOPPED
            works = list(self._pending.values())
            self._pending.clear()
            self._generations.clear()
            self._waiting_unary = 0
        for work in works:
            work.fail(error)
        self.stats.queue_depth = 0
        self.stats.active_generations = 0
