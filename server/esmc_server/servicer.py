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
from importlib import metadata as importlib_metadata
from typing import Any

from esmc import tokenizer
from esmc import ESMC
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server import convert, tracing
from esmc_server.config import ServerConfig
from esmc_server.engine import Engine
from esmc_server.errors import Cancelled, InvalidRequest, Unavailable
from esmc_server.metrics import Metrics
from esmc_server.budget import Leased, ResponseBudget, StreamIds
from esmc_server.outcome import PUSHBACK_KEY, Outcome, abort
from esmc_server.scoring import ScoringMethods
from esmc_server.streams import keyed_stream

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ESMC"].full_name
__all__ = ["ESMCServicer", "PUSHBACK_KEY", "SERVICE_NAME", "server_version"]
STEP_BYTES_PER_TOKEN = 32
"""Upper bound on a Generate message's bytes per token (sequence, ids, probabilities...)."""
RESPONSE_THREADS = 2
"""Threads that build response messages (tensor bytes) off the event loop."""


def server_version() -> str:
    try:
        return importlib_metadata.version("esmc-serve")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Attached:
    """What the servicer needs once the model is loaded."""

    engine: Engine
    model: ESMC
    shapes: convert.Shapes


class ESMCServicer(ScoringMethods, pb_grpc.ESMCServicer):
    """Answers ``UNAVAILABLE`` until :meth:`attach` hands it a started engine."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self._config = config
        self.metrics = metrics or Metrics()
        self._served: Attached | None = None
        self._pool = ThreadPoolExecutor(RESPONSE_THREADS, thread_name_prefix="esmc-respond")
        # one memory budget for the whole server (esmc_server.budget)
        self.budget = ResponseBudget(
            config.max_unread_response_bytes, self.metrics.on_unread_response_bytes
        )
        self.stream_ids = StreamIds(config.max_stream_ids, self.metrics.on_stream_ids)
        self._draining = False

    def attach(self, engine: Engine, model: ESMC) -> None:
        shapes = convert.Shapes(d_model=model.config.d_model, logits_width=model.config.vocab_rows)
        self._served = Attached(engine, model, shapes)

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

    @property
    def _max_tokens(self) -> int:
        return self._config.max_tokens

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

    def _check_size(self, size: int, advice: str) -> None:
        convert.check_response_size(size, self._config.max_message_bytes, advice)

    async def _unary(self, method: str, context, handler: Callable[[], Any]):
        """Run ``handler``; any error becomes its status (with pushback where it helps)."""
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
        return await self._unary("Info", context, self._info)

    async def _info(self) -> pb.InfoResponse:
        model = self._ready.model
        shape = model.config
        batching = self._config.batching
        return pb.InfoResponse(
            model_name=self._config.model,
            d_model=shape.d_model,
            n_heads=shape.n_heads,
            n_layers=shape.n_layers,
            vocabulary=list(tokenizer.VOCABULARY),
            max_length=self._max_tokens,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            batching=pb.BatchingLimits(
                max_batch_tokens=batching.max_batch_tokens,
                max_batch_size=batching.max_batch_size,
                max_wait_ms=batching.max_wait_ms,
                max_queue=batching.max_queue,
                packed=batching.packed,
            ),
            max_message_bytes=self._config.max_message_bytes,
            server_version=server_version(),
            logits_width=shape.vocab_rows,
            trained_context=shape.max_length,
        )

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
            served = self._ready
            tokens = convert.tokens_from_request(request, self._max_tokens)
            config, layers = convert.logits_config_from_proto(
                request.config, served.model.config.n_layers
            )
            dtype = convert.output_dtype(request.output_dtype)
            size = convert.logits_response_bytes(
                config, layers, len(tokens), served.shapes, dtype
            )
            self._check_size(size, convert.LOGITS_SIZE_ADVICE)
            lease = await self.budget.reserve(size)  # given back once handed to gRPC
            try:
                result = await served.engine.logits(
                    tokens, config, deadline=convert.deadline_of(context),
                    dtype=convert.torch_dtype(dtype),
                )
                tracing.engine_done(result.timing)
                metadata = convert.metadata_to_proto(result.timing)
                return await self._build(
                    convert.logits_response_serialized, result.output, layers, dtype, metadata
                )
            finally:
                lease.release()

        return await self._unary("Logits", context, handler)

    async def ForwardAndSample(self, request: pb.ForwardAndSampleRequest, context):
        async def handler():
            served = self._ready
            tokens = convert.tokens_from_request(request, self._max_tokens)
            sampling = convert.sampling_config_from_request(request)
            dtype = convert.output_dtype(request.output_dtype)
            size = convert.sample_response_bytes(sampling, len(tokens), served.shapes, dtype)
            self._check_size(size, convert.SAMPLE_SIZE_ADVICE)
            lease = await self.budget.reserve(size)  # given back once handed to gRPC
            try:
                output, timing = await served.engine.forward_and_sample(
                    tokens, sampling, convert.seed_of(request),
                    deadline=convert.deadline_of(context),
                )
                tracing.engine_done(timing)
                metadata = convert.metadata_to_proto(timing)
                return await self._build(
                    convert.forward_and_sample_response, output, dtype, metadata
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
        await self._keyed_stream(
            "Embed", request_iterator, context, self._embed_one, pb.EmbedResponse,
            self._config.embed_window,
        )

    async def _embed_one(self, request: pb.EmbedRequest, deadline: float | None) -> Leased:
        served = self._ready
        tokens = convert.tokens_from_request(request, self._max_tokens)
        config = convert.embed_config_from_proto(request, served.model.config.n_layers)
        dtype = convert.output_dtype(request.output_dtype)
        layers = [0] if config.needs_hidden_states else []
        size = convert.logits_response_bytes(config, layers, len(tokens), served.shapes, dtype)
        self._check_size(size + len(request.id.encode()), convert.EMBED_SIZE_ADVICE)
        lease = await self.budget.reserve(size)  # given back once written (Leased)
        try:
            result = await served.engine.logits(
                tokens, config, deadline=deadline, dtype=convert.torch_dtype(dtype)
            )
            tracing.engine_done(result.timing, request.id)
            metadata = convert.metadata_to_proto(result.timing)
            data = await self._build(
                convert.embed_response_serialized, request.id, result.output, config, dtype,
                metadata,
            )
        except BaseException:
            lease.release()
            raise
        return Leased(data, lease)

    # -- Generate: server stream ----------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        """One message per step, then a final one with the finished protein.

        The engine's next event is taken only after the previous message has been written.
        The deadline covers the whole stream; a client that cancels, goes away or stops
        reading closes the engine's iterator, which drops the generation before its next step.
        """
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
        served = self._ready
        tokens = convert.tokens_from_request(request, self._max_tokens)
        if not bool((tokens[1:-1] == tokenizer.MASK_ID).any()):
            raise InvalidRequest(
                "protein has no masked position ('_' or <mask>): there is nothing to generate"
            )
        config = convert.generation_config_from_proto(request.config)
        events = served.engine.generate(
            tokens, config, convert.seed_of(request), deadline=convert.deadline_of(context)
        )
        totals = _StreamTotals()
        last_sent = None
        step_bytes = 1024 + STEP_BYTES_PER_TOKEN * len(tokens)  # an upper bound per message
        try:
            async for event in events:
                if last_sent is None or event.step.step != last_sent.step:
                    totals.add(event.timing)
                    tracing.engine_done(event.timing)
                    metadata = convert.metadata_to_proto(event.timing)
                    response = await self._leased(
                        step_bytes, convert.generation_step_response, event.step, metadata
                    )
                    await self.write(context, response)
                    last_sent = event.step
                if event.final or event.step.done:
                    final = await self._leased(
                        step_bytes, convert.generation_final_response, event.step,
                        totals.metadata(),
                    )
                    await self.write(context, final)
                    return
        finally:
            await events.aclose()


class _StreamTotals:
    """Metadata of a whole generation: summed times, the last forward's batch, steps taken."""

    def __init__(self):
        self.queue_ms = 0.0
        self.compute_ms = 0.0
        self.forwards = 0
        self.last = None

    def add(self, timing) -> None:
        self.queue_ms += timing.queue_ms
        self.compute_ms += timing.compute_ms
        self.forwards += timing.forwards
        self.last = timing

    def metadata(self) -> pb.ResponseMetadata:
        return pb.ResponseMetadata(
            queue_ms=self.queue_ms,
            compute_ms=self.compute_ms,
            batch_size=self.last.batch_size,
            batch_tokens=self.last.batch_tokens,
            forwards=self.forwards,
        )

