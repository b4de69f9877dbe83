"""How a call ends: any exception as the status the client sees, logged and counted once.

:class:`Outcome` is the one place that turns an exception into the status (or Embed item error)
of one call, logs it at the right level and counts it in the metrics once the client has seen
it; :func:`abort` ends a call with a service error's status, with retry pushback where it
helps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from grpc._cython import cygrpc  # the errors of a call that has ended (no public name)

from esmc_server.calls import current_caller
from esmc_server.errors import Cancelled, InternalError, ServiceError
from esmc_server.metrics import Metrics

log = logging.getLogger(__name__)

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata telling clients how long to wait before they retry (gRPC's retry key)."""
DEADLINE_SLACK_S = 0.1
"""A call cancelled this close to its deadline is counted as DEADLINE_EXCEEDED."""


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for a service error (``code`` names a ``grpc.StatusCode``)."""
    return grpc.StatusCode[error.code]


_CALL_ENDED = (cygrpc.ExecuteBatchError, cygrpc.UsageError)
"""What gRPC raises when a message is written to (or read from) a call that has already ended:
the caller cancelled or went away while the server was writing. Not a server fault."""


def as_service_error(error: BaseException, what: str) -> ServiceError:
    """What the client is told about ``error``; an unexpected one is logged with a reference.

    A caller's cancellation (or a write refused because the caller has gone) is CANCELLED,
    logged at DEBUG by :meth:`Outcome.fail`: never INTERNAL, never an ERROR with a traceback.
    """
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, asyncio.CancelledError):
        return Cancelled("the call was cancelled")
    if isinstance(error, _CALL_ENDED):
        return Cancelled("the caller cancelled or went away before the response was written")
    reference = uuid.uuid4().hex[:12]
    log.error("%s failed (reference %s)", what, reference, exc_info=error)
    return InternalError(f"handling this call (log reference {reference})")


class Outcome:
    """One call, or one item of an Embed stream: its status code, logged and counted once."""

    def __init__(self, metrics: Metrics, method: str):
        self.metrics = metrics
        self.method = method
        self.start = time.perf_counter()
        self.caller = current_caller()  # named by the auth interceptor for this call
        self.error: ServiceError | None = None
        self._recorded = False

    @property
    def code(self) -> str:
        return "OK" if self.error is None else self.error.code

    def fail(self, error: BaseException) -> ServiceError:
        """Remember the first failure (as the client will see it) and return it."""
        if self.error is None:
            self.error = as_service_error(error, self.method)  # logs unexpected ones (ERROR)
            log.debug("%s: %s %s", self.method, self.error.code, self.error)
            if self.error is error:
                forget_tracebacks(error)
        return self.error

    def record(self, context=None) -> None:
        """Count the outcome once, as the client sees it: a call that ended OK after its
        client had gone counts as that (deadline passed, or cancelled). Sizes are checked
        before a response is handed to gRPC, so an OK counted here is one gRPC can send."""
        if self._recorded:
            return
        self._recorded = True
        code = self.code
        if code in ("OK", "CANCELLED") and context is not None:
            remaining = context.time_remaining()
            # the client's deadline fires first (its clock started earlier) and cancels the
            # call a few milliseconds before the server's copy of the deadline passes
            if remaining is not None and remaining <= DEADLINE_SLACK_S:
                code = "DEADLINE_EXCEEDED"
            elif context.cancelled():
                code = "CANCELLED"
        self.metrics.on_request(self.method, code, time.perf_counter() - self.start)
        self.metrics.on_caller_request(self.caller.name, code)


def forget_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of an expected error (and of what caused it) once it has been
    turned into a status: a traceback keeps its frames alive, a frame holding the error makes
    a reference cycle, and a stream of many bad requests then leaves the cyclic garbage
    collector full scans to do on the event loop (pauses of a second were seen)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


async def abort(context, error: ServiceError) -> None:
    """End the call with ``error``'s status and message (and its retry pushback, if any)."""
    metadata = ()
    if error.retry_pushback_ms is not None:
        metadata = ((PUSHBACK_KEY, str(error.retry_pushback_ms)),)
    await context.abort(status_of(error), str(error), trailing_metadata=metadata)
