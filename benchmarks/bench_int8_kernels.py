"""The int8 matrix-product kernels at hand on this CPU, at a model's projection sizes.

    python -m benchmarks.bench_int8_kernels --config esmc-300m --tokens 384,2900 --threads 2

For ``--tokens`` rows of activations, one pass over the four projections of a block (q;k;v,
out, SwiGLU in, SwiGLU out) with random weights, each way:

- ``float32``: ``F.linear`` (oneDNN/MKL sgemm), the baseline;
- ``ours``: :class:`esmc.quantize.Int8Linear` (per-row activation scales, oneDNN int8 linear,
  activations 8-bit with VNNI/AMX, else 7-bit), quantisation of the activations included;
- ``ao-dynamic``: ``torch.ops.quantized.linear_dynamic`` (what the deprecated
  ``torch.ao.quantization.quantize_dynamic`` runs: fbgemm, one activation scale per tensor,
  so a row's result depends on the other rows; ``reduce_range`` without VNNI);
- ``int-mm``: ``torch._int_mm`` (int8 x int8 -> int32; what torchao's int8 dynamic-activation
  path calls in eager mode), products only, no quantisation.

Timing: ``--rounds`` rounds, ways in shuffled order each round, best kept. Error: ``max |y -
y_fp32| / max |y_fp32|`` over the four outputs.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks import common
from esmc.config import get_config
from esmc.quantize import Int8Linear, activation_bits_for, cpu_has_fast_int8

WAYS = ("float32", "ours", "ao-dynamic", "int-mm")


def projection_shapes(name: str) -> list[tuple[int, int]]:
    """(in, out) of a block's four projections."""
    c = get_config(name)
    return [(c.d_model, 3 * c.d_model), (c.d_model, c.d_model), (c.d_model, 2 * c.ffn_hidden),
            (c.ffn_hidden, c.d_model)]


def make_ways(shapes, tokens: int, bits: int) -> dict[str, Callable[[], list[torch.Tensor]]]:
    torch.manual_seed(0)
    xs = [torch.randn(tokens, k) for k, _ in shapes]
    linears = [torch.nn.Linear(k, n, bias=False) for k, n in shapes]
    ours = [Int8Linear(linear, bits) for linear in linears]
    packed = []
    for linear in linears:
        w = linear.weight.detach()
        scale = (w.abs().amax(1) / 127).double()
        q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                       torch.qint8)
        packed.append(torch.ops.quantized.linear_prepack(q, None))
    codes = [torch.randint(-63, 64, (tokens, k), dtype=torch.int8) for k, _ in shapes]
    weight_codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8).t() for k, n in shapes]
    reduce_range = not cpu_has_fast_int8()
    return {
        "float32": lambda: [F.linear(x, m.weight) for x, m in zip(xs, linears)],
        "ours": lambda: [m(x) for x, m in zip(xs, ours)],
        "ao-dynamic": lambda: [torch.ops.quantized.linear_dynamic(x, p, reduce_range)
                               for x, p in zip(xs, packed)],
        "int-mm": lambda: [torch._int_mm(c, w) for c, w in zip(codes, weight_codes)],
    }


def rel_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outputs, reference))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="esmc-300m")
    parser.add_argument("--tokens", default="384,2900", help="comma-separated row counts")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    ways = common.parse_modes(parser, args.ways, WAYS)
    bits = activation_bits_for()
    shapes = projection_shapes(args.config)
    rows = []
    with torch.inference_mode():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            runs = {w: f for w, f in make_ways(shapes, tokens, bits).items() if w in ways}
            reference = runs["float32"]() if "float32" in runs else None
            errors = {w: None if w == "int-mm" or reference is None else rel_error(f(), reference)
                      for w, f in runs.items()}
            best = {w: float("inf") for w in runs}
            for _ in range(args.rounds):
                for way in random.sample(list(runs), len(runs)):
                    best[way] = min(best[way], common.timed(runs[way], torch.device("cpu")))
            for way in runs:
                speedup = best["float32"] / best[way] if "float32" in best else None
                rows.append({"tokens": tokens, "way": way, "seconds": best[way],
                             "speedup": speedup, "rel_error": errors[way]})
    cells = [[str(r["tokens"]), r["way"], f"{1000 * r['seconds']:.1f}",
              "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
              "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}"] for r in rows]
    header = [
        f"# int8 kernels at {args.config}'s projection sizes {shapes} (one block)",
        f"device: {common.device_description(torch.device('cpu'))}; our activations {bits}-bit",
        f"timing: {args.rounds} rounds, ways shuffled per round, best kept",
        common.load_note(load_at_start),
        "",
        common.markdown_table(["tokens", "way", "ms", "vs float32", "rel. error"], cells),
    ]
    payload = {"benchmark": "int8_kernels", "config": args.config, "bits": bits, "rows": rows,
               "load": header[3], "device": header[1]}
    common.emit(header, payload, args.json)
    return payload


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
