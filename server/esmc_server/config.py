"""Server settings: frozen dataclasses (the only module that will read ESMC_* variables)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch_tokens: int = 16384  # token budget per forward (padded tokens when padding)
    max_batch_size: int = 256  # sequences per forward; 1 switches batching off
    max_wait_ms: float = 5.0  # timed from the oldest waiting request
    max_queue: int = 4096  # waiting requests (logits + generations) before RESOURCE_EXHAUSTED
    packed: bool = True  # pack end to end (else length-sorted padded)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model: str = "esmc-tiny"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9090
    device: str = "auto"
    dtype: str | None = None
    batching: BatchingConfig = BatchingConfig()
    max_message_bytes: int = 512 * 1024 * 1024
    grace_s: float = 30.0
    warmup: bool = True
