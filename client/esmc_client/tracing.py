"""W3C trace context for outgoing calls, when OpenTelemetry is installed (``[otel]``).

With a current span (the caller's), each call carries ``traceparent`` (and ``tracestate``)
metadata, so the server's span of that call becomes its child. Without OpenTelemetry, or
without a current span, nothing is added.
"""

from __future__ import annotations

import importlib.util

_propagate = None
_checked = False


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current trace context (empty when there is none)."""
    global _propagate, _checked
    if not _checked:
        _checked = True
        if importlib.util.find_spec("opentelemetry") is not None:
            from opentelemetry import propagate

            _propagate = propagate
    if _propagate is None:
        return ()
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return tuple(carrier.items())
