"""Assemble the server: gRPC (ESMC, health, reflection), the engine, metrics; graceful stop.

Order of start-up: the gRPC port opens first with health ``NOT_SERVING`` (so probes get an
answer while the weights load), then the model is loaded off the event loop, the engine starts
and warms up, and only then health turns ``SERVING``. A port another process holds is an
error at start (no ``SO_REUSEPORT`` unless ``so_reuseport`` asks for it).

Order of shutdown (:meth:`Server.stop`): health ``NOT_SERVING`` first; the listener keeps
answering for ``drain_delay_s`` so that load balancers see it and send traffic elsewhere; then
new calls are refused and calls in flight get ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from esmc import ESMC
from esmc.runtime import resolve_dtype
from esmc.weights import default_device
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import tracing
from esmc_server.admission import AdmissionLimits
from esmc_server.config import ServerConfig
from esmc_server.connections import quiet_descriptor_errors
from esmc_server.decoding import DecodingInterceptor
from esmc_server.metrics import Metrics
from esmc_server.security import OpenStreams, Security, connection_options, start_health_server
from esmc_server.servicer import SERVICE_NAME, ESMCServicer

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """A client channel's message size limits (both directions)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's options: a response limit, a request limit of its own (gRPC applies
    it to the decompressed message, before anything parses it), a cap on connections below
    the descriptor limit, and SO_REUSEPORT only when asked for."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.request_limit),
        *listener_options(config),
    ]


def listener_options(config: ServerConfig) -> list[tuple[str, int]]:
    """What every gRPC listener (the main port and the health port) shares."""
    return [
        ("grpc.so_reuseport", 1 if config.so_reuseport else 0),
        ("grpc.max_allowed_incoming_connections", config.connection_limit),
    ]


