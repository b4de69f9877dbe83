"""Bulk embedding on Ray (``esmc ray-embed``; the ``[ray]`` extra).

A Ray Data pipeline reads FASTA, parquet or CSV shards, drops the ids the output directory
already holds, and sends blocks of sequences through an actor pool. Two kinds of actors:

- **against running servers** (:func:`embed_with_servers`): each actor holds one
  :class:`~esmc_client.client.ESMCClient` per target and splits every block over the targets
  that answer; sequences a target fails with a transient status (``UNAVAILABLE``...) go to
  the others, and a failing target rests a while before it gets work again.
- **model actors without servers** (:func:`embed_in_process`): each actor owns a device and
  runs the server's own :class:`~esmc_server.engine.Engine` in-process
  (:class:`esmc_server.embedder.LocalEmbedder`: same batching, same token budget, same
  input checks as ``esmc serve``).

Each actor writes every finished block itself as one parquet part, ``part-<hash of its
ids>.parquet``, written under a temporary name and renamed, so a retried block rewrites the
same file and a crash leaves no partial part. Columns: ``id``, ``sequence_length``
(residues), ``embedding`` (fixed-size list of float32, null on error), ``per_residue``
(``--pool none`` only: (L+2, d) rows, BOS and EOS included; ``embedding`` is then their
residue mean) and ``error`` (``"CODE: message"`` of a sequence the service refused, else
null). The schema metadata holds ``esmc.model``, ``esmc.layer``, ``esmc.pooling``,
``esmc.server_version``, ``esmc.d_model``, ``esmc.n_layers`` and ``esmc.mode``.

Resuming is running the same command again: ids already in the output are skipped; ids
that only met transient errors (every target down, queue full, out of memory) are left out
of the output and counted as *unfinished*, so the next run retries them. Ids must be unique
across the inputs (a repeat inside one block is dropped; the summary counts duplicates left
in the output). Importing this module imports neither ray nor torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from esmc_client.bulk import progress_bar
from esmc_client.retry import RetryPolicy
from esmc_client.fasta import read_fasta
from esmc_client.types import EmbedResult, ESMCError

log = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")
INPUT_FORMATS = ("fasta", "parquet", "csv")
TRANSIENT_CODES = (
    "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "ABORTED",
)
"""Errors that say nothing about the sequence: its id is left for the next run."""
RESUME_KEYS = ("kind", "model", "layer", "pooling", "method", "normalization")
"""Metadata a resumed job must share with the parts already written."""
FASTA_BLOCK_RECORDS = 4096
READ_CPUS = 0.5  # reading is I/O: a whole CPU per read task starved the actors on 2-CPU nodes
_CLIENT_RETRY = RetryPolicy(max_retries=2, initial_backoff_s=0.2, max_backoff_s=1.0, ride_out_s=2.0)
"""Short: a target that stays down hands its sequences to the others (a lone target gets
the client's usual 30 s ride-out of a restart)."""
_FAILOVER_ROUNDS = 6
_REST_S = 5.0  # a target that failed transiently gets no work for this long (doubling)


# --- results ------------------------------------------------------------------------------


@dataclass
class JobSummary:
    """What one run did. ``already_done``: ids found in the output at the start;
    ``written``/``errors``: rows written by this run (``errors`` of them with an error);
    ``unfinished``: ids left for the next run; ``duplicates``: repeated ids in the output."""

    output: str
    already_done: int = 0
    written: int = 0
    errors: int = 0
    unfinished: int = 0
    duplicates: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.unfinished == 0 and self.duplicates == 0

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.output}: {self.written} written ({self.errors} with an error), "
            f"{self.already_done} already there, {self.unfinished} unfinished, "
            f"{self.duplicates} duplicate ids; {self.seconds:.1f} s, {rate:.1f} sequences/s"
        )


# --- public entry points ------------------------------------------------------------------


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


