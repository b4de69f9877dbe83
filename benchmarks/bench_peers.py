"""This project's ESMC side by side with the official ``esm`` package, ``transformers``, ``faesm``.

    python -m benchmarks.bench_peers --config esmc-300m --dtype float32 --device cpu \
        --fasta ../shared/data/proteome.fasta --proteins 8 --threads 2 --rounds 3

Every model holds the same random weights (ours drawn like ``bench_forward``'s, then handed to
the official ``esm`` ESMC in its own legacy layout and to ``transformers``' EsmcForMaskedLM
through the project's layout rules, :data:`esmc.weights.RULES`), in ``--dtype``, on ``--device``,
and runs the same proteins (the first ``--proteins`` of the FASTA file). Rows (``--ways``):

- ``esm-one`` / ``esm-batch``: the official ``esm`` ESMC, one protein per forward / padded
  batches of ``--batch-size`` in arrival order (what a user of that package would run);
- ``hf-one`` / ``hf-batch``: ``transformers`` EsmcForMaskedLM (SDPA attention), the same two ways;
- ``faesm-one`` / ``faesm-batch``: ``faesm``'s ESMC (SDPA on the CPU, flash attention on CUDA
  where ``flash_attn`` is installed), the same two ways (:func:`benchmarks.peers.faesm_esmc`);
- ``esmc-one``: this project, one protein per forward (padded forward of one row);
- ``esmc-packed``: this project, packed end to end, at most ``--max-batch-tokens`` per forward
  (what the server runs); ``esmc-padded``: padded batches of ``--batch-size`` (optional);
- ``int8-one`` / ``int8-packed``: this project in int8 (:mod:`esmc.quantize`), one protein per
  forward / packed like ``esmc-packed``; float32 CPU runs only (dropped from others);
- ``esmc-compiled``: ``esmc-packed`` with the block stack compiled (:mod:`esmc.compiled`;
  compile and warm-up happen before the timed rounds and are not timed);
- ``ceiling-one`` / ``ceiling-packed``: only the projection matmuls of every layer (q;k;v, out,
  SwiGLU in, SwiGLU out) with the model's weights, on the same tokens fed one protein at a time
  / in the packed batches. A row's "of ceiling" divides its residues/s by the ceiling fed the
  same way (one-at-a-time rows by ``ceiling-one``, batched rows by ``ceiling-packed``).

Timing: ``--rounds`` rounds; each runs every row once over all proteins, rows in a freshly
shuffled order (a shared machine drifts: timing rows one after the other misleads). The best
and the median of each row's round times are kept; the table reports the best. One untimed
warm-up forward per row (the first protein) comes first.

Agreement: ``max |logits - reference| / max |reference|`` over the residues of every protein
(worst protein), the reference being the official ``esm`` ESMC in float32, one protein per
forward, on the same weights (in a bfloat16 run that model is built beside the bf16 ones).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.bench_forward import DTYPES, build_model, packed_batches
from benchmarks.peers import faesm_esmc, int8_esmc, official_esmc, transformers_esmc
from esmc import ESMC
from esmc.quantize import is_int8
from esmc.tokenizer import PAD_ID, encode

WAYS = (
    "esm-one", "esm-batch", "hf-one", "hf-batch", "faesm-one", "faesm-batch", "esmc-one",
    "esmc-packed", "esmc-padded", "esmc-compiled", "int8-one", "int8-packed", "ceiling-one",
    "ceiling-packed",
)
DEFAULT_WAYS = (
    "esm-one", "esm-batch", "hf-one", "hf-batch", "faesm-one", "faesm-batch", "esmc-one",
    "esmc-packed", "int8-one", "int8-packed", "ceiling-one", "ceiling-packed",
)
DESCRIPTIONS = {
    "esm-one": "official `esm` ESMC, one protein per forward",
    "esm-batch": "official `esm` ESMC, padded batches of {batch} in arrival order",
    "hf-one": "`transformers` EsmcForMaskedLM, one protein per forward",
    "hf-batch": "`transformers` EsmcForMaskedLM, padded batches of {batch}",
    "faesm-one": "`faesm` ESMC, one protein per forward",
    "faesm-batch": "`faesm` ESMC, padded batches of {batch}",
    "esmc-one": "this project's `esmc`, one protein per forward",
    "esmc-packed": "this project's `esmc`, packed, <= {budget} tokens per forward",
    "esmc-padded": "this project's `esmc`, padded batches of {batch}",
    "esmc-compiled": "this project's `esmc`, packed, compiled block stack",
    "int8-one": "this project's `esmc` in int8, one protein per forward",
    "int8-packed": "this project's `esmc` in int8, packed, <= {budget} tokens per forward",
    "ceiling-one": "projection matmuls alone, one protein at a time (ceiling)",
    "ceiling-packed": "projection matmuls alone, the packed batches (ceiling)",
}

Run = Callable[[], list[torch.Tensor] | None]  # one pass over all proteins: per-protein logits


# -- one pass over the proteins, per way --------------------------------------------------------


def padded(tokens: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    batch = torch.nn.utils.rnn.pad_sequence(list(tokens), batch_first=True, padding_value=PAD_ID)
    return batch.to(device)


def batches_of(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def unpad(logits: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return [logits[b, :n].float().cpu() for b, n in enumerate(lengths)]


def make_runs(ways, models, tokens, args, device) -> dict[str, Run]:
    ours, esm_model, hf_model = models["esmc"], models.get("esm"), models.get("hf")
    lengths = [int(t.shape[0]) for t in tokens]
    groups = batches_of(len(tokens), args.batch_size)
    packs = packed_batches(lengths, args.max_batch_tokens)

    def esm_run(group_list):
        out = []
        for g in group_list:
            batch = padded([tokens[i] for i in g], device)
            logits = esm_model(sequence_tokens=batch).sequence_logits
            out += unpad(logits, [lengths[i] for i in g])
        return out

    def faesm_run(group_list):
        out = []
        for g in group_list:
            logits = models["faesm"](padded([tokens[i] for i in g], device)).sequence_logits
            out += unpad(logits, [lengths[i] for i in g])
        return out

    def hf_run(group_list):
        out = []
        for g in group_list:
            batch = padded([tokens[i] for i in g], device)
            logits = hf_model(input_ids=batch, attention_mask=(batch != PAD_ID).long()).logits
            out += unpad(logits, [lengths[i] for i in g])
        return out

    def esmc_padded_run(group_list, model=ours):
        out = []
        for g in group_list:
            logits = model(padded([tokens[i] for i in g], device), hidden_layers=()).sequence_logits
            out += unpad(logits, [lengths[i] for i in g])
        return out

    def esmc_packed_run(model_forward):
        out = []
        for g in packs:
            flat = torch.cat([tokens[i] for i in g]).to(device)
            cu = torch.zeros(len(g) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor([lengths[i] for i in g]).cumsum(0)
            logits = model_forward(flat, cu.to(device), max(lengths[i] for i in g)).sequence_logits
            out += [part.float().cpu() for part in logits.split([lengths[i] for i in g])]
        return out

    singles = [[i] for i in range(len(tokens))]
    runs: dict[str, Run] = {
        "esm-one": lambda: esm_run(singles),
        "esm-batch": lambda: esm_run(groups),
        "hf-one": lambda: hf_run(singles),
        "hf-batch": lambda: hf_run(groups),
        "faesm-one": lambda: faesm_run(singles),
        "faesm-batch": lambda: faesm_run(groups),
        "int8-one": lambda: esmc_padded_run(singles, models.get("int8")),
        "int8-packed": lambda: esmc_packed_run(models["int8"].forward_packed),
        "esmc-one": lambda: esmc_padded_run(singles),
        "esmc-padded": lambda: esmc_padded_run(groups),
        "esmc-packed": lambda: esmc_packed_run(ours.forward_packed),
        "ceiling-one": lambda: ceiling(ours, [[n] for n in lengths]),
        "ceiling-packed": lambda: ceiling(ours, [[lengths[i] for i in g] for g in packs]),
    }
    if "esmc-compiled" in ways:
        runs["esmc-compiled"] = lambda: esmc_packed_run(models["compiled"])
    return {w: runs[w] for w in ways}


def projection_weights(model: ESMC) -> list[list[torch.Tensor]]:
    return [
        [b.attn.layernorm_qkv[1].weight, b.attn.out_proj.weight, b.ffn[1].weight, b.ffn[3].weight]
        for b in model.transformer.blocks
    ]


def ceiling(model: ESMC, groups: list[list[int]]) -> None:
    """Only the projection matmuls of every layer, for ``groups`` of token counts per forward."""
    d, h = model.config.d_model, model.config.ffn_hidden
    weights = projection_weights(model)
    for group in groups:
        x = torch.randn(sum(group), d, device=model.device, dtype=model.dtype)
        act = torch.randn(sum(group), h, device=model.device, dtype=model.dtype)
        for qkv, out, ffn_in, ffn_out in weights:
            F.linear(x, qkv)
            F.linear(x, out)
            F.linear(x, ffn_in)
            F.linear(act, ffn_out)
    return None


# -- measuring ----------------------------------------------------------------------------------


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Worst protein's ``max |ours - ref| / max |ref|`` over its residues (BOS/EOS excluded)."""
    worst = 0.0
    for ours, ref in zip(outputs, reference):
        ours, ref = ours[1:-1].double(), ref[1:-1].double()
        worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
    return worst


