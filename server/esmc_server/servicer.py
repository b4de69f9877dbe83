"""The ``esmc.v1.ESMC`` gRPC servicer: protobuf in, checked engine calls, protobuf out.

Each call is admitted before any work: sizes first (read from the wire), then the library's
validation of what was parsed (``convert``), then the size of the response it would produce
against the message limit; a caller's mistake answers ``INVALID_ARGUMENT`` without costing
queue space. Response messages (tensor bytes) are built off the event loop, in a small thread
pool. Streams write one message at a time: a keyed stream (Embed, PseudoLogLikelihoodStream)
admits a new request only once an earlier response has been written (a window outstanding,
``embed_window`` for Embed), a Generate stream takes the
engine's next step only once the previous message has been written, and a write that waits
longer than ``stream_idle_timeout_s`` for the client to read cancels the call.

Errors are plain :class:`ServiceError` exceptions below this module;
:class:`esmc_server.outcome.Outcome` is the one place that turns any exception into the status
(or Embed item error) the client sees, logs it at the right level and counts it in the metrics
once the client has seen it. Keyed streams live in :mod:`esmc_server.streams`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from esmc import ESMC
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server import convert, tracing
from esmc_server.calls import ANONYMOUS, CALLER_METADATA, CURRENT_CALLER, Caller, CallerLabels
from esmc_server.config import BatchingConfig, ServerConfig
from esmc_server.engine import Engine
from esmc_server.errors import Cancelled, InvalidRequest, Unavailable
from esmc_server.info import ServerInfo, describe, server_version
from esmc_server.metrics import Metrics
from esmc_server.models import ModelTable, ServedModel, served_model
from esmc_server.budget import Leased, ResponseBudget, StreamIds
from esmc_server.outcome import PUSHBACK_KEY, Outcome, abort
from esmc_server.readers import RequestLimits, read_embed, read_generate, read_logits, read_sample
from esmc_server.requests import Timing, combine_timings
from esmc_server.scoring import ScoringMethods
from esmc_server.sizes import Shapes
from esmc_server.streams import keyed_stream
from esmc_server.wire import wire_dtype

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ESMC"].full_name
__all__ = ["ESMCServicer", "PUSHBACK_KEY", "SERVICE_NAME", "server_version"]
STEP_BYTES_PER_TOKEN = 32
"""Upper bound on a Generate message's bytes per token (sequence, ids, probabilities...)."""
RESPONSE_THREADS = 2
"""Threads that build response messages (tensor bytes) off the event loop."""


@dataclasses.dataclass(frozen=True)
class Attached:
    """What the servicer needs once the model is loaded."""

    engine: Engine
    model: ESMC
    limits: RequestLimits
    info: pb.InfoResponse
    identity: ServedModel

    def stamp(self, asked: str) -> pb.ResponseMetadata:
        """The metadata fields that say what served a request that named ``asked``."""
        identity = self.identity
        return pb.ResponseMetadata(
            model=asked or identity.name, weights_sha256=identity.weights_sha256,
            dtype=identity.dtype, server_version=identity.server_version,
        )

    def metadata(self, timing: Timing, asked: str) -> pb.ResponseMetadata:
        metadata = convert.metadata_to_proto(timing)
        metadata.MergeFrom(self.stamp(asked))
        return metadata


