"""Does a small request still get through while another caller runs long work?

    python -m benchmarks.bench_fairness --model esmc-tiny --threads 1 \
        --out benchmarks/results/fairness_esmc-tiny_cpu.md

Starts a server in this process (``--model`` on the CPU, ``--threads`` torch threads, the
default token budget unless ``--max-batch-tokens``), then, per scenario, a caller labelled
``victim`` sends ``--small`` small Logits (one after the other, ``--residues`` residues each)
while a caller labelled ``attacker`` runs:

- ``idle``: nothing;
- ``1 generation``: one Generate of an all-masked ``--gen-residues``-residue protein (one
  position per step), read normally, started again whenever it finishes;
- ``40 generations``: forty of them at once;
- ``16k Logits``: Logits of a ``--long-residues``-residue protein, one after the other.

Prints the victim's latency p50/p99/max (client side, over real gRPC), how many of its calls
succeeded, and the forwards and generation steps the server ran meanwhile. Callers are told
apart by the ``esmc-caller`` label (authentication off), as the fair policy sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
import torch

from benchmarks import common
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import create_server
from esmc_server.config import BatchingConfig, ServerConfig

ATTACKER = (("esmc-caller", "attacker"),)
VICTIM = (("esmc-caller", "victim"),)
SCENARIOS = ("idle", "1 generation", "40 generations", "16k Logits")


async def attacker(stub, scenario: str, args, stop: asyncio.Event) -> None:
    """Keep the attacker's work running until ``stop``."""
    if scenario == "idle":
        await stop.wait()
        return
    if scenario == "16k Logits":
        request = pb.LogitsRequest(
            protein=pb.ESMProtein(sequence="A" * args.long_residues),
            config=pb.LogitsConfig(sequence=True), output_dtype=pb.DTYPE_BFLOAT16,
        )
        while not stop.is_set():
            await stub.Logits(request, metadata=ATTACKER, timeout=3600)
        return
    count = 1 if scenario == "1 generation" else 40
    request = pb.GenerateRequest(
        protein=pb.ESMProtein(sequence="_" * args.gen_residues),
        config=pb.GenerationConfig(num_steps=args.gen_residues),
    )

    async def generate_until_stopped() -> None:  # one generation after the other
        while not stop.is_set():
            call = stub.Generate(request, metadata=ATTACKER, timeout=3600)
            waiter = asyncio.create_task(stop.wait())
            reader = asyncio.create_task(_drain(call))
            await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not reader.done():
                call.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    await asyncio.gather(*(generate_until_stopped() for _ in range(count)))


async def _drain(call) -> None:
    try:
        async for _ in call:
            pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


async def scenario_row(stub, server, scenario: str, args) -> list[str]:
    stop = asyncio.Event()
    task = asyncio.create_task(attacker(stub, scenario, args, stop))
    await asyncio.sleep(args.settle_s if scenario != "idle" else 0.0)
    stats = server.engine.stats
    forwards, steps = stats.forwards, stats.generation_steps
    small = pb.LogitsRequest(
        protein=pb.ESMProtein(sequence="MKTAYIAKQRQISFVKSHFSRQ"[: args.residues].ljust(args.residues, "A")),
        config=pb.LogitsConfig(sequence=True),
    )
    latencies, ok = [], 0
    for _ in range(args.small):
        started = time.perf_counter()
        try:
            await stub.Logits(small, metadata=VICTIM, timeout=args.timeout_s)
            ok += 1
        except grpc.aio.AioRpcError as error:
            print(f"  victim call failed: {error.code().name}")
        latencies.append(time.perf_counter() - started)
    forwards, steps = stats.forwards - forwards, stats.generation_steps - steps
    stop.set()
    await task
    return [
        scenario, f"{ok}/{args.small}",
        f"{common.percentile_ms(latencies, 50):,.0f}", f"{common.percentile_ms(latencies, 99):,.0f}",
        f"{max(latencies) * 1000:,.0f}", f"{forwards:,}", f"{steps:,}",
    ]


async def main_async(args) -> list[str]:
    batching = BatchingConfig(max_wait_ms=2.0, **(
        {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}))
    config = ServerConfig(
        model=args.model, device="cpu", port=0, metrics_port=None, warmup=True,
        threads=args.threads, batching=batching, forward_timeout_s=None,
        max_connection_age_s=None,  # one channel for the whole run
    )
    server, port = await create_server(config)
    rows = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ESMCStub(channel)
            for scenario in args.scenarios:
                print(f"scenario: {scenario}", flush=True)
                rows.append(await scenario_row(stub, server, scenario, args))
    finally:
        await server.stop(grace_s=1.0)
    headers = ["attacker runs", "victim OK", "p50 ms", "p99 ms", "max ms", "forwards",
               "generation steps"]
    return [
        f"Victim: {args.small} small Logits ({args.residues} residues) one after the other; "
        f"attacker's generations: {args.gen_residues} masked residues, one per step; "
        f"long Logits: {args.long_residues} residues. Budget "
        f"{batching.max_batch_tokens} tokens per forward.",
        "",
        common.markdown_table(headers, rows, numeric_from=1),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="esmc-tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-tokens", type=int)
    parser.add_argument("--small", type=int, default=20, help="victim calls per scenario")
    parser.add_argument("--residues", type=int, default=22)
    parser.add_argument("--gen-residues", type=int, default=400)
    parser.add_argument("--long-residues", type=int, default=16384)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.scenarios = [s.strip() for s in args.scenarios.split(",")]
    torch.set_num_threads(args.threads)
    lines = asyncio.run(main_async(args))
    lines.append("")
    lines.append(common.device_description(torch.device("cpu")))
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
