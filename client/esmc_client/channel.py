"""Channel options shared by the sync and async clients, and what a failed connection to a
target means (:func:`unreachable_reason`: nothing listening, an HTTP/1 port, a bad name).

- Message size limits in both directions come from one setting, with the server's
  default (512 MiB): a 2,048-residue protein's hidden states are far above gRPC's 4 MB.
- ``round_robin`` load balancing, so a target like ``dns:///esmc.internal:50051`` that
  resolves to several replicas spreads calls over all of them.
- Reconnection attempts at most every 2 s (gRPC's default backoff grows to 120 s), so a
  restarted server is found again within about 2 s.
- Keepalive pings every 60 s while calls are open, so a call on a replica that vanished
  without closing its connection (a node lost, a network partition) fails within ~80 s and
  is retried elsewhere instead of hanging. (The server accepts pings every 10 s or more.)
- No gRPC retry policy: the clients retry themselves (:mod:`esmc_client.retry`), with a
  retry budget and server pushback, the same way for unary calls, ``Generate`` before its
  first message and bulk ``Embed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esmc_client.retry import RETRYABLE_CODES, RetryPolicy

if TYPE_CHECKING:
    from esmc_client.types import ESMCError

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 2000
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "RETRYABLE_CODES",
    "RetryPolicy",
    "channel_options",
    "unreachable_reason",
]


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra: tuple[tuple[str, object], ...] = (),
) -> list[tuple[str, object]]:
    """gRPC channel arguments for an ESMC client channel (``extra`` last, so it wins)."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        *KEEPALIVE_OPTIONS,
    ]
    options.extend(extra)
    return options


def unreachable_reason(error: ESMCError) -> str:
    """``error`` in one line, with what to do when it says nothing listens at the target or
    something that is not a gRPC server does (a metrics or HTTP port)."""
    text = " ".join(f"{error.code}: {error.message}".split())
    if error.code != "UNAVAILABLE":
        return text
    if "Failed parsing HTTP/2" in text or "Expected SETTINGS frame" in text:
        return ("UNAVAILABLE: it answers HTTP/1, not gRPC (a metrics or HTTP port?); point "
                f"--target at the server's gRPC port (esmc serve --port, "
                f"{DEFAULT_TARGET.rsplit(':', 1)[1]} by default)")
    if "Connection refused" in text:
        return ("UNAVAILABLE: connection refused, nothing listens there; start a server with "
                "`esmc serve` or point --target (or $ESMC_TARGET) at a running one")
    if "DNS resolution failed" in text or "name resolution" in text.lower():
        return "UNAVAILABLE: the host name does not resolve; check --target (or $ESMC_TARGET)"
    return text
