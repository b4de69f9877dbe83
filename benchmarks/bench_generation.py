"""Generation benchmark: N concurrent generations, continuous batching vs lockstep vs one at a time.

    python -m benchmarks.bench_generation --model esmc-tiny --fasta ../shared/data/proteome.fasta \
        --n 16 --mask-fraction 0.3 --steps 8 --json out.json

Prompts: the first ``--n`` proteins of the FASTA file, cropped to ``--max-residues``, with
``--mask-fraction`` of their positions masked (chosen with ``--seed``). Generation ``i`` asks for
a step count spread evenly from ``--min-steps`` to ``--steps`` (clamped by the server to its
number of masks, as the reference does) and uses seed ``--seed + i`` in every mode, so the modes
do the same work and their proteins can be compared.

Modes, in this order:

- ``continuous``: all generations at once through the server (``esmc serve`` in its own
  process), one ``AsyncESMCClient.generate_stream`` each; the server advances every active
  generation by one step per forward and a generation leaves as soon as it is done.
- ``sequential``: the same server, one generation after the other.
- ``lockstep``: the reference's semantics, in this process (the server has no such mode): the
  same weights, one :class:`esmc.generation.GenerationState` per prompt, and every step one
  forward over *all* prompts (finished ones included, their logits unused) for the largest
  step count. Forwards are packed like the server's (``--lockstep-forward padded`` pads, as the
  reference does) and split by the server's token budget.

Before timing, each mode runs one untimed step of every prompt (all at once).
Counted: steps (the steps generations took: the work asked for), forwards (server modes: the
server's ``esmc_forwards_total`` counter; lockstep: this loop's), and sequence-steps computed
(sequences summed over forwards: lockstep computes finished prompts too). Steps/s and proteins/s
are over the wall time from the first request to the last final message (the first forward).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_forward import packed_batches
from esmc.generation import GenerationState
from esmc.inference import run_logits
from esmc import ESMC
from esmc.tokenizer import decode
from esmc.types import ESMProtein, LogitsConfig
from esmc.types import GenerationConfig as LibraryGenerationConfig
from esmc_client import AsyncESMCClient, GenerationConfig, ServerInfo

MODES = ("continuous", "sequential", "lockstep")
COUNTERS = ("esmc_forwards_total", "esmc_sequences_total", "esmc_generation_steps_total")


@dataclasses.dataclass(frozen=True)
class Prompt:
    name: str
    masked: str  # "_" where the model fills in
    num_steps: int  # asked for (before clamping to the number of masks)
    seed: int

    @property
    def steps(self) -> int:
        """Steps this generation takes: ``num_steps`` clamped to its number of masks."""
        return min(self.num_steps, self.masked.count("_"))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One mode's run: its proteins (prompt order), wall seconds and forward counts."""

    proteins: list[str]
    seconds: float
    forwards: int
    sequence_steps: int  # sequences summed over forwards
    step_batch_sizes: list[int] = dataclasses.field(default_factory=list)  # per step message


# -- prompts ----------------------------------------------------------------------------------


def make_prompts(
    records: Sequence[tuple[str, str]], args: argparse.Namespace
) -> list[Prompt]:
    """Cropped, partly masked prompts with step counts spread from min_steps to steps."""
    rng = random.Random(args.seed)
    prompts = []
    for i, (name, sequence) in enumerate(records):
        residues = list(sequence[: args.max_residues])
        count = max(1, round(args.mask_fraction * len(residues)))
        for position in rng.sample(range(len(residues)), count):
            residues[position] = "_"
        prompts.append(Prompt(name, "".join(residues), spread_steps(i, len(records), args),
                              args.seed + i))
    return prompts


def spread_steps(i: int, n: int, args: argparse.Namespace) -> int:
    if n == 1:
        return args.steps
    return args.min_steps + (i * (args.steps - args.min_steps)) // (n - 1)


def client_config(prompt: Prompt, args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        num_steps=prompt.num_steps, strategy=args.strategy, temperature=args.temperature
    )


def library_config(prompt: Prompt, args: argparse.Namespace) -> LibraryGenerationConfig:
    return LibraryGenerationConfig(
        track="sequence", num_steps=prompt.num_steps, strategy=args.strategy,
        temperature=args.temperature,
    )


# -- through the server -----------------------------------------------------------------------


async def stream_one(
    client: AsyncESMCClient, prompt: Prompt, args: argparse.Namespace
) -> tuple[str, list[int]]:
    """The finished sequence and the batch size of every step message of one generation."""
    sizes, final = [], None
    async for step in client.generate_stream(prompt.masked, client_config(prompt, args),
                                             prompt.seed):
        if step.final:
            final = step
        else:
            sizes.append(step.metadata.batch_size)
    if final is None or final.protein is None:
        raise RuntimeError(f"the generation of {prompt.name} ended without a final message")
    return final.protein.sequence, sizes


