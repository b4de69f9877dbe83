"""The ``esmc.v1.ESMC`` gRPC servicer: protobuf in, validated engine calls, protobuf out.

Every request is validated (``convert``) before it reaches the engine, so a caller's mistake
answers ``INVALID_ARGUMENT`` without costing queue space. Errors are plain
:class:`ServiceError` exceptions below this module; :func:`status_of` is the one place that
turns them into gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata as importlib_metadata

import grpc

from esmc import tokenizer
from esmc.model import ESMC
from esmc_client._proto.esmc.v1 import esmc_pb2 as pb
from esmc_client._proto.esmc.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server import convert
from esmc_server.config import ServerConfig
from esmc_server.errors import InvalidRequest, ServiceError, Unavailable
from esmc_server.metrics import Metrics
from esmc_server.scoring import ScoringMethods

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ESMC"].full_name
EMBED_WINDOW = 256
"""Requests of one Embed stream in flight at once; reading pauses (flow control) beyond it."""


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for a service error (``code`` names a ``grpc.StatusCode``)."""
    return grpc.StatusCode[error.code]


def server_version() -> str:
    try:
        return importlib_metadata.version("esmc-serve")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as ``time.monotonic()`` seconds, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclasses.dataclass(frozen=True)
class _Served:
    """What the servicer needs once the model is loaded."""

    engine: object  # esmc_server.engine.Engine
    model: ESMC


