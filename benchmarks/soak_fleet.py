"""The replicas of a soak run: certificates and tokens made at run time, ``esmc serve``
processes on fixed ports (a restarted replica comes back on its port), signals, and what
``/proc`` says about each process (resident memory, open descriptors).

Nothing here imports torch: the soak driver is a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVER_NAME = "localhost"  # the name every server certificate carries (clients check it)
CLIENT_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)


class Secrets:
    """A throwaway CA (``trustme``), the server certificate and the tokens file, in ``directory``.

    :meth:`reissue_certificate` writes a new server certificate from the same CA (what a
    certificate renewal looks like); :meth:`write_tokens` rewrites the tokens file.
    """

    def __init__(self, directory: Path):
        import trustme  # a test extra; only the soak needs it

        self.directory = directory
        self._ca = trustme.CA()
        self.ca_pem = self._ca.cert_pem.bytes()
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server.key"
        self.tokens_path = directory / "tokens.txt"
        self.certificate_der = b""
        self.reissue_certificate()
        self.token = new_token()
        self.write_tokens([("soak-0", self.token)])

    def reissue_certificate(self) -> bytes:
        """A new server certificate and key from the same CA (written in place); its DER."""
        issued = self._ca.issue_cert("127.0.0.1", SERVER_NAME)
        _write_atomically(self.key_path, issued.private_key_pem.bytes())
        _write_atomically(self.cert_path, issued.private_key_and_cert_chain_pem.bytes())
        pem = issued.cert_chain_pems[0].bytes().decode()
        self.certificate_der = ssl.PEM_cert_to_DER_cert(pem)
        return self.certificate_der

    def write_tokens(self, tokens: list[tuple[str, str]]) -> None:
        """The tokens file: one ``name:token`` line per ``(caller name, token)``."""
        lines = "".join(f"{name}:{token}\n" for name, token in tokens)
        _write_atomically(self.tokens_path, lines.encode())

    def server_flags(self) -> list[str]:
        return [
            "--tls-cert", str(self.cert_path), "--tls-key", str(self.key_path),
            "--auth-tokens-file", str(self.tokens_path),
        ]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem)


class Auth:
    """The token the clients use now; a rotation bumps ``version`` (clients are remade).
    ``in_use`` counts the calls in flight per token version (see :meth:`holding`)."""

    def __init__(self, token: str):
        self.token = token
        self.version = 0
        self.revoked: list[str] = []
        self.in_use: Counter[int] = Counter()

    @contextlib.contextmanager
    def holding(self, version: int):
        """A call made with token ``version`` is in flight."""
        self.in_use[version] += 1
        try:
            yield
        finally:
            self.in_use[version] -= 1


def new_token() -> str:
    return secrets.token_hex(16)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def presented_certificate(port: int, ca_pem: bytes, timeout: float = 5.0) -> bytes:
    """The DER certificate a new TLS handshake with 127.0.0.1:``port`` gets (checked
    against ``ca_pem`` and :data:`SERVER_NAME`)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            return tls.getpeercert(binary_form=True)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclasses.dataclass
class Lifetime:
    """One process of a replica: when it started, when it ended and how."""

    pid: int
    started: float  # seconds on the run's clock
    serving: float | None = None
    ended: float | None = None
    how: str = ""  # "SIGKILL", "SIGTERM drain", "exit 1 (unexpected)", "end of run"
    returncode: int | None = None


class Replica:
    """``esmc serve`` number ``index`` on a fixed port; :meth:`start` again after a stop."""

    def __init__(self, index: int, model: str, flags: list[str], run_dir: Path, clock):
        self.index = index
        self.port, self.metrics_port = free_ports(2)
        self.model = model
        self.flags = flags
        self.clock = clock  # seconds since the run's start
        self.log_path = run_dir / f"replica-{index}.log"
        self.process: subprocess.Popen | None = None
        self.lifetimes: list[Lifetime] = []
        self.expected_exit = False  # set before a signal that ends the process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "esmc_server.cli", "serve", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), *self.flags,
        ]

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start at {self.clock():.1f} s: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.expected_exit = False
        self.lifetimes.append(Lifetime(self.process.pid, self.clock()))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited_unexpectedly(self) -> bool:
        """The process ended without this run asking it to (recorded once)."""
        if self.process is None or self.alive() or self.expected_exit:
            return False
        self._ended(f"exit {self.process.returncode} (unexpected)")
        self.expected_exit = True
        return True

    async def wait_serving(self, credentials, timeout: float) -> float:
        """Wait for health SERVING; the run's clock time it happened."""
        deadline = time.monotonic() + timeout
        channel = grpc.aio.secure_channel(self.address, credentials, options=CLIENT_OPTIONS)
        try:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"replica {self.index} exited with {self.process.returncode}; "
                        f"log: {self.log_path}"
                    )
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        self.lifetimes[-1].serving = self.clock()
                        return self.lifetimes[-1].serving
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        finally:
            await channel.close()
        raise TimeoutError(f"replica {self.index} not SERVING after {timeout:.0f} s")

    def shift_clock(self, seconds: float) -> None:
        """The run's clock moved its origin ``seconds`` later: move the recorded times."""
        for life in self.lifetimes:
            life.started -= seconds
            life.serving = None if life.serving is None else life.serving - seconds
            life.ended = None if life.ended is None else life.ended - seconds

    def kill(self) -> None:
        self.expected_exit = True
        self.process.kill()
        self.process.wait()
        self._ended("SIGKILL")

    async def drain(self, timeout: float) -> None:
        """SIGTERM, then wait for the process to finish its calls and exit."""
        self.expected_exit = True
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self._ended("SIGTERM drain (SIGKILL after the timeout)")
        else:
            self._ended("SIGTERM drain")

    def hangup(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.alive():
            self.expected_exit = True
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._ended("end of run")

    def _ended(self, how: str) -> None:
        life = self.lifetimes[-1]
        if life.ended is None:
            life.ended, life.how, life.returncode = self.clock(), how, self.process.returncode


def process_sample(pid: int) -> tuple[float, int] | None:
    """``(resident MB, open descriptors)`` of ``pid`` from ``/proc``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            rss_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None
    return rss_kb / 1024, descriptors
