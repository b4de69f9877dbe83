"""Admission by cost, before anything is queued: what a call may cost, and what a caller and
the whole server may have in flight.

A call's cost is its token-forwards (:class:`esmc_server.calls.Cost`: a Logits of L tokens
is 1 x L, a PseudoLogLikelihood L copies of L + 2 tokens, a generation its steps x its
tokens). :meth:`Admission.admit` refuses, in this order:

- a call whose single forward is longer than the longest one this server admits (the start
  check, :meth:`Admission.cap_forward`, found that a longer one might not finish within
  ``forward_timeout_s``): ``INVALID_ARGUMENT``;
- a call over ``max_request_token_forwards``: ``INVALID_ARGUMENT`` naming its cost, the
  limit and the flag (it could never fit);
- a call that would take its caller over ``max_caller_token_forwards`` in flight, or the
  server over ``max_inflight_token_forwards``: ``RESOURCE_EXHAUSTED`` with retry pushback
  naming the limit (it could fit later). A caller or a server with nothing in flight always
  admits a call within the per-request limit.

An admitted call holds a :class:`Lease` of its cost until it ends (result, error, cancel,
stream closed); releasing is idempotent. Thread-safe.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict

from esmc_server.calls import Call
from esmc_server.errors import InvalidRequest, QueueFull

PUSHBACK_MS = 1000
"""Retry pushback of a call refused for in-flight cost (the work ahead takes seconds)."""


class OverBudget(QueueFull):
    """In-flight cost over a caller's or the server's limit: retry later."""

    retry_pushback_ms = PUSHBACK_MS


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    max_request_token_forwards: int = 2**22  # one call (a 2,000-residue PLL fits)
    max_caller_token_forwards: int = 2**23  # in flight per caller
    max_inflight_token_forwards: int = 2**25  # in flight in the whole server

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be >= 1")


class Lease:
    """A call's cost held in flight; :meth:`release` (or leaving the ``with``) gives it back."""

    def __init__(self, admission: Admission, caller: str, token_forwards: int):
        self._admission = admission
        self.caller = caller
        self.token_forwards = token_forwards
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None):
        self.limits = limits or AdmissionLimits()
        self.max_forward_tokens: int | None = None  # set by the start check; None: no cap
        self.cap_reason = ""
        self._lock = threading.Lock()
        self._by_caller: dict[str, int] = defaultdict(int)
        self._total = 0

    def cap_forward(self, tokens: int, reason: str) -> None:
        """Admit no forward longer than ``tokens`` from now on (``reason`` says why)."""
        self.max_forward_tokens = tokens
        self.cap_reason = reason

    @property
    def in_flight(self) -> int:
        return self._total

    def caller_in_flight(self, caller: str) -> int:
        return self._by_caller.get(caller, 0)

    def admit(self, call: Call) -> Lease:
        """A lease of ``call``'s cost, or the refusal (see the module docstring)."""
        cost, caller = call.cost, call.caller.name
        cap = self.max_forward_tokens
        if cap is not None and cost.tokens > cap:
            raise InvalidRequest(
                f"a forward of {cost.tokens:,} tokens is longer than this server admits "
                f"({cap:,} tokens: {self.cap_reason}); send a shorter protein"
            )
        limits = self.limits
        needed = cost.token_forwards
        if needed > limits.max_request_token_forwards:
            raise InvalidRequest(
                f"this request costs {cost.describe()}; the limit is "
                f"{limits.max_request_token_forwards:,} token-forwards per request "
                "(server setting --max-request-token-forwards / "
                "ESMC_MAX_REQUEST_TOKEN_FORWARDS); send a shorter protein or fewer "
                "steps, variants or copies"
            )
        with self._lock:
            mine = self._by_caller.get(caller, 0)
            if mine and mine + needed > limits.max_caller_token_forwards:
                raise OverBudget(
                    f"caller {caller!r} has {mine:,} token-forwards in flight; this request "
                    f"({needed:,}) would exceed the per-caller limit of "
                    f"{limits.max_caller_token_forwards:,} (max_caller_token_forwards); "
                    "retry when earlier requests have finished"
                )
            if self._total and self._total + needed > limits.max_inflight_token_forwards:
                raise OverBudget(
                    f"the server has {self._total:,} token-forwards in flight; this request "
                    f"({needed:,}) would exceed its limit of "
                    f"{limits.max_inflight_token_forwards:,} (max_inflight_token_forwards); "
                    "retry later or on another replica"
                )
            self._by_caller[caller] = mine + needed
            self._total += needed
        return Lease(self, caller, needed)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            left = self._by_caller[lease.caller] - lease.token_forwards
            if left > 0:
                self._by_caller[lease.caller] = left
            else:
                del self._by_caller[lease.caller]
            self._total -= lease.token_forwards
