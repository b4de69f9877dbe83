"""Real servers in this process, on port 0: on the test's own event loop (``running_server``,
talked to through the raw stubs) or on an event-loop thread of their own (``ThreadServer``,
``serving_on``), which blocking clients, asyncio clients and the CLI all reach over real
channels. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmc import ESMC
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import Server, channel_options, create_server
from esmc_server.config import BatchingConfig, ServerConfig

from .metrics import Samples, scrape_metrics


def server_config(
    *,
    max_message_bytes: int = 64 * 1024 * 1024,
    grace_s: float = 5.0,
    settings: dict | None = None,
    **batching,
) -> ServerConfig:
    """A test server's config: port 0, CPU; ``settings`` sets other ServerConfig fields."""
    return ServerConfig(
        **(settings or {}),
        model="tiny-random",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        device="cpu",
        batching=BatchingConfig(**batching),
        max_message_bytes=max_message_bytes,
        grace_s=grace_s,
    )


@dataclasses.dataclass
class Running:
    """A server on the test's loop and a channel to it."""

    server: Server
    port: int
    channel: grpc.aio.Channel
    stub: pb_grpc.ESMCStub
    health: health_pb2_grpc.HealthStub
    model: ESMC

    @property
    def engine(self):
        return self.server.engine

    async def health_status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return response.status

    async def assert_serving(self) -> None:
        assert await self.health_status() == health_pb2.HealthCheckResponse.SERVING
        info = await self.stub.Info(pb.InfoRequest(), timeout=10)
        assert info.d_model == self.model.config.d_model

    def scrape(self) -> Samples:
        """The metrics endpoint over HTTP."""
        return scrape_metrics(self.server.metrics_port)


@contextlib.asynccontextmanager
async def running_server(
    model: ESMC, config: ServerConfig, engine=None
) -> AsyncIterator[Running]:
    """A real server on a free port with ``model`` (served by ``engine`` when given, e.g. one
    with injected faults), and a channel with the same size limits."""
    server, port = await create_server(config, engine=engine, model=model)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(config.max_message_bytes)
    )
    try:
        yield Running(
            server,
            port,
            channel,
            pb_grpc.ESMCStub(channel),
            health_pb2_grpc.HealthStub(channel),
            model,
        )
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)


@contextlib.contextmanager
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio loop running on a daemon thread (servers there; blocking clients here)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="esmc-test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@contextlib.contextmanager
def serving_on(loop, model, metrics: bool = True, tracer_provider=None, **settings):
    """``create_server`` on ``loop`` with ``model`` on port 0 and ``settings`` (ServerConfig
    fields); yields the Server (its ``port``, ``metrics_port``...), stopped at the end."""
    config = ServerConfig(
        port=0, metrics_port=0 if metrics else None, warmup=False,
        batching=BatchingConfig(max_wait_ms=1.0), **settings,
    )
    coroutine = create_server(config, model=model, tracer_provider=tracer_provider)
    server, _ = asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(2), loop).result(60)


class ThreadServer:
    """An in-process server on its own event-loop thread (clients of any kind can call it);
    ``close()`` stops both."""

    def __init__(self, model: ESMC, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._run(create_server(config, model=model), 120)

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._run(self.server.stop(2), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