async def run_server_mode(
    served: common.ServedModel, prompts: list[Prompt], concurrent: bool, args: argparse.Namespace
) -> Outcome:
    async with AsyncESMCClient(served.target) as client:
        warm = [dataclasses.replace(p, num_steps=1) for p in prompts]  # untimed: one step each
        await asyncio.gather(*(stream_one(client, p, args) for p in warm))
        before = await asyncio.to_thread(common.scrape_metrics, served.metrics_url)
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(stream_one(client, p, args) for p in prompts))
        else:
            results = [await stream_one(client, p, args) for p in prompts]
        seconds = time.perf_counter() - start
        after = await asyncio.to_thread(common.scrape_metrics, served.metrics_url)
    counters = common.counter_deltas(before, after, COUNTERS)
    return Outcome(
        proteins=[sequence for sequence, _ in results],
        seconds=seconds,
        forwards=counters["esmc_forwards_total"],
        sequence_steps=counters["esmc_sequences_total"],
        step_batch_sizes=[size for _, sizes in results for size in sizes],
    )


async def server_info(target: str) -> ServerInfo:
    async with AsyncESMCClient(target) as client:
        return await client.info()


# -- lockstep, in this process ----------------------------------------------------------------


def step_logits(model: ESMC, tokens: list[torch.Tensor], budget: int, packed: bool):
    """Every sequence's (L+2, 64) logits, in forwards of at most ``budget`` tokens."""
    lengths = [int(t.shape[0]) for t in tokens]
    batches = packed_batches(lengths, budget)
    logits = []
    for batch in batches:
        chosen = [tokens[i] for i in batch]
        outputs = run_logits(model, chosen, [LogitsConfig(sequence=True)] * len(chosen),
                             packed=packed)
        logits += [out.logits.sequence for out in outputs]
    return logits, len(batches)


def new_state(prompt: Prompt, args: argparse.Namespace) -> GenerationState:
    return GenerationState(ESMProtein(sequence=prompt.masked), library_config(prompt, args),
                           prompt.seed)


def run_lockstep(
    model: ESMC, prompts: list[Prompt], budget: int, args: argparse.Namespace
) -> Outcome:
    """All prompts in every forward until the largest step count is done (the reference)."""
    packed = args.lockstep_forward == "packed"
    warm = [new_state(p, args) for p in prompts]
    step_logits(model, [s.tokens for s in warm], budget, packed)  # untimed: one forward
    start = time.perf_counter()
    states = [new_state(p, args) for p in prompts]
    forwards = sequence_steps = 0
    for _ in range(max(s.num_steps for s in states)):
        logits, count = step_logits(model, [s.tokens for s in states], budget, packed)
        forwards += count
        sequence_steps += len(states)
        for state, rows in zip(states, logits):
            if not state.done:
                state.advance(rows)
    seconds = time.perf_counter() - start
    return Outcome([decode(s.tokens) for s in states], seconds, forwards, sequence_steps)