def server_metadata(targets: Sequence[str], client_options: dict[str, Any]) -> dict[str, str]:
    """The job's model, server version and shape from the targets' ``Info`` (no compute).

    Every answering target must serve the same model. Targets that do not answer are
    skipped (the actors try them again later); at least one must answer.
    """
    from esmc_client.client import ESMCClient

    seen = {}
    for target in targets:
        with ESMCClient(target, retry=_CLIENT_RETRY, **client_options) as client:
            try:
                seen[target] = client.info(timeout=30)
            except ESMCError as error:
                log.warning("%s does not answer (%s); its share goes elsewhere", target, error)
    if not seen:
        raise ESMCError("UNAVAILABLE", f"none of the targets answers: {', '.join(targets)}")
    first = next(iter(seen.values()))
    for target, info in seen.items():
        if (info.model_name, info.d_model) != (first.model_name, first.d_model):
            raise ValueError(
                f"targets serve different models: {target} serves {info.model_name} "
                f"(d={info.d_model}), another {first.model_name} (d={first.d_model})"
            )
    return {
        "model": first.model_name,
        "server_version": first.server_version,
        "d_model": str(first.d_model),
        "n_layers": str(first.n_layers),
        "mode": "servers",
    }


def _check_probe(probe: EmbedResult, where: str, layer: int, pool: str) -> None:
    """A one-residue embed must pass the service's checks of ``layer`` and ``pool``: a bad
    layer fails the job at its start, not as an error row per sequence."""
    if probe.error is not None and probe.error.code not in TRANSIENT_CODES:
        raise ValueError(f"{where} refuses layer={layer} pool={pool}: {probe.error}")


# --- the pipeline -------------------------------------------------------------------------


def run_job(
    inputs: Sequence[str],
    output: str,
    actor_class: type,
    actor_kwargs: dict[str, Any],
    metadata: dict[str, str],
    *,
    concurrency: int,
    batch_size: int,
    resources: dict[str, Any],
    progress: bool,
    calls_per_actor: int = 1,
    columns: dict[str, str] | None = None,
) -> JobSummary:
    """Read, skip what ``output`` holds, embed the rest with ``actor_class`` actors.

    ``calls_per_actor`` > 1 lets an actor take the next block while one is in flight (the
    in-process engine then packs both blocks into its forwards). ``columns``: output name ->
    input column of parquet/CSV inputs (default ``id``, ``sequence``).
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    store = PartStore(output)
    store.check_compatible(metadata)
    done = store.ids()
    summary = JobSummary(output=output, already_done=len(done))
    pending = (
        read_inputs(inputs, columns or {"id": "id", "sequence": "sequence"}, batch_size)
        .map_batches(
            drop_done, fn_kwargs={"done": ray.put(done)}, batch_format="pyarrow",
            num_cpus=READ_CPUS,
        )
        .repartition(target_num_rows_per_block=batch_size)  # one actor call per block
    )
    pool = ray.data.ActorPoolStrategy(
        size=concurrency,
        max_concurrent_calls_per_actor=calls_per_actor,
        enable_true_multi_threading=calls_per_actor > 1,
    )
    stats = pending.map_batches(
        actor_class,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=pool,
        **resources,
    )
    with progress_bar(progress, desc="ray-embed") as bar:
        for batch in stats.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key in ("written", "errors", "unfinished"):
                setattr(summary, key, getattr(summary, key) + sum(batch[key].to_pylist()))
            bar.update(sum(batch["written"].to_pylist()))
    summary.duplicates = store.duplicates()
    summary.seconds = time.perf_counter() - start
    return summary


def input_files(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, format)`` of every input file; a directory stands for the files in it
    (names starting with ``.`` or ``_`` skipped). Formats by suffix: FASTA
    (``.fasta``, ``.fa``, ``.faa``, ``.fas``), ``.parquet`` or ``.csv``."""
    files = []
    for path in map(str, inputs):
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith((".", "_")))
            files += input_files([os.path.join(path, n) for n in names])
            continue
        name = path.lower()
        kind = "fasta" if name.endswith(FASTA_SUFFIXES) else name.rsplit(".", 1)[-1]
        if kind not in INPUT_FORMATS:
            raise ValueError(
                f"{path}: unknown input type; use {', '.join(FASTA_SUFFIXES)}, .parquet or .csv"
            )
        files.append((path, kind))
    if not files:
        raise ValueError(f"no input files in {', '.join(map(str, inputs))}")
    return files


