"""``esmc embed``: every protein of a FASTA file into one embeddings file.

    esmc embed proteins.fasta -o runs/embeddings.npz --layer -1

The whole input is checked before any work (readable, unique ids, upper-case, lengths
under ``--long``); each protein that fails is named in the summary on stderr and, with
``--errors FILE``, listed there. Embedding files and their keys: :mod:`esmc_client.outputs`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from esmc_client.cli_options import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    UPPERCASE_HINT,
    RunError,
    connect,
    names,
    one_line,
    positive,
    server_info,
)
from esmc_client.fasta import FastaError, duplicate_ids, first_lowercase, read_fasta
from esmc_client.fasta import residue_count, truncate
from esmc_client.outputs import FORMATS, write_embeddings
from esmc_client.retry import RetryPolicy
from esmc_client.types import EmbedResult, ServerInfo

LONG_MODES = ("embed", "error", "truncate", "skip")
_RUN_CODES = ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED")  # about the server, not a protein


def add_embed_command(sub, common: argparse.ArgumentParser) -> None:
    embed = sub.add_parser(
        "embed", parents=[common], help="embeddings of every protein of a FASTA file",
        description="Embed every protein of a FASTA file into one .npz, .h5 or .parquet file "
        "holding ids, embeddings and the run's metadata (model, layer, pooling, dtype, server "
        "version). A summary on stderr says what happened to each protein.",
    )
    embed.add_argument("fasta", type=Path, help="FASTA file (ids: each header's first word)")
    embed.add_argument("-o", "--output", type=_embed_output, required=True,
                       help="output file: .npz, .h5/.hdf5 (h5py) or .parquet (pyarrow)")
    embed.add_argument("--layer", type=int, default=-1,
                       help="-1: final embeddings (after the last norm); 0..n-1: that block's "
                       "output; -2..-n: counted from the end")
    embed.add_argument("--pool", choices=("mean", "none"), default="mean",
                       help="mean over residues (d per protein), or none: every position "
                       "(L+2 rows per protein, BOS and EOS included)")
    embed.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="wire dtype (bfloat16 is stored as float32)")
    embed.add_argument("--long", choices=LONG_MODES, default="embed",
                       help="proteins longer than --max-residues: embed (send them; the server "
                       "embeds what it accepts and refuses the rest, listed), error (stop before "
                       "any work), truncate (embed the first --max-residues residues), skip")
    embed.add_argument("--max-residues", type=positive, default=None,
                       help="length limit for --long (default: what the server accepts, from "
                       "esmc info; the model's trained context is 2046 residues)")
    embed.add_argument("--uppercase", action="store_true",
                       help="upper-case the sequences (lowercase is refused otherwise)")
    embed.add_argument("--dedupe", action="store_true",
                       help="keep the first record of a repeated id (repeats are refused otherwise)")
    embed.add_argument("--errors", type=Path, default=None,
                       help="write the proteins that failed or were skipped to this TSV file "
                       "(id, status, message) (default: none)")
    embed.add_argument("--batch-size", type=positive, default=256, help="sequences per stream")
    embed.add_argument("--concurrency", type=positive, default=4, help="streams at once")
    embed.add_argument("--max-in-flight", type=positive, default=64,
                       help="requests ahead of their answers per stream")
    embed.add_argument("--ride-out-s", type=float, default=30.0,
                       help="seconds a restarting or unreachable server is waited for during "
                       "the run (0: fail its proteins at once)")
    embed.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    embed.set_defaults(run=cmd_embed)


@dataclass
class _Protein:
    id: str
    sequence: str
    truncated: bool = False


def cmd_embed(args: argparse.Namespace) -> int:
    proteins, dropped = read_proteins(args.fasta, args.uppercase, args.dedupe)
    prepare_output(args.output)
    if args.errors is not None:
        prepare_output(args.errors)
    retry = RetryPolicy(ride_out_s=args.ride_out_s)
    with connect(args, retry) as client:
        info = server_info(client, args)
        check_layer(args.layer, info)
        limit = args.max_residues or max(1, info.max_length - 2)
        proteins, skipped = apply_long(proteins, args.long, limit)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        results = client.embed(
            [(p.id, p.sequence) for p in proteins],
            layer=args.layer,
            pool=args.pool,
            output_dtype=args.dtype,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            max_in_flight=args.max_in_flight,
            progress=progress,
            timeout=args.timeout,
        )
    good = [(p, r) for p, r in zip(proteins, results) if r.ok]
    failed = [r for r in results if not r.ok]
    if failed and not good and len({(r.error.code, r.error.message) for r in failed}) == 1:
        if failed[0].error.code in _RUN_CODES:  # the server went away: one line says it
            raise RunError(f"no protein embedded: {failed[0].error}")
    if args.errors is not None:
        write_errors(args.errors, failed, skipped, limit)
    if good:
        metadata = {
            "model": info.model_name, "layer": args.layer, "pooling": args.pool,
            "dtype": args.dtype, "server_version": info.server_version,
            "d_model": info.d_model, "n_layers": info.n_layers, "max_residues": limit,
        }
        write_embeddings(args.output, [p.id for p, _ in good], [r.embedding for _, r in good],
                         metadata, [p.truncated for p, _ in good])
    for line in embed_summary(args, len(proteins) + len(skipped) + dropped, good, failed,
                              skipped, dropped, limit):
        print(line, file=sys.stderr)
    served = info.max_length - 2
    lengths = {p.id: residue_count(p.sequence) for p in proteins}
    over = [r.id for r in failed if lengths.get(r.id, 0) > served]
    if over:
        print(f"esmc embed: {len(over)} failed proteins are longer than the server's limit of "
              f"{served} residues: --long truncate or --long skip handles them", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def read_proteins(path: Path, uppercase: bool, dedupe: bool) -> tuple[list[_Protein], int]:
    """The FASTA file's proteins, checked as a whole; ``(proteins, duplicates dropped)``."""
    try:
        records = list(read_fasta(path, uppercase=uppercase))
    except FastaError as error:
        raise RunError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise RunError(f"cannot read {path}: {reason}") from None
    if not records:
        raise RunError(f"no sequences in {path} (a FASTA file starts with a '>' header)")
    repeated = duplicate_ids(records)
    dropped = 0
    if repeated and not dedupe:
        raise RunError(f"{len(repeated)} ids occur more than once in {path}: "
                       f"{names(repeated)}; make them unique or pass --dedupe to keep the "
                       "first record of each")
    if repeated:
        seen: set[str] = set()
        unique = []
        for uid, sequence in records:
            if uid not in seen:
                seen.add(uid)
                unique.append((uid, sequence))
        dropped = len(records) - len(unique)
        records = unique
    lower = [(uid, hit) for uid, sequence in records if (hit := first_lowercase(sequence))]
    if lower:
        uid, (residue, letter) = lower[0]
        raise RunError(f"{len(lower)} sequences contain lowercase letters (first: {uid}, "
                       f"{letter!r} at residue {residue + 1}); {UPPERCASE_HINT}")
    return [_Protein(uid, sequence) for uid, sequence in records], dropped