class ESMCServicer(ScoringMethods, pb_grpc.ESMCServicer):
    """Answers ``UNAVAILABLE`` until :meth:`attach` hands it a started engine."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self._config = config
        self._metrics = metrics or Metrics()
        self._served: _Served | None = None

    def attach(self, engine, model: ESMC) -> None:
        self._served = _Served(engine, model)

    def detach(self) -> None:
        self._served = None

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def _ready(self) -> _Served:
        if self._served is None:
            raise Unavailable("the server is not ready: the model is loading or shutting down")
        return self._served

    async def _unary(self, method: str, context, handler: Callable[[], Awaitable]):
        """Run ``handler``; map its errors to a status; record latency and status."""
        start = time.perf_counter()
        code = "OK"
        try:
            return await handler()
        except ServiceError as e:
            code = e.code
            await context.abort(status_of(e), str(e))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
            )
        finally:
            self._metrics.on_request(method, code, time.perf_counter() - start)

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
            max_length=shape.max_length,
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
        )

    # -- tokenizer ------------------------------------------------------------------------------

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        async def handler():
            tokens = convert.tokens_from_protein(request.protein, max_length=None)
            return pb.EncodeResponse(tokens=convert.protein_tensor_to_proto(tokens))

        return await self._unary("Encode", context, handler)

    async def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        async def handler():
            tokens = convert.tokens_from_tensor(request.tokens, max_length=None)
            return pb.DecodeResponse(protein=convert.protein_to_proto(tokens))

        return await self._unary("Decode", context, handler)

    # -- forwards -----------------------------------------------------------------------------

    async def Logits(self, request: pb.LogitsRequest, context) -> pb.LogitsResponse:
        async def handler():
            served = self._ready
            tokens = convert.tokens_from_request(request, served.model.config.max_length)
            config, layers = convert.logits_config_from_proto(
                request.config, served.model.config.n_layers
            )
            dtype = convert.output_dtype(request.output_dtype)
            result = await served.engine.logits(
                tokens, config, deadline=deadline_of(context), dtype=convert.torch_dtype(dtype)
            )
            metadata = convert.metadata_to_proto(result.timing)
            return convert.logits_response(result.output, layers, dtype, metadata)

        return await self._unary("Logits", context, handler)

    async def ForwardAndSample(self, request: pb.ForwardAndSampleRequest, context):
        async def handler():
            served = self._ready
            tokens = convert.tokens_from_request(request, served.model.config.max_length)
            sampling = convert.sampling_config_from_request(request)
            dtype = convert.output_dtype(request.output_dtype)
            output, timing = await served.engine.forward_and_sample(
                tokens, sampling, convert.seed_of(request), deadline=deadline_of(context)
            )
            metadata = convert.metadata_to_proto(timing)
            return convert.forward_and_sample_response(output, dtype, metadata)

        return await self._unary("ForwardAndSample", context, handler)

    # -- Embed: bidirectional bulk stream -----------------------------------------------------

    async def Embed(self, request_iterator, context) -> AsyncIterator[pb.EmbedResponse]:
        """One response per request, in completion order, each with its request's id."""
        deadline = deadline_of(context)
        results: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(EMBED_WINDOW)
        reader = asyncio.create_task(self._read_embeds(request_iterator, deadline, results, window))
        try:
            while (item := await results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_embeds(
        self, request_iterator, deadline, results: asyncio.Queue, window
    ) -> None:
        """Start one task per request (at most EMBED_WINDOW at once); None when all answered."""
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.EmbedRequest) -> None:
            try:
                results.put_nowait(await self._embed_one(request, deadline))
            finally:
                window.release()

        try:
            async for request in request_iterator:
                await window.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            results.put_nowait(None)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        except Exception as e:  # the request stream itself failed
            results.put_nowait(e)

    async def _embed_one(
        self, request: pb.EmbedRequest, deadline: float | None
    ) -> pb.EmbedResponse:
        """This id's embedding, or this id's error: one bad sequence never ends the stream."""
        start = time.perf_counter()
        code = "OK"
        try:
            served = self._ready
            tokens = convert.tokens_from_request(request, served.model.config.max_length)
            config = convert.embed_config_from_proto(request, served.model.config.n_layers)
            dtype = convert.output_dtype(request.output_dtype)
            result = await served.engine.logits(
                tokens, config, deadline=deadline, dtype=convert.torch_dtype(dtype)
            )
            return pb.EmbedResponse(
                id=request.id,
                embedding=convert.tensor_to_proto(
                    convert.embedding_of(result.output, config), dtype
                ),
                metadata=convert.metadata_to_proto(result.timing),
            )
        except ServiceError as e:
            code = e.code
            return pb.EmbedResponse(id=request.id, error=pb.Error(code=e.code, message=str(e)))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code = "INTERNAL"
            log.exception("Embed item %r failed", request.id)
            message = f"internal error: {type(e).__name__}: {e}"
            return pb.EmbedResponse(id=request.id, error=pb.Error(code=code, message=message))
        finally:
            self._metrics.on_request("Embed", code, time.perf_counter() - start)

    # -- Generate: server stream ----------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One message per step, then a final one with the finished protein.

        The deadline covers the whole stream; a client that cancels or goes away closes the
        engine's iterator, which drops the generation before its next step.
        """
        start = time.perf_counter()
        code = "OK"
        try:
            async for response in self._generate(request, context):
                yield response
        except ServiceError as e:
            code = e.code
            await context.abort(status_of(e), str(e))
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as e:
            code = "INTERNAL"
            log.exception("Generate failed")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
            )
        finally:
            self._metrics.on_request("Generate", code, time.perf_counter() - start)

    async def _generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        served = self._ready
        tokens = convert.tokens_from_request(request, served.model.config.max_length)
        if not bool((tokens[1:-1] == tokenizer.MASK_ID).any()):
            raise InvalidRequest(
                "protein has no masked position ('_' or <mask>): there is nothing to generate"
            )
        config = convert.generation_config_from_proto(request.config)
        events = served.engine.generate(
            tokens, config, convert.seed_of(request), deadline=deadline_of(context)
        )
        totals = _StreamTotals()
        last_sent = None
        try:
            async for event in events:
                if last_sent is None or event.step.step != last_sent.step:
                    totals.add(event.timing)
                    yield convert.generation_step_response(
                        event.step, convert.metadata_to_proto(event.timing)
                    )
                    last_sent = event.step
                if event.final or event.step.done:
                    yield convert.generation_final_response(event.step, totals.metadata())
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
