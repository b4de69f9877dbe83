"""One Ray Data job: read the inputs, skip what the output holds, send blocks through an
actor pool whose actors write their own parts, and add up what they did."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esmc_client.bulk import progress_bar
from esmc_ray.inputs import READ_CPUS, drop_done, read_inputs
from esmc_ray.parts import PartStore


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
