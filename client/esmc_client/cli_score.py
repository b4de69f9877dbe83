"""``esmc score``: variant-effect scores of a wild type, ProteinGym DMS files in and out.

    esmc score P12345.fasta --variants P12345_DMS.csv --method masked-marginals -o out.csv
    esmc score MKTAYIAKQR --plot map.png          # every single substitution, and the map

The wild type is a sequence or a FASTA file; lowercase letters are refused unless
``--uppercase`` (as in every ``esmc`` command). A missing file, a variants file without a
``mutant`` column or a server that cannot be used is one line on stderr and exit status 2.

The variants file is a CSV with a ``mutant`` column (``A23P`` or ``A23P:D45N``); it is written
back with a score column added. With a ``DMS_score`` column the Spearman correlation between
it and the scores is printed. Without ``--variants`` all 19 x L single substitutions are scored.
``--plot`` draws the site-saturation map (needs matplotlib: ``pip install 'esmc-serve[plot]'``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esmc_client.cli_options import EXIT_OK, UPPERCASE_HINT, RunError, checked_sequence, connect
from esmc_client.fasta import FastaError, first_lowercase, read_fasta
from esmc_client.types import AMINO_ACIDS, SCORING_METHODS, SCORING_NORMALIZATIONS

if TYPE_CHECKING:
    from esmc_client.scoring import VariantScores

MUTANT_COLUMN = "mutant"
DMS_COLUMN = "DMS_score"
_LETTERS = re.compile(r"[A-Za-z]+")


def add_score_command(sub, common: argparse.ArgumentParser) -> None:
    """Add the ``score`` subcommand to ``sub`` (the ``esmc`` subparsers)."""
    p = sub.add_parser("score", parents=[common], help="variant-effect scores (ProteinGym CSV)")
    p.add_argument("wild_type", help="wild-type sequence, or a FASTA file (first record or --id)")
    p.add_argument("--id", help="which record of the FASTA file is the wild type "
                   "(default: the first)")
    p.add_argument("--variants", type=Path,
                   help="CSV with a 'mutant' column (ProteinGym DMS file); "
                   "default: every single substitution")
    p.add_argument("--method", choices=SCORING_METHODS, default="masked-marginals",
                   help="how a variant is scored")
    p.add_argument("--joint-masking", action="store_true",
                   help="masked-marginals: mask all positions of a multi-mutant together")
    p.add_argument("--normalization", choices=SCORING_NORMALIZATIONS, default="full",
                   help="log_softmax over the 64 logits (full) or the 20 amino acids")
    p.add_argument("--offset", type=int, default=0,
                   help="subtracted from every position (positions are 1-based)")
    p.add_argument("--column", default="score", help="name of the score column written")
    p.add_argument("--uppercase", action="store_true",
                   help="upper-case the wild type (lowercase is refused otherwise)")
    p.add_argument("-o", "--output", type=Path, help="CSV to write (default: standard output)")
    p.add_argument("--plot", type=Path,
                   help="draw the site-saturation map to this image (default: no map)")
    p.set_defaults(run=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    wild_type = read_wild_type(args.wild_type, args.id, args.uppercase)
    fields, rows = read_variants(args.variants, wild_type, args.offset)
    with connect(args) as client:
        result = client.score(
            wild_type,
            [row[MUTANT_COLUMN] for row in rows],
            args.method,
            offset=args.offset,
            joint_masking=args.joint_masking,
            normalization=args.normalization,
            saturation_map=args.plot is not None,
            timeout=args.timeout,
        )
    for row, score in zip(rows, result.scores):
        row[args.column] = f"{float(score):.6g}"
    columns = fields + [args.column] if args.column not in fields else fields
    text = write_csv(columns, rows)
    report = sys.stdout
    if args.output is None:
        sys.stdout.write(text)
        report = sys.stderr
    else:
        try:
            args.output.write_text(text)
        except OSError as error:
            raise RunError(f"cannot write {args.output}: {error.strerror or error}") from None
        print(f"wrote {len(rows)} scores to {args.output}", file=sys.stderr)
    if DMS_COLUMN in fields:
        rho, n = spearman_of(rows, DMS_COLUMN, args.column)
        print(f"Spearman rho ({DMS_COLUMN} vs {args.column}, {args.method}): {rho:.4f} "
              f"over {n} variants", file=report)
    if args.plot is not None:
        plot_saturation_map(result, wild_type, args.plot, f"{args.method}", args.offset)
        print(f"wrote the site-saturation map to {args.plot}", file=sys.stderr)
    return EXIT_OK


# -- files ---------------------------------------------------------------------------------


def read_wild_type(text: str, record_id: str | None, uppercase: bool = False) -> str:
    """The wild type: ``text`` itself when it is a sequence, else the FASTA file it names
    (its first record, or the one with id ``record_id``)."""
    path = Path(text)
    if not path.is_file():
        if path.exists():
            raise RunError(f"{text} is not a file (the wild type is a sequence or a FASTA file)")
        if record_id is not None:
            raise RunError(f"--id needs a FASTA file; {text!r} is not a file")
        if not _LETTERS.fullmatch(text.strip()):
            raise RunError(f"{text}: no such file (and not a one-letter protein sequence)")
        return checked_sequence(text.strip(), uppercase, "the wild type")
    try:
        records = list(read_fasta(path, uppercase=uppercase))
    except FastaError as error:
        raise RunError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    if record_id is not None:
        records = [(name, seq) for name, seq in records if name == record_id]
    if not records:
        which = f" with id {record_id!r}" if record_id else ""
        raise RunError(f"no record{which} in {path}")
    name, sequence = records[0]
    if hit := first_lowercase(sequence):
        residue, letter = hit
        raise RunError(f"{name} in {path} contains lowercase letters ({letter!r} at residue "
                       f"{residue + 1}); {UPPERCASE_HINT}")
    return sequence


def read_variants(path: Path | None, wild_type: str, offset: int) -> tuple[list[str], list[dict]]:
    """The CSV's columns and rows, or every single substitution as a one-column table."""
    if path is None:
        mutants = [
            f"{wt}{i + 1 + offset}{aa}"
            for i, wt in enumerate(wild_type)
            for aa in AMINO_ACIDS
            if aa != wt
        ]
        return [MUTANT_COLUMN], [{MUTANT_COLUMN: m} for m in mutants]
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            if MUTANT_COLUMN not in fields:
                raise RunError(f"{path} has no {MUTANT_COLUMN!r} column (its columns: "
                               f"{', '.join(fields) or 'none'})")
            return fields, list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RunError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def write_csv(columns: Sequence[str], rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# -- statistics ----------------------------------------------------------------------------


def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of average-tie ranks (NaN if one is constant)."""
    ra = rank_average(np.asarray(a, dtype=np.float64))
    rb = rank_average(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def spearman_of(rows: Sequence[dict], x: str, y: str) -> tuple[float, int]:
    """rho between columns ``x`` and ``y`` over rows where both are numbers."""
    pairs = []
    for row in rows:
        try:
            a, b = float(row[x]), float(row[y])
        except (TypeError, ValueError):
            continue
        if math.isfinite(a) and math.isfinite(b):
            pairs.append((a, b))
    if len(pairs) < 2:
        return math.nan, len(pairs)
    a, b = zip(*pairs)
    return spearman(a, b), len(pairs)


# -- plot ----------------------------------------------------------------------------------


def plot_saturation_map(
    result: VariantScores, wild_type: str, path: Path, title: str, offset: int = 0
) -> None:
    """Heatmap: amino acids down, positions across, the wild type's cell outlined (0)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RunError(
            f"--plot needs matplotlib: pip install 'esmc-serve[plot]' ({error})"
        ) from None
    table = np.asarray(result.saturation_map, dtype=np.float64).T  # (20, L)
    columns = result.columns
    length = table.shape[1]
    width = min(60.0, max(6.0, 0.18 * length + 2))
    fig, ax = plt.subplots(figsize=(width, 4.8))
    limit = float(np.nanmax(np.abs(table))) or 1.0
    image = ax.imshow(table, aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit,
                      interpolation="nearest")
    ax.set_yticks(range(len(columns)), list(columns))
    step = max(1, length // 40)
    ticks = list(range(0, length, step))
    ax.set_xticks(ticks, [f"{wild_type[i]}{i + 1 + offset}" for i in ticks], rotation=90,
                  fontsize=7)
    rows = [columns.index(a) if a in columns else None for a in wild_type]
    xs = [i for i, r in enumerate(rows) if r is not None]
    ax.scatter(xs, [rows[i] for i in xs], s=4, c="black", marker="s", linewidths=0)
    ax.set_xlabel("position (wild type)")
    ax.set_ylabel("substituted amino acid")
    ax.set_title(f"site-saturation map, {title}: log p(aa) - log p(wt)")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
