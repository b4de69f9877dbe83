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

Errors are plain :class:`ServiceError` exceptions below this module; :class:`_Outcome` is the
one place that turns any exception into the status (or Embed item error) the client sees, logs
it at the right level and counts it in the metrics once the client has seen it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from typing import Any

import grpc

from esmc import tokenizer
from esmc.model import ESMC
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server import convert, tracing
from esmc_server.config import ServerConfig
from esmc_server.errors import Cancelled, InternalError, InvalidRequest
from esmc_server.errors import ServiceError, Unavailable
from esmc_server.metrics import Metrics
from esmc_server.scoring import ScoringMethods

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ESMC"].full_name
PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata telling clients how long to wait before they retry (gRPC's retry key)."""
_DEADLINE_SLACK_S = 0.1
"""A call cancelled this close to its deadline is counted as DEADLINE_EXCEEDED."""
RESPONSE_THREADS = 2
"""Threads that build response messages (tensor bytes) off the event loop."""


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for a service error (``code`` names a ``grpc.StatusCode``)."""
    return grpc.StatusCode[error.code]


def server_version() -> str:
    try:
        return importlib_metadata.version("esmc-serve")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def as_service_error(error: BaseException, what: str) -> ServiceError:
    """What the client is told about ``error``; an unexpected one is logged with a reference."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, asyncio.CancelledError):
        return Cancelled("the call was cancelled")
    reference = uuid.uuid4().hex[:12]
    log.error("%s failed (reference %s)", what, reference, exc_info=error)
    return InternalError(f"handling this call (log reference {reference})")


class _Outcome:
    """One call, or one item of an Embed stream: its status code, logged and counted once."""

    def __init__(self, metrics: Metrics, method: str):
        self.metrics = metrics
        self.method = method
        self.start = time.perf_counter()
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
            if remaining is not None and remaining <= _DEADLINE_SLACK_S:
                code = "DEADLINE_EXCEEDED"
            elif context.cancelled():
                code = "CANCELLED"
        self.metrics.on_request(self.method, code, time.perf_counter() - self.start)


async def _abort(context, error: ServiceError) -> None:
    metadata = ()
    if error.retry_pushback_ms is not None:
        metadata = ((PUSHBACK_KEY, str(error.retry_pushback_ms)),)
    await context.abort(status_of(error), str(error), trailing_metadata=metadata)


@dataclasses.dataclass(frozen=True)
class _Served:
    """What the servicer needs once the model is loaded."""

    engine: Any  # esmc_server.engine.Engine
    model: ESMC
    shapes: convert.Shapes


class ESMCServicer(ScoringMethods, pb_grpc.ESMCServicer):
    """Answers ``UNAVAILABLE`` until :meth:`attach` hands it a started engine."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self._config = config
        self._metrics = metrics or Metrics()
        self._served: _Served | None = None
        self._pool = ThreadPoolExecutor(RESPONSE_THREADS, thread_name_prefix="esmc-respond")
        self._draining = False

    def attach(self, engine, model: ESMC) -> None:
        shapes = convert.Shapes(d_model=model.config.d_model, logits_width=model.config.vocab_rows)
        self._served = _Served(engine, model, shapes)

    def detach(self) -> None:
        self._served = None

    def drain(self) -> None:
        """Refuse new calls with UNAVAILABLE (and pushback) from now on."""
        self._draining = True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def _ready(self) -> _Served:
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

    def _check_size(self, size: int, advice: str) -> None:
        convert.check_response_size(size, self._config.max_message_bytes, advice)

    async def _unary(self, method: str, context, handler: Callable[[], Any]):
        """Run ``handler``; any error becomes its status (with pushback where it helps)."""
        outcome = _Outcome(self._metrics, method)
        try:
            return await handler()
        except BaseException as e:
            error = outcome.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            await _abort(context, error)
        finally:
            outcome.record(context)

    async def _write(self, context, message) -> None:
        """Write one stream message; a client that does not read for the idle timeout is cut."""
        timeout = self._config.stream_idle_timeout_s
        try:
            await asyncio.wait_for(context.write(message), timeout)
        except TimeoutError:
            raise Cancelled(
                f"the client read nothing for {timeout:g} s (stream_idle_timeout_s); "
                "the stream was cancelled"
            ) from None

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
            result = await served.engine.logits(
                tokens, config, deadline=convert.deadline_of(context),
                dtype=convert.torch_dtype(dtype),
            )
            tracing.engine_done(result.timing)
            metadata = convert.metadata_to_proto(result.timing)
            return await self._build(
                convert.logits_response_serialized, result.output, layers, dtype, metadata
            )

        return await self._unary("Logits", context, handler)

    async def ForwardAndSample(self, request: pb.ForwardAndSampleRequest, context):
        async def handler():
            served = self._ready
            tokens = convert.tokens_from_request(request, self._max_tokens)
            sampling = convert.sampling_config_from_request(request)
            dtype = convert.output_dtype(request.output_dtype)
            size = convert.sample_response_bytes(sampling, len(tokens), served.shapes, dtype)
            self._check_size(size, convert.SAMPLE_SIZE_ADVICE)
            output, timing = await served.engine.forward_and_sample(
                tokens, sampling, convert.seed_of(request), deadline=convert.deadline_of(context)
            )
            tracing.engine_done(timing)
            metadata = convert.metadata_to_proto(timing)
            return await self._build(convert.forward_and_sample_response, output, dtype, metadata)

        return await self._unary("ForwardAndSample", context, handler)

    # -- keyed bidirectional streams (Embed, PseudoLogLikelihoodStream) ------------------------

    async def _keyed_stream(
        self,
        method: str,
        request_iterator,
        context,
        answer: Callable[[Any, float | None], Any],
        response_type,
        window: int,
    ) -> None:
        """One response per request, in completion order, each with its request's ``id``.

        ``answer(request, deadline)`` returns the serialized response; an error it raises
        becomes that id's ``error`` (a ``response_type`` message), except ``UNAVAILABLE``,
        which ends the stream. At most ``window`` requests are computed and not yet written:
        the next request is read only when a response has been written, so a client that
        does not read stops being read (gRPC flow control then holds its sends).
        """
        deadline = convert.deadline_of(context)
        stream = _KeyedStream(self, method, answer, response_type, window, deadline)
        reader = asyncio.create_task(stream.read(request_iterator))
        try:
            while (item := await stream.results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                response, outcome = item
                try:
                    await self._write(context, response)
                except BaseException as e:
                    outcome.fail(e)
                    raise
                finally:
                    outcome.record()
                    stream.window.release()
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                error = as_service_error(e, method)
                log.debug("%s stream: %s %s", method, error.code, error)
                await _abort(context, error)
            raise
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            stream.cancel()

    async def Embed(self, request_iterator, context) -> None:
        """Bulk embeddings: a keyed stream with ``embed_window`` requests outstanding."""
        await self._keyed_stream(
            "Embed", request_iterator, context, self._embed_one, pb.EmbedResponse,
            self._config.embed_window,
        )

    async def _embed_one(self, request: pb.EmbedRequest, deadline: float | None) -> bytes:
        served = self._ready
        tokens = convert.tokens_from_request(request, self._max_tokens)
        config = convert.embed_config_from_proto(request, served.model.config.n_layers)
        dtype = convert.output_dtype(request.output_dtype)
        layers = [0] if config.needs_hidden_states else []
        size = convert.logits_response_bytes(config, layers, len(tokens), served.shapes, dtype)
        self._check_size(size + len(request.id.encode()), convert.EMBED_SIZE_ADVICE)
        result = await served.engine.logits(
            tokens, config, deadline=deadline, dtype=convert.torch_dtype(dtype)
        )
        tracing.engine_done(result.timing, request.id)
        metadata = convert.metadata_to_proto(result.timing)
        return await self._build(
            convert.embed_response_serialized, request.id, result.output, config, dtype, metadata
        )

    # -- Generate: server stream ----------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        """One message per step, then a final one with the finished protein.

        The engine's next event is taken only after the previous message has been written.
        The deadline covers the whole stream; a client that cancels, goes away or stops
        reading closes the engine's iterator, which drops the generation before its next step.
        """
        outcome = _Outcome(self._metrics, "Generate")
        try:
            await self._generate(request, context)
        except BaseException as e:
            error = outcome.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            await _abort(context, error)
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
        try:
            async for event in events:
                if last_sent is None or event.step.step != last_sent.step:
                    totals.add(event.timing)
                    tracing.engine_done(event.timing)
                    metadata = convert.metadata_to_proto(event.timing)
                    response = await self._build(
                        convert.generation_step_response, event.step, metadata
                    )
                    await self._write(context, response)
                    last_sent = event.step
                if event.final or event.step.done:
                    final = await self._build(
                        convert.generation_final_response, event.step, totals.metadata()
                    )
                    await self._write(context, final)
                    return
        finally:
            await events.aclose()


class _KeyedStream:
    """The reading half of one keyed stream: a task per admitted request, results queued.

    ``window`` is acquired before a request is read and released by the writer once that
    request's response has been written. Ids are checked here, once for every keyed stream:
    bounded in length and unique within the stream.
    """

    def __init__(self, servicer: ESMCServicer, method: str, answer, response_type,
                 window: int, deadline: float | None):
        self.servicer = servicer
        self.method = method
        self.answer = answer
        self.response_type = response_type
        self.deadline = deadline
        self.results: asyncio.Queue = asyncio.Queue()
        self.window = asyncio.Semaphore(window)
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task] = set()

    async def read(self, request_iterator) -> None:
        """Admit requests while the window allows; None once every one has been answered."""
        try:
            while True:
                await self.window.acquire()
                try:
                    request = await anext(request_iterator)
                except StopAsyncIteration:
                    self.window.release()
                    break
                task = asyncio.create_task(self._answer(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.gather(*self.tasks)
            self.results.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the request stream itself failed
            self.results.put_nowait(e)

    def _check_id(self, request_id: str) -> None:
        convert.stream_id_of(request_id)
        if request_id in self.seen:
            raise InvalidRequest(
                f"id {request_id!r} was already used in this stream; ids must be unique"
            )
        self.seen.add(request_id)

    async def _answer(self, request) -> None:
        """This id's response, or this id's error: one bad sequence never ends the stream.

        ``UNAVAILABLE`` (not ready, shutting down) ends the whole stream instead, with retry
        pushback, so that clients reconnect (to another replica) rather than spend each id's
        retries on a server that cannot answer any of them.
        """
        outcome = _Outcome(self.servicer._metrics, self.method)
        try:
            self._check_id(request.id)
            response = await self.answer(request, self.deadline)
        except asyncio.CancelledError:
            outcome.fail(Cancelled("the call was cancelled"))
            outcome.record()
            raise
        except Unavailable as e:  # loading or shutting down: the whole stream, not this id
            outcome.fail(e)
            outcome.record()
            self.results.put_nowait(e)
            return
        except BaseException as e:
            error = outcome.fail(e)
            response = self.response_type(
                id=request.id[: convert.MAX_ID_CHARS],
                error=pb.Error(code=error.code, message=str(error)),
            )
        self.results.put_nowait((response, outcome))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


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

