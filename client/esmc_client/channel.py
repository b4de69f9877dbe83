"""Channel options shared by the sync and async clients.

- Message size limits in both directions come from one setting, with the server's
  default (512 MiB): a 2,048-residue protein's hidden states are far above gRPC's 4 MB.
- ``round_robin`` load balancing, so a target like ``dns:///esmc.internal:50051`` that
  resolves to several replicas spreads calls over all of them.
- gRPC's own retries (exponential backoff) for the unary calls and for ``Generate`` before
  its first message, on ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED``. ``Embed`` streams are
  retried per sequence by the client itself (:mod:`esmc_client.bulk`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

_RETRIED_METHODS = ("Info", "Encode", "Decode", "Logits", "ForwardAndSample", "Generate")
_GRPC_MAX_ATTEMPTS = 5  # gRPC caps maxAttempts at 5


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: retry ``n`` waits ``initial_backoff_s * multiplier**(n-1)``
    (capped at ``max_backoff_s``), scaled by a random factor in [0.5, 1] (jitter)."""

    max_retries: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (0.5 + 0.5 * random.random())


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = None,
    extra: tuple[tuple[str, object], ...] = (),
) -> list[tuple[str, object]]:
    """gRPC channel arguments for an ESMC client channel."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if retry is not None and retry.max_retries > 0:
        options.append(("grpc.service_config", service_config(retry)))
    options.extend(extra)
    return options


def service_config(retry: RetryPolicy) -> str:
    """JSON service config with a retry policy for every method except ``Embed``."""
    policy = {
        "maxAttempts": min(_GRPC_MAX_ATTEMPTS, retry.max_retries + 1),
        "initialBackoff": f"{retry.initial_backoff_s}s",
        "maxBackoff": f"{retry.max_backoff_s}s",
        "backoffMultiplier": retry.multiplier,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    names = [{"service": "esmc.v1.ESMC", "method": m} for m in _RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})
