"""Masked-token perplexity of a model on held-out proteins, next to the uniform and unigram
baselines. ``python -m esmc.training.evaluate`` prints the model card's table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random

import torch

from esmc.batch import TokenBatch
from esmc.pretrained import ESMC
from esmc.training.data import (
    DEFAULT_DATA_DIR,
    crop,
    load_split,
    mask_for_eval,
    unigram_log_probs,
)
from esmc.tokenizer import encode_ids

EVAL_SEED = 7
EVAL_MASK_RATE = 0.15
EVAL_MAX_RESIDUES = 1022


@dataclasses.dataclass(frozen=True)
class PerplexityReport:
    proteins: int
    masked_tokens: int
    model: float
    unigram: float
    uniform: float = 20.0


@torch.no_grad()
def masked_perplexity(
    model: ESMC,
    heldout: list[str],
    unigram: torch.Tensor,
    *,
    batch_tokens: int = 16384,
) -> PerplexityReport:
    """Mask 15% of each protein's residues (fixed seed) and score the true tokens there."""
    rng = random.Random(EVAL_SEED)
    examples = []
    for seq in heldout:
        ids = encode_ids(crop(seq, EVAL_MAX_RESIDUES, rng))
        masked, positions = mask_for_eval(ids, EVAL_MASK_RATE, rng)
        examples.append((ids, masked, positions))
    model_nll = unigram_nll = 0.0
    count = 0
    batch: list = []
    for i, example in enumerate(examples):
        batch.append(example)
        if sum(len(e[0]) for e in batch) >= batch_tokens or i == len(examples) - 1:
            nll_m, nll_u, n = _score_batch(model, batch, unigram)
            model_nll, unigram_nll, count = model_nll + nll_m, unigram_nll + nll_u, count + n
            batch = []
    return PerplexityReport(
        proteins=len(examples),
        masked_tokens=count,
        model=math.exp(model_nll / count),
        unigram=math.exp(unigram_nll / count),
    )


def _score_batch(model: ESMC, batch: list, unigram: torch.Tensor) -> tuple[float, float, int]:
    device = model.device
    packed = TokenBatch.pack(
        [torch.tensor(masked, dtype=torch.long) for _, masked, _ in batch], device=device
    )
    out = packed.forward(model)
    log_probs = out.sequence_logits.float().log_softmax(-1)  # (T, 64)
    offsets = packed.offsets()
    flat_positions = [o + p for o, (_, _, ps) in zip(offsets, batch) for p in ps]
    targets = torch.tensor([ids[p] for ids, _, ps in batch for p in ps], device=device)
    model_nll = -log_probs[flat_positions, targets].sum().item()
    unigram_nll = -unigram[targets.cpu()].sum().item()
    return model_nll, unigram_nll, len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="esmc-tiny", help="name or path of the weights")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out")
    args = parser.parse_args()
    torch.manual_seed(0)
    split = load_split(args.data_dir)
    model = ESMC.from_pretrained(args.model, device="cpu").eval()
    heldout = split.heldout[: args.limit] if args.limit else split.heldout
    report = masked_perplexity(model, heldout, unigram_log_probs(split.train))
    print(f"held-out proteins: {report.proteins}, masked tokens scored: {report.masked_tokens}")
    print("| predictor | masked-token perplexity |")
    print("|---|---:|")
    print(f"| uniform over 20 amino acids | {report.uniform:.2f} |")
    print(f"| unigram (training frequencies) | {report.unigram:.2f} |")
    print(f"| {args.model} | {report.model:.2f} |")
    print(json.dumps(dataclasses.asdict(report)))


if __name__ == "__main__":
    main()
