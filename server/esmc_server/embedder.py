"""The server's engine in this process, without gRPC: bulk embedding for batch jobs.

:class:`LocalEmbedder` loads a model the way ``esmc serve`` does (:func:`esmc_server.app.load_model`),
starts the same :class:`~esmc_server.engine.Engine` (one device thread, token-budget packing)
on an asyncio loop of its own thread, and turns ``(id, sequence)`` records into the client's
:class:`~esmc_client.types.EmbedResult` exactly as the ``Embed`` RPC would: the same
tokenization and length limit, the same layer/pooling rules, each sequence's own error in its
result. Used by the Ray model actors (:mod:`esmc_client.ray`) and the Ray benchmark.

    with LocalEmbedder("esmc-tiny", device="cpu") as embedder:
        results = embedder.embed([("p1", "MKTAYIAK"), ("p2", "MLLV")], layer=-1, pool="mean")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.requests import embed_request
from esmc_client.types import EmbedResult, ESMCError, ResponseMetadata
from esmc_server import convert
from esmc_server.app import load_model
from esmc_server.config import BatchingConfig, ServerConfig
from esmc_server.engine import Engine
from esmc_server.errors import ServiceError
from esmc_server.servicer import server_version


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
        self.max_length = max_length or _served_length(config, self.model)
        self.engine = Engine(self.model, batching or config.batching)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="esmc-embedder")
        self._thread.start()
        self._run(self.engine.start())
        if warmup:
            self._run(self.engine.warmup())

    def info(self) -> dict[str, object]:
        """What a server's ``Info`` would say about the model (name, shape, limit, version)."""
        c = self.model.config
        return {
            "model_name": self.model_name,
            "d_model": c.d_model,
            "n_layers": c.n_layers,
            "max_length": self.max_length,
            "device": str(next(self.model.parameters()).device),
            "server_version": server_version(),
        }

    def embed(
        self, records: Sequence[tuple[str, str]], layer: int = -1, pool: str = "mean"
    ) -> list[EmbedResult]:
        """One result per record, in order; every record is queued at once so the engine
        packs them into forwards under its token budget."""
        requests = [embed_request(uid, sequence, layer=layer, pool=pool) for uid, sequence in records]
        return self._run(self._embed_all(requests))

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

    async def _embed_all(self, requests: list[pb.EmbedRequest]) -> list[EmbedResult]:
        return list(await asyncio.gather(*(self._embed_one(r) for r in requests)))

    async def _embed_one(self, request: pb.EmbedRequest) -> EmbedResult:
        """The ``Embed`` RPC's conversions around ``engine.logits``, minus the wire."""
        uid = request.id
        try:
            tokens = convert.tokens_from_request(request, self.max_length)
            config = convert.embed_config_from_proto(request, self.model.config.n_layers)
            result = await self.engine.logits(tokens, config)
        except ServiceError as error:
            return EmbedResult(uid, None, ESMCError(error.code, str(error)), ResponseMetadata())
        except Exception as error:  # noqa: BLE001 - one sequence's failure stays its own
            failure = ESMCError("INTERNAL", f"internal error: {type(error).__name__}: {error}")
            return EmbedResult(uid, None, failure, ResponseMetadata())
        embedding = convert.embedding_of(result.output, config).float().numpy()
        timing = result.timing
        metadata = ResponseMetadata(
            timing.queue_ms, timing.compute_ms, timing.batch_size, timing.batch_tokens, timing.forwards
        )
        return EmbedResult(uid, embedding, None, metadata)


def _served_length(config: ServerConfig, model) -> int:
    """The server's per-protein token limit for this config, BOS and EOS included
    (``max_length`` counts residues)."""
    return config.max_tokens