def read_inputs(inputs: Sequence[str], columns: dict[str, str], rows: int = FASTA_BLOCK_RECORDS):
    """One Ray dataset of string columns named as the keys of ``columns`` (values: the
    parquet/CSV column names; FASTA gives ``id`` and ``sequence``) from every input file,
    one read task per file streaming blocks of at most ``rows`` rows (files must be readable
    from every node: a shared filesystem)."""
    import ray.data

    files = [{"path": path, "format": kind} for path, kind in input_files(inputs)]
    if set(columns) != {"id", "sequence"} and any(f["format"] == "fasta" for f in files):
        raise ValueError(f"FASTA has no {', '.join(sorted(set(columns) - {'id', 'sequence'}))} column")
    return ray.data.from_items(files).map_batches(
        read_blocks, fn_kwargs={"columns": columns, "rows": rows}, batch_size=1,
        batch_format="pyarrow", num_cpus=READ_CPUS,
    )


def read_blocks(files, columns: dict[str, str], rows: int) -> Iterator[Any]:
    """The records of each file, as tables of at most ``rows`` rows."""
    for path, kind in zip(files["path"].to_pylist(), files["format"].to_pylist()):
        if kind == "fasta":
            yield from _fasta_blocks(path, rows)
        else:
            yield from _table_blocks(path, kind, columns, rows)


def _fasta_blocks(path: str, rows: int) -> Iterator[Any]:
    import pyarrow as pa

    ids: list[str] = []
    sequences: list[str] = []
    for uid, sequence in read_fasta(path):
        ids.append(uid)
        sequences.append(sequence)
        if len(ids) == rows:
            yield pa.table({"id": ids, "sequence": sequences})
            ids, sequences = [], []
    if ids:
        yield pa.table({"id": ids, "sequence": sequences})


def _table_blocks(path: str, kind: str, columns: dict[str, str], rows: int):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    wanted = list(columns.values())
    if kind == "parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=wanted)
    else:
        types = {name: pa.string() for name in wanted}
        options = pyarrow.csv.ConvertOptions(column_types=types, include_columns=wanted)
        batches = pyarrow.csv.open_csv(path, convert_options=options)
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            part = batch.slice(start, rows)
            yield pa.table({
                name: part.column(column).cast(pa.string()) for name, column in columns.items()
            })


def drop_done(batch, done):
    """``batch`` without the ids in ``done`` (an array, or its Ray object ref) and without
    repeats of an id within it."""
    import pyarrow.compute as pc
    import ray

    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)

    batch = batch.filter(pc.invert(pc.is_in(batch["id"], done)))
    ids = batch["id"].to_pylist()
    if len(set(ids)) == len(ids):
        return batch
    first = {uid: i for i, uid in reversed(list(enumerate(ids)))}
    return batch.take(sorted(first.values()))


# --- actors -------------------------------------------------------------------------------


class TargetPool:
    """One client per target; work goes to the targets that answer.

    :meth:`run` splits items over the live targets; items a target fails with a transient
    status go to the others in the next round, and that target rests (5 s, doubling up to
    40 s) before it gets work again. Items still failing after the last round get None.
    """

    def __init__(self, targets: Sequence[str], client_options: dict[str, Any]):
        from esmc_client.client import ESMCClient

        retry = _CLIENT_RETRY if len(targets) > 1 else RetryPolicy()
        options = {"retry": retry, **client_options}
        self._clients = [ESMCClient(target, **options) for target in targets]
        self._rest_until = [0.0] * len(targets)
        self._rest_s = [_REST_S] * len(targets)

    def run(self, items: list, call: Callable[[Any, list], list]) -> list:
        """``call(client, some items)`` -> one result per item (with an ``error``), per item."""
        results: list = [None] * len(items)
        todo = list(range(len(items)))
        for round_ in range(_FAILOVER_ROUNDS):
            if round_:
                time.sleep(min(_REST_S, 0.5 * 2**round_))
            live = self._live()
            shares = [(t, todo[k :: len(live)]) for k, t in enumerate(live)]

            def on(share: tuple[int, list[int]]) -> list:
                target, indices = share
                return call(self._clients[target], [items[i] for i in indices]) if indices else []

            with ThreadPoolExecutor(len(shares)) as pool:
                answers = list(pool.map(on, shares))
            todo = []
            for (target, share), answer in zip(shares, answers):
                failed = [i for i, r in zip(share, answer) if _transient(r)]
                for i, result in zip(share, answer):
                    if not _transient(result):
                        results[i] = result
                self._note(target, failed=bool(failed))
                todo += failed
            if not todo:
                break
        return results

    def _live(self) -> list[int]:
        now = time.monotonic()
        live = [t for t, until in enumerate(self._rest_until) if until <= now]
        return live or [min(range(len(self._rest_until)), key=self._rest_until.__getitem__)]

    def _note(self, target: int, failed: bool) -> None:
        if failed:
            self._rest_until[target] = time.monotonic() + self._rest_s[target]
            self._rest_s[target] = min(8 * _REST_S, 2 * self._rest_s[target])
        else:
            self._rest_s[target] = _REST_S


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
                _check_probe(probe, "the targets", self._options["layer"], self._options["pool"])
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
        results = self._embedder.embed(records, layer=self._layer, pool=self._pool)
        kept = [None if _transient(r) else r for r in results]
        return self._store.write(records, kept, embedding_table)

    def _start(self) -> None:
        from esmc_server.embedder import LocalEmbedder

        model, embedder_options, output, metadata = self._args
        embedder = LocalEmbedder(model, **embedder_options)
        [probe] = embedder.embed([("probe", "M")], layer=self._layer, pool=self._pool)
        _check_probe(probe, model, self._layer, self._pool)
        info = embedder.info()
        shape = {key: str(info[key]) for key in ("server_version", "d_model", "n_layers")}
        self._store = PartStore(output, {**metadata, **shape})
        self._embedder = embedder


