"""One command on a GPU: parity, forward, load and peer tables, written under benchmarks/results.

    python -m benchmarks.gpu_suite               # one CUDA GPU, esmc-300m shape, <= 8 minutes
    python -m benchmarks.gpu_suite --dry-run     # tiny shapes on the CPU, a minute or two

Steps, each one benchmark module's ``main`` (its table printed and written to
``<out>/gpu_<gpu>_<step>.md`` with its JSON beside it; the GPU is named in the file name and
in every table's device line):

1. ``parity-float32``: :mod:`benchmarks.bench_peers` in float32 on the GPU: the official
   ``esm`` ESMC, ``transformers``, ``faesm`` and this project (one per forward, packed) on the
   same random weights; this project must agree with ``esm`` to <= 1e-5 (max |diff| / max |ref|);
2. ``peers-bfloat16``: the same peers in bfloat16, one per forward and in padded batches, this
   project packed and compiled: throughput side by side, and each row's bf16 error against
   ``esm`` in float32;
3. ``forward``: :mod:`benchmarks.bench_forward`, one model fed one at a time, padded, sorted,
   packed and packed with the block stack compiled;
4. ``load-mean`` / ``load-logits``: :mod:`benchmarks.bench_load`, a real ``esmc serve`` on the
   GPU and 64 concurrent clients, one protein per call, asking for mean embeddings / logits.

A failing step is recorded with its error and the others still run; the summary table
(``gpu_<gpu>_summary.md``) lists every step, its time, its file and whether it passed, and the
exit status is 1 if any step failed or float32 parity missed 1e-5. Random weights throughout
(the cost of a forward does not depend on them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import bench_forward, bench_load, bench_peers, common

RESULTS = Path(__file__).parent / "results"
PARITY_FLOAT32 = 1e-5
BUDGET_S = 480.0  # the whole suite on one GPU
DRY_RUN_FASTA = """>a
MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRSLH
>b
MLKNVQVLVLGGGHAGEEAARRLHALGAHVTLVERDAIGGACAEG
>c
ACDEFGHIKLMNPQRSTVWYACDEFGHIKLMNPQRSTVWY
>d
MSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDWQPEVKLDLDTASSQLADDVYEVVLRVTVTASLGEETAFLCEVQQGGIFSIAGIEGTQMAHCLGAYCPNILFPYARECITSMVSRGTFPQLNLAPVNFDALFMNYLQQQAGEGTEEHQDA
>e
MGSSHHHHHHSSGLVPRGSHM
>f
MAHHHHHHVDDDDKMVSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKQHDFFKSAMPEGYVQERTIFFKDDGNYKTRAEVKFEGDTLVNRIELKGIDFKEDGNILGHKLEYNYNSHNVYIMADKQKNGIKVNFKIRHNIEDGSVQLADHYQQNTPIGDGPVLLPDNHYLSTQSALSKDPNEKRDHMVLLEFVTAAGITHGMDELYK
"""


def gpu_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU, ``cpu-dry-run`` on the CPU: part of every file name."""
    if device.type != "cuda":
        return "cpu-dry-run"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def plan(args: argparse.Namespace, fasta: str, device: str) -> list[tuple[str, Callable, list]]:
    """(step name, benchmark main, its arguments) in the order they run."""
    dry = args.dry_run
    config = "esmc-tiny" if dry else args.config
    proteins = "3" if dry else str(args.peer_proteins)
    load_limit = ["--limit", "6"] if dry else (["--limit", str(args.load_limit)]
                                               if args.load_limit else [])
    clients = "4" if dry else "64"
    peers = [
        "--config", config, "--fasta", fasta, "--device", device, "--proteins", proteins,
        "--rounds", "1" if dry else "2", "--batch-size", "2" if dry else "32",
    ]
    one_way = "esm-one,hf-one,faesm-one,esmc-one,esmc-packed"
    batch_ways = "esm-one,esm-batch,hf-one,hf-batch,faesm-one,faesm-batch,esmc-one,esmc-packed"
    if not dry:
        batch_ways += ",esmc-compiled"  # compiling on the CPU takes minutes: not in a dry run
    load = [
        "--model", config, "--weights", "random", "--fasta", fasta, "--device", device,
        "--clients", clients, "--modes", "dynamic", *load_limit,
    ]
    if dry:
        load += ["--server-threads", "1"]
    forward_ways = "one,padded,sorted,packed" + ("" if dry else ",compiled")
    forward_limit = "6" if dry else str(args.forward_limit)
    return [
        ("parity-float32", bench_peers.main, [*peers, "--dtype", "float32", "--ways", one_way]),
        ("peers-bfloat16", bench_peers.main, [*peers, "--dtype", "bfloat16", "--ways", batch_ways]),
        ("forward", bench_forward.main, [
            "--config", config, "--fasta", fasta, "--device", device, "--limit", forward_limit,
            "--ways", forward_ways, *(["--batch-size", "2"] if dry else []),
        ]),
        ("load-mean", bench_load.main, [*load, "--output", "mean_embedding"]),
        ("load-logits", bench_load.main, [*load, "--output", "logits"]),
    ]