def measure(runs: dict[str, Run], warmups: dict[str, Run], rounds: int, device, seed: int):
    """Warm up every row on one protein, then ``rounds`` shuffled rounds over all proteins.

    Returns per row its round times and the logits of its first round.
    """
    rng = random.Random(seed)
    times: dict[str, list[float]] = {w: [] for w in runs}
    outputs: dict[str, list[torch.Tensor] | None] = {}
    with torch.inference_mode():
        for warmup in warmups.values():
            warmup()
        for r in range(rounds):
            order = list(runs)
            rng.shuffle(order)
            for way in order:
                result = []
                times[way].append(common.timed(lambda: result.append(runs[way]()), device))
                outputs.setdefault(way, result[0])
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{w} {times[w][-1]:.2f}s" for w in order), flush=True)
    return times, outputs


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="esmc-300m", help="registry name (random weights)")
    parser.add_argument("--fasta", default="../shared/data/proteome.fasta")
    parser.add_argument("--proteins", type=int, default=8, help="the first N proteins of --fasta")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="proteins per padded batch")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="packed budget")
    parser.add_argument("--ways", default=",".join(DEFAULT_WAYS), help=f"subset of {WAYS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line added under the table's heading")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.ways = common.parse_modes(parser, args.ways, WAYS)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type != "cpu" or dtype != torch.float32:  # int8 quantises float32 on the CPU
        args.ways = [w for w in args.ways if not w.startswith("int8-")]
    records = common.load_proteins(args.fasta, args.proteins)
    max_residues = build_config_limit(args.config)
    fitted, changed = common.fit_to_length(records, max_residues, "crop")
    tokens = [encode(sequence) for _, sequence in fitted]
    residues = sum(len(s) for _, s in fitted)

    start = time.perf_counter()
    reference_ours = build_model(args.config, device, torch.float32, args.seed)
    reference = official_esmc(reference_ours)
    with torch.inference_mode():
        expected = [
            reference(sequence_tokens=t[None].to(device)).sequence_logits[0].float().cpu()
            for t in tokens
        ]
    if dtype == torch.float32:
        models = {"esmc": reference_ours}
    else:
        del reference
        models = {"esmc": reference_ours.to(dtype)}
    models["esm"] = official_esmc(models["esmc"]) if any(w.startswith("esm-") for w in args.ways) else None
    models["hf"] = transformers_esmc(models["esmc"]) if any(w.startswith("hf-") for w in args.ways) else None
    if any(w.startswith("faesm-") for w in args.ways):
        models["faesm"] = faesm_esmc(models["esmc"])
    if any(w.startswith("int8-") for w in args.ways):
        models["int8"] = int8_esmc(models["esmc"])
    if "esmc-compiled" in args.ways:
        from esmc.compiled import compile_blocks

        compiled = compile_blocks(copy.copy(models["esmc"]))  # shares the weights, not the flag
        models["compiled"] = compiled.forward_packed
    setup_s = time.perf_counter() - start

    runs = make_runs(args.ways, models, tokens, args, device)
    warmups = make_runs(args.ways, models, tokens[:1], args, device)
    times, outputs = measure(runs, warmups, args.rounds, device, args.seed)
    rows = []
    for way in args.ways:
        best, median = min(times[way]), statistics.median(times[way])
        rows.append({
            "way": way,
            "description": DESCRIPTIONS[way].format(
                batch=min(args.batch_size, len(tokens)), budget=f"{args.max_batch_tokens:,}"),
            "best_s": best,
            "median_s": median,
            "rounds_s": times[way],
            "residues_per_s": residues / best,
            "proteins_per_s": len(tokens) / best,
            "agreement": None if outputs[way] is None else agreement(outputs[way], expected),
        })
    by_way = {r["way"]: r for r in rows}
    for r in rows:
        ceiling_way = "ceiling-one" if r["way"].endswith("-one") else "ceiling-packed"
        c = by_way.get(ceiling_way)
        r["of_ceiling"] = r["residues_per_s"] / c["residues_per_s"] if c else None

    header = [
        f"# {args.config}: this project vs the official `esm` package, `transformers`, `faesm`, "
        f"{args.dtype} weights, {device.type}",
        f"device: {common.device_description(device)}",
        f"workload: first {len(tokens)} proteins of {Path(args.fasta).name}, {residues:,} residues"
        f" ({changed} cropped to {max_residues}); same random weights (seed {args.seed}) in every "
        "model",
        f"timing: {args.rounds} interleaved rounds in shuffled order after a warm-up forward per "
        "row; best round kept (median beside it)",
        "agreement: worst protein's max |logits - ref| / max |ref| over residues; ref = official "
        "`esm` in float32, one protein per forward",
    ]
    header.append(common.load_note(load_at_start))
    if args.note:
        header.append(args.note)
    header += ["", *table_lines(rows), ""]
    payload = {
        "benchmark": "peers",
        "command": "python -m benchmarks.bench_peers " + " ".join(argv or []),
        "load": common.load_note(load_at_start),
        "config": args.config,
        "dtype": args.dtype,
        "weights_dtypes": {  # what each model really holds (loading keeps a module's dtype)
            name: "int8" if is_int8(m) else str(next(m.parameters()).dtype).removeprefix("torch.")
            for name, m in models.items() if isinstance(m, torch.nn.Module)
        },
        "device": common.device_description(device),
        "proteins": len(tokens),
        "residues": residues,
        "rounds": args.rounds,
        "setup_s": setup_s,
        "rows": rows,
    }
    common.emit(header, payload, args.json)
    return payload


def build_config_limit(name: str) -> int:
    from esmc.config import get_config

    return get_config(name).max_length - 2


def table_lines(rows: list[dict]) -> list[str]:
    headers = ["row", "how", "residues/s", "proteins/s", "best s", "median s", "of ceiling",
               "logits vs fp32 ref"]
    cells = []
    for r in rows:
        cells.append([
            r["way"], r["description"], common.format_number(r["residues_per_s"]),
            common.format_number(r["proteins_per_s"]), f"{r['best_s']:.2f}",
            f"{r['median_s']:.2f}",
            "-" if r["of_ceiling"] is None else f"{r['of_ceiling']:.2f}",
            "-" if r["agreement"] is None else f"{r['agreement']:.1e}",
        ])
    return [common.markdown_table(headers, cells)]


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
