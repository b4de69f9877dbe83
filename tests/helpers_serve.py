"""Real ``esmc serve`` processes for tests: start on free ports, wait for SERVING, signal, kill.

Each process runs torch on one thread (``--threads 1`` where the server has it, else
``OMP_NUM_THREADS=1``) and writes its log to a file the test can read.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def proteome_path() -> Path | None:
    """The shared proteome (``../shared/data/proteome.fasta`` beside the checkout), if present."""
    candidates = [
        os.environ.get("ESMC_PROTEOME"),
        ROOT.parent / "shared" / "data" / "proteome.fasta",
        ROOT / "shared" / "data" / "proteome.fasta",
        Path("/work/shared/data/proteome.fasta"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


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
        self.port, self.metrics_port = port or free_ports(1)[0], free_ports(1)[0]
        while self.metrics_port == self.port:
            self.metrics_port = free_ports(1)[0]
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

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """The metrics endpoint: ``{(sample name, sorted labels): value}``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __enter__(self) -> ServeProcess:
        return self.start().wait_serving()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


def requests_served(metrics: dict[tuple[str, tuple], float], method: str) -> float:
    """How many ``method`` calls (any status) a server's metrics counted."""
    return sum(
        value
        for (name, labels), value in metrics.items()
        if name.endswith("_total") and "request" in name and ("method", method) in labels
    )
