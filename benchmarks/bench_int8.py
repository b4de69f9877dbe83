"""What int8 (:mod:`esmc.quantize`) costs in accuracy against float32, on the same weights.

    python -m benchmarks.bench_int8 --fasta ../shared/data/proteome.fasta --threads 2

On the shipped esmc-tiny (trained weights: this is where int8 is judged):

- masked perplexity (:func:`esmc.training.evaluate.masked_perplexity`: 15% of residues masked
  with a fixed seed, proteins cropped to 1,022 residues) on the first ``--limit`` proteins of
  ``--fasta`` (all by default), float32 and int8 on the same masks;
- cosine of each protein's mean embedding, int8 to float32 (mean and worst over proteins);
- Spearman correlation of int8 and float32 variant scores over a saturation map (every single
  substitution, masked marginals) of each of the first ``--wild-types`` proteins.

On the ``--shape`` config with random weights (std 0.02, as ``bench_forward``; their error says
how int8 rounding grows through a deep stack, not what a trained model loses): the relative
error ``max |int8 - fp32| / max |fp32|`` of logits and of the last hidden state, and the mean
embedding's cosine, over the first ``--shape-proteins`` proteins.

Speed is measured elsewhere, with every peer in interleaved rounds: ``bench_peers`` (rows
``int8-one`` / ``int8-packed``) and ``bench_load --dtypes float32,int8``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.bench_forward import build_model
from esmc.inference import run_logits
from esmc.quantize import activation_bits_for, quantize_int8
from esmc.scoring import saturation_map
from esmc.tokenizer import encode
from esmc.types import LogitsConfig

MEAN = LogitsConfig(sequence=False, return_mean_embedding=True)
ALL = LogitsConfig(sequence=True, return_embeddings=True, return_mean_embedding=True)


def perplexities(exact, int8, sequences: list[str]) -> tuple[float, float, int]:
    from esmc.training.data import unigram_log_probs
    from esmc.training.evaluate import masked_perplexity

    unigram = unigram_log_probs(sequences)
    a = masked_perplexity(exact, sequences, unigram)
    b = masked_perplexity(int8, sequences, unigram)
    return a.model, b.model, a.masked_tokens


def mean_embedding_cosines(exact, int8, sequences: list[str], chunk: int = 64) -> list[float]:
    cosines = []
    for start in range(0, len(sequences), chunk):
        tokens = [encode(s) for s in sequences[start : start + chunk]]
        a = run_logits(exact, tokens, [MEAN] * len(tokens))
        b = run_logits(int8, tokens, [MEAN] * len(tokens))
        cosines += [
            float(F.cosine_similarity(x.mean_embedding, y.mean_embedding, dim=-1))
            for x, y in zip(a, b)
        ]
    return cosines


def saturation_spearman(exact, int8, wild_types: list[str]) -> list[float]:
    from scipy.stats import spearmanr

    result = []
    for wild_type in wild_types:
        a = saturation_map(exact, wild_type).flatten()
        b = saturation_map(int8, wild_type).flatten()
        keep = a != 0  # the wild type's own column is 0 in both
        result.append(float(spearmanr(a[keep].numpy(), b[keep].numpy()).statistic))
    return result


def shape_errors(name: str, sequences: list[str], seed: int) -> dict:
    exact = build_model(name, torch.device("cpu"), torch.float32, seed)
    int8 = quantize_int8(copy.deepcopy(exact))
    tokens = [encode(s) for s in sequences]
    a = run_logits(exact, tokens, [ALL] * len(tokens))
    b = run_logits(int8, tokens, [ALL] * len(tokens))

    def rel(x, y):
        return float((x - y).abs().max() / y.abs().max())

    return {
        "logits_rel_err": max(rel(y.logits.sequence, x.logits.sequence) for x, y in zip(a, b)),
        "embeddings_rel_err": max(rel(y.embeddings, x.embeddings) for x, y in zip(a, b)),
        "mean_embedding_cosine_min": min(
            float(F.cosine_similarity(x.mean_embedding, y.mean_embedding, dim=-1))
            for x, y in zip(a, b)
        ),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="esmc-tiny", help="trained weights to judge")
    parser.add_argument("--fasta", default="../shared/data/proteome.fasta")
    parser.add_argument("--limit", type=int, default=None, help="first N proteins (default all)")
    parser.add_argument("--wild-types", type=int, default=3, help="saturation maps scored")
    parser.add_argument("--max-wild-type", type=int, default=300, help="residues, cropped")
    parser.add_argument("--shape", default="esmc-300m", help="random-weight shape ('' skips)")
    parser.add_argument("--shape-proteins", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=None, choices=[7, 8],
                        help="default: by the CPU (8 with VNNI/AMX, else 7)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    from esmc import ESMC

    bits = args.activation_bits or activation_bits_for()
    exact = ESMC.from_pretrained(args.model, device="cpu", dtype=torch.float32).eval()
    int8 = quantize_int8(copy.deepcopy(exact), bits)
    max_residues = exact.config.max_length - 2
    records = common.load_proteins(args.fasta, args.limit)
    fitted, _ = common.fit_to_length(records, max_residues, "crop")
    sequences = [s for _, s in fitted]
    ppl_fp32, ppl_int8, masked = perplexities(exact, int8, sequences)
    cosines = mean_embedding_cosines(exact, int8, sequences)
    wild_types = [s[: args.max_wild_type] for s in sequences[: args.wild_types]]
    spearman = saturation_spearman(exact, int8, wild_types)
    shape = shape_errors(args.shape, sequences[: args.shape_proteins], args.seed) if args.shape else None

    rows = [
        ["masked perplexity, float32", f"{ppl_fp32:.4f}"],
        ["masked perplexity, int8", f"{ppl_int8:.4f} ({100 * (ppl_int8 / ppl_fp32 - 1):+.2f}%)"],
        ["mean-embedding cosine int8 vs float32, mean / worst",
         f"{statistics.fmean(cosines):.5f} / {min(cosines):.5f}"],
        [f"saturation-map Spearman int8 vs float32 ({len(wild_types)} wild types), mean / worst",
         f"{statistics.fmean(spearman):.4f} / {min(spearman):.4f}"],
    ]
    if shape:
        rows += [
            [f"{args.shape} shape (random weights): logits max rel. error",
             f"{shape['logits_rel_err']:.2e}"],
            [f"{args.shape} shape (random weights): last hidden state max rel. error",
             f"{shape['embeddings_rel_err']:.2e}"],
            [f"{args.shape} shape (random weights): mean-embedding cosine, worst",
             f"{shape['mean_embedding_cosine_min']:.5f}"],
        ]
    device = common.device_description(torch.device("cpu"))
    header = [
        f"# int8 vs float32 accuracy: {args.model} (trained), activations {bits}-bit per token",
        f"device: {device}",
        f"workload: {Path(args.fasta).name}, {len(sequences)} proteins, {masked:,} masked "
        f"residues; saturation maps of the first {len(wild_types)} (cropped to "
        f"{args.max_wild_type}); shape errors on the first {args.shape_proteins}",
        common.load_note(load_at_start),
        "",
        common.markdown_table(["measure", "value"], rows, numeric_from=1),
    ]
    payload = {
        "benchmark": "int8",
        "command": "python -m benchmarks.bench_int8 " + " ".join(argv or []),
        "model": args.model, "activation_bits": bits, "device": device,
        "proteins": len(sequences), "masked_residues": masked,
        "perplexity": {"float32": ppl_fp32, "int8": ppl_int8},
        "mean_embedding_cosine": {"mean": statistics.fmean(cosines), "min": min(cosines)},
        "saturation_spearman": spearman, "shape": args.shape, "shape_errors": shape,
        "load": header[3],
    }
    common.emit(header, payload, args.json)
    return payload


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
