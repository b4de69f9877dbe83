"""Bulk embedding on Ray (``esmc ray-embed``): against running servers
(:func:`embed_with_servers`, client actors over the targets with failover) or with model
actors that run the server's engine in-process (:func:`embed_in_process`, no servers).

Parts: ``id``, ``sequence_length`` (residues), ``embedding`` (fixed-size list of float32,
null on error), ``per_residue`` (``pool="none"`` only: (L+2, d) rows, BOS and EOS included;
``embedding`` is then their residue mean) and ``error``; schema metadata ``esmc.model``,
``esmc.layer``, ``esmc.pooling``, ``esmc.server_version``, ``esmc.d_model``,
``esmc.n_layers`` and ``esmc.mode``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from esmc_client.types import EmbedResult, ESMCError, ResponseMetadata
from esmc_ray.job import JobSummary, run_job
from esmc_ray.parts import PartStore, error_column
from esmc_ray.targets import TRANSIENT_CODES, TargetPool, server_metadata, transient


def embed_with_servers(
    inputs: Sequence[str],
    output: str,
    targets: Sequence[str],
    *,
    layer: int = -1,
    pool: str = "mean",
    client_options: dict[str, Any] | None = None,
    concurrency: int | None = None,
    batch_size: int = 256,
    cpus_per_actor: float = 0.25,
    progress: bool = False,
    id_column: str = "id",
    sequence_column: str = "sequence",
) -> JobSummary:
    """Embed ``inputs`` into ``output`` through running servers (``targets``, host:port).

    ``client_options`` go to every :class:`ESMCClient` (TLS, token...); ``concurrency``
    actors (default: two per target) each hold one client per target. Ray must be
    initialised (:func:`ray.init`), or a local instance is started.
    """
    if not targets:
        raise ValueError("give at least one target (host:port)")
    client_options = dict(client_options or {})
    metadata = {
        "kind": "embeddings", **server_metadata(targets, client_options),
        "layer": str(layer), "pooling": pool,
    }
    actor_kwargs = {
        "targets": list(targets),
        "client_options": client_options,
        "layer": layer,
        "pool": pool,
        "output": output,
        "metadata": metadata,
    }
    return run_job(
        inputs, output, ServerEmbedActor, actor_kwargs, metadata,
        concurrency=concurrency or 2 * len(targets), batch_size=batch_size,
        resources={"num_cpus": cpus_per_actor}, progress=progress,
        columns={"id": id_column, "sequence": sequence_column},
    )


def embed_in_process(
    inputs: Sequence[str],
    output: str,
    model: str,
    *,
    layer: int = -1,
    pool: str = "mean",
    embedder_options: dict[str, Any] | None = None,
    concurrency: int = 1,
    batch_size: int = 256,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress: bool = False,
    id_column: str = "id",
    sequence_column: str = "sequence",
) -> JobSummary:
    """Embed ``inputs`` into ``output`` with ``concurrency`` model actors, no servers.

    Each actor loads ``model`` and runs the server's engine on its own device
    (``gpus_per_actor`` >= 1: the GPU Ray gives it). ``embedder_options`` go to
    :class:`esmc_server.embedder.LocalEmbedder` (device, dtype, batching, max_length,
    threads). Needs the ``[server]`` extra on every node.
    """
    metadata = {
        "kind": "embeddings", "model": model, "layer": str(layer), "pooling": pool,
        "mode": "in-process",
    }
    actor_kwargs = {
        "model": model,
        "embedder_options": dict(embedder_options or {}),
        "layer": layer,
        "pool": pool,
        "output": output,
        "metadata": metadata,
    }
    resources = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
    return run_job(
        inputs, output, EngineEmbedActor, actor_kwargs, metadata,
        concurrency=concurrency, calls_per_actor=2, batch_size=batch_size, resources=resources,
        progress=progress, columns={"id": id_column, "sequence": sequence_column},
    )


def check_probe(probe: EmbedResult, where: str, layer: int, pool: str) -> None:
    """A one-residue embed must pass the service's checks of ``layer`` and ``pool``: a bad
    layer fails the job at its start, not as an error row per sequence."""
    if probe.error is not None and probe.error.code not in TRANSIENT_CODES:
        raise ValueError(f"{where} refuses layer={layer} pool={pool}: {probe.error}")


class ServerEmbedActor:
    """Embeds blocks through the given servers and writes them (see the module docstring)."""

    def __init__(self, targets, client_options, layer, pool, output, metadata):
        self._targets = TargetPool(targets, client_options)
        self._options = {"layer": layer, "pool": pool, "batch_size": 32, "concurrency": 4}
        self._store = PartStore(output, metadata)
        self._probed = False

    def __call__(self, batch):
        if not self._probed:  # at the first block: a job with nothing to do computes nothing
            [probe] = self._targets.run([("probe", "M")], self._embed)
            if probe is not None:  # None: no target answered yet; the blocks retry them
                check_probe(probe, "the targets", self._options["layer"], self._options["pool"])
            self._probed = True
        records = list(zip(batch["id"].to_pylist(), batch["sequence"].to_pylist()))
        results = self._targets.run(records, self._embed)
        return self._store.write(records, results, embedding_table)

    def _embed(self, client, records: list[tuple[str, str]]) -> list[EmbedResult]:
        return client.embed(records, **self._options)


class EngineEmbedActor:
    """Embeds blocks with the server's engine in this process, on this actor's device."""

    def __init__(self, model, embedder_options, layer, pool, output, metadata):
        self._args = (model, embedder_options, output, metadata)
        self._layer, self._pool = layer, pool
        self._lock = threading.Lock()
        self._embedder = None

    def __call__(self, batch):
        with self._lock:  # the model loads at the first block, not for a job with none
            if self._embedder is None:
                self._start()
        records = list(zip(batch["id"].to_pylist(), batch["sequence"].to_pylist()))
        results = self._embed(self._embedder, records)
        kept = [None if transient(r) else r for r in results]
        return self._store.write(records, kept, embedding_table)

    def _start(self) -> None:
        from esmc_server.embedder import LocalEmbedder

        model, embedder_options, output, metadata = self._args
        embedder = LocalEmbedder(model, **embedder_options)
        [probe] = self._embed(embedder, [("probe", "M")])
        check_probe(probe, model, self._layer, self._pool)
        info = embedder.info()
        shape = {key: str(info[key]) for key in ("server_version", "d_model", "n_layers")}
        self._store = PartStore(output, {**metadata, **shape})
        self._embedder = embedder

    def _embed(self, embedder, records: list[tuple[str, str]]) -> list[EmbedResult]:
        local = embedder.embed(records, layer=self._layer, pool=self._pool)
        return [client_result(r) for r in local]


def client_result(local) -> EmbedResult:
    """The client's :class:`EmbedResult` of one in-process embedder result (the server's
    plain type: ``id``, ``embedding``, ``error`` with ``code`` and ``message``, ``metadata``
    with the timing), so both kinds of actors write the same rows."""
    error = None if local.error is None else ESMCError(local.error.code, local.error.message)
    t = local.metadata
    timing = ResponseMetadata(t.queue_ms, t.compute_ms, t.batch_size, t.batch_tokens, t.forwards)
    return EmbedResult(local.id, local.embedding, error, timing)


def embedding_table(kept: list[tuple[tuple[str, str], EmbedResult]], metadata: dict[str, str]):
    """``id``, ``sequence_length``, ``embedding`` (and ``per_residue``), ``error``."""
    import pyarrow as pa

    d = int(metadata["d_model"])
    per_residue = metadata["pooling"] == "none"
    vectors = np.zeros((len(kept), d), np.float32)
    rows: list[np.ndarray | None] = []
    for k, (_, result) in enumerate(kept):
        if result.error is not None:
            rows.append(None)
        elif per_residue:
            rows.append(np.asarray(result.embedding, np.float32))
            vectors[k] = rows[-1][1:-1].mean(axis=0, dtype=np.float64)
        else:
            vectors[k] = result.embedding
    failed = np.array([r.error is not None for _, r in kept])
    columns = {
        "id": pa.array([uid for (uid, _), _ in kept], pa.string()),
        "sequence_length": pa.array([_residues(seq) for (_, seq), _ in kept], pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), d, mask=pa.array(failed)
        ),
    }
    if per_residue:
        columns["per_residue"] = pa.array(
            [None if r is None else list(r) for r in rows], pa.list_(pa.list_(pa.float32(), d))
        )
    columns["error"] = error_column(r for _, r in kept)
    return pa.table(columns)


def _residues(sequence: str) -> int:
    return len(sequence.replace("<mask>", "_"))
