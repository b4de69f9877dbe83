"""Helpers for end-to-end server tests: tiny random models, a real server on port 0, raw stubs.

No mocks and no high-level client: tests talk to the server through the generated stubs
over real channels and decode the wire tensors with numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from esmc import ESMC, ESMCConfig
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import Server, channel_options, create_server
from esmc_server.config import BatchingConfig, ServerConfig

_WIRE = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_INT32: "<i4",
    pb.DTYPE_INT64: "<i8",
}


def tiny_model(d_model: int = 64, n_heads: int = 2, n_layers: int = 3, seed: int = 0) -> ESMC:
    """A random-weight ESMC in float32 on the CPU, the same for the same arguments."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ESMC(ESMCConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers))
    return model.eval()


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    """A wire Tensor as numpy; bfloat16 is widened to float32 (its bits in the upper half)."""
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(tensor.shape))
    return np.frombuffer(tensor.data, dtype=_WIRE[tensor.dtype]).reshape(tuple(tensor.shape))


def free_port() -> int:
    """A port free right now (for the rare test that must know it before the server binds)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_sequence(rng: np.random.Generator, length: int) -> str:
    return "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=length))


@dataclasses.dataclass
class Running:
    """A server and a channel to it."""

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

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """The metrics endpoint over HTTP: {(sample name, sorted labels): value}."""
        return scrape_metrics(self.server.metrics_port)


def scrape_metrics(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


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


def protein_request(protein_sequence: str, /, **config) -> pb.LogitsRequest:
    return pb.LogitsRequest(
        protein=pb.ESMProtein(sequence=protein_sequence), config=pb.LogitsConfig(**config)
    )


async def serving_port(log_path, process, timeout: float = 120.0) -> int:
    """The port an ``esmc serve`` subprocess logs once it serves (its log file is read)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        assert process.returncode is None, log_path.read_text()
        await asyncio.sleep(0.1)
    raise AssertionError("the server did not start:\n" + log_path.read_text())