def run_step(name: str, main: Callable, argv: list[str], out: Path, slug: str) -> dict:
    """Run one benchmark, echoing and keeping its output; its table and JSON go to ``out``."""
    stem = out / f"gpu_{slug}_{name}"
    argv = [*argv, "--json", f"{stem}.json"]
    captured = io.StringIO()
    start = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stdout(_Tee(captured, sys.stdout)):
            payload = main(argv)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (one failing step must not stop the rest)
        payload, error = None, "".join(traceback.format_exception_only(type(exc), exc)).strip()
        traceback.print_exc()
    seconds = time.perf_counter() - start
    text = captured.getvalue()
    table = text[: text.rfind("\n\n{")] if "\n\n{" in text else text
    command = "python -m benchmarks." + main.__module__.rsplit(".", 1)[-1] + " " + " ".join(argv)
    Path(f"{stem}.md").write_text(f"`{command}`\n\n{table.rstrip()}\n")
    return {"step": name, "seconds": seconds, "file": f"{stem}.md", "error": error,
            "payload": payload, "command": command}


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def parity_of(step: dict) -> float | None:
    """This project's worst agreement with the official ``esm`` in a parity step."""
    if step["payload"] is None:
        return None
    rows = [r for r in step["payload"]["rows"] if r["way"].startswith("esmc-")]
    return max(r["agreement"] for r in rows) if rows else None


def summary_lines(steps: list[dict], device_line: str, total_s: float, budget_s: float) -> list:
    parity = parity_of(steps[0]) if steps and steps[0]["step"] == "parity-float32" else None
    cells = []
    for step in steps:
        ok = step["error"] is None
        if step["step"] == "parity-float32":
            ok = ok and parity is not None and parity <= PARITY_FLOAT32
        note = step["error"] or ""
        if step["step"] == "parity-float32" and parity is not None:
            note = f"this project vs esm float32: {parity:.1e} (limit {PARITY_FLOAT32:.0e})"
        cells.append([step["step"], "ok" if ok else "FAILED", f"{step['seconds']:.1f}",
                      Path(step["file"]).name, note])
    within = "within" if total_s <= budget_s else "OVER"
    return [
        "# GPU suite",
        f"device: {device_line}",
        f"total {total_s:.0f} s ({within} the {budget_s:.0f} s budget)",
        "",
        common.markdown_table(["step", "result", "seconds", "table", "note"], cells,
                              numeric_from=2),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU with a built-in FASTA (what the tests run)")
    parser.add_argument("--config", default="esmc-300m", help="registry name (random weights)")
    parser.add_argument("--fasta", default="../shared/data/proteome.fasta")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (the dry run: cpu)")
    parser.add_argument("--out", default=str(RESULTS), help="where the tables are written")
    parser.add_argument("--peer-proteins", type=int, default=64, help="proteins per peer row")
    parser.add_argument("--forward-limit", type=int, default=512, help="proteins in forward")
    parser.add_argument("--load-limit", type=int, default=None, help="proteins per load run "
                        "(default: the whole FASTA file)")
    parser.add_argument("--steps", default=None, help="comma-separated subset of the steps")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run to check the suite on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(device)
    with tempfile.TemporaryDirectory() as directory:
        fasta = args.fasta
        if args.dry_run:
            fasta = os.path.join(directory, "dry_run.fasta")
            Path(fasta).write_text(DRY_RUN_FASTA)
        steps = plan(args, fasta, str(device))
        if args.steps:
            chosen = {s.strip() for s in args.steps.split(",")}
            steps = [s for s in steps if s[0] in chosen]
        start = time.perf_counter()
        results = [run_step(name, fn, argv, out, slug) for name, fn, argv in steps]
        total = time.perf_counter() - start
    lines = summary_lines(results, common.device_description(device), total, BUDGET_S)
    (out / f"gpu_{slug}_summary.md").write_text("\n".join(lines) + "\n")
    (out / f"gpu_{slug}_summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "payload"} for r in results], indent=2) + "\n")
    print("\n".join(lines))
    failed = any("FAILED" in line for line in lines[4:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
