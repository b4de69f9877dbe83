"""The device thread: the only code that runs the model, and the watchdog that watches it.

One pass (:class:`esmc_server.device_pass.DevicePass`) is schedule -> execute -> update.

Fault containment: an ``Exception`` at any stage (collation, forward, copy, slicing, sampling,
result building, the observer) fails exactly the requests it concerns with a
:class:`ServiceError` whose message names the stage (the traceback is logged once at ERROR),
and the loop goes on. Anything else (a ``BaseException`` on the device thread, the thread
gone, or a pass stage running longer than ``forward_timeout_s``) is fatal: the
:class:`Watchdog` (or the thread itself) fails every call in flight and queued with
``UNAVAILABLE``, refuses new work, and reports the reason (``on_fatal``) so that the server
turns health ``NOT_SERVING`` and the process can exit for its orchestrator to restart it.

Lookahead: when the batch carries no generation step, the next batch is scheduled and
collated right after the forward is launched and before its outputs are read. On CUDA the
forward runs asynchronously, so collation and its non-blocking copy overlap the running
forward; on the CPU the forward is synchronous and the lookahead only reorders the work.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from esmc import ESMC
from esmc_server.config import BatchingConfig
from esmc_server.device_pass import Busy, DevicePass, Prepared, service_error
from esmc_server.errors import Unavailable
from esmc_server.execute import BatchExecutor
from esmc_server.observer import EngineObserver, GuardedObserver
from esmc_server.pending import PendingSet, State
from esmc_server.requests import EngineStats, Work

log = logging.getLogger(__name__)


class DeviceLoop:
    """The device thread over a pending set, and its watchdog. Submitting is thread-safe.

    ``forward_timeout_s`` (None: no limit) bounds each stage of a pass; ``on_fatal`` gets the
    reason (a plain sentence) once, from the thread that noticed.
    """

    def __init__(
        self,
        model: ESMC,
        limits: BatchingConfig,
        observer: EngineObserver,
        stats: EngineStats,
        *,
        generation_window: int = 2,
        forward_timeout_s: float | None = None,
        on_fatal: Callable[[str], None] = lambda reason: None,
        executor: BatchExecutor | None = None,
    ):
        self.stats = stats
        guarded = isinstance(observer, GuardedObserver)
        self.observer = observer if guarded else GuardedObserver(observer)
        self.pending = PendingSet(limits, stats, self.observer, generation_window)
        self.busy = Busy()
        self.forward_timeout_s = forward_timeout_s
        self.fatal: str | None = None
        executor = executor or BatchExecutor()
        self._pass = DevicePass(model, self.pending, self.observer, stats, self.busy, executor)
        self._on_fatal = on_fatal
        self._fatal_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watchdog: Watchdog | None = None
        self._on_idle: Callable[[], None] = lambda: None

    # -- control (any thread) ----------------------------------------------------------------

    def start(self, on_idle: Callable[[], None]) -> None:
        """Start the device thread and its watchdog; ``on_idle`` is called from the device
        thread once draining has finished (and once on a fatal fault)."""
        self._on_idle = on_idle
        self.pending.open()
        self._thread = threading.Thread(target=self._main, name="esmc-device", daemon=True)
        self._thread.start()
        self._watchdog = Watchdog(self)
        self._watchdog.start()

    def submit(self, work: Work) -> None:
        self.pending.submit(work)

    def set_budget(self, max_batch_tokens: int) -> None:
        """Lower the token budget of the forwards from the next pass on (the start check)."""
        limits = dataclasses.replace(self.pending.limits, max_batch_tokens=max_batch_tokens)
        self.pending.limits = limits

    def wake(self) -> None:
        self.pending.wake()

    def drain(self) -> None:
        """Refuse new work; run what is pending without waiting for company."""
        self.pending.drain()

    def halt(self) -> None:
        """Finish the pass under way, fail everything else with :class:`Unavailable`, exit."""
        left = self.pending.halt()
        error = Unavailable("the engine stopped before this request was computed")
        for work in left:
            work.fail(error)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the device thread (a hung one after a fatal fault is not waited for)."""
        if self._thread is not None:
            end = None if timeout is None else time.monotonic() + timeout
            while self._thread.is_alive() and self.fatal is None:  # the watchdog may fire
                if end is not None and time.monotonic() >= end:
                    break
                self._thread.join(0.1)
            if self.fatal is not None:
                self._thread.join(0.5)  # a hung device thread is abandoned (a daemon)
        if self._watchdog is not None:
            self._watchdog.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def die(self, reason: str) -> None:
        """Fatal fault: fail every accepted call with Unavailable, refuse new ones, report."""
        with self._fatal_lock:
            if self.fatal is not None:
                return
            self.fatal = reason
        message = f"the model engine failed ({reason}) and must be restarted; try another replica"
        works = self.pending.refuse_all(message) or []
        log.error("engine failed: %s; %d calls in flight fail with UNAVAILABLE", reason, len(works))
        error = Unavailable(message)
        for work in works:
            work.fail(error)
        self._on_idle()
        try:
            self._on_fatal(reason)
        except Exception:  # noqa: BLE001 - a listener must not hide the fault
            log.exception("the engine's fatal-fault listener failed")

    # -- the device thread -------------------------------------------------------------------

    def _main(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        prepared = None
        try:
            while True:
                if prepared is None:
                    self.busy.leave()
                    prepared = self._pass.schedule(block=True, on_idle=self._on_idle)
                    if prepared is None:
                        return
                prepared = self._run(prepared)
        except BaseException as error:  # noqa: BLE001 - fatal: reported, then the thread ends
            log.critical("the device thread stopped", exc_info=error)
            self.die("the device thread stopped on an unrecoverable error")
        finally:
            self.busy.leave()

    def _run(self, prepared: Prepared) -> Prepared | None:
        """One pass; an Exception that escaped every finer guard fails this pass's works only."""
        try:
            return self._pass.run(prepared, self._on_idle)
        except Exception as error:  # noqa: BLE001 - the loop goes on
            failure = service_error(error, "running a batch")
            for work in prepared.works:
                work.fail(failure)
            self.pending.forget(prepared.works)
            return self._pass.take_lookahead()


class Watchdog:
    """A monitor thread: the device thread gone while the engine runs, or one stage of a pass
    (a forward, or handing its results on) running past ``forward_timeout_s``, is fatal."""

    def __init__(self, loop: DeviceLoop):
        self._loop = loop
        self._stop = threading.Event()
        limit = loop.forward_timeout_s
        self._interval = 0.05 if limit is None else min(max(limit / 10, 0.01), 0.25)
        self._thread = threading.Thread(target=self._main, name="esmc-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _main(self) -> None:
        loop = self._loop
        while not self._stop.wait(self._interval):
            if loop.fatal is not None:
                return
            if not loop.alive:
                if not self._stop.is_set() and loop.pending.state != State.STOPPED:
                    loop.die("the device thread stopped unexpectedly")
                return
            since, limit = loop.busy.since, loop.forward_timeout_s
            if since is not None and limit is not None and time.monotonic() - since > limit:
                loop.die(f"{loop.busy.what} ran longer than {limit:g} s (forward_timeout_s)")
                return