def _transient(result: Any) -> bool:
    """A result (with an ``error``) that says nothing about its input: retry it later."""
    return result.error is not None and result.error.code in TRANSIENT_CODES


# --- the output directory -----------------------------------------------------------------


class PartStore:
    """The parquet parts of one output directory (a local path or a pyarrow URI: s3://...)."""

    def __init__(self, output: str, metadata: dict[str, str] | None = None):
        import pyarrow.fs

        if "://" in output:
            self._fs, self._base = pyarrow.fs.FileSystem.from_uri(output)
        else:
            self._fs, self._base = pyarrow.fs.LocalFileSystem(), os.path.abspath(output)
        self._fs.create_dir(self._base, recursive=True)
        self._metadata = metadata

    def _dataset(self):
        import pyarrow.dataset

        return pyarrow.dataset.dataset(self._base, filesystem=self._fs, format="parquet")

    def ids(self):
        """Every id written so far (a pyarrow array)."""
        import pyarrow as pa

        dataset = self._dataset()
        if not dataset.files:
            return pa.array([], pa.string())
        return dataset.to_table(columns=["id"])["id"].combine_chunks()

    def duplicates(self) -> int:
        ids = self.ids()
        return len(ids) - len(ids.unique())

    def metadata(self) -> dict[str, str] | None:
        """The ``esmc.*`` metadata of the first part, or None when there is none yet."""
        files = self._dataset().files
        if not files:
            return None
        raw = _read_schema(self._fs, files[0]).metadata or {}
        return {k.decode()[5:]: v.decode() for k, v in raw.items() if k.startswith(b"esmc.")}

    def check_compatible(self, metadata: dict[str, str]) -> None:
        existing = self.metadata()
        if existing is None:
            return
        for key in RESUME_KEYS:
            if existing.get(key) != metadata.get(key):
                raise ValueError(
                    f"{self._base} holds {key}={existing.get(key)!r}, this job has "
                    f"{key}={metadata.get(key)!r}; use another output directory"
                )

    def write(self, records: list[tuple], results: list, build: Callable) -> Any:
        """Write the records that have a result as one part, the table ``build(kept,
        metadata)`` makes of ``(record, result)`` pairs; the block's counts as a table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        kept = [(record, r) for record, r in zip(records, results) if r is not None]
        stats = {
            "written": [len(kept)],
            "errors": [sum(1 for _, r in kept if r.error is not None)],
            "unfinished": [len(records) - len(kept)],
        }
        if kept:
            table = build(kept, self._metadata)
            table = table.replace_schema_metadata({f"esmc.{k}": str(v) for k, v in self._metadata.items()})
            ids = "\n".join(str(record[0]) for record, _ in kept)
            final = f"{self._base}/part-{hashlib.sha256(ids.encode()).hexdigest()[:32]}.parquet"
            temporary = f"{self._base}/.tmp-{uuid.uuid4().hex}.parquet"
            with self._fs.open_output_stream(temporary) as sink:
                pq.write_table(table, sink)
            self._fs.move(temporary, final)
        return pa.table(stats)


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


def error_column(results: Iterable[Any]):
    """The ``error`` column: ``CODE: message`` of each result's error, or null."""
    import pyarrow as pa

    return pa.array([None if r.error is None else str(r.error) for r in results], pa.string())


