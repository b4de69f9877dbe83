"""Scoring benchmark: the full site-saturation map (19 x L single substitutions) of proteome
proteins by masked marginals, three ways on the same weights.

    python -m benchmarks.bench_scoring --model esmc-tiny --proteins 8 --max-residues 400 \
        --json benchmarks/results/scoring_esmc-tiny_cpu.json

- ``reference``: what a script does: one forward per masked copy (L forwards per protein,
  each a (1, L+2) padded forward of this project's ESMC), ``log_softmax`` over the 64 logits;
- ``packed``: ``esmc.scoring.saturation_map`` in this process: the plan's L copies packed end
  to end into forwards of at most ``--max-batch-tokens`` tokens;
- ``served``: ``client.saturation_map`` against ``esmc serve`` in its own process (the copies
  are ordinary work items of its batcher), ``--concurrency`` proteins in flight.

The first ``--proteins`` proteins of the FASTA file (file order) no longer than
``--max-residues`` are used. Every mode runs ``--rounds`` times, the modes in a shuffled order
each round (interleaved: a shared machine drifts), and its best round is reported: proteins/s,
variants/s (19 x L per protein), masked copies/s and the forwards it took (the server's
``esmc_forwards_total``). The maps of every mode are compared with the reference's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from esmc import scoring
from esmc import ESMC
from esmc.tokenizer import MASK_ID, TOKEN_TO_ID, encode

MODES = ("reference", "packed", "served")
AA_IDS = [TOKEN_TO_ID[a] for a in scoring.AMINO_ACIDS]


def reference_map(model: ESMC, sequence: str) -> np.ndarray:
    """One forward per masked copy, as a user script does: (L, 20)."""
    tokens = encode(sequence)
    table = np.zeros((len(sequence), 20), dtype=np.float32)
    with torch.no_grad():
        for i, wt in enumerate(sequence):
            masked = tokens.clone()
            masked[i + 1] = MASK_ID
            logits = model(masked[None]).sequence_logits[0, i + 1].float()
            lp = torch.log_softmax(logits, -1)
            table[i] = (lp[AA_IDS] - lp[TOKEN_TO_ID[wt]]).numpy()
    return table


def run_in_process(mode: str, model: ESMC, sequences: list[str], batch_tokens: int) -> tuple:
    forwards = 0
    maps = []
    start = time.perf_counter()
    for s in sequences:
        if mode == "reference":
            maps.append(reference_map(model, s))
            forwards += len(s)
        else:
            plan = scoring.plan_scores(s, [], saturation_map=True)
            forwards += len(scoring.pack_copies(plan, batch_tokens))
            maps.append(scoring.run_plan(model, plan, max_batch_tokens=batch_tokens)
                        .saturation_map.numpy())
    return time.perf_counter() - start, maps, forwards


async def run_served(target: str, sequences: list[str], concurrency: int, metrics_url: str):
    """Timed maps over one client; the server's counters are read after an untimed call that
    opens the connection, so they count the timed maps only."""
    from esmc_client import AsyncESMCClient

    gate = asyncio.Semaphore(concurrency)
    async with AsyncESMCClient(target) as client:
        await client.saturation_map(sequences[0][:8])  # connection opens, untimed
        before = common.scrape_metrics(metrics_url)

        async def one(s: str) -> np.ndarray:
            async with gate:
                return await client.saturation_map(s, timeout=3600)

        start = time.perf_counter()
        maps = await asyncio.gather(*(one(s) for s in sequences))
        return time.perf_counter() - start, list(maps), before


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_served_model_arguments(parser)
    parser.add_argument("--proteins", type=int, default=8)
    parser.add_argument("--max-residues", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads here and OMP_NUM_THREADS of the server")
    parser.add_argument("--concurrency", type=int, default=2, help="served: proteins in flight")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="what else the machine ran, for the heading")
    args = parser.parse_args(argv)
    args.modes = common.parse_modes(parser, args.modes, MODES)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [
        (name, s) for name, s in common.load_proteins(args.fasta)
        if len(s) <= args.max_residues and set(s) <= set(scoring.AMINO_ACIDS)
    ][: args.proteins]
    sequences = [s for _, s in records]
    batch_tokens = args.max_batch_tokens or 4096
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        weights, weights_note = common.weights_to_serve(
            args.model, args.weights, Path(directory), args.seed
        )
        model = ESMC.from_pretrained(weights).eval()
        # One map is one unary call; on a CPU with a big model it can outlast the server's
        # default connection age + grace (300 + 60 s), after which the call would be cut and
        # retried: give calls in flight at GOAWAY an hour.
        options = ["--no-warmup", "--max-batch-tokens", str(batch_tokens), "--device", "cpu",
                   "--max-connection-age-grace-s", "3600"]
        with common.serve(weights, options, threads=args.threads) as served:
            reference_maps = None
            order = list(args.modes)
            rng = random.Random(args.seed)
            for round_index in range(args.rounds):
                rng.shuffle(order)
                for mode in order:
                    if mode == "served":
                        seconds, maps, before = asyncio.run(run_served(
                            served.target, sequences, args.concurrency, served.metrics_url
                        ))
                        after = common.scrape_metrics(served.metrics_url)
                        counts = common.counter_deltas(
                            before, after, ["esmc_forwards_total", "esmc_sequences_total"]
                        )
                        forwards = counts["esmc_forwards_total"]
                        # a retried call would compute its copies twice: show it
                        print(f"  server computed {counts['esmc_sequences_total']} copies",
                              flush=True)
                    else:
                        seconds, maps, forwards = run_in_process(
                            mode, model, sequences, batch_tokens
                        )
                    if mode == "reference" and reference_maps is None:
                        reference_maps = maps
                    row = best.get(mode)
                    if row is None or seconds < row["seconds"]:
                        best[mode] = {"seconds": seconds, "forwards": forwards, "maps": maps,
                                      "round": round_index}
                    print(f"round {round_index + 1} {mode}: {seconds:.2f} s", flush=True)
    residues = sum(len(s) for s in sequences)
    rows = []
    for mode in args.modes:
        r = best[mode]
        diff = None
        if reference_maps is not None:
            diff = max(float(np.abs(a - b).max()) for a, b in zip(r["maps"], reference_maps))
        rows.append({
            "mode": mode,
            "seconds": r["seconds"],
            "proteins_per_s": len(sequences) / r["seconds"],
            "variants_per_s": 19 * residues / r["seconds"],
            "copies_per_s": residues / r["seconds"],
            "forwards": r["forwards"],
            "max_abs_diff_vs_reference": diff,
        })
    payload = {
        "benchmark": "scoring (site-saturation map by masked marginals)",
        "model": args.model,
        "weights": weights_note,
        "device": common.device_description(torch.device("cpu")),
        "threads": args.threads,
        "max_batch_tokens": batch_tokens,
        "concurrency": args.concurrency,
        "fasta": str(args.fasta),
        "proteins": len(sequences),
        "residues": residues,
        "variants": 19 * residues,
        "rounds": args.rounds,
        "note": args.note,
        "rows": rows,
    }
    common.emit(table_lines(payload), payload, args.json)
    return payload


def table_lines(payload: dict) -> list[str]:
    lines = [
        f"## Site-saturation maps by masked marginals: {payload['model']}, CPU",
        *([payload["note"]] if payload.get("note") else []),
        "",
        f"{payload['weights']}; {payload['device']}; {payload['proteins']} proteome proteins "
        f"({payload['residues']:,} residues, {payload['variants']:,} variants); "
        f"packed/served forwards <= {payload['max_batch_tokens']} tokens; served: "
        f"{payload['concurrency']} proteins in flight; best of {payload['rounds']} interleaved "
        "rounds.",
        "",
    ]
    headers = ["how", "proteins/s", "variants/s", "masked copies/s", "forwards",
               "max abs diff vs script"]
    names = {
        "reference": "one forward per masked copy (script)",
        "packed": "esmc.scoring in-process, packed",
        "served": "ScoreVariants via esmc serve",
    }
    body = [
        [
            names[r["mode"]],
            common.format_number(r["proteins_per_s"]),
            common.format_number(r["variants_per_s"]),
            common.format_number(r["copies_per_s"]),
            f"{r['forwards']:,}",
            "-" if r["max_abs_diff_vs_reference"] is None
            else f"{r['max_abs_diff_vs_reference']:.1e}",
        ]
        for r in payload["rows"]
    ]
    return lines + [common.markdown_table(headers, body, numeric_from=1)]


if __name__ == "__main__":
    main()
