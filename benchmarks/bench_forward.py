"""Forward throughput of one model fed four ways (one per forward, padded in arrival order,
length-sorted padded, packed).

    python -m benchmarks.bench_forward --config esmc-300m --fasta ../shared/data/proteome.fasta \
        --limit 50 --device auto --json out.json

Ways of feeding the same model function, all asking for logits only (no hidden states):

- ``one``: one sequence per forward, as most user scripts do;
- ``padded``: batches of ``--batch-size`` in arrival order, padded (the reference path);
- ``sorted``: length-sorted batches of at most ``--max-batch-tokens`` padded tokens;
- ``packed``: sequences end to end, at most ``--max-batch-tokens`` tokens per forward
  (``ESMC.forward_packed``: varlen flash attention on CUDA, per-sequence SDPA on the CPU);
- ``compiled`` (only when asked): ``packed`` with the block stack compiled
  (:func:`esmc.compiled.compile_blocks`; compiling and its warm-up are not timed).

Weights are random (normal, std 0.02): the cost of a forward does not depend on them. On CUDA
they are cast to bf16 and run under bf16 autocast, as the reference runs on a GPU.

Useful work, counted on real tokens only (BOS and EOS included, padding excluded):
``FLOPs = sum over sequences of (2 * P * n + 4 * n**2 * d * layers)`` where ``P`` is the number of
non-embedding parameters, ``n`` the sequence's tokens and ``d`` the model width (``Q K^T`` and
``A V`` cost ``2 * n**2 * d`` each per layer). TFLOP/s is that divided by the seconds taken.

The run also checks that packed and padded forwards agree on the first arrival-order batch:
the largest over its proteins of ``max |packed - padded| / max |padded|`` on the logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import common
from esmc.runtime import keep_freed_memory
from esmc.batch import TokenBatch
from esmc.config import get_config
from esmc.inference import autocast_for
from esmc import ESMC, ESMCOutput
from esmc.tokenizer import encode

WAYS = ("one", "padded", "sorted", "packed", "compiled")
DEFAULT_WAYS = ("one", "padded", "sorted", "packed")
INIT_STD = 0.02
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Batch = list[int]  # indices into the token list
Forward = Callable[[ESMC, Sequence[torch.Tensor]], ESMCOutput]


# -- model ------------------------------------------------------------------------------------


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> ESMC:
    """A registry config with random weights, allocated once, directly in ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = ESMC(get_config(name))
    model = model.to(dtype).to_empty(device=device)
    init_random(model, seed)
    return model.eval()


