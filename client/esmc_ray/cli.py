"""``esmc ray-embed`` and ``esmc ray-score``: the Ray jobs as ``esmc`` subcommands.

Both are registered in the ``esmc.commands`` entry-point group (``pyproject.toml``), so the
client's ``esmc`` runs them without importing this package; they take the client's
connection options (:func:`esmc_client.cli_options.common_options`) and report like every
``esmc`` command. Ray's own log lines and warnings are quiet unless ``--verbose``; a Ray
cluster that cannot be reached at ``--address`` is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from esmc_client.cli_options import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    Parser,
    RunError,
    common_options,
    quiet_native_logs,
    run_command,
)
from esmc_client.types import SCORING_METHODS, SCORING_NORMALIZATIONS
from esmc_ray.embed import embed_in_process, embed_with_servers
from esmc_ray.inputs import FASTA_SUFFIXES
from esmc_ray.job import JobSummary
from esmc_ray.score import score_with_servers
from esmc_server.config import BatchingConfig  # no torch: the engine's settings only

RAY_EXTRA_HINT = "needs the ray extra: pip install 'esmc-serve[ray]'"
RAY_LOG_LEVEL_ENV = "RAY_BACKEND_LOG_LEVEL"


def ray_embed(argv: Sequence[str] | None = None) -> int:
    """``esmc ray-embed``: FASTA/parquet/CSV shards into a parquet directory of embeddings."""
    return _main("ray-embed", embed_parser(), argv, cmd_ray_embed)


def ray_score(argv: Sequence[str] | None = None) -> int:
    """``esmc ray-score``: a parquet/CSV of variants into a parquet directory of scores."""
    return _main("ray-score", score_parser(), argv, cmd_ray_score)


def _main(name: str, parser: argparse.ArgumentParser, argv, run) -> int:
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    quiet_native_logs(args.verbose)
    return run_command(name, args, run)


IN_PROCESS_MODEL = "esmc-tiny"
"""The model ``--in-process`` actors load when ``--model`` names none."""


def embed_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="esmc ray-embed", parents=[common_options()],
        description="Embed FASTA/parquet/CSV shards on a Ray cluster into a parquet directory, "
        "through running servers (--targets) or model actors (--in-process). Running the same "
        "command again resumes: ids already written are skipped. --model names the served model "
        f"to use, or with --in-process the model to load (default {IN_PROCESS_MODEL}).",
    )
    p.add_argument("inputs", nargs="+",
                   help=f"{', '.join(FASTA_SUFFIXES)}, .parquet, .csv files or directories")
    add_job_arguments(p)
    p.add_argument("--in-process", action="store_true", help="model actors, no servers")
    p.add_argument("--device", default="auto", help="with --in-process: auto, cpu, cuda")
    p.add_argument("--dtype", default=None,
                   help="with --in-process: model dtype (default: the server's choice for "
                   "the device)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="with --in-process: the engine's token budget per forward (default: "
                   "the server's)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --in-process")
    p.add_argument("--layer", type=int, default=-1,
                   help="-1 final embeddings, 0..n-1 a block's output, -2.. from the end")
    p.add_argument("--pool", choices=("mean", "none"), default="mean",
                   help="none also writes per-residue rows")
    return p


def score_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="esmc ray-score", parents=[common_options()],
        description="Score a parquet/CSV of variants (id, wild-type sequence, variant) on a "
        "Ray cluster into a parquet directory. Running the same command again resumes.",
    )
    p.add_argument("inputs", nargs="+", help=".parquet or .csv files or directories of them")
    add_job_arguments(p)
    p.add_argument("--variant-column", default="variant", help='e.g. "K2P" or "K2P:A4D"')
    p.add_argument("--method", choices=SCORING_METHODS, default="masked-marginals",
                   help="how a variant is scored")
    p.add_argument("--normalization", choices=SCORING_NORMALIZATIONS, default="full",
                   help="log_softmax over the 64 logits (full) or the 20 amino acids")
    return p


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
            options["batching"] = BatchingConfig(max_batch_tokens=args.max_batch_tokens)
        return embed_in_process(
            args.inputs, args.output, args.model or IN_PROCESS_MODEL, embedder_options=options,
            concurrency=args.concurrency or 1, gpus_per_actor=args.gpus_per_actor, **shared,
        )

    return run_job_command(args, job)


def cmd_ray_score(args: argparse.Namespace) -> int:
    def job(shared: dict[str, Any]) -> JobSummary:
        return score_with_servers(
            args.inputs, args.output, targets_of(args), method=args.method,
            normalization=args.normalization, client_options=client_options(args),
            concurrency=args.concurrency, variant_column=args.variant_column, **shared,
        )

    return run_job_command(args, job)


def run_job_command(args: argparse.Namespace, job: Callable[[dict[str, Any]], JobSummary]) -> int:
    """Start Ray (unless it runs already), run ``job(options shared by every job)``, print
    the summary; exit 0 when every id has a row without an error, 1 otherwise, 2 on bad
    arguments, a missing ``[ray]`` extra or a Ray cluster that cannot be reached."""
    if not args.verbose:
        quiet_ray()
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RunError(f"{RAY_EXTRA_HINT} ({error})") from None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    started = not ray.is_initialized()
    if started:
        _start_ray(ray, args.address, args.verbose)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = args.verbose
    shared = {
        "batch_size": args.batch_size, "progress": progress, "id_column": args.id_column,
        "sequence_column": args.sequence_column,
    }
    if args.cpus_per_actor is not None:
        shared["cpus_per_actor"] = args.cpus_per_actor
    try:
        summary = job(shared)
    except ValueError as error:
        raise RunError(str(error)) from None
    finally:
        if started:
            ray.shutdown()
    print(summary.line(), file=sys.stderr)
    print(json.dumps({"summary": summary.__dict__}))
    return EXIT_OK if summary.complete and summary.errors == 0 else EXIT_SOME_FAILED


def quiet_ray(environ=os.environ) -> None:
    """Ray's own log lines and warnings off (its C++ core's ``E`` lines, the driver's
    warnings): they read like failures of the job, which reports its own in one line."""
    environ.setdefault(RAY_LOG_LEVEL_ENV, "fatal")  # read when ray.init starts the core
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def _start_ray(ray, address: str | None, verbose: bool) -> None:
    """``ray.init``, with Ray's log lines quiet unless ``verbose``; a cluster that cannot be
    reached is a :class:`RunError` naming the address."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    try:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    except ConnectionError as error:
        where = address or "$RAY_ADDRESS"
        raise RunError(
            f"no Ray cluster at --address {where} ({_first_line(error)}); start one with "
            "`ray start --head`, or leave --address out for a local instance"
        ) from None
    for name in ("ray", "ray.data"):  # ray.init sets up its loggers again
        logging.getLogger(name).setLevel(level)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def targets_of(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in (args.targets or args.target).split(",") if t.strip()]


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client's TLS and token options from the ``--tls*``/``--token`` flags; certificate
    files are read here, so actors on other nodes get their bytes, not a local path."""
    options: dict[str, Any] = {"token": args.token or None, "tls": args.tls, "model": args.model}
    files = {"root_certificates": args.tls_ca, "client_certificate": args.tls_cert,
             "client_key": args.tls_key}
    for name, path in files.items():
        if path:
            try:
                with open(path, "rb") as handle:
                    options[name] = handle.read()
            except OSError as error:
                raise RunError(f"cannot read {path}: {error.strerror or error}") from None
    return {name: value for name, value in options.items() if value is not None}

