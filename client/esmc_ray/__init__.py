"""Bulk jobs on Ray (the ``[ray]`` extra): ``esmc ray-embed`` and ``esmc ray-score``.

A Ray Data pipeline reads FASTA, parquet or CSV shards, drops the ids the output directory
already holds, and sends blocks of rows through an actor pool; each actor writes every
finished block itself as one parquet part. Two kinds of embedding actors:

- **against running servers** (:func:`embed_with_servers`): each actor holds one
  :class:`~esmc_client.client.ESMCClient` per target and splits every block over the targets
  that answer; rows a target fails with a transient status (``UNAVAILABLE``...) go to the
  others, and a failing target rests a while before it gets work again.
- **model actors without servers** (:func:`embed_in_process`): each actor owns a device and
  runs the server's own engine in-process (:class:`esmc_server.embedder.LocalEmbedder`: same
  batching, same token budget, same input checks as ``esmc serve``).

Variant scoring (:func:`score_with_servers`) runs the same pipeline with ``ScoreVariants``.

Resuming is running the same job again: ids already in the output are skipped; ids that
only met transient errors (every target down, queue full, out of memory) are left out of
the output and counted as *unfinished*, so the next run retries them. Ids must be unique
across the inputs (a repeat inside one block is dropped; the summary counts duplicates left
in the output). Importing this package imports neither ray nor torch nor grpc.

Modules, by job: :mod:`~esmc_ray.inputs` (reading shards, skipping done ids),
:mod:`~esmc_ray.targets` (servers, failover, the job's model from ``Info``),
:mod:`~esmc_ray.parts` (the output directory), :mod:`~esmc_ray.job` (the pipeline and its
summary), :mod:`~esmc_ray.embed`, :mod:`~esmc_ray.score` (the actors and their tables),
:mod:`~esmc_ray.cli` (the ``esmc`` subcommands). This package may import both the client
and the server.
"""

from esmc_ray.embed import embed_in_process, embed_with_servers
from esmc_ray.job import JobSummary
from esmc_ray.score import score_with_servers

__all__ = ["JobSummary", "embed_in_process", "embed_with_servers", "score_with_servers"]
