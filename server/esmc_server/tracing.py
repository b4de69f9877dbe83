"""Optional OpenTelemetry tracing (``--otlp-endpoint``, extra ``[otel]``).

One SERVER span per RPC (``esmc.v1.ESMC/Logits``...), a child of the caller's span when the
call carries W3C trace context (``traceparent`` metadata, which the Python client sends when
OpenTelemetry is installed and a span is current). Under it, for every engine answer:

- ``queue``: waiting for a forward (``queue_ms`` of the engine's Timing),
- ``forward``: the forward it rode in (``compute_ms``), with ``esmc.batch_size`` and
  ``esmc.batch_tokens`` (sequences and tokens in that forward) as attributes,
- ``build response``: from the engine's answer to the response message leaving the handler.

The engine is not instrumented: queue and forward spans are placed from its Timing, ending
when its answer reaches the servicer (:func:`engine_done`), with explicit start and end times.
Embed gets these three per sequence, Generate per step. Health and reflection are not traced.

Off (the default) nothing is installed: no interceptor, and :func:`engine_done` returns at
its first line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from typing import Any

import grpc

log = logging.getLogger(__name__)

_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_current: contextvars.ContextVar[_RpcTrace | None] = contextvars.ContextVar(
    "esmc_rpc_trace", default=None
)


def otlp_tracer_provider(endpoint: str, service_name: str = "esmc-serve"):
    """A TracerProvider batching spans to an OTLP/gRPC collector at ``endpoint``."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ValueError(
            "--otlp-endpoint needs OpenTelemetry: pip install 'esmc-serve[otel]'"
        ) from e
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint, insecure=insecure)))
    return provider


def engine_done(timing: Any, key: str | None = None) -> None:
    """The engine answered (``timing``: queue_ms, compute_ms, batch_size, batch_tokens).

    ``key`` tells apart concurrent answers of one stream (Embed: the request's id); the
    ``build response`` span it opens ends when a response with that id leaves the handler.
    """
    trace = _current.get()
    if trace is None:
        return
    trace.engine_done(timing, key)


class _RpcTrace:
    """The span of one RPC and its open ``build response`` children."""

    def __init__(self, tracer, span):
        from opentelemetry import trace as otel_trace

        self.tracer = tracer
        self.span = span
        self.context = otel_trace.set_span_in_context(span)
        self.building: dict[str | None, Any] = {}

    def engine_done(self, timing: Any, key: str | None) -> None:
        now = time.time_ns()
        forward_start = now - int(timing.compute_ms * 1e6)
        queue_start = forward_start - int(timing.queue_ms * 1e6)
        queue = self.tracer.start_span("queue", context=self.context, start_time=queue_start)
        queue.end(end_time=forward_start)
        forward = self.tracer.start_span(
            "forward",
            context=self.context,
            start_time=forward_start,
            attributes={
                "esmc.batch_size": int(timing.batch_size),
                "esmc.batch_tokens": int(timing.batch_tokens),
                "esmc.forwards": int(getattr(timing, "forwards", 1)),
            },
        )
        forward.end(end_time=now)
        previous = self.building.pop(key, None)
        if previous is not None:
            previous.end(end_time=now)
        self.building[key] = self.tracer.start_span(
            "build response", context=self.context, start_time=now
        )

    def responded(self, message: Any) -> None:
        span = self.building.pop(getattr(message, "id", None), None)
        if span is not None:
            span.end()

    def close(self) -> None:
        for span in self.building.values():
            span.end()
        self.building.clear()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every traced RPC's handler in a SERVER span (see the module docstring)."""

    def __init__(self, tracer_provider):
        from opentelemetry import propagate

        self._propagate = propagate
        self.tracer = tracer_provider.get_tracer("esmc_server")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        carrier = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if isinstance(value, str)
        }
        parent = self._propagate.extract(carrier)
        return _traced_handler(handler, self, method, parent)

    def start(self, method: str, parent) -> _RpcTrace:
        from opentelemetry.trace import SpanKind

        service, _, name = method.lstrip("/").partition("/")
        span = self.tracer.start_span(
            f"{service}/{name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        return _RpcTrace(self.tracer, span)


def _finish(trace: _RpcTrace, context, error: BaseException | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = context.code() if callable(getattr(context, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):  # not set by the handler
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
    trace.span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        trace.span.set_status(Status(StatusCode.ERROR, code.name))
    trace.close()
    trace.span.end()


class _WriteTracingContext:
    """The servicer's context, ending a ``build response`` span as each message is written."""

    def __init__(self, context, trace: _RpcTrace):
        self._context = context
        self._trace = trace

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def write(self, message) -> None:
        self._trace.responded(message)
        await self._context.write(message)


@contextlib.contextmanager
def _rpc_scope(interceptor: TracingInterceptor, method: str, parent, context):
    """The RPC's span, current for the handler (and the tasks it starts) while it runs."""
    trace = interceptor.start(method, parent)
    token = _current.set(trace)
    error = None
    try:
        yield trace
    except BaseException as e:
        error = e
        raise
    finally:
        _reset(token)
        _finish(trace, context, error)


def _traced_handler(handler, interceptor: TracingInterceptor, method: str, parent):
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request, context):
                with _rpc_scope(interceptor, method, parent, context) as trace:
                    async for message in behavior(request, context):
                        trace.responded(message)
                        yield message

        else:  # writes its messages with context.write

            async def streaming(request, context):
                with _rpc_scope(interceptor, method, parent, context) as trace:
                    return await behavior(request, _WriteTracingContext(context, trace))

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(streaming, **kwargs)

    behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request, context):
        with _rpc_scope(interceptor, method, parent, context) as trace:
            response = await behavior(request, context)
            trace.responded(response)
            return response

    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(unary, **kwargs)


def _reset(token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # an async generator finalised in another context
        pass
