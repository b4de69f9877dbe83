"""Requests whose bytes are no valid message answer ``INVALID_ARGUMENT``.

gRPC's asyncio server parses a request before the handler runs, and a parse failure
escapes it: "Unexpected [DecodeError] raised by servicer method" logged at ERROR with a
traceback, and ``UNKNOWN`` for the caller. :class:`DecodingInterceptor` wraps each method's
request parser so that bytes which do not parse become an :class:`Undecodable` marker, and
the method refuses it before any work: at once for a single request, when it is read for a
request stream (as an ``InvalidRequest`` the stream's handler answers like any other).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from esmc_server.errors import InvalidRequest


class Undecodable:
    """What a request that did not parse becomes."""

    def __init__(self, method: str, error: DecodeError):
        self.message = f"the request is not a valid {method} request message ({error})"


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """``on_refused(method)`` is called for each refused single request (to count it)."""

    def __init__(self, on_refused: Callable[[str], None] | None = None):
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = _tolerant(handler.request_deserializer, method.rsplit("/", 1)[-1])
        if handler.request_streaming:
            behaviour = handler.stream_stream or handler.stream_unary
            wrapped = _stream_requests(behaviour)
        else:
            behaviour = handler.unary_stream or handler.unary_unary
            wrapped = _single_request(behaviour, method, self.on_refused)
        field = _behaviour_field(handler)
        return handler._replace(request_deserializer=parse, **{field: wrapped})


def _behaviour_field(handler: grpc.RpcMethodHandler) -> str:
    prefix = "stream" if handler.request_streaming else "unary"
    suffix = "stream" if handler.response_streaming else "unary"
    return f"{prefix}_{suffix}"


def _tolerant(parse: Callable[[bytes], object], method: str) -> Callable[[bytes], object]:
    def run(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(method, error)

    return run


def _single_request(behaviour, method: str, on_refused):
    """The method, refusing an undecodable request before it runs."""

    async def refuse(request: Undecodable, context) -> None:
        if on_refused is not None:
            on_refused(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request, context):
            if isinstance(request, Undecodable):
                await refuse(request, context)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await behaviour(request, context)

    return unary


def _stream_requests(behaviour):
    """The method, reading its requests through a check: an undecodable one raises
    ``InvalidRequest`` where the handler reads it."""

    def checked(requests):
        async def iterate():
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise InvalidRequest(request.message)
                yield request

        return iterate()

    if inspect.isasyncgenfunction(behaviour):

        async def stream(requests, context):
            async for response in behaviour(checked(requests), context):
                yield response

        return stream

    async def call(requests, context):
        return await behaviour(checked(requests), context)

    return call
