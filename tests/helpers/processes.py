"""Real ``esmc serve`` processes for tests: start on free ports, wait for SERVING, signal, kill.

Each process runs torch on one thread (``OMP_NUM_THREADS=1``) and writes its log to a file
the test can read.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .metrics import Samples, scrape_metrics


def free_port() -> int:
    """A port free right now (for the rare test that must know it before the server binds)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``esmc serve --model MODEL *options`` on free ports; use as a context manager.

    ``credentials`` (channel credentials) are those the health probe needs with TLS;
    ``target_name`` overrides the TLS host name it checks (default: the certificate's).
    """

    def __init__(
        self,
        model: str = "esmc-tiny",
        options: Sequence[str] = (),
        *,
        credentials: grpc.ChannelCredentials | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_s: float = 120.0,
    ):
        self.port, self.metrics_port = port or free_port(), free_port()
        while self.metrics_port == self.port:
            self.metrics_port = free_port()
        self.command = [
            sys.executable, "-m", "esmc_server.cli", "serve", "--model", model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), "--no-warmup", *options,
        ]
        self.credentials = credentials
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.ready_s = ready_s
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="esmc-serve-", suffix=".log", delete=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        return self

    def wait_serving(self) -> ServeProcess:
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"esmc serve exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"esmc serve on {self.target} not SERVING after {self.ready_s} s")

    def health(self, timeout: float = 2.0) -> int | None:
        """The health status, or None when the server does not answer."""
        if self.credentials is None:
            channel = grpc.insecure_channel(self.target)
        else:
            channel = grpc.secure_channel(self.target, self.credentials)
        with channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return None
        return reply.status

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no drain, sockets die with the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def metrics(self) -> Samples:
        """The metrics endpoint: ``{(sample name, sorted labels): value}``."""
        return scrape_metrics(self.metrics_port)

    def __enter__(self) -> ServeProcess:
        return self.start().wait_serving()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


async def serving_port(log_path: Path, process, timeout: float = 120.0) -> int:
    """The port an ``esmc serve`` subprocess (an asyncio one) logs once it serves (its log
    file is read)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        assert process.returncode is None, log_path.read_text()
        await asyncio.sleep(0.1)
    raise AssertionError("the server did not start:\n" + log_path.read_text())
