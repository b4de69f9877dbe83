"""When and how long the clients wait before trying a call again (no I/O here).

Only ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED`` are retried, and ``RESOURCE_EXHAUSTED`` only
when it is not gRPC's own message-size refusal (that request can never fit). Every other
status, ``INVALID_ARGUMENT`` first of all, is definitive: the call is never sent again.

Three things bound the retries:

- **Backoff with jitter.** Retry ``n`` waits ``initial_backoff_s * multiplier**(n-1)``, capped at
  ``max_backoff_s`` and scaled by a random factor in [0.5, 1], so clients refused together do
  not come back together. At most ``max_retries`` retries per call.
- **Server pushback.** A server that answers with the ``grpc-retry-pushback-ms`` trailer says
  how long to wait: the client waits that long (plus up to 20% jitter) instead of its own
  backoff; a negative value means "do not retry" (gRFC A6).
- **A retry budget** (:class:`RetryBudget`), shared by every call of one client: each call
  deposits ``budget_ratio`` of a token, each retry spends a whole one, and the balance never
  exceeds ``budget_burst``. Over any stretch of time a client therefore makes at most
  ``budget_burst + budget_ratio * calls`` retries: under overload it sends about 1.2x its calls
  (default ratio 0.2), not the 5x that five attempts per call would give.

Bulk ``embed`` and the pseudo-log-likelihood stream also ride out a server that is
unreachable (restarting) for up to ``ride_out_s`` seconds (default 30): they wait for the
channel to reconnect and resend the sequences that have no answer yet; those waits are bounded
by time, not by the budget.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
PUSHBACK_KEY = "grpc-retry-pushback-ms"
_NEVER_FITS = ("larger than max",)  # gRPC's "Sent/Received message larger than max (...)"


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff, retry budget and restart ride-out of one client (see the module docstring).

    ``RetryPolicy(max_retries=0)`` turns retries off (bulk ``embed`` and the PLL stream still
    ride out a restart unless ``ride_out_s=0``).
    """

    max_retries: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    budget_ratio: float = 0.2
    budget_burst: float = 10.0
    ride_out_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_retries and backoffs must be >= 0")
        if self.multiplier < 1 or self.budget_ratio < 0 or self.budget_burst < 0:
            raise ValueError("multiplier must be >= 1, budget_ratio and budget_burst >= 0")
        if self.ride_out_s < 0:
            raise ValueError("ride_out_s must be >= 0")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jitter included."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (0.5 + 0.5 * random.random())


class RetryBudget:
    """Token bucket of retries, thread-safe; one per client (see the module docstring)."""

    def __init__(self, ratio: float, burst: float):
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst
        self._lock = threading.Lock()
        self.calls = 0  # calls that deposited
        self.retries = 0  # retries granted
        self.refused = 0  # retries refused for want of budget

    def deposit(self) -> None:
        """A new call (not a retry)."""
        with self._lock:
            self.calls += 1
            self._tokens = min(self.burst, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        """Spend one retry; False when the budget is spent."""
        with self._lock:
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.retries += 1
                return True
            self.refused += 1
            return False


def retryable(code: str, message: str = "") -> bool:
    """Whether an error with this status could succeed if sent again."""
    if code not in RETRYABLE_CODES:
        return False
    return not (code == "RESOURCE_EXHAUSTED" and any(s in message for s in _NEVER_FITS))


def pushback_ms(trailing_metadata: Iterable | None) -> int | None:
    """The ``grpc-retry-pushback-ms`` trailer: milliseconds to wait, -1 for "do not retry",
    None when absent."""
    for key, value in trailing_metadata or ():
        if key == PUSHBACK_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1  # malformed: gRFC A6 says do not retry
    return None


class CallRetries:
    """The retry decisions of one call (a unary call, or a stream before its first message)."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget, timeout: float | None):
        self._policy = policy
        self._budget = budget
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.attempts = 1
        budget.deposit()

    def remaining(self) -> float | None:
        """Seconds left of the call's ``timeout`` (which covers all its attempts)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def next_delay(self, code: str, message: str, pushback: int | None) -> float | None:
        """Seconds to wait before the next attempt, or None: give up with this error."""
        if not retryable(code, message) or self.attempts > self._policy.max_retries:
            return None
        if pushback is not None and pushback < 0:
            return None
        if pushback is not None:
            delay = pushback / 1000 * (1 + 0.2 * random.random())
        else:
            delay = self._policy.delay(self.attempts)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        if not self._budget.withdraw():
            return None
        self.attempts += 1
        return delay
