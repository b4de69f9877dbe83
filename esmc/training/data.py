"""The training corpus: real proteins from ``../shared/data``, split by protein with a fixed seed."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from esmc.fasta import read_fasta
from esmc.tokenizer import MASK_ID, RESIDUES, TOKEN_TO_ID, encode_ids

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SPLIT_SEED = 20241204
HELDOUT_FRACTION = 0.1
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[str]
    heldout: list[str]


def corpus_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "train").glob("*.fasta")) + [data_dir / "proteome.fasta"]
    missing = [f for f in files if not f.exists()]
    if missing or len(files) < 2:
        raise FileNotFoundError(f"protein data not found under {data_dir} (missing {missing})")
    return files


def load_split(data_dir: Path = DEFAULT_DATA_DIR) -> Split:
    """All unique proteins, shuffled with ``SPLIT_SEED``; the last 10% are held out."""
    seen: set[str] = set()
    sequences: list[str] = []
    for path in corpus_files(Path(data_dir)):
        for _, seq in read_fasta(path):
            if seq and seq not in seen and all(c in RESIDUES for c in seq):
                seen.add(seq)
                sequences.append(seq)
    sequences.sort()
    random.Random(SPLIT_SEED).shuffle(sequences)
    n_heldout = int(len(sequences) * HELDOUT_FRACTION)
    return Split(train=sequences[n_heldout:], heldout=sequences[:n_heldout])


def crop(sequence: str, max_residues: int, rng: random.Random) -> str:
    if len(sequence) <= max_residues:
        return sequence
    start = rng.randrange(len(sequence) - max_residues + 1)
    return sequence[start : start + max_residues]


def mask_for_eval(ids: list[int], rate: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Mask ``rate`` of the residues (at least one); returns (masked ids, masked positions)."""
    positions = list(range(1, len(ids) - 1))
    n = max(1, round(rate * len(positions)))
    chosen = sorted(rng.sample(positions, n))
    masked = list(ids)
    for p in chosen:
        masked[p] = MASK_ID
    return masked, chosen


def unigram_log_probs(sequences: list[str]) -> torch.Tensor:
    """Log-frequencies of each token id over the residues of ``sequences`` (add-one smoothed)."""
    residue_ids = torch.tensor([TOKEN_TO_ID[c] for c in RESIDUES])
    counts = torch.zeros(64, dtype=torch.float64)
    counts[residue_ids] = 1.0
    for seq in sequences:
        ids = torch.tensor(encode_ids(seq)[1:-1])
        counts += torch.bincount(ids, minlength=64).double()
    return (counts / counts.sum()).log()