class ESMCServicer(ScoringMethods, pb_grpc.ESMCServicer):
    """Answers ``UNAVAILABLE`` until :meth:`attach` hands it a started engine."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self._config = config
        self.metrics = metrics or Metrics()
        self._served: Attached | None = None
        self._table: ModelTable | None = None
        self._pool = ThreadPoolExecutor(RESPONSE_THREADS, thread_name_prefix="esmc-respond")
        # one memory budget for the whole server (esmc_server.budget)
        self.budget = ResponseBudget(
            config.max_unread_response_bytes, self.metrics.on_unread_response_bytes
        )
        self.stream_ids = StreamIds(config.max_stream_ids, self.metrics.on_stream_ids)
        self._draining = False
        self._labels = CallerLabels()

    def attach(self, engine: Engine, model: ESMC) -> None:
        config = self._config
        shapes = Shapes(d_model=model.config.d_model, logits_width=model.config.vocab_rows)
        limits = RequestLimits(config.max_tokens, model.config.n_layers, shapes,
                               config.max_message_bytes)
        info = describe(config.model, model, config.max_tokens, config.batching,
                        config.max_message_bytes)
        identity = served_model(config.model, model, info.dtype, info.server_version)
        self._table = ModelTable([identity])
        response = info_response(info)
        response.models.append(model_info(info, identity))
        self._served = Attached(engine, model, limits, response, identity)

    def detach(self) -> None:
        self._served = None

    def drain(self) -> None:
        """Refuse new calls with UNAVAILABLE (and pushback) from now on."""
        self._draining = True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def _ready(self) -> Attached:
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self._served is None:
            raise Unavailable("the server is not ready: the model is loading or shutting down")
        return self._served

    def _serving(self, asked: str) -> Attached:
        """The model a request's ``model`` field names ("" the default); ``NOT_FOUND`` naming
        the served models for any other name, ``UNAVAILABLE`` before the model serves."""
        served = self._ready
        self._table.index(asked)
        return served

    @property
    def _max_tokens(self) -> int:
        return self._config.max_tokens

    def _caller(self, context) -> Caller:
        """The token's name (auth on), else the client's ``esmc-caller`` label (bounded), else
        ``anonymous``; set as this call's caller (outcomes and metrics count it)."""
        named = CURRENT_CALLER.get()
        if named is not None:
            return named
        caller = ANONYMOUS
        for key, value in context.invocation_metadata() or ():
            if key == CALLER_METADATA:
                caller = self._labels.caller(value if isinstance(value, str) else None)
                break
        CURRENT_CALLER.set(caller)
        return caller

    async def _build(self, build: Callable[..., Any], *args) -> bytes:
        """Build and serialize a response in the response pool (never on the event loop);
        ``build`` returns a message or its serialized bytes.

        Returns the serialized message (``app.add_servicer`` passes bytes through). Its size
        is checked against the message limit there too, so that a response is never handed
        to gRPC and refused (the size estimated before the request was queued is an upper
        bound; this is the last guard).
        """
        limit = self._config.max_message_bytes

        def run() -> bytes:
            data = build(*args)
            if not isinstance(data, bytes):
                data = data.SerializeToString()
            if len(data) > limit:
                raise InvalidRequest(
                    f"the response is {len(data)} bytes, over this server's message limit of "
                    f"{limit} bytes (max_message_bytes)"
                )
            return data

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def _leased(self, nbytes: int, build: Callable[..., Any], *args) -> Leased:
        """:meth:`_build` under a reservation of ``nbytes`` from the server's budget."""
        lease = await self.budget.reserve(nbytes)
        try:
            return Leased(await self._build(build, *args), lease)
        except BaseException:
            lease.release()
            raise

    async def _unary(self, method: str, context, handler: Callable[[], Any]):
        """Run ``handler``; any error becomes its status (with pushback where it helps)."""
        self._caller(context)
        outcome = Outcome(self.metrics, method)
        try:
            return await handler()
        except BaseException as e:
            error = outcome.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            await abort(context, error)
        finally:
            outcome.record(context)

    async def write(self, context, message) -> None:
        """Write one stream message; a client that does not read for the idle timeout is cut.
        A :class:`Leased` message gives its budget back once written (or failed)."""
        if isinstance(message, Leased):
            try:
                return await self.write(context, message.data)
            finally:
                message.lease.release()
        timeout = self._config.stream_idle_timeout_s
        try:
            await asyncio.wait_for(context.write(message), timeout)
        except TimeoutError:
            raise Cancelled(
                f"the client read nothing for {timeout:g} s (stream_idle_timeout_s); "
                "the stream was cancelled"
            ) from None
        except Exception:
            # gRPC fails a write whose call is over (the client cancelled or went away), also
            # in place of the CancelledError of a handler cancelled while it waited for it
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from None
            if context.cancelled() or context.done():
                raise Cancelled("the client went away while its stream was written") from None
            raise

    # -- model description ------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        async def handler():
            return self._serving(request.model).info

        return await self._unary("Info", context, handler)

    # -- tokenizer ------------------------------------------------------------------------------

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        async def handler():
            tokens = convert.tokens_from_protein(request.protein, self._max_tokens)
            return pb.EncodeResponse(tokens=convert.protein_tensor_to_proto(tokens))

        return await self._unary("Encode", context, handler)

    async def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        async def handler():
            tokens = convert.tokens_from_tensor(request.tokens, self._max_tokens)
            return pb.DecodeResponse(protein=convert.protein_to_proto(tokens))

        return await self._unary("Decode", context, handler)

    # -- forwards -----------------------------------------------------------------------------

    async def Logits(self, request: pb.LogitsRequest, context) -> pb.LogitsResponse:
        async def handler():
            served = self._serving(request.model)
            call = read_logits(request, served.limits, self._caller(context),
                               convert.deadline_of(context))
            lease = await self.budget.reserve(call.cost.response_bytes)  # back once sent
            try:
                result = await served.engine.logits(call)
                tracing.engine_done(result.timing)
                metadata = served.metadata(result.timing, request.model)
                return await self._build(
                    convert.logits_response_serialized, result.output, call.layers,
                    wire_dtype(call.dtype), metadata,
                )
            finally:
                lease.release()

        return await self._unary("Logits", context, handler)

    async def ForwardAndSample(self, request: pb.ForwardAndSampleRequest, context):
        async def handler():
            served = self._serving(request.model)
            call = read_sample(request, served.limits, self._caller(context),
                               convert.deadline_of(context))
            lease = await self.budget.reserve(call.cost.response_bytes)  # back once sent
            try:
                output, timing = await served.engine.forward_and_sample(call)
                tracing.engine_done(timing)
                metadata = served.metadata(timing, request.model)
                return await self._build(
                    convert.forward_and_sample_response, output, wire_dtype(call.dtype),
                    metadata,
                )
            finally:
                lease.release()

        return await self._unary("ForwardAndSample", context, handler)

    # -- keyed bidirectional streams (Embed, PseudoLogLikelihoodStream) ------------------------

    async def _keyed_stream(self, method: str, request_iterator, context, answer,
                            response_type, window: int) -> None:
        """A keyed stream (:func:`esmc_server.streams.keyed_stream`) over this servicer."""
        await keyed_stream(self, method, request_iterator, context, answer, response_type, window)

    async def Embed(self, request_iterator, context) -> None:
        """Bulk embeddings: a keyed stream with ``embed_window`` requests outstanding."""
        caller = self._caller(context)

        async def one(request: pb.EmbedRequest, deadline: float | None) -> Leased:
            served = self._serving(request.model)
            call = read_embed(request, served.limits, caller, deadline)
            lease = await self.budget.reserve(call.cost.response_bytes)  # back once written
            try:
                result = await served.engine.logits(call)
                tracing.engine_done(result.timing, request.id)
                metadata = served.metadata(result.timing, request.model)
                data = await self._build(
                    convert.embed_response_serialized, request.id, result.output, call.config,
                    wire_dtype(call.dtype), metadata,
                )
            except BaseException:
                lease.release()
                raise
            return Leased(data, lease)

        await self._keyed_stream(
            "Embed", request_iterator, context, one, pb.EmbedResponse, self._config.embed_window
        )

    # -- Generate: server stream ----------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        """One message per step, then a final one with the finished protein.

        The engine's next event is taken only after the previous message has been written.
        The deadline covers the whole stream; a client that cancels, goes away or stops
        reading closes the engine's iterator, which drops the generation before its next step.
        """
        self._caller(context)
        outcome = Outcome(self.metrics, "Generate")
        try:
            await self._generate(request, context)
        except BaseException as e:
            error = outcome.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            await abort(context, error)
        finally:
            outcome.record(context)

    async def _generate(self, request: pb.GenerateRequest, context) -> None:
        served = self._serving(request.model)
        call = read_generate(request, served.limits, self._caller(context),
                             convert.deadline_of(context))
        events = served.engine.generate(call)
        timings: list[Timing] = []
        last_sent = None
        step_bytes = 1024 + STEP_BYTES_PER_TOKEN * len(call.tokens)  # an upper bound per message
        try:
            async for event in events:
                if last_sent is None or event.step.step != last_sent.step:
                    timings.append(event.timing)
                    tracing.engine_done(event.timing)
                    metadata = served.metadata(event.timing, request.model)
                    response = await self._leased(
                        step_bytes, convert.generation_step_response, event.step, metadata
                    )
                    await self.write(context, response)
                    last_sent = event.step
                if event.final or event.step.done:
                    total = combine_timings(timings, concurrent=False)
                    final = await self._leased(
                        step_bytes, convert.generation_final_response, event.step,
                        served.metadata(total, request.model),
                    )
                    await self.write(context, final)
                    return
        finally:
            await events.aclose()


def batching_limits(batching: BatchingConfig) -> pb.BatchingLimits:
    """A server's batching settings as Info reports them."""
    return pb.BatchingLimits(
        max_batch_tokens=batching.max_batch_tokens,
        max_batch_size=batching.max_batch_size,
        max_wait_ms=batching.max_wait_ms,
        max_queue=batching.max_queue,
        packed=batching.packed,
    )


def model_info(info: ServerInfo, identity: ServedModel) -> pb.ModelInfo:
    """One served model as Info lists it."""
    return pb.ModelInfo(
        name=identity.name, aliases=list(identity.aliases), is_default=True,
        d_model=info.d_model, n_heads=info.n_heads, n_layers=info.n_layers,
        max_length=info.max_length, dtype=info.dtype, devices=[info.device],
        batching=batching_limits(info.batching),
        weights_sha256=identity.weights_sha256, weights_bytes=identity.weights_bytes,
        trained_context=info.trained_context,
    )


def info_response(info: ServerInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_name=info.model_name,
        d_model=info.d_model,
        n_heads=info.n_heads,
        n_layers=info.n_layers,
        vocabulary=list(info.vocabulary),
        max_length=info.max_length,
        dtype=info.dtype,
        device=info.device,
        batching=batching_limits(info.batching),
        max_message_bytes=info.max_message_bytes,
        server_version=info.server_version,
        logits_width=info.logits_width,
        trained_context=info.trained_context,
    )
