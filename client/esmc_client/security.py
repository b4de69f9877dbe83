"""Client credentials: a bearer token sent with every call, TLS and mutual TLS.

PEM arguments are bytes or paths. A token over a plaintext channel is allowed (a proxy or
mesh may terminate TLS in front of the server) but crosses the network in clear.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import grpc

def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying ``token``, or None without one."""
    if token is None:
        return None
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token must be non-empty and contain no whitespace")
    return (("authorization", f"Bearer {token}"),)


def read_pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes given as bytes or as a path to a file."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {os.fspath(value)}: {e.strerror}") from None


def tls_credentials(
    tls: bool | None,
    root_certificates: bytes | str | os.PathLike | None = None,
    client_certificate: bytes | str | os.PathLike | None = None,
    client_key: bytes | str | os.PathLike | None = None,
) -> grpc.ChannelCredentials | None:
    """SSL channel credentials, or None for plaintext.

    ``tls=None`` means TLS when any certificate is given. ``root_certificates`` None trusts
    the system's roots; client certificate and key go together (mutual TLS).
    """
    given = (root_certificates, client_certificate, client_key)
    if tls is None:
        tls = any(value is not None for value in given)
    if not tls:
        if any(value is not None for value in given):
            raise ValueError("certificates were given with tls=False")
        return None
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certificates, "root certificates"),
        private_key=read_pem(client_key, "client key"),
        certificate_chain=read_pem(client_certificate, "client certificate"),
    )


# -- telling a TLS mismatch from a server that is down ------------------------------------------

PROBE_TIMEOUT_S = 2.0
_CERTIFICATE_ALERTS = (
    "CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "UNKNOWN_CA", "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR", "ACCESS_DENIED",
)
_CLIENT_TLS_FLAGS = "tls=True and the server's CA (root_certificates=...; CLI --tls --tls-ca FILE)"


def probe_address(target: str) -> tuple[str, int] | None:
    """The first ``(host, port)`` of a gRPC target, or None for targets it cannot name
    (unix sockets, other resolvers)."""
    text = target.strip()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme):]
            break
    else:
        if "://" in text or text.startswith("unix:"):
            return None
    text = text.split(",")[0]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``load_cert_chain`` from PEM bytes (it reads files only): a private temporary copy."""
    with tempfile.TemporaryDirectory(prefix="esmc-tls-") as directory:
        paths = Path(directory, "chain.pem"), Path(directory, "key.pem")
        for path, data in zip(paths, (chain, key)):
            path.touch(mode=0o600)
            path.write_bytes(data)
        context.load_cert_chain(*paths)


def _certificate_alert(error: ssl.SSLError) -> bool:
    """Whether the peer refused the handshake with a certificate alert (OpenSSL's names)."""
    text = f"{error.reason or ''} {error}".upper().replace(" ", "_")
    return any(name in text for name in _CERTIFICATE_ALERTS)


class TransportCheck:
    """Why a channel cannot connect when the server is up but speaks another transport.

    gRPC reports a plaintext client at a TLS port, a TLS client at a plaintext port, an
    untrusted server certificate and a refused client certificate all as ``UNAVAILABLE``
    (often just "Socket closed"), the same as a server that is down, so clients would retry
    them in vain. After an ``UNAVAILABLE``, :meth:`explain` opens one TCP connection to the
    target and tries a TLS handshake itself: a mismatch gives a definitive error that says
    what to change. Once a probe has reached the server and found none, it never probes again.
    """

    def __init__(self, target: str, tls: bool, root_certificates: bytes | None,
                 roots_known: bool, client_pair: tuple[bytes, bytes] | None,
                 server_name: str | None = None):
        self.address = probe_address(target)
        self.server_name = server_name  # the channel's grpc.ssl_target_name_override, if any
        self.tls = tls
        self.roots = root_certificates
        self.roots_known = roots_known
        self.client_pair = client_pair  # (certificate chain, key) PEM, presented by the probe
        self._lock = threading.Lock()
        self._settled = self.address is None
        self._hint: str | None = None

    def explain(self, code: str) -> str | None:
        """After an error with status ``code``: what is wrong with the transport, or None."""
        if code != "UNAVAILABLE":
            return None
        with self._lock:
            if not self._settled:
                reached, self._hint = self._probe()
                self._settled = reached
            return self._hint

    def _probe(self) -> tuple[bool, str | None]:
        """``(reached a listener, hint)``."""
        host, port = self.address
        where = f"the server at {host}:{port}"
        try:
            with socket.create_connection((host, port), PROBE_TIMEOUT_S) as raw:
                speaks_tls, refused = self._handshake(raw, host)
        except OSError:  # nothing listens (down, restarting): retrying is right
            return False, None
        if not self.tls:
            if speaks_tls:
                return True, f"{where} speaks TLS and this client connects in plaintext: pass " \
                             f"{_CLIENT_TLS_FLAGS}"
            return True, None
        if not speaks_tls:
            return True, f"{where} does not speak TLS (it is plaintext): connect without TLS " \
                         "(no tls/root_certificates; CLI without --tls/--tls-ca)"
        if refused:
            if self.client_pair is not None:
                return True, f"{where} refused this client's certificate: it requires a " \
                             "client certificate signed by a CA it trusts (mutual TLS)"
            return True, f"{where} requires a client certificate (mutual TLS): pass " \
                         "client_certificate and client_key (CLI --tls-cert FILE --tls-key FILE)"
        if self.roots_known:
            problem = self._verification_problem(host, port)
            if problem is not None:
                return True, f"{where} has a certificate this client does not trust: {problem}"
        return True, None

    def _handshake(self, raw: socket.socket, host: str) -> tuple[bool, bool]:
        """``(speaks TLS, refused this client's certificate)``: a handshake that checks
        nothing and presents this client's certificate, if any. A TLS 1.2 server refuses a
        certificate with an alert during the handshake; a TLS 1.3 server after it, by an
        alert or by closing the connection before the client has sent anything, which no
        server that accepted the handshake does (it waits for the HTTP/2 preface)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        if self.client_pair is not None:
            _load_pair(context, *self.client_pair)
        try:
            tls = context.wrap_socket(raw, server_hostname=self.server_name or host)
        except ssl.SSLError as e:
            refused = _certificate_alert(e)
            return refused, refused
        except OSError:
            return False, False
        with tls:
            tls.settimeout(0.5)
            try:
                return True, tls.recv(1) == b""
            except TimeoutError:  # waiting for our preface: the handshake was accepted
                return True, False
            except OSError:  # an alert, a reset or a TLS-level EOF
                return True, True

    def _verification_problem(self, host: str, port: int) -> str | None:
        """Why this client's roots reject the server's certificate chain, or None."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.roots is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cadata=self.roots.decode("ascii", "replace"))
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host, port), PROBE_TIMEOUT_S) as raw:
                with context.wrap_socket(raw, server_hostname=self.server_name or host):
                    return None
        except ssl.SSLCertVerificationError as e:
            return e.verify_message or str(e)
        except OSError:
            return None
