"""Client credentials: a bearer token sent with every call, TLS and mutual TLS.

PEM arguments are bytes or paths. A token over a plaintext channel is allowed (a proxy or
mesh may terminate TLS in front of the server) but crosses the network in clear.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

TOKEN_ENV = "ESMC_TOKEN"
TLS_ENV = "ESMC_TLS"
TLS_CA_ENV = "ESMC_TLS_CA"
TLS_CERT_ENV = "ESMC_TLS_CERT"
TLS_KEY_ENV = "ESMC_TLS_KEY"


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


def env_flag(environ, name: str) -> bool | None:
    """A boolean environment variable (``1/true/yes/on``, ``0/false/no/off``), None if unset."""
    text = environ.get(name, "").strip().lower()
    if not text:
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r} is not a boolean")
