"""How the gRPC port is exposed: TLS / mutual TLS, token auth, connection management.

- TLS: ``tls_cert`` + ``tls_key`` (PEM); with ``tls_client_ca`` clients must present a
  certificate signed by that CA (mutual TLS). The files are re-read on SIGHUP together with
  the tokens, for the gRPC port and the HTTP front alike (new connections get the new
  certificate; open ones keep theirs).
- Tokens: :mod:`esmc_server.auth`.
- Connections: ``max_connection_age_s`` sends GOAWAY to every connection after that long
  (plus up to 10% jitter, gRPC's own), so that clients behind a headless Service re-resolve
  the name and spread over replicas that came up after they connected; calls in flight get
  ``max_connection_age_grace_s`` to finish. Keepalive pings find dead peers (a replica that
  vanished without closing its sockets) and keep idle connections through NATs/proxies.

The metrics endpoint is not covered: it stays plaintext HTTP on its own port. So does the
optional ``health_port``: a plaintext gRPC port that serves only ``grpc.health.v1``, for
probes that cannot speak TLS (Kubernetes' native gRPC probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from grpc_health.v1 import health_pb2_grpc

from esmc_server.auth import AuthInterceptor, TokenStore
from esmc_server.calls import CURRENT_CALLER
from esmc_server.config import ServerConfig

log = logging.getLogger(__name__)


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC server arguments for connection age and keepalive."""
    options = [
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.min_client_ping_interval_s)),
    ]
    if config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_s)),
        ]
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class TlsFiles:
    """The server's certificate, key and optional client CA, re-read by :meth:`reload`.

    Both listeners that speak TLS take them from here: gRPC through dynamic credentials
    (:meth:`credentials`), the HTTP front through :meth:`ssl_context`. After a reload, the
    next handshake on either uses the new files; open connections keep theirs.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._read()
        self._ssl = self._python_context()

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        try:
            chain = Path(self.cert).read_bytes()
            key = Path(self.key).read_bytes()
            root = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as e:
            raise ValueError(f"cannot read TLS file {e.filename}: {e.strerror}") from None
        for name, data in (("tls_cert", chain), ("tls_key", key), ("tls_client_ca", root)):
            if data is not None and b"-----BEGIN" not in data:
                raise ValueError(f"{name} is not a PEM file")
        return grpc.ssl_server_certificate_configuration([(key, chain)], root)

    def _python_context(self) -> ssl.SSLContext:
        """The files as a Python server context; also checks that the key fits the cert."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"tls_cert/tls_key/tls_client_ca: {e}") from None
        return context

    def reload(self) -> None:
        """Read the files again; the next handshake uses them. On error the old ones stay."""
        configuration = self._read()
        context = self._python_context()
        with self._lock:
            self._pending = configuration
            self._ssl = context

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration once, else None."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self._fetch, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A context for a Python TLS listener that follows reloads: every handshake is
        switched (from OpenSSL's server-name callback, called for each ClientHello, with
        or without SNI) to the context of the files as last read."""
        listener = self._python_context()

        def current(ssl_object: ssl.SSLObject, server_name, _context) -> None:
            with self._lock:
                ssl_object.context = self._ssl

        listener.sni_callback = current
        return listener


class Security:
    """Tokens, TLS files and the interceptors they need, built from the settings."""

    def __init__(self, config: ServerConfig, on_refused=None):
        self.tokens = TokenStore(config.auth_tokens_file) if config.auth_tokens_file else None
        self.tls = (
            TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        self.streams = OpenStreams()  # ended when a reload removes their caller's token
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.tokens is not None:
            self.interceptors.append(
                AuthInterceptor(
                    self.tokens, protect_reflection=config.auth_reflection, on_refused=on_refused
                )
            )

    def describe(self) -> str:
        """For the start-up log line, e.g. ``"mutual TLS, 2 token(s)"``."""
        transport = "plaintext" if self.tls is None else "mutual TLS" if self.tls.mutual else "TLS"
        auth = "no auth" if self.tokens is None else f"{len(self.tokens)} token(s)"
        return f"{transport}, {auth}"

    def warn_if_unsafe(self) -> None:
        if self.tokens is not None and self.tls is None:
            log.warning(
                "token auth over plaintext: tokens cross the network in clear; "
                "add --tls-cert/--tls-key unless a proxy or mesh terminates TLS in front"
            )

    def add_port(self, grpc_server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return grpc_server.add_insecure_port(address)
        return grpc_server.add_secure_port(address, self.tls.credentials())

    def reload(self) -> None:
        """SIGHUP: re-read the tokens and TLS files; log what happened (never a token)."""
        if self.tokens is not None:
            before = self.tokens.names()
            self.tokens.reload_logged()
            removed = before - self.tokens.names()
            if removed:
                self.streams.revoke(removed)
        if self.tls is not None:
            try:
                self.tls.reload()
            except ValueError as e:
                log.error("TLS files not reloaded, the previous ones stay in force: %s", e)
            else:
                log.info("TLS files reloaded; new connections use them")


REVOKED_MESSAGE = (
    "the token of this call was removed from the server's tokens file; open streams of a "
    "removed token end; send a token the server accepts"
)


class OpenStreams:
    """Streaming calls in progress, by caller name: :meth:`revoke` ends those of removed
    tokens (status UNAUTHENTICATED), so a token taken out of the file by a SIGHUP reload
    stops working for calls already open too. Event-loop only."""

    def __init__(self):
        self._open: dict[str, set[asyncio.Task]] = {}
        self._revoked: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return sum(len(tasks) for tasks in self._open.values())

    @contextlib.contextmanager
    def track(self, name: str | None) -> Iterator[None]:
        task = asyncio.current_task()
        if name is None or task is None:
            yield
            return
        self._open.setdefault(name, set()).add(task)
        try:
            yield
        finally:
            tasks = self._open.get(name, set())
            tasks.discard(task)
            if not tasks:
                self._open.pop(name, None)
            self._revoked.discard(task)

    def revoke(self, names: set[str]) -> None:
        ended = 0
        for name in names:
            for task in self._open.get(name, ()):
                self._revoked.add(task)
                task.cancel()
                ended += 1
        if ended:
            log.info("tokens removed by the reload: %d open stream(s) ended", ended)

    def revoked(self, task: asyncio.Task | None) -> bool:
        return task in self._revoked

    def wrap(self, handler):
        """``handler(request_or_iterator, context)`` tracked under the call's caller; a
        revoked call ends with UNAUTHENTICATED."""

        async def tracked(request, context):
            caller = CURRENT_CALLER.get()
            task = asyncio.current_task()
            with self.track(caller.name if caller is not None else None):
                try:
                    return await handler(request, context)
                except asyncio.CancelledError:
                    if not self.revoked(task):
                        raise
                    task.uncancel()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_MESSAGE)

        return tracked


async def start_health_server(
    health, host: str, port: int, options: list[tuple[str, int]]
) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server with only ``health`` (the main server's health servicer);
    ``options`` as the main port's listener (no SO_REUSEPORT unless asked, a connection cap)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096), *options])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises it when the bind fails
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot bind the health port {host}:{port}: the port is in use by another process "
            "or the address is not available (so_reuseport is off)"
        )
    await server.start()
    return server, bound