def _serialize(message) -> bytes:
    """Response serializer: bytes the servicer serialized off the event loop pass through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(
    servicer: ESMCServicer, grpc_server: grpc.aio.Server, streams: OpenStreams | None = None
) -> None:
    """Register every ``esmc.v1.ESMC`` method as the generated code does, with two changes:
    a handler may return (or write) an already serialized message as ``bytes``, so that large
    responses are serialized in the servicer's thread pool instead of on the event loop; and
    streaming methods are tracked in ``streams`` (ended when their token is removed)."""
    service = pb.DESCRIPTOR.services_by_name["ESMC"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    def behaviour(method):
        handler = getattr(servicer, method.name)
        streaming = method.client_streaming or method.server_streaming
        return streams.wrap(handler) if streams is not None and streaming else handler

    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            behaviour(method),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=_serialize,
        )
        for method in service.methods
    }
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    grpc_server.add_registered_method_handlers(service.full_name, handlers)


class PortInUse(OSError):
    """The gRPC port could not be bound (another process holds it, or the address is wrong)."""


def load_model(config: ServerConfig) -> ESMC:
    """The model named by ``config.model`` (registry name, hub id or local path), in eval mode."""
    device = None if config.device == "auto" else torch.device(config.device)
    dtype = resolve_dtype(config.dtype, device if device is not None else default_device())
    model = ESMC.from_pretrained(config.model, device=device, dtype=dtype).eval()
    if config.compile:  # compiled and warmed up for the served layout before SERVING
        from esmc.compiled import compile_blocks

        compile_blocks(model, warmup=("packed",) if config.batching.packed else ("padded",))
    return model


class Server:
    """A running server: ``port``, ``metrics_port``, ``engine``; :meth:`stop` shuts it down."""

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        health: health_aio.HealthServicer,
        servicer: ESMCServicer,
        metrics: Metrics,
    ):
        self.config = config
        self.grpc_server = grpc_server
        self.health = health
        self.servicer = servicer
        self.metrics = metrics
        self.security: Security | None = None
        self.health_server: grpc.aio.Server | None = None  # plaintext health-only port
        self.health_port: int | None = None
        self.tracer_provider = None  # one this server made (flushed and shut down at stop)
        self.port: int = 0
        self.metrics_port: int | None = None
        self.http = None  # esmc_server.http.HttpFront when config.http_port is set
        self.engine = None
        self.model: ESMC | None = None
        self.fatal: str | None = None  # why the engine failed, once it has
        self.failed = asyncio.Event()  # set when the engine failed (health is NOT_SERVING)
        self._stopping: asyncio.Task | None = None
        self._health_update: asyncio.Future | None = None

    def watch_engine(self) -> None:
        """Tie health to the engine's watchdog: a fatal engine fault turns ``""`` and the ESMC
        service NOT_SERVING at once and sets :attr:`failed` (``esmc serve`` then exits 1)."""

        def on_fatal(reason: str) -> None:
            log.error("engine failed (%s): health is NOT_SERVING from now on", reason)
            self.fatal = reason
            self.failed.set()
            self.metrics.on_engine_failed()
            self._health_update = asyncio.ensure_future(self.set_serving(False))

        self.engine.add_fatal_listener(on_fatal)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        self.metrics.on_serving(serving)

    async def stop(self, grace_s: float | None = None, drain_delay_s: float = 0.0) -> None:
        """Health NOT_SERVING; keep answering for ``drain_delay_s`` (load balancers drain);
        then refuse new calls and let calls in flight finish within ``grace_s``.

        ``esmc serve`` passes the configured ``drain_delay_s`` on SIGTERM; tests and embedders
        stop at once by default. Safe to call more than once (later calls wait for the first).
        """
        if self._stopping is None:
            grace = self.config.grace_s if grace_s is None else grace_s
            self._stopping = asyncio.ensure_future(self._stop(grace, drain_delay_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float, drain_delay_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.metrics.on_serving(False)
        if drain_delay_s > 0:
            log.info("health NOT_SERVING; still answering for %.1f s", drain_delay_s)
            await asyncio.sleep(drain_delay_s)
        deadline = time.monotonic() + grace_s
        self.servicer.drain()
        if self.http is not None:  # closes its port, lets requests in flight finish
            await self.http.stop()
        await self.grpc_server.stop(grace_s)  # refuses new RPCs now, cancels the rest at grace
        self.servicer.detach()
        if self.engine is not None:
            await self.engine.stop(max(0.0, deadline - time.monotonic()))
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.shutdown)
        self.servicer.close()
        self.metrics.close()
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(
    config: ServerConfig, engine=None, model: ESMC | None = None, *, tracer_provider=None
) -> tuple[Server, int]:
    """Start serving ``config``; returns once health is SERVING, with the bound gRPC port.

    Without ``engine`` one is built over ``model`` (loaded from ``config.model`` when None)
    with this server's metrics as its observer. A given ``engine`` must expose ``.model`` or
    come with ``model``. ``config.port`` 0 binds a free port. ``tracer_provider`` (an
    OpenTelemetry TracerProvider) turns tracing on, as ``config.otlp_endpoint`` does.
    """
    quiet_descriptor_errors(asyncio.get_running_loop())
    metrics = Metrics(queue_capacity=config.batching.max_queue)
    if config.tls_cert:
        metrics.watch_certificate(config.tls_cert)
    security = Security(
        config, on_refused=lambda method: metrics.on_request(_short(method), "UNAUTHENTICATED", 0.0)
    )
    security.warn_if_unsafe()
    owned_provider = None
    if tracer_provider is None and config.otlp_endpoint:
        tracer_provider = owned_provider = tracing.otlp_tracer_provider(config.otlp_endpoint)
    tracers = [tracing.TracingInterceptor(tracer_provider)] if tracer_provider else []
    grpc_server = grpc.aio.server(
        options=server_options(config) + connection_options(config),
        # traced first: refusals show too; requests are parsed only once authenticated
        interceptors=tracers + security.interceptors + [DecodingInterceptor(
            on_refused=lambda method: metrics.on_request(_short(method), "INVALID_ARGUMENT", 0.0)
        )],
    )
    health = health_aio.HealthServicer()
    servicer = ESMCServicer(config, metrics)
    server = Server(config, grpc_server, health, servicer, metrics)
    server.security = security
    server.tracer_provider = owned_provider
    await server.set_serving(False)
    add_servicer(servicer, grpc_server, security.streams)
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    address = f"{config.host}:{config.port}"
    try:
        server.port = security.add_port(grpc_server, address)
    except RuntimeError:  # grpc raises it when the bind fails
        server.port = 0
    if server.port == 0:
        servicer.close()
        raise PortInUse(
            f"cannot bind {address}: the port is in use by another process or the address is "
            "not available (so_reuseport is off, so two servers never share a port)"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    await grpc_server.start()
    try:
        if config.health_port is not None:
            server.health_server, server.health_port = await start_health_server(
                health, config.host, config.health_port, listener_options(config)
            )
        await _start_engine(server, config, engine, model)
        if config.metrics_port is not None:
            server.metrics_port = metrics.serve(config.host, config.metrics_port)
        if config.http_port is not None:
            from esmc_server.http import start_http

            server.http = await start_http(server, config.host, config.http_port)
    except BaseException:
        await grpc_server.stop(0)
        if server.health_server is not None:
            await server.health_server.stop(0)
        if server.engine is not None:
            await server.engine.stop(0)
        servicer.close()
        metrics.close()
        raise
    servicer.attach(server.engine, server.model)
    if server.fatal is None:
        await server.set_serving(True)
    return server, server.port


def _short(method: str) -> str:
    """``/esmc.v1.ESMC/Logits`` -> ``Logits`` (the servicer's metric label)."""
    return method.rsplit("/", 1)[-1]


async def _start_engine(server: Server, config: ServerConfig, engine, model: ESMC | None) -> None:
    from esmc_server.engine import Engine

    if engine is None:
        if model is None:
            log.info("loading model %s", config.model)
            model = await asyncio.to_thread(load_model, config)
        engine = Engine(
            model,
            config.batching,
            observer=server.metrics,
            forward_timeout_s=config.forward_timeout_s,
            admission=admission_limits(config),
        )
    server.model = model if model is not None else engine.model
    server.engine = engine
    server.watch_engine()
    await engine.start()
    if config.warmup:  # and the start check: the longest admitted forward fits the timeout
        await engine.warmup()
        await engine.check_forward_time(config.max_tokens)


def admission_limits(config: ServerConfig) -> AdmissionLimits:
    """The cost limits of ``config`` (:mod:`esmc_server.admission`)."""
    return AdmissionLimits(
        max_request_token_forwards=config.max_request_token_forwards,
        max_caller_token_forwards=config.max_caller_token_forwards,
        max_inflight_token_forwards=config.max_inflight_token_forwards,
    )
