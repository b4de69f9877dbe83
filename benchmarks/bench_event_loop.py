"""Is the event loop free? Latency of concurrent ``Info`` calls while large responses are served.

    python -m benchmarks.bench_event_loop --before /tmp/esmc-before [--rounds 2] [--seconds 20]

Runs ``esmc serve`` in its own process on a random-weight model (by default 24 blocks of
d_model 512) with the server code of the current tree ("after") and of ``--before`` (another
checkout, put first on the server's PYTHONPATH), in interleaved rounds on the same machine.
In each run ``--senders`` clients (in a separate process, so that receiving 49 MB responses
cannot delay the measuring client) ask for all hidden states of a ``--length``-residue protein
back to back (a response of layers x (L+2) x d float32, 49 MB by default) while one client
calls ``Info`` every ``--interval-ms`` and records its latency. ``Info`` does no work: its
latency is the time the server's event loop was busy with something else. Prints a markdown
table (p50, p99, max of ``Info``; large responses served) and writes it with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_BYTES = 1024 * 1024 * 1024


def tree_path(root: Path) -> str:
    """PYTHONPATH entries that make ``root``'s esmc, esmc_server and esmc_client importable."""
    return os.pathsep.join(str(root / sub) for sub in ("", "server", "client"))


def commit_of(tree: Path) -> str:
    """The short commit a checkout is at (``+`` when it has uncommitted changes)."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *command], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_weights(directory: Path, d_model: int, n_heads: int, n_layers: int) -> Path:
    import torch

    from esmc import ESMC, ESMCConfig
    from esmc.weights import save_safetensors

    torch.manual_seed(0)
    model = ESMC(ESMCConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers)).eval()
    path = directory / "model.safetensors"
    save_safetensors(model, path)
    return path


def start_server(weights: Path, tree: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": tree_path(tree), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "esmc_server.cli", "serve", "--model", str(weights),
        "--port", "0", "--metrics-port", "off", "--device", "cpu",
        "--max-message-bytes", str(MESSAGE_BYTES), "--max-wait-ms", "0",
    ]  # fmt: skip
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"esmc serve exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("esmc serve did not start in 300 s")


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ]


def large_request(length: int) -> pb.LogitsRequest:
    return pb.LogitsRequest(
        protein=pb.ESMProtein(sequence="MKTAYIAKQR" * (length // 10)),
        config=pb.LogitsConfig(return_hidden_states=True),
    )


async def send_large(port: int, length: int, senders: int, seconds: float) -> tuple[int, int]:
    """``senders`` clients asking for the large response back to back for ``seconds``; the
    responses are taken as bytes (not parsed). Returns (responses, bytes of one)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
        logits = ch.unary_unary(
            "/esmc.v1.ESMC/Logits", request_serializer=pb.LogitsRequest.SerializeToString
        )  # no response_deserializer: bytes
        request = large_request(length)
        end = time.monotonic() + seconds
        served, size = 0, 0

        async def sender() -> None:
            nonlocal served, size
            while time.monotonic() < end:
                size = len(await logits(request, timeout=300))
                served += 1

        await asyncio.gather(*(sender() for _ in range(senders)))
    return served, size


def sender_process(port: int, length: int, senders: int, seconds: float, results) -> None:
    results.put(asyncio.run(send_large(port, length, senders, seconds)))


async def measure(port: int, args) -> dict:
    """The large responses are asked for from another process, so that receiving them
    (copies, and the GIL) cannot delay the ``Info`` calls measured here: what is left is the
    server's own event loop."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
        stub = pb_grpc.ESMCStub(ch)
        await stub.Info(pb.InfoRequest(), timeout=60)
        await stub.Logits(large_request(args.length), timeout=300)  # warm
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        senders = context.Process(
            target=sender_process, args=(port, args.length, args.senders, args.seconds, results)
        )
        senders.start()
        await asyncio.sleep(1.0)  # the senders' interpreter starts and sends its first calls
        latencies = []
        end = time.monotonic() + args.seconds - 1.0
        while time.monotonic() < end:
            started = time.perf_counter()
            await stub.Info(pb.InfoRequest(), timeout=60)
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(args.interval_ms / 1000)
        served, size = await asyncio.to_thread(results.get, True, 600)
        await asyncio.to_thread(senders.join, 60)
    latencies.sort()
    return {
        "calls": len(latencies),
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max": latencies[-1],
        "served": served,
        "mb": size / 1e6,
    }


def run_one(name: str, tree: Path, weights: Path, directory: Path, args) -> dict:
    process, port = start_server(weights, tree, directory / f"{name}.log")
    try:
        return asyncio.run(measure(port, args))
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the code to compare")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--senders", type=int, default=2)
    p.add_argument("--length", type=int, default=1000, help="residues of the large requests")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--note", help="a line added under the heading (e.g. what else ran)")
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": ROOT}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        weights = write_weights(directory, args.d_model, args.heads, args.layers)
        for round_ in range(1, args.rounds + 1):
            for name, tree in trees.items():
                result = run_one(name, tree, weights, directory, args)
                rows.append((name, round_, result))
                print(f"round {round_} {name}: {result}", file=sys.stderr, flush=True)
    command = "python -m benchmarks.bench_event_loop " + " ".join(argv or sys.argv[1:])
    before_commit, after_commit = commit_of(trees["before"]), commit_of(trees["after"])
    lines = [
        f"Info latency while large responses are served ({args.senders} clients asking for all "
        f"{args.layers} hidden states of a {args.length}-residue protein, d_model "
        f"{args.d_model}, {rows[0][2]['mb']:.0f} MB per response; one Info every "
        f"{args.interval_ms:g} ms for {args.seconds:g} s; server on one torch thread, CPU). "
        "The large responses are asked for from a separate client process; rounds "
        "interleaved, compare rows of the same run only.",
        *([args.note] if args.note else []),
        "",
        f"Command: `{command}`",
        "",
        "| server | round | Info calls | p50 ms | p99 ms | max ms | large responses served |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, round_, r in rows:
        label = f"before ({before_commit})" if name == "before" else f"after ({after_commit})"
        lines.append(
            f"| {label} | {round_} | {r['calls']} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['max']:.1f} | {r['served']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
