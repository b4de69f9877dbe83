"""Server settings: frozen dataclasses, and the only module that reads ``ESMC_*`` variables.

Every setting has one environment variable (``ESMC_`` + the upper-cased field name, e.g.
``ESMC_MAX_BATCH_TOKENS``); keyword overrides (command-line flags) win over the environment,
which wins over the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "ESMC_"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16", "int8", "auto")  # esmc.runtime.resolve_dtype
REQUEST_BYTES_PER_TOKEN = 256
"""Default request limit per token of the longest protein (19 variants of ~10 bytes each)."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch_tokens: int = 16384  # token budget per forward (padded tokens when padding)
    max_batch_size: int = 256  # sequences per forward; 1 switches batching off
    max_wait_ms: float = 5.0  # timed from the oldest waiting request
    max_queue: int = 4096  # waiting requests (logits + generations) before RESOURCE_EXHAUSTED
    packed: bool = True  # pack end to end (else length-sorted padded)
    generation_window: int = 2  # steps a generation may run ahead of its consumer

    def __post_init__(self) -> None:
        _check(self.max_batch_tokens >= 1, "max_batch_tokens must be >= 1")
        _check(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        _check(
            math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, "max_wait_ms must be >= 0"
        )
        _check(self.max_queue >= 1, "max_queue must be >= 1")
        _check(self.generation_window >= 1, "generation_window must be >= 1")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model: str = "esmc-tiny"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9090  # None: no metrics endpoint
    device: str = "auto"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU; auto: bf16 if native
    batching: BatchingConfig = BatchingConfig()
    max_message_bytes: int = 64 * 1024 * 1024  # one response (sent), gRPC and HTTP alike
    max_request_bytes: int | None = None  # one request, decompressed (None: request_limit)
    grace_s: float = 30.0
    warmup: bool = True
    compile: bool = False  # torch.compile the block stack (esmc.compiled), warmed up at start
    max_score_forwards: int = 20000  # masked copies one ScoreVariants/PLL request may need
    # --- admission by cost (esmc_server.admission): token-forwards = tokens x forwards ---
    max_request_token_forwards: int = 2**22  # one request (a 2,000-residue PLL fits)
    max_caller_token_forwards: int = 2**23  # in flight per caller
    max_inflight_token_forwards: int = 2**25  # in flight in the whole server
    http_port: int | None = None  # Forge-compatible HTTP endpoint (same engine); None: off
    # --- shared-service settings (security, connections, tracing) ---
    auth_tokens_file: str | None = None  # one token per line; None: no auth
    auth_reflection: bool = False  # reflection needs a token too
    tls_cert: str | None = None  # PEM certificate chain; None: plaintext
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a cert it signed
    max_connection_age_s: float | None = 300.0  # GOAWAY after this (clients re-resolve); None: never
    max_connection_age_grace_s: float = 60.0  # calls in flight at GOAWAY get this long
    keepalive_time_s: float = 60.0  # ping an idle connection this often (finds dead peers)
    keepalive_timeout_s: float = 20.0  # a ping unanswered this long closes the connection
    keepalive_permit_without_calls: bool = True  # accept client pings with no call open
    min_client_ping_interval_s: float = 10.0  # clients pinging faster get GOAWAY too_many_pings
    health_port: int | None = None  # plaintext gRPC port with only grpc.health.v1 (probes)
    otlp_endpoint: str | None = None  # OpenTelemetry collector (OTLP/gRPC); None: no tracing
    forward_timeout_s: float | None = 600.0  # a forward running longer is fatal (None: no limit)
    fatal_exit_s: float = 3.0  # after a fatal engine fault, `esmc serve` exits 1 this much later
    # --- service-layer settings (limits, streams, shutdown, threads) ---
    max_length: int = 16384  # residues per protein (BOS/EOS not counted), as the hosted API
    threads: int | None = None  # torch intra-op threads of the served model (None: torch's)
    embed_window: int = 64  # requests of one Embed stream computed but not yet written
    stream_idle_timeout_s: float = 60.0  # a stream write blocked this long cancels the call
    drain_delay_s: float = 5.0  # SIGTERM: NOT_SERVING but still answering for this long
    so_reuseport: bool = False  # allow another process to bind the same port (every listener)
    # --- limits before work (connections, HTTP front, memory) ---
    max_connections: int | None = None  # per listener (None: connection_limit, below the fd limit)
    http_idle_timeout_s: float = 15.0  # an HTTP connection with no complete request is closed
    http_body_timeout_s: float = 30.0  # an HTTP request body must arrive within this
    max_unread_response_bytes: int = 64 * 1024 * 1024  # reserved, not yet written: all calls
    max_stream_ids: int = 1_000_000  # ids one keyed stream remembers (uniqueness); then refused

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, f"port {self.port} is out of range")
        if self.metrics_port is not None:
            _check(
                0 <= self.metrics_port < 65536, f"metrics_port {self.metrics_port} is out of range"
            )
        _check(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N",
        )
        _check(
            self.dtype is None or self.dtype in DTYPES,
            f"dtype {self.dtype!r} is not one of {DTYPES}",
        )
        _check(self.max_message_bytes >= 4 * 1024 * 1024, "max_message_bytes must be >= 4 MiB")
        _check(self.grace_s >= 0, "grace_s must be >= 0")
        _check(
            (self.tls_cert is None) == (self.tls_key is None),
            "tls_cert and tls_key go together (a certificate needs its private key)",
        )
        _check(
            self.tls_client_ca is None or self.tls_cert is not None,
            "tls_client_ca (mutual TLS) needs tls_cert and tls_key",
        )
        _check(
            self.max_connection_age_s is None or self.max_connection_age_s > 0,
            "max_connection_age_s must be > 0 (or off)",
        )
        for name in ("max_connection_age_grace_s", "min_client_ping_interval_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        if self.health_port is not None:
            _check(0 <= self.health_port < 65536, f"health_port {self.health_port} is out of range")
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            _check(getattr(self, name) > 0, f"{name} must be > 0")
        _check(self.max_score_forwards >= 1, "max_score_forwards must be >= 1")
        for name in ("max_request_token_forwards", "max_caller_token_forwards",
                     "max_inflight_token_forwards"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        _check(
            self.forward_timeout_s is None or self.forward_timeout_s > 0,
            "forward_timeout_s must be > 0 (or off)",
        )
        _check(self.fatal_exit_s >= 0, "fatal_exit_s must be >= 0")
        _check(self.max_length >= 1, "max_length must be >= 1 residue")
        _check(self.threads is None or self.threads >= 1, "threads must be >= 1")
        _check(self.embed_window >= 1, "embed_window must be >= 1")
        _check(
            math.isfinite(self.stream_idle_timeout_s) and self.stream_idle_timeout_s > 0,
            "stream_idle_timeout_s must be > 0",
        )
        _check(
            math.isfinite(self.drain_delay_s) and self.drain_delay_s >= 0,
            "drain_delay_s must be >= 0",
        )
        if self.http_port is not None:
            _check(0 <= self.http_port < 65536, f"http_port {self.http_port} is out of range")
        _check(
            self.max_request_bytes is None or self.max_request_bytes >= 64 * 1024,
            "max_request_bytes must be >= 64 KiB",
        )
        _check(
            self.max_connections is None or self.max_connections >= 1,
            "max_connections must be >= 1",
        )
        for name in ("http_idle_timeout_s", "http_body_timeout_s"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"{name} must be > 0")
        _check(
            self.max_unread_response_bytes >= self.max_message_bytes,
            "max_unread_response_bytes must be >= max_message_bytes (one response must fit)",
        )
        _check(self.max_stream_ids >= 1, "max_stream_ids must be >= 1")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def max_tokens(self) -> int:
        """Tokens per protein the server accepts, BOS and EOS included."""
        return self.max_length + 2

    @property
    def request_limit(self) -> int:
        """Bytes one request message may hold once decompressed: ``max_request_bytes``, or by
        default ``REQUEST_BYTES_PER_TOKEN`` per token of the longest protein (at least 1 MiB):
        room for the protein and a full single-substitution variant list over it."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(1 << 20, REQUEST_BYTES_PER_TOKEN * self.max_tokens)

    @property
    def connection_limit(self) -> int:
        """Connections each listener keeps open: ``max_connections``, or by default a quarter
        of this process's file-descriptor limit (so that descriptors never run out)."""
        if self.max_connections is not None:
            return self.max_connections
        return max(16, descriptor_limit() // 4)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> ServerConfig:
        """Defaults, then ``ESMC_*`` variables, then ``overrides`` (``None`` values are skipped).

        Overrides name fields of either :class:`ServerConfig` or :class:`BatchingConfig`.
        """
        server_fields = _fields(cls) - {"batching"}
        batching_fields = _fields(BatchingConfig)
        unknown = set(overrides) - server_fields - batching_fields
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        values = {**_read_env(environ), **{k: v for k, v in overrides.items() if v is not None}}
        batching = BatchingConfig(**{k: v for k, v in values.items() if k in batching_fields})
        return cls(batching=batching, **{k: v for k, v in values.items() if k in server_fields})


def descriptor_limit() -> int:
    """This process's soft limit on open file descriptors (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_optional_port(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "off") else int(text)


def _parse_optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "auto") else int(text)


def _parse_dtype(text: str) -> str | None:
    """``auto`` stays ``auto`` (bf16 where native); empty or ``none`` means the default."""
    return None if text.strip().lower() in ("", "none") else text.strip()


def _parse_optional_path(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none", "off") else text.strip()


def _parse_optional_seconds(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none", "off") else float(text)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "model": str.strip,
    "host": str.strip,
    "port": int,
    "metrics_port": _parse_optional_port,
    "device": str.strip,
    "dtype": _parse_dtype,
    "max_message_bytes": int,
    "grace_s": float,
    "warmup": _parse_bool,
    "compile": _parse_bool,
    "max_score_forwards": int,
    "max_request_token_forwards": int,
    "max_caller_token_forwards": int,
    "max_inflight_token_forwards": int,
    "max_length": int,
    "threads": _parse_optional_int,
    "embed_window": int,
    "stream_idle_timeout_s": float,
    "drain_delay_s": float,
    "so_reuseport": _parse_bool,
    "max_request_bytes": _parse_optional_int,
    "max_connections": _parse_optional_int,
    "http_idle_timeout_s": float,
    "http_body_timeout_s": float,
    "max_unread_response_bytes": int,
    "max_stream_ids": int,
    "http_port": _parse_optional_port,
    "max_batch_tokens": int,
    "max_batch_size": int,
    "max_wait_ms": float,
    "max_queue": int,
    "packed": _parse_bool,
    "auth_tokens_file": _parse_optional_path,
    "auth_reflection": _parse_bool,
    "tls_cert": _parse_optional_path,
    "tls_key": _parse_optional_path,
    "tls_client_ca": _parse_optional_path,
    "max_connection_age_s": _parse_optional_seconds,
    "max_connection_age_grace_s": float,
    "keepalive_time_s": float,
    "keepalive_timeout_s": float,
    "keepalive_permit_without_calls": _parse_bool,
    "min_client_ping_interval_s": float,
    "health_port": _parse_optional_port,
    "otlp_endpoint": _parse_optional_path,
    "generation_window": int,
    "forward_timeout_s": _parse_optional_seconds,
    "fatal_exit_s": float,
}


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name, parse in _PARSERS.items():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            try:
                values[name] = parse(environ[key])
            except ValueError as e:
                raise ValueError(f"{key}={environ[key]!r}: {e}") from None
    return values
