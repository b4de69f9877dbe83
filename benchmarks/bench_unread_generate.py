"""How far does an unread Generate stream run ahead? Steps computed before the server stops.

    python -m benchmarks.bench_unread_generate [--streams 20] [--residues 400] [--idle-s 6]

Starts a server in this process (a random-weight model of ``--d-model``/``--layers``, one
torch thread) and opens ``--streams`` Generate calls of an all-masked ``--residues``-residue
protein (one position per step) that are never read, once per client window setting:

- ``initial``: gRPC's initial 64 KiB HTTP/2 window (BDP probing off in the client channel);
- ``bdp``: gRPC's default, whose BDP probing grows the window as data flows.

The server takes a stream's next step only once its previous message was written, and gRPC
completes a write once the message fits the client's flow-control window, so a stream stops
being computed once that window is full; the idle timeout (``--idle-s``) then cancels it.
Prints, per setting, the steps the engine computed per stream, the messages each stream had
received when it ended (read afterwards), their bytes, and how the streams ended.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import torch

from esmc.config import ESMCConfig
from esmc import ESMC
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import create_server
from esmc_server.config import BatchingConfig, ServerConfig

WINDOWS = {"initial": [("grpc.http2.bdp_probe", 0)], "bdp": []}


async def run(args, window: str, model: ESMC) -> dict:
    config = ServerConfig(
        port=0, metrics_port=None, warmup=False, threads=1,
        batching=BatchingConfig(max_wait_ms=2.0), stream_idle_timeout_s=args.idle_s,
    )
    server, port = await create_server(config, model=model)
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=WINDOWS[window])
        stub = pb_grpc.ESMCStub(channel)
        request = pb.GenerateRequest(
            protein=pb.ESMProtein(sequence="_" * args.residues),
            config=pb.GenerationConfig(num_steps=args.residues),
        )
        calls = [stub.Generate(request) for _ in range(args.streams)]  # never read
        started = time.monotonic()
        await asyncio.sleep(0.5)
        while server.engine.stats.active_generations > 0:
            await asyncio.sleep(0.2)
        parked_s = time.monotonic() - started
        computed = server.engine.stats.generation_steps
        received, sizes, outcomes = [], [], set()
        for call in calls:  # now read what the transport held, then the status
            count = size = 0
            try:
                async for message in call:
                    count += 1
                    size += message.ByteSize()
                outcomes.add("OK")
            except grpc.aio.AioRpcError as error:
                outcomes.add(error.code().name)
            received.append(count)
            sizes.append(size)
        await channel.close()
    finally:
        await server.stop(grace_s=1.0)
    return {
        "window": window,
        "computed": computed / args.streams,
        "received": (min(received), max(received)),
        "kib": max(sizes) / 1024,
        "seconds": parked_s,
        "outcomes": ", ".join(sorted(outcomes)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--residues", type=int, default=400)
    parser.add_argument("--idle-s", type=float, default=6.0)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--windows", default="initial,bdp")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ESMC(ESMCConfig(d_model=args.d_model, n_heads=2, n_layers=args.layers)).eval()
    rows = [asyncio.run(run(args, window, model)) for window in args.windows.split(",")]
    print(
        f"{args.streams} unread Generate streams of a {args.residues}-residue all-masked protein "
        f"({args.residues} steps each); idle timeout {args.idle_s:g} s; random model d_model "
        f"{args.d_model}, {args.layers} layers, CPU\n"
    )
    print("| client window | steps computed per stream | of | messages received per stream "
          "| KiB received per stream (max) | until all ended s | outcome |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        low, high = row["received"]
        print(f"| {row['window']} | {row['computed']:.0f} | {args.residues} | {low}-{high} | "
              f"{row['kib']:.0f} | {row['seconds']:.1f} | {row['outcomes']} |")


if __name__ == "__main__":
    main()
