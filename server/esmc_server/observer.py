"""What the engine reports for metrics: a typed observer, and a guard so that it never fails
the device loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class EngineObserver:
    """Receives plain numbers for metrics. Every method is a no-op here; subclass what you need.

    Methods run on the device thread, except :meth:`on_queue_depth`, which a submission also
    calls on the caller's thread: keep them cheap and thread-safe (Prometheus metrics are).
    """

    def on_batch(
        self,
        sequences: int,
        tokens: int,
        real_tokens: int,
        queue_ms_list: Sequence[float],
        compute_ms: float,
        generation_steps: int,
    ) -> None:
        """One pass: sequences and tokens paid (padded when padding), real tokens, each
        request's queue time, the pass's compute time, and how many were generation steps."""

    def on_queue_depth(self, n: int) -> None:
        """Work items waiting for a forward."""

    def on_active_generations(self, n: int) -> None:
        """Generations started and not yet finished, failed or closed (finished streams whose
        last event is still unread count until it is read)."""

    def on_call(self, caller: str, token_forwards: int) -> None:
        """A call admitted for ``caller`` (on the caller's thread), with its cost."""

    def on_served(self, caller: str, tokens: int, queue_ms: float) -> None:
        """One of ``caller``'s sequences rode in a forward after waiting ``queue_ms``."""


class GuardedObserver(EngineObserver):
    """Forwards to ``inner``; an exception there is logged (once per method) and swallowed:
    metrics must never stop the model. BaseExceptions are not swallowed."""

    def __init__(self, inner: EngineObserver):
        self.inner = inner
        self._logged: set[str] = set()

    def on_batch(self, sequences, tokens, real_tokens, queue_ms_list, compute_ms, generation_steps):
        try:
            self.inner.on_batch(
                sequences, tokens, real_tokens, queue_ms_list, compute_ms, generation_steps
            )
        except Exception:  # noqa: BLE001
            self._log("on_batch")

    def on_queue_depth(self, n: int) -> None:
        try:
            self.inner.on_queue_depth(n)
        except Exception:  # noqa: BLE001
            self._log("on_queue_depth")

    def on_active_generations(self, n: int) -> None:
        try:
            self.inner.on_active_generations(n)
        except Exception:  # noqa: BLE001
            self._log("on_active_generations")

    def on_call(self, caller: str, token_forwards: int) -> None:
        try:
            self.inner.on_call(caller, token_forwards)
        except Exception:  # noqa: BLE001
            self._log("on_call")

    def on_served(self, caller: str, tokens: int, queue_ms: float) -> None:
        try:
            self.inner.on_served(caller, tokens, queue_ms)
        except Exception:  # noqa: BLE001
            self._log("on_served")

    def _log(self, method: str) -> None:
        if method not in self._logged:
            self._logged.add(method)
            log.exception("engine observer %s failed (logged once; later failures are silent)",
                          method)