def check_layer(layer: int, info: ServerInfo) -> None:
    n = info.n_layers
    if layer == -1 or 0 <= layer < n or -n <= layer <= -2:
        return
    raise RunError(f"--layer {layer} does not exist: {info.model_name} has {n} layers (-1: "
                   f"final embeddings; 0..{n - 1}: a block's output; -2..-{n}: from the end)")


def apply_long(
    proteins: list[_Protein], mode: str, limit: int
) -> tuple[list[_Protein], list[_Protein]]:
    """``(proteins to send, proteins skipped)`` under ``--long mode`` with ``limit`` residues."""
    long = [p for p in proteins if residue_count(p.sequence) > limit]
    if not long or mode == "embed":
        return proteins, []
    if mode == "error":
        raise RunError(f"{len(long)} proteins are longer than {limit} residues: "
                       f"{names([p.id for p in long])}; use --long truncate, skip or embed")
    if mode == "skip":
        skipped = {id(p) for p in long}
        return [p for p in proteins if id(p) not in skipped], long
    for protein in long:
        protein.sequence = truncate(protein.sequence, limit)
        protein.truncated = True
    return proteins, []


# --- reporting ----------------------------------------------------------------------------


def embed_summary(args, total: int, good, failed: list[EmbedResult], skipped: list[_Protein],
                  dropped: int, limit: int) -> list[str]:
    """What happened to each protein, as lines for stderr."""
    truncated = [p.id for p, _ in good if p.truncated]
    parts = [f"{len(good)} embedded"]
    if truncated:
        parts.append(f"{len(truncated)} of them truncated to {limit} residues")
    parts += [f"{len(skipped)} skipped (longer than {limit} residues)", f"{len(failed)} failed"]
    if dropped:
        parts.append(f"{dropped} repeated records dropped (--dedupe)")
    lines = [f"esmc embed: {total} proteins: " + ", ".join(parts)]
    if good:
        lines.append(f"esmc embed: wrote {len(good)} embeddings to {args.output}")
    if truncated:
        lines.append(f"esmc embed: truncated: {names(truncated)}")
    if skipped:
        lines.append(f"esmc embed: skipped: {names([p.id for p in skipped])}")
    by_code: dict[str, list[EmbedResult]] = defaultdict(list)
    for result in failed:
        by_code[result.error.code].append(result)
    for code, results in by_code.items():
        ids = [r.id for r in results]
        first = results[0].error.message
        same = all(r.error.message == first for r in results)
        why = f"{code}: {first}" if same else f"{code}, first: {ids[0]}: {first}"
        lines.append(f"esmc embed: failed ({len(ids)}) {names(ids)}: {why}")
    if (failed or skipped) and args.errors is not None:
        lines.append(f"esmc embed: every failed or skipped protein is listed in {args.errors}")
    elif failed:
        lines.append("esmc embed: --errors FILE lists every failed protein with its error")
    return lines


def write_errors(path: Path, failed: list[EmbedResult], skipped: list[_Protein], limit: int) -> None:
    """``id<TAB>status<TAB>message`` per failed or skipped protein, with a header line."""
    lines = ["id\tstatus\tmessage"]
    lines += [f"{r.id}\t{r.error.code}\t{one_line(r.error.message)}" for r in failed]
    lines += [f"{p.id}\tSKIPPED\tlonger than {limit} residues (--long skip)" for p in skipped]
    path.write_text("\n".join(lines) + "\n")


# --- files --------------------------------------------------------------------------------


def _embed_output(text: str) -> Path:
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text}: the output must end in {', '.join(FORMATS)}")
    module = FORMATS[suffix]
    if module is not None:
        if importlib.util.find_spec(module) is None:
            raise argparse.ArgumentTypeError(f"writing {suffix} needs {module} (pip install {module})")
    return path


def prepare_output(path: Path) -> None:
    """Create the output's directory (e.g. ``runs/``) and check it is writable, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create {path.parent}: {error.strerror or error}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RunError(f"cannot write {path}: permission denied")
