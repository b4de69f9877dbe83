"""Variant scoring on Ray (``esmc ray-score``): a parquet/CSV of variants in, scores out.

Input rows: ``id``, ``sequence`` (the wild type) and ``variant`` (``"K2P"``, or
``"K2P:A4D"`` for a multiple mutant; 1-based positions), column names set by
``--id-column``, ``--sequence-column``, ``--variant-column``. The pipeline is
:mod:`esmc_ray.job`'s (skip ids already written, client actors spread over the targets,
failover on transient errors, one parquet part per block written once), with
:meth:`ESMCClient.score <esmc_client.scoring.ScoringCalls.score>` instead of ``embed``: the
rows of a block that share a wild type are one ``ScoreVariants`` call. When the server
refuses such a call (``INVALID_ARGUMENT`` naming a bad variant), each of its variants is
scored alone, so a bad variant fails only its own row.

Output parts: ``id``, ``variant``, ``score`` (float32, null on error), ``error``; schema
metadata ``esmc.kind`` (``variant-scores``), ``esmc.model``, ``esmc.method``,
``esmc.normalization``, ``esmc.server_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esmc_client.types import SCORING_METHODS, SCORING_NORMALIZATIONS, ESMCError
from esmc_ray.job import JobSummary, run_job
from esmc_ray.parts import PartStore, error_column
from esmc_ray.targets import TRANSIENT_CODES, TargetPool, server_metadata


@dataclass(frozen=True)
class VariantScore:
    id: str
    variant: str
    score: float | None
    error: ESMCError | None


@dataclass(frozen=True)
class _Group:
    """The scores of one wild type's variants, or the transient error that stopped them."""

    scores: list[VariantScore]
    error: ESMCError | None = None


def score_with_servers(
    inputs: Sequence[str],
    output: str,
    targets: Sequence[str],
    *,
    method: str = "masked-marginals",
    normalization: str = "full",
    client_options: dict[str, Any] | None = None,
    concurrency: int | None = None,
    batch_size: int = 256,
    cpus_per_actor: float = 0.25,
    progress: bool = False,
    id_column: str = "id",
    sequence_column: str = "sequence",
    variant_column: str = "variant",
) -> JobSummary:
    """Score the variants of ``inputs`` (parquet or CSV) into ``output`` through ``targets``."""
    if method not in SCORING_METHODS or normalization not in SCORING_NORMALIZATIONS:
        raise ValueError(f"method must be one of {SCORING_METHODS}, normalization one of {SCORING_NORMALIZATIONS}")
    client_options = dict(client_options or {})
    metadata = {
        "kind": "variant-scores", **server_metadata(targets, client_options),
        "method": method, "normalization": normalization,
    }
    actor_kwargs = {
        "targets": list(targets), "client_options": client_options, "method": method,
        "normalization": normalization, "output": output, "metadata": metadata,
    }
    columns = {"id": id_column, "sequence": sequence_column, "variant": variant_column}
    return run_job(
        inputs, output, ServerScoreActor, actor_kwargs, metadata,
        concurrency=concurrency or 2 * len(targets), batch_size=batch_size,
        resources={"num_cpus": cpus_per_actor}, progress=progress, columns=columns,
    )


class ServerScoreActor:
    """Scores blocks of variants through the given servers and writes them."""

    def __init__(self, targets, client_options, method, normalization, output, metadata):
        self._targets = TargetPool(targets, client_options)
        self._options = {"method": method, "normalization": normalization}
        self._store = PartStore(output, metadata)

    def __call__(self, batch):
        rows = list(zip(*(batch[c].to_pylist() for c in ("id", "sequence", "variant"))))
        by_wild_type: dict[str, list[int]] = {}
        for i, (_, wild_type, _) in enumerate(rows):
            by_wild_type.setdefault(wild_type, []).append(i)
        groups = [(wt, [rows[i] for i in members]) for wt, members in by_wild_type.items()]
        results: list[VariantScore | None] = [None] * len(rows)
        for members, group in zip(by_wild_type.values(), self._targets.run(groups, self._score)):
            if group is not None:
                for i, score in zip(members, group.scores):
                    results[i] = score
        return self._store.write(rows, results, score_table)

    def _score(self, client, groups: list[tuple[str, list[tuple]]]) -> list[_Group]:
        return [self._score_group(client, wild_type, rows) for wild_type, rows in groups]

    def _score_group(self, client, wild_type: str, rows: list[tuple]) -> _Group:
        try:
            values = client.score_variants(wild_type, [r[2] for r in rows], **self._options)
        except ESMCError as error:
            if error.code in TRANSIENT_CODES:
                return _Group([], error)
            if len(rows) == 1:
                return _Group([VariantScore(rows[0][0], rows[0][2], None, error)])
            alone = [self._score_group(client, wild_type, [row]) for row in rows]
            transient = next((g.error for g in alone if g.error is not None), None)
            return _Group([g.scores[0] for g in alone] if transient is None else [], transient)
        return _Group([VariantScore(r[0], r[2], float(v), None) for r, v in zip(rows, values)])


def score_table(kept: list[tuple[tuple, VariantScore]], metadata: dict[str, str]):
    """``id``, ``variant``, ``score`` (float32, null on error), ``error``."""
    import pyarrow as pa

    results = [result for _, result in kept]
    return pa.table({
        "id": pa.array([r.id for r in results], pa.string()),
        "variant": pa.array([r.variant for r in results], pa.string()),
        "score": pa.array([r.score for r in results], pa.float32()),
        "error": error_column(results),
    })