@torch.no_grad()
def init_random(model: ESMC, seed: int) -> None:
    """Matrices normal(0, 0.02); norm weights one; biases zero."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, INIT_STD)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def non_embedding_params(model: ESMC) -> int:
    return sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()


def estimate_flops(model: ESMC, lengths: Sequence[int]) -> float:
    """Useful FLOPs of a forward over sequences of ``lengths`` tokens (formula in the docstring)."""
    config = model.config
    params = non_embedding_params(model)
    return sum(2 * params * n + 4 * n * n * config.d_model * config.n_layers for n in lengths)


# -- forwards ---------------------------------------------------------------------------------


def forward_padded(model: ESMC, tokens: Sequence[torch.Tensor]) -> ESMCOutput:
    batch = TokenBatch.pack(tokens, packed=False, device=model.device)
    return batch.forward(model, ())  # logits (B, L, 64)


def forward_packed(model: ESMC, tokens: Sequence[torch.Tensor]) -> ESMCOutput:
    return TokenBatch.pack(tokens, device=model.device).forward(model, ())  # logits (T, 64)


# -- how sequences are grouped into forwards --------------------------------------------------


def one_at_a_time(lengths: Sequence[int]) -> list[Batch]:
    return [[i] for i in range(len(lengths))]


def arrival_batches(lengths: Sequence[int], size: int) -> list[Batch]:
    order = list(range(len(lengths)))
    return [order[i : i + size] for i in range(0, len(order), size)]


def sorted_batches(lengths: Sequence[int], budget: int) -> list[Batch]:
    """Longest first; a batch holds as many as fit ``count * longest <= budget`` (at least one)."""
    batches: list[Batch] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def packed_batches(lengths: Sequence[int], budget: int) -> list[Batch]:
    """Arrival order; a batch holds sequences while their total tokens stay within ``budget``."""
    batches: list[Batch] = []
    total = 0
    for i, n in enumerate(lengths):
        if batches and total + n <= budget:
            batches[-1].append(i)
            total += n
        else:
            batches.append([i])
            total = n
    return batches


def plan(way: str, lengths: Sequence[int], args: argparse.Namespace) -> tuple[list[Batch], Forward]:
    if way == "one":
        return one_at_a_time(lengths), forward_padded
    if way == "padded":
        return arrival_batches(lengths, args.batch_size), forward_padded
    if way == "sorted":
        return sorted_batches(lengths, args.max_batch_tokens), forward_padded
    return packed_batches(lengths, args.max_batch_tokens), forward_packed


def describe(way: str, args: argparse.Namespace, device: torch.device) -> str:
    budget = f"{args.max_batch_tokens:,}"
    if way == "one":
        return "one sequence per forward"
    if way == "padded":
        return f"batches of {args.batch_size} in arrival order, padded (reference path)"
    if way == "sorted":
        return f"length-sorted batches of <= {budget} padded tokens"
    attention = "varlen flash attention" if device.type == "cuda" else "per-sequence SDPA"
    how = "`torch.compile` of the block stack" if way == "compiled" else "eager"
    return f"packed end to end, <= {budget} tokens per forward, {attention}, {how}"


# -- measuring --------------------------------------------------------------------------------


def measure(
    model: ESMC, tokens: Sequence[torch.Tensor], batches: list[Batch], forward: Forward
) -> tuple[float, float | None]:
    """Seconds for all ``batches`` after one warm-up forward, and peak device memory (GiB)."""
    device = model.device
    common.reset_peak_memory(device)

    def run(selected: list[Batch]) -> None:
        with torch.inference_mode(), autocast_for(model):
            for batch in selected:
                forward(model, [tokens[i] for i in batch])

    run(batches[:1])  # warm-up
    seconds = common.timed(lambda: run(batches), device)
    return seconds, common.peak_memory_gib(device)


def way_model(model: ESMC, way: str) -> ESMC:
    """``model``, or for ``compiled`` a shallow copy sharing its weights, compiled and warmed up."""
    if way != "compiled":
        return model
    import copy

    from esmc.compiled import compile_blocks

    return compile_blocks(copy.copy(model), warmup=("packed",))


def packed_vs_padded_error(model: ESMC, tokens: Sequence[torch.Tensor]) -> float:
    """Largest per-protein ``max |packed - padded| / max |padded|`` of the logits of ``tokens``."""
    with torch.inference_mode(), autocast_for(model):
        padded = forward_padded(model, tokens).sequence_logits.float()  # (B, L, 64)
        packed = forward_packed(model, tokens).sequence_logits.float()  # (T, 64)
    per_protein = zip(
        TokenBatch.pack(tokens, device="cpu").split(packed),
        TokenBatch.pack(tokens, packed=False, device="cpu").split(padded),
    )
    worst = 0.0
    for ours, reference in per_protein:
        worst = max(worst, float((ours - reference).abs().max() / reference.abs().max()))
    return worst


def result_row(
    way: str, *, description: str, batches: list[Batch], lengths: Sequence[int],
    seconds: float, flops: float, peak: float | None,
) -> dict:
    proteins = sum(len(b) for b in batches)
    return {
        "way": way,
        "description": description,
        "forwards": len(batches),
        "proteins": proteins,
        "tokens": sum(lengths),
        "seconds": seconds,
        "proteins_per_s": proteins / seconds,
        "tokens_per_s": sum(lengths) / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "peak_gib": peak,
    }


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="esmc-tiny", help="registry name (random weights)")
    parser.add_argument("--fasta", default="../shared/data/proteome.fasta")
    parser.add_argument("--limit", type=int, default=None, help="first N proteins only")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="weights dtype; auto: bfloat16 on CUDA (under bf16 autocast), float32 on the CPU",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per padded batch")
    parser.add_argument(
        "--ways", default=",".join(DEFAULT_WAYS), help=f"comma-separated subset of {WAYS}"
    )
    parser.add_argument(
        "--long", default="crop", choices=common.LONG_POLICIES,
        help="sequences over the model's limit: crop them (default) or skip them",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = set(args.ways) - set(WAYS)
    if unknown or not args.ways:
        parser.error(f"--ways must be a subset of {WAYS}, got {args.ways}")
    return args


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def table_lines(config_name: str, rows: list[dict]) -> list[str]:
    baseline = next((r["proteins_per_s"] for r in rows if r["way"] == "one"), None)
    headers = ["model", "how the sequences are fed", "proteins/s", "tokens/s", "TFLOP/s",
               "peak GiB", "speedup vs one-at-a-time"]
    cells = []
    for r in rows:
        speedup = f"{r['proteins_per_s'] / baseline:.1f}x" if baseline else "-"
        cells.append([
            config_name, r["description"], common.format_number(r["proteins_per_s"]),
            common.format_number(round(r["tokens_per_s"])), common.format_number(r["tflops_per_s"]),
            common.format_number(r["peak_gib"], 2) if r["peak_gib"] is not None else "-", speedup,
        ])
    return [common.markdown_table(headers, cells)]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    keep_freed_memory()
    device = common.resolve_device(args.device)
    dtype = weights_dtype(args.dtype, device)
    model = build_model(args.config, device, dtype, args.seed)
    max_residues = model.config.max_length - 2

    records = common.load_proteins(args.fasta, args.limit)
    fitted, changed = common.fit_to_length(records, max_residues, args.long)
    tokens = [encode(sequence) for _, sequence in fitted]
    lengths = [int(t.shape[0]) for t in tokens]

    error = packed_vs_padded_error(model, tokens[: args.batch_size])
    rows = []
    for way in args.ways:
        batches, forward = plan(way, lengths, args)
        seconds, peak = measure(way_model(model, way), tokens, batches, forward)
        rows.append(result_row(
            way, description=describe(way, args, device), batches=batches, lengths=lengths,
            seconds=seconds, flops=estimate_flops(model, lengths), peak=peak,
        ))

    autocast = "bf16 autocast" if device.type == "cuda" else "no autocast"
    params = sum(p.numel() for p in model.parameters())
    header = [
        f"# {args.config}: forward throughput, random weights "
        f"({params / 1e6:.1f}M parameters, {non_embedding_params(model) / 1e6:.1f}M non-embedding)",
        f"device: {common.device_description(device)}; weights {str(dtype).removeprefix('torch.')}, "
        f"{autocast}",
        f"workload: {Path(args.fasta).name}, {len(fitted)} proteins, {sum(lengths):,} tokens "
        f"(BOS/EOS included), median {statistics.median(lengths):.0f}, longest {max(lengths):,}",
        common.long_sequence_note(args.long, changed, len(records), max_residues),
        f"packed vs padded logits, first batch of {min(args.batch_size, len(tokens))}: "
        f"max relative error {error:.2e}",
        "TFLOP/s: (2 * non-embedding params * tokens + 4 * L^2 * d * layers per sequence) / s",
        common.load_note(load_at_start),
        "",
    ]
    payload = {
        "benchmark": "forward",
        "config": args.config,
        "device": common.device_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": "bfloat16" if device.type == "cuda" else None,
        "parameters": params,
        "non_embedding_parameters": non_embedding_params(model),
        "fasta": str(args.fasta),
        "proteins": len(fitted),
        "tokens": sum(lengths),
        "long_sequences": {"policy": args.long, "max_residues": max_residues, "affected": changed},
        "max_batch_tokens": args.max_batch_tokens,
        "batch_size": args.batch_size,
        "packed_vs_padded_max_rel_error": error,
        "rows": rows,
    }
    common.emit(header + table_lines(args.config, rows), payload, args.json)
    return payload


if __name__ == "__main__":
    main()
