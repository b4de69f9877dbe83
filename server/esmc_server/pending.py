"""The engine's pending set: admission, queue accounting and the one lock.

Every work item the engine accepted is in exactly one place here until it is settled:

- ``queued``: waiting for a forward (the policy picks batches from these);
- ``taken``: handed to the device thread (collating, in a forward, being handed on);
- ``parked``: a generation held back because its consumer has not taken its earlier steps
  (at most ``generation_window`` unread steps each), or a finished generation whose last
  event is still unread.

Admission counts queued one-shot calls plus every live generation (queued, taken or parked),
so streams nobody reads cannot pile up beyond ``max_queue``. All methods are thread-safe; the
device thread blocks in :meth:`PendingSet.next_batch`. A fatal fault (:meth:`refuse_all`)
takes everything out at once so the caller can fail it.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Iterable

from esmc_server.config import BatchingConfig
from esmc_server.errors import QueueFull, Unavailable
from esmc_server.observer import EngineObserver
from esmc_server.policy import FairClock, next_wakeup, select_batch
from esmc_server.requests import EngineStats, GenerationWork, Work


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"  # refuse new work, run what is pending without waiting for company
    STOPPED = "stopped"  # shut down: the device thread exits
    FAILED = "failed"  # fatal fault: everything was failed with Unavailable


class PendingSet:
    """Queued, taken and parked work under one condition variable."""

    def __init__(
        self,
        limits: BatchingConfig,
        stats: EngineStats,
        observer: EngineObserver,
        generation_window: int = 2,
    ):
        if generation_window < 1:
            raise ValueError("generation_window must be >= 1")
        self.limits = limits
        self.stats = stats
        self.generation_window = generation_window
        self._observer = observer
        self._cond = threading.Condition()
        self._queued: dict[int, Work] = {}
        self._taken: dict[int, Work] = {}
        self._parked: dict[int, GenerationWork] = {}
        self._generations: set[int] = set()  # keys of live generations, wherever they are
        self._waiting_unary = 0  # one-shot works queued
        self._clock = FairClock()  # fair start tags, by caller (the policy's order)
        self.state = State.NEW
        self.refusal = "the engine is not accepting work (starting or shutting down)"

    # -- any thread --------------------------------------------------------------------------

    def open(self) -> None:
        with self._cond:
            if self.state == State.NEW:
                self.state = State.RUNNING

    def submit(self, work: Work) -> None:
        """Queue ``work``; raises :class:`Unavailable` unless running, :class:`QueueFull`."""
        with self._cond:
            if self.state != State.RUNNING:
                raise Unavailable(self.refusal)
            waiting = self._waiting_unary + len(self._generations)
            limit = self.limits.max_queue
            if waiting >= limit:
                raise QueueFull(f"{waiting} requests are waiting (max_queue={limit})")
            self._queue(work)
            if isinstance(work, GenerationWork):
                self._generations.add(work.key)
            else:
                self._waiting_unary += 1
            depth = self.stats.queue_depth = len(self._queued)
            self._cond.notify()
        self._observer.on_queue_depth(depth)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def drain(self) -> None:
        with self._cond:
            if self.state == State.RUNNING:
                self.state = State.DRAINING
                self.refusal = "the server is shutting down"
            self._cond.notify()

    def halt(self) -> list[Work]:
        """Stop: the device thread exits after its pass; returns queued and parked work."""
        return self._close(State.STOPPED, "the server is shutting down")

    def refuse_all(self, reason: str) -> list[Work] | None:
        """Fatal fault: refuse new work with ``reason``; returns every accepted work item not yet
        settled (queued, taken, parked) for the caller to fail. None when already failed."""
        with self._cond:
            if self.state == State.FAILED:
                return None
            works = list(self._taken.values())
            self._taken.clear()
        return works + self._close(State.FAILED, reason)

    @property
    def failed(self) -> bool:
        return self.state == State.FAILED

    @property
    def idle(self) -> bool:
        """Draining and nothing left that the device thread still has to run."""
        with self._cond:
            return self._idle_locked()

    # -- the device thread -------------------------------------------------------------------

    def next_batch(self, block: bool, on_idle: Callable[[], None]) -> list[Work] | None:
        """Take the next batch out of the queue; None when stopped (or, not blocking, when
        nothing is due). Sweeps gone work and parked generations first. ``on_idle`` is called
        (under the lock) whenever a draining engine has nothing left."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._sweep(now):  # tell the observer outside the lock, then look again
                    active = len(self._generations)
                    self._cond.release()
                    try:
                        self._observer.on_active_generations(active)
                    finally:
                        self._cond.acquire()
                    continue
                if self.state in (State.STOPPED, State.FAILED):
                    return None
                entries = [w.entry() for w in self._queued.values()]
                limits = self.limits
                if self.state == State.DRAINING:
                    limits = dataclasses.replace(limits, max_wait_ms=0.0)
                batch = select_batch(entries, limits, now)
                if batch is not None:
                    works = [self._take(key) for key in batch.keys]
                    self._clock.served([w.start_tag for w in works])
                    depth = self.stats.queue_depth = len(self._queued)
                    break
                if not block:
                    return None
                if self._idle_locked():
                    on_idle()
                wakeup = next_wakeup(entries, limits, now)
                self._cond.wait(None if wakeup is None else max(wakeup - now, 0.0))
        self._observer.on_queue_depth(depth)
        return works

    def recheck(self, works: list[Work]) -> list[Work]:
        """The works still wanted (a looked-ahead batch waited); the others are let go."""
        now = time.monotonic()
        alive = [w for w in works if not w.gone(now)]
        if len(alive) < len(works):
            with self._cond:
                for work in works:
                    if work not in alive:
                        self._forget(work)
                        self.stats.dropped += 1
        return alive

    def settle(self, again: Iterable[GenerationWork], done: Iterable[Work]) -> int:
        """After a pass: queue (or park) each generation that goes on, let go of the rest.

        A generation whose consumer has ``generation_window`` unread steps is parked, as is
        a finished one whose last event is unread. Returns the live generations.
        """
        with self._cond:
            for work in again:
                if self._taken.pop(work.key, None) is None:
                    continue  # failed by a fatal fault meanwhile
                if work.stream.unread >= self.generation_window:
                    self._parked[work.key] = work
                else:
                    self._queue(work)
            for work in done:
                if self._taken.pop(work.key, None) is None:
                    continue
                if isinstance(work, GenerationWork) and work.stream.unread > 0:
                    self._parked[work.key] = work
                else:
                    self._generations.discard(work.key)
            return self._count_generations()

    def forget(self, works: Iterable[Work]) -> None:
        """Works taken and then failed or dropped: they leave the engine."""
        with self._cond:
            for work in works:
                self._forget(work)

    # -- under the lock ----------------------------------------------------------------------

    def _queue(self, work: Work) -> None:
        """Queue ``work`` (new, or a generation's next step) with its caller's next fair tag."""
        work.start_tag = self._clock.tag(work.caller, work.length)
        self._queued[work.key] = work

    def _take(self, key: int) -> Work:
        work = self._queued.pop(key)
        if not isinstance(work, GenerationWork):
            self._waiting_unary -= 1
        self._taken[key] = work
        return work

    def _forget(self, work: Work) -> None:
        self._taken.pop(work.key, None)
        self._parked.pop(work.key, None)
        self._generations.discard(work.key)

    def _sweep(self, now: float) -> bool:
        """Remove gone work before it costs a forward; release parked generations whose
        consumer caught up, and finished ones whose last event was read or that were closed.
        True when the number of live generations changed."""
        before = len(self._generations)
        for work in [w for w in self._queued.values() if w.gone(now)]:
            self._queued.pop(work.key)
            if not isinstance(work, GenerationWork):
                self._waiting_unary -= 1
            self._generations.discard(work.key)
            self.stats.dropped += 1
        for work in list(self._parked.values()):
            finished = work.state.done or work.stream.ended
            if work.stream.closed or (finished and work.stream.unread == 0):
                del self._parked[work.key]
                self._generations.discard(work.key)
                self.stats.dropped += not finished
            elif not finished and work.gone(now):  # deadline passed while parked
                del self._parked[work.key]
                self._generations.discard(work.key)
                self.stats.dropped += 1
            elif not finished and work.stream.unread < self.generation_window:
                del self._parked[work.key]
                work.ready = now
                self._queue(work)
        if len(self._generations) != before:
            self._count_generations()
            return True
        return False

    def _count_generations(self) -> int:
        active = self.stats.active_generations = len(self._generations)
        return active

    def _idle_locked(self) -> bool:
        return (
            self.state == State.DRAINING
            and not self._queued
            and not self._taken
            and not any(not (w.state.done or w.stream.ended) for w in self._parked.values())
        )

    def _close(self, state: State, reason: str) -> list[Work]:
        with self._cond:
            self.state = state
            self.refusal = reason
            works = list(self._queued.values()) + list(self._parked.values())
            self._queued.clear()
            self._parked.clear()
            self._generations.clear()
            self._waiting_unary = 0
            self.stats.queue_depth = 0
            self.stats.active_generations = 0
            self._cond.notify_all()
        return works
