"""Bearer-token auth: a token store re-read on SIGHUP and a gRPC server interceptor.

The tokens file holds one token per line, ``name:token`` (blank lines and lines starting
with ``#`` are skipped). The name is the caller the token's calls are charged and counted to
(:mod:`esmc_server.calls`); a bare token is named ``token-`` and the first 8 hex digits of its
SHA-256, a stable name that does not reveal it. Only SHA-256 digests of the tokens are kept in memory, and a presented token is
compared with every one of them with :func:`hmac.compare_digest`, so the time a check takes
says nothing about how much of a token matched, nor which one. Tokens are never logged, never
echoed in an error message and never put in a metric label.

Every RPC needs ``authorization: Bearer <token>`` except ``grpc.health.v1`` (probes must work
without credentials) and, unless ``protect_reflection``, server reflection. The check itself is
:meth:`TokenStore.allows` over the header's value, so the HTTP endpoint uses the same one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable

import grpc

from esmc_server.calls import CURRENT_CALLER, Caller
from esmc_server.errors import Unauthenticated

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
HEALTH_PREFIX = "/grpc.health.v1."
REFLECTION_PREFIX = "/grpc.reflection."
_SCHEME = "bearer"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The lines of ``path`` that hold a token (``name:token`` or a bare token), stripped;
    blank and ``#`` lines skipped."""
    with open(path, encoding="utf-8") as handle:
        lines = (line.strip() for line in handle)
        return [line for line in lines if line and not line.startswith("#")]


def named_token(line: str) -> tuple[str, str]:
    """``(name, token)`` of a tokens-file line: ``name:token``, where the name is 1-64 of
    ``[A-Za-z0-9._-]``; anything else is a bare token, named ``token-<8 hex of its sha256>``."""
    name, sep, token = line.partition(":")
    if sep and token.strip() and _NAME.fullmatch(name.strip()):
        return name.strip(), token.strip()
    return "token-" + hashlib.sha256(line.encode("utf-8")).hexdigest()[:8], line


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token:
        return None
    return token


class TokenStore:
    """The accepted tokens, read from ``path``; :meth:`reload` re-reads the file.

    Raises ``ValueError`` when the file cannot be read or holds no token (a server that
    would refuse everybody is a configuration mistake, not a state to serve in).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._digests: tuple[tuple[bytes, str], ...] = ()  # (sha256 of the token, its name)
        self.reload()

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> int:
        """Re-read the file; returns the number of tokens. On error the old tokens stay."""
        try:
            tokens = read_tokens(self.path)
        except OSError as e:
            raise ValueError(f"cannot read the auth tokens file {self.path}: {e.strerror}") from None
        if not tokens:
            raise ValueError(f"the auth tokens file {self.path} holds no token")
        named = (named_token(line) for line in tokens)
        digests = tuple({_digest(token): name for name, token in named}.items())
        with self._lock:
            self._digests = digests
        return len(digests)

    def reload_logged(self) -> None:
        """:meth:`reload` for a signal handler: logs the outcome (a count, never a token)."""
        try:
            count = self.reload()
        except ValueError as e:
            log.error("auth tokens not reloaded, the previous ones stay in force: %s", e)
        else:
            log.info("auth tokens reloaded from %s: %d token(s)", self.path, count)

    def names(self) -> set[str]:
        """The callers' names the tokens give (to see which a reload removed)."""
        with self._lock:
            return {name for _, name in self._digests}

    def name_of(self, token: str | None) -> str | None:
        """The name of ``token`` when it is one of the tokens (else None); constant time in
        the token's content."""
        if not token:
            return None
        presented = _digest(token)
        with self._lock:
            digests = self._digests
        found = None
        for digest, name in digests:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    def allows_token(self, token: str | None) -> bool:
        """Whether ``token`` is one of the tokens; constant time in the token's content."""
        return self.name_of(token) is not None

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` header value (``Bearer <token>``) is accepted."""
        return self.allows_token(bearer_token(authorization))

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller an ``authorization`` header value names, or None when not accepted."""
        name = self.name_of(bearer_token(authorization))
        return None if name is None else Caller(name)


def needs_token(method: str, protect_reflection: bool) -> bool:
    """Whether the full method name (``/package.Service/Method``) requires a token."""
    if method.startswith(HEALTH_PREFIX):
        return False
    if method.startswith(REFLECTION_PREFIX):
        return protect_reflection
    return True


def _metadata_value(metadata, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted token with ``UNAUTHENTICATED`` before any work.

    ``on_refused(method)`` is called for each refused call (e.g. to count it in metrics).
    """

    def __init__(
        self,
        store: TokenStore,
        *,
        protect_reflection: bool = False,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.protect_reflection = protect_reflection
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not needs_token(method, self.protect_reflection):
            return handler
        header = _metadata_value(handler_call_details.invocation_metadata, AUTHORIZATION)
        caller = self.store.caller(header)
        if caller is not None:
            CURRENT_CALLER.set(caller)  # the handler runs in this context: its caller
            return handler
        if self.on_refused is not None:
            self.on_refused(method)
        reason = "missing" if header is None else "not accepted"
        return _refusing_handler(handler, Unauthenticated(_refusal_message(reason)))


def _refusal_message(reason: str) -> str:
    return (
        f"authorization {reason}: send the metadata 'authorization: Bearer <token>' "
        "with a token the server accepts"
    )


def _refusing_handler(handler: grpc.RpcMethodHandler, error: Unauthenticated):
    """A handler that aborts with ``error`` without reading the request.

    It is registered as request-streaming whatever the method is (the wire is the same), so
    gRPC calls it at once instead of first receiving, decompressing and parsing a message:
    an unauthenticated caller costs no more than its headers, whatever its body.
    """
    code = grpc.StatusCode[error.code]
    message = str(error)

    async def refuse(request_iterator, context):
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": _unread,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)


def _unread(data: bytes) -> None:
    """The refusing handler never reads a message; if one were read, it is not parsed."""
    return None