def _read_schema(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        return pq.read_schema(handle)


def _residues(sequence: str) -> int:
    return len(sequence.replace("<mask>", "_"))


# --- the command --------------------------------------------------------------------------


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """``esmc ray-embed`` and ``esmc ray-score``: registered by :mod:`esmc_client.cli`."""
    from esmc_client import ray_score

    p = sub.add_parser(
        "ray-embed", parents=[common],
        help="embed FASTA/parquet/CSV shards on a Ray cluster into a parquet directory",
    )
    p.add_argument("inputs", nargs="+", help=f"{', '.join(FASTA_SUFFIXES)}, .parquet, .csv or directories")
    add_job_arguments(p)
    p.add_argument("--in-process", action="store_true", help="model actors, no servers")
    p.add_argument("--model", default="esmc-tiny", help="with --in-process: the model to load")
    p.add_argument("--device", default="auto", help="with --in-process: auto, cpu, cuda")
    p.add_argument("--dtype", default=None, help="with --in-process: model dtype")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="with --in-process: the engine's token budget per forward")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --in-process")
    p.add_argument("--layer", type=int, default=-1,
                   help="-1 final embeddings, 0..n-1 a block's output, -2.. from the end")
    p.add_argument("--pool", choices=("mean", "none"), default="mean",
                   help="none also writes per-residue rows")
    p.set_defaults(run=cmd_ray_embed)
    ray_score.add_parser(sub, common)


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options every Ray job command shares."""
    p.add_argument("-o", "--output", required=True, help="output directory (or s3://..., gs://...)")
    p.add_argument("--targets", help="servers host:port,host:port (default: --target)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="actors (default: 2 per target; 1 in-process)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs Ray reserves per actor (default 0.25 with servers, 1 in-process)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    p.add_argument("--id-column", default="id", help="parquet/CSV id column")
    p.add_argument("--sequence-column", default="sequence", help="parquet/CSV sequence column")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")


def run_command(args: argparse.Namespace, job: Callable[[dict[str, Any]], JobSummary]) -> int:
    """Start Ray (unless it runs already), run ``job(options shared by every job)``, print
    the summary; exit 0 when every id has a row without an error, 1 otherwise, 2 on bad
    arguments or a missing ``[ray]`` extra."""
    try:
        import ray
        import ray.data
    except ImportError:
        print(f"esmc {args.command} needs the ray extra: pip install 'esmc-serve[ray]'",
              file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, log_to_driver=progress)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    shared = {
        "batch_size": args.batch_size, "progress": progress, "id_column": args.id_column,
        "sequence_column": args.sequence_column,
    }
    if args.cpus_per_actor is not None:
        shared["cpus_per_actor"] = args.cpus_per_actor
    try:
        summary = job(shared)
    except ValueError as error:
        print(f"esmc {args.command}: {error}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    print(summary.line(), file=sys.stderr)
    print(json.dumps({"summary": summary.__dict__}))
    return 0 if summary.complete and summary.errors == 0 else 1


def targets_of(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in (args.targets or args.target).split(",") if t.strip()]


def cmd_ray_embed(args: argparse.Namespace) -> int:
    def job(shared: dict[str, Any]) -> JobSummary:
        shared = {**shared, "layer": args.layer, "pool": args.pool}
        if not args.in_process:
            return embed_with_servers(
                args.inputs, args.output, targets_of(args), client_options=client_options(args),
                concurrency=args.concurrency, **shared,
            )
        options = {"device": args.device, "dtype": args.dtype}
        if args.max_batch_tokens is not None:
            from esmc_server.config import BatchingConfig

            options["batching"] = BatchingConfig(max_batch_tokens=args.max_batch_tokens)
        return embed_in_process(
            args.inputs, args.output, args.model, embedder_options=options,
            concurrency=args.concurrency or 1, gpus_per_actor=args.gpus_per_actor, **shared,
        )

    return run_command(args, job)


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client's TLS and token options from the ``--tls*``/``--token`` flags; certificate
    files are read here, so actors on other nodes get their bytes, not a local path."""
    options: dict[str, Any] = {"token": args.token or None, "tls": args.tls}
    files = {"root_certificates": args.tls_ca, "client_certificate": args.tls_cert,
             "client_key": args.tls_key}
    for name, path in files.items():
        if path:
            with open(path, "rb") as handle:
                options[name] = handle.read()
    return {name: value for name, value in options.items() if value is not None}