def load_local_model(model: str, info: ServerInfo) -> ESMC:
    """The served weights, loaded in this process on the server's device and dtype."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    return ESMC.from_pretrained(model, device=info.device, dtype=dtype[info.dtype]).eval()


# -- results ----------------------------------------------------------------------------------


def describe(mode: str, args: argparse.Namespace) -> str:
    if mode == "continuous":
        return "continuous batching: all at once through the server"
    if mode == "sequential":
        return "one at a time through the server"
    return f"lockstep for the largest step count, in-process, {args.lockstep_forward} forwards"


def result_row(mode: str, outcome: Outcome, prompts: list[Prompt], reference: list[str] | None,
               args: argparse.Namespace) -> dict:
    steps = sum(p.steps for p in prompts)
    sizes = outcome.step_batch_sizes
    return {
        "mode": mode,
        "description": describe(mode, args),
        "where": "in-process" if mode == "lockstep" else "server",
        "generations": len(prompts),
        "steps": steps,
        "seconds": outcome.seconds,
        "steps_per_s": steps / outcome.seconds,
        "proteins_per_s": len(prompts) / outcome.seconds,
        "forwards": outcome.forwards,
        "sequence_steps_computed": outcome.sequence_steps,
        "steps_per_forward": steps / outcome.forwards if outcome.forwards else None,
        "mean_step_batch_size": statistics.fmean(sizes) if sizes else None,
        "same_proteins_as_continuous": (
            None if reference is None
            else sum(a == b for a, b in zip(outcome.proteins, reference))
        ),
    }


def table_lines(rows: list[dict]) -> list[str]:
    baseline = next((r["steps_per_s"] for r in rows if r["mode"] == "sequential"), None)
    headers = ["how the generations run", "steps/s", "proteins/s", "forwards",
               "sequence-steps computed", "steps/forward", "speedup vs one at a time"]
    cells = []
    for r in rows:
        speedup = f"{r['steps_per_s'] / baseline:.1f}x" if baseline else "-"
        cells.append([
            r["description"], common.format_number(r["steps_per_s"]),
            common.format_number(r["proteins_per_s"]), common.format_number(r["forwards"]),
            common.format_number(r["sequence_steps_computed"]),
            common.format_number(r["steps_per_forward"]), speedup,
        ])
    return [common.markdown_table(headers, cells, numeric_from=1)]


def header_lines(args: argparse.Namespace, info: ServerInfo, weights_note: str,
                 prompts: list[Prompt], rows: list[dict]) -> list[str]:
    lengths = [len(p.masked) for p in prompts]
    masks = [p.masked.count("_") for p in prompts]
    steps = [p.steps for p in prompts]
    same = [f"{r['mode']} {r['same_proteins_as_continuous']}/{len(prompts)}"
            for r in rows if r["same_proteins_as_continuous"] is not None]
    return [
        f"# {args.model}: {len(prompts)} concurrent generations "
        f"({args.strategy} strategy, temperature {args.temperature:g})",
        f"server: `esmc serve` subprocess on {info.device} ({info.dtype}), "
        f"{common.threads_note(args.server_threads)} (lockstep too), packed "
        f"<= {info.batching.max_batch_tokens:,} tokens per forward; "
        f"{common.device_description(torch.device(info.device))}",
        weights_note,
        f"prompts: first {len(prompts)} proteins of {Path(args.fasta).name} cropped to "
        f"<= {args.max_residues} residues (median {statistics.median(lengths):.0f}), "
        f"{args.mask_fraction:g} masked (seed {args.seed}): {sum(masks):,} masks",
        f"steps: asked {args.min_steps}..{args.steps}, taken {min(steps)}..{max(steps)} "
        f"(clamped to the masks), {sum(steps):,} in all",
        "same proteins as continuous (same seeds): " + (", ".join(same) if same else "-"),
        "",
    ]


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_served_model_arguments(parser)
    parser.add_argument("--n", type=int, default=16, help="generations")
    parser.add_argument("--max-residues", type=int, default=200, help="prompts cropped to this")
    parser.add_argument("--mask-fraction", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=8, help="largest step count")
    parser.add_argument("--min-steps", type=int, default=None,
                        help="smallest step count (default: steps / 4, rounded up)")
    parser.add_argument("--strategy", default="random", choices=["random", "entropy"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}"
    )
    parser.add_argument("--lockstep-forward", default="packed", choices=["packed", "padded"])
    parser.add_argument("--seed", type=int, default=0, help="masks, generation seeds, weights")
    args = parser.parse_args(argv)
    args.modes = common.parse_modes(parser, args.modes, MODES)
    if args.min_steps is None:
        args.min_steps = -(-args.steps // 4)
    if not 1 <= args.min_steps <= args.steps:
        parser.error("need 1 <= --min-steps <= --steps")
    if not 0 < args.mask_fraction <= 1 or args.n < 1 or args.max_residues < 1:
        parser.error("need 0 < --mask-fraction <= 1, --n >= 1 and --max-residues >= 1")
    return args


def server_options(args: argparse.Namespace) -> list[str]:
    options = ["--device", args.device]
    if args.dtype:
        options += ["--dtype", args.dtype]
    if args.max_batch_tokens is not None:
        options += ["--max-batch-tokens", str(args.max_batch_tokens)]
    return options


def run_modes(model: str, prompts: list[Prompt], args: argparse.Namespace):
    """Each requested mode's outcome, and the server's info."""
    outcomes = {}
    with common.serve(model, server_options(args), args.server_threads) as served:
        info = asyncio.run(server_info(served.target))
        for mode in ("continuous", "sequential"):
            if mode in args.modes:
                concurrent = mode == "continuous"
                outcomes[mode] = asyncio.run(run_server_mode(served, prompts, concurrent, args))
    if "lockstep" in args.modes:  # after the server stopped: the two never share the device
        if args.server_threads is not None:
            torch.set_num_threads(args.server_threads)
        local = load_local_model(model, info)
        outcomes["lockstep"] = run_lockstep(local, prompts, info.batching.max_batch_tokens, args)
    return outcomes, info


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    prompts = make_prompts(common.load_proteins(args.fasta, args.n), args)
    with tempfile.TemporaryDirectory() as directory:
        model, weights_note = common.weights_to_serve(
            args.model, args.weights, Path(directory), args.seed
        )
        outcomes, info = run_modes(model, prompts, args)

    reference = outcomes["continuous"].proteins if "continuous" in outcomes else None
    rows = [
        result_row(mode, outcomes[mode], prompts, None if mode == "continuous" else reference, args)
        for mode in MODES if mode in outcomes
    ]
    payload = {
        "benchmark": "generation",
        "model": args.model,
        "weights": weights_note,
        "server": {
            "device": info.device, "dtype": info.dtype, "process": "esmc serve",
            "threads": args.server_threads, "max_batch_tokens": info.batching.max_batch_tokens,
        },
        "device": common.device_description(torch.device(info.device)),
        "fasta": str(args.fasta),
        "generations": len(prompts),
        "max_residues": args.max_residues,
        "mask_fraction": args.mask_fraction,
        "steps": {"min": args.min_steps, "max": args.steps},
        "strategy": args.strategy,
        "temperature": args.temperature,
        "seed": args.seed,
        "prompts": [dataclasses.asdict(p) | {"steps_taken": p.steps} for p in prompts],
        "rows": rows,
    }
    common.emit(header_lines(args, info, weights_note, prompts, rows) + table_lines(rows),
                payload, args.json)
    return payload


if __name__ == "__main__":
    main()
