"""The server's engine in this process, without gRPC: bulk embedding for batch jobs.

:class:`LocalEmbedder` loads a model the way ``esmc serve`` does (:func:`esmc_server.app.load_model`),
starts the same :class:`~esmc_server.engine.Engine` (one device thread, token-budget packing)
on an asyncio loop of its own thread, and turns ``(id, sequence)`` records into
:class:`LocalEmbedding` results exactly as the ``Embed`` RPC would: the same tokenization and
length limit, the same layer/pooling rules (the same :class:`~esmc_server.calls.LogitsCall`),
each sequence's own error in its result. Plain server-side types: a client package turns them
into its own (the Ray jobs do).

    with LocalEmbedder("esmc-tiny", device="cpu") as embedder:
        results = embedder.embed([("p1", "MKTAYIAK"), ("p2", "MLLV")], layer=-1, pool="mean")
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import torch

from esmc import tokenizer
from esmc_server.app import load_model
from esmc_server.calls import Caller, checked_layers, embed_config, logits_call
from esmc_server.config import BatchingConfig, ServerConfig
from esmc_server.engine import Engine
from esmc_server.errors import InvalidRequest, ServiceError
from esmc_server.info import describe
from esmc_server.requests import Timing
from esmc_server.wire import embedding_of

POOLS = ("mean", "none")
CALLER = Caller("local")
"""Whom an embedder's work is charged to (it is the engine's only caller)."""


@dataclasses.dataclass(frozen=True)
class ItemError:
    """Why one record has no embedding: a status code name and a message."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclasses.dataclass(frozen=True, eq=False)  # holds an array: compared by identity
class LocalEmbedding:
    """One record's embedding ((d) pooled, or (L+2, d)) or its own error, and how it was
    served (``metadata``: queue and compute times, batch, forwards)."""

    id: str
    embedding: np.ndarray | None
    error: ItemError | None
    metadata: Timing

    @property
    def ok(self) -> bool:
        return self.error is None


_NO_TIMING = Timing(0.0, 0.0, 0, 0, 0)


class LocalEmbedder:
    """An :class:`Engine` over one model on one device, driven from synchronous code.

    Args:
        model: what ``esmc serve --model`` takes (registry name, hub repo id, local path).
        device, dtype: as ``esmc serve`` (``auto``: CUDA when visible, else the CPU).
        batching: the engine's token budget and caps (default: the server's defaults).
        max_length: tokens per protein, BOS and EOS included (default: the server's limit).
        threads: torch CPU threads (None: leave torch's setting).
        warmup: run the server's warm-up calls before the first batch.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str | None = None,
        batching: BatchingConfig | None = None,
        max_length: int | None = None,
        threads: int | None = None,
        warmup: bool = True,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        config = ServerConfig(model=model, device=device, dtype=dtype)
        self.model_name = model
        self.model = load_model(config)
        self.max_length = max_length or config.max_tokens
        batching = batching or config.batching
        self.engine = Engine(self.model, batching)
        self._info = describe(model, self.model, self.max_length, batching,
                              config.max_message_bytes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="esmc-embedder")
        self._thread.start()
        self._run(self.engine.start())
        if warmup:
            self._run(self.engine.warmup())

    def info(self) -> dict[str, object]:
        """What a server's ``Info`` would say about the model (name, shape, limit, version)."""
        info = self._info
        return {
            "model_name": info.model_name,
            "d_model": info.d_model,
            "n_layers": info.n_layers,
            "max_length": info.max_length,
            "device": info.device,
            "server_version": info.server_version,
        }

    def embed(
        self, records: Sequence[tuple[str, str]], layer: int = -1, pool: str = "mean"
    ) -> list[LocalEmbedding]:
        """One result per record, in order; every record is queued at once so the engine
        packs them into forwards under its token budget. ``layer``: -1 (or None) the final
        embeddings, 0..n-1 a block's output, -2.. from the end; ``pool``: ``mean`` (or None)
        or ``none``."""
        if pool not in (*POOLS, None):
            raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
        pooled = pool != "none"
        layer = -1 if layer is None else int(layer)
        return self._run(self._embed_all(list(records), layer, pooled))

    def close(self) -> None:
        """Stop the engine (work in flight finishes first) and the loop thread."""
        if self._thread.is_alive():
            self._run(self.engine.stop(grace_s=30.0))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> LocalEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _embed_all(
        self, records: list[tuple[str, str]], layer: int, pooled: bool
    ) -> list[LocalEmbedding]:
        return list(await asyncio.gather(*(self._embed_one(r, layer, pooled) for r in records)))

    async def _embed_one(self, record: tuple[str, str], layer: int, pooled: bool
                         ) -> LocalEmbedding:
        """The ``Embed`` RPC's call around ``engine.logits``, minus the wire."""
        uid, sequence = record
        try:
            config = embed_config(layer, pooled)
            layers = checked_layers(config, self.model.config.n_layers, "layer")
            try:
                tokens = tokenizer.encode(sequence, max_length=self.max_length)
            except ValueError as error:
                raise InvalidRequest(f"protein.sequence: {error}") from error
            result = await self.engine.logits(logits_call(tokens, config, layers, caller=CALLER))
        except ServiceError as error:
            return LocalEmbedding(uid, None, ItemError(error.code, str(error)), _NO_TIMING)
        except Exception as error:  # noqa: BLE001 - one sequence's failure stays its own
            failure = ItemError("INTERNAL", f"internal error: {type(error).__name__}: {error}")
            return LocalEmbedding(uid, None, failure, _NO_TIMING)
        embedding = embedding_of(result.output, config).float().numpy()
        return LocalEmbedding(uid, embedding, None, result.timing)
