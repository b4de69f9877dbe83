"""Load benchmark: a real server, C concurrent clients, one protein per ``Logits`` call.

    python -m benchmarks.bench_load --model esmc-tiny --fasta ../shared/data/proteome.fasta \
        --limit 256 --clients 32 --json out.json

The server runs as ``esmc serve`` in its own process, as in production: its event loop and
device thread never share an interpreter lock with the clients. It is started twice, one
after the other, with the same settings except batching:

- ``dynamic``: the server's dynamic batching (its limits, or ``--max-batch-tokens`` /
  ``--max-wait-ms`` when given);
- ``off``: ``--max-batch-size 1``, one sequence per forward;
- ``tls+auth``: dynamic batching behind TLS (a throwaway CA and certificate made with
  ``trustme``) and bearer-token auth, the clients sending the token over TLS: the cost of
  running as a secured shared service, against ``dynamic`` in the same run.

``--rounds N`` runs the modes N times, interleaved (dynamic, off, tls+auth, dynamic, ...), one
row per mode and round, so that drift of a shared machine shows instead of favouring a mode.

The clients are ``AsyncESMCClient`` objects, each with its own channel, in one asyncio loop
of this process. Each makes one untimed call (its connection opens), then all take the next
protein of the FASTA file (file order) until none is left, one protein per call. Each call
asks for ``return_mean_embedding`` (one pooled vector per protein, what most users want;
``--output logits`` asks for the (L+2, 64) logits instead).

Reported per batching mode: proteins/s and tokens/s (BOS/EOS included) over the wall time
from the first timed call to the last answer; p50/p99 latency of a call as the client sees
it; mean batch size, the ``batch_size`` of the response metadata (sequences in the forward a
call rode in) averaged over calls; forwards, read from the server's Prometheus counters
(``esmc_forwards_total``, warm-up excluded), and sequences per forward.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import dataclasses
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from benchmarks import common
from esmc_client import AsyncESMCClient, ESMCError, LogitsConfig, ResponseMetadata, ServerInfo

MODES = ("dynamic", "off", "tls+auth")
TOKEN = "bench-token-0123456789abcdef"
OUTPUTS = {
    "mean_embedding": LogitsConfig(return_mean_embedding=True),
    "logits": LogitsConfig(sequence=True),
}
COUNTERS = ("esmc_forwards_total", "esmc_sequences_total", "esmc_real_tokens_total")


@dataclasses.dataclass(frozen=True)
class Call:
    """One timed call: its tokens, latency and metadata, or its error code."""

    tokens: int
    seconds: float
    metadata: ResponseMetadata | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Workload:
    records: list[tuple[str, str]]
    changed: int  # sequences cropped or skipped for the model's length limit
    total: int  # sequences read from the FASTA file


# -- running the clients ----------------------------------------------------------------------


async def client_loop(
    client: AsyncESMCClient, work: Iterator[tuple[str, str]], config: LogitsConfig
) -> list[Call]:
    """Take proteins from the shared ``work`` iterator until it is empty, one call each."""
    calls = []
    for _, sequence in work:
        start = time.perf_counter()
        try:
            out = await client.logits(sequence, config)
        except ESMCError as error:
            calls.append(Call(len(sequence) + 2, time.perf_counter() - start, None, error.code))
            continue
        calls.append(Call(len(sequence) + 2, time.perf_counter() - start, out.metadata))
    return calls


async def run_clients(
    served: common.ServedModel,
    records: Sequence[tuple[str, str]],
    clients: int,
    config: LogitsConfig,
    client_options: dict | None = None,
) -> tuple[list[Call], float, dict]:
    """All proteins through ``clients`` concurrent clients: the calls, the wall seconds, and
    how much the server's counters grew meanwhile (the untimed first calls excluded)."""
    opened = [AsyncESMCClient(served.target, **(client_options or {})) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.logits(records[0][1], config) for c in opened))  # untimed
        before = await asyncio.to_thread(common.scrape_metrics, served.metrics_url)
        work = iter(records)
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c, work, config) for c in opened))
        seconds = time.perf_counter() - start
        after = await asyncio.to_thread(common.scrape_metrics, served.metrics_url)
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    calls = [call for calls in per_client for call in calls]
    return calls, seconds, common.counter_deltas(before, after, COUNTERS)


async def server_info(target: str, client_options: dict | None = None) -> ServerInfo:
    async with AsyncESMCClient(target, **(client_options or {})) as client:
        return await client.info()


def run_mode(
    model: str, mode: str, records: list[tuple[str, str]], args: argparse.Namespace,
    dtype: str | None = None,
) -> tuple[dict, ServerInfo, Workload]:
    """Start a server for ``mode`` (weights in ``dtype``; None: ``--dtype``), send it
    ``records`` (fitted to its limit), stop it."""
    options = server_options(mode, args, dtype)
    client_options, credentials = {}, None
    if mode == "tls+auth":
        extra, client_options, credentials = secured(Path(args.secrets_dir))
        options += extra
    with common.serve(model, options, args.server_threads, credentials=credentials) as served:
        info = asyncio.run(server_info(served.target, client_options))
        workload = fit_workload(records, info.max_length - 2, args.long)
        calls, seconds, counters = asyncio.run(
            run_clients(served, workload.records, args.clients, OUTPUTS[args.output],
                        client_options)
        )
    row = result_row(mode, info, calls, seconds, counters)
    if (dtype or args.dtype) == "int8":  # Info names the float32 the model computes around it
        row["dtype"] = "int8"
    return row, info, workload


def secured(directory: Path) -> tuple[list[str], dict, object]:
    """Server flags, client arguments and probe credentials for TLS + a bearer token
    (certificates from a throwaway ``trustme`` CA, written to ``directory``)."""
    import grpc
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "tokens")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["server.pem"]))
    cert.private_key_pem.write_to_path(str(paths["server.key"]))
    paths["tokens"].write_text(TOKEN + "\n")
    flags = ["--tls-cert", str(paths["server.pem"]), "--tls-key", str(paths["server.key"]),
             "--auth-tokens-file", str(paths["tokens"])]
    client = {"token": TOKEN, "root_certificates": str(paths["ca.pem"])}
    return flags, client, grpc.ssl_channel_credentials(ca.cert_pem.bytes())


def fit_workload(records: list[tuple[str, str]], max_residues: int, policy: str) -> Workload:
    fitted, changed = common.fit_to_length(records, max_residues, policy)
    if not fitted:
        raise ValueError(f"no sequence of at most {max_residues} residues to send")
    return Workload(fitted, changed, len(records))


def server_options(mode: str, args: argparse.Namespace, dtype: str | None = None) -> list[str]:
    options = ["--device", args.device]
    dtype = dtype or args.dtype
    if dtype:
        options += ["--dtype", dtype]
    if args.max_batch_tokens is not None:
        options += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.max_wait_ms is not None:
        options += ["--max-wait-ms", str(args.max_wait_ms)]
    if mode == "off":
        options += ["--max-batch-size", "1"]
    return options


# -- results ----------------------------------------------------------------------------------


def describe(mode: str, info: ServerInfo) -> str:
    limits = info.batching
    if mode == "off":
        return "off (--max-batch-size 1)"
    if mode == "tls+auth":
        return "dynamic, TLS + bearer token (same limits)"
    layout = "packed" if limits.packed else "length-sorted padded"
    return (
        f"dynamic ({layout}, <= {limits.max_batch_tokens:,} tokens and "
        f"<= {limits.max_batch_size} sequences per forward, wait <= {limits.max_wait_ms:g} ms)"
    )


def result_row(
    mode: str, info: ServerInfo, calls: list[Call], seconds: float, counters: dict
) -> dict:
    done = [c for c in calls if c.error is None]
    tokens = sum(c.tokens for c in done)
    latencies = [c.seconds for c in done]
    forwards = counters["esmc_forwards_total"]
    return {
        "mode": mode,
        "dtype": info.dtype,
        "description": describe(mode, info),
        "batching": dataclasses.asdict(info.batching),
        "calls": len(calls),
        "proteins": len(done),
        "errors": dict(Counter(c.error for c in calls if c.error is not None)),
        "tokens": tokens,
        "seconds": seconds,
        "proteins_per_s": len(done) / seconds,
        "tokens_per_s": tokens / seconds,
        "latency_ms": {
            "p50": common.percentile_ms(latencies, 50),
            "p99": common.percentile_ms(latencies, 99),
            "mean": 1000 * statistics.fmean(latencies),
        },
        "mean_batch_size": statistics.fmean(c.metadata.batch_size for c in done),
        "mean_queue_ms": statistics.fmean(c.metadata.queue_ms for c in done),
        "mean_compute_ms": statistics.fmean(c.metadata.compute_ms for c in done),
        "forwards": forwards,
        "sequences_per_forward": counters["esmc_sequences_total"] / forwards if forwards else None,
        "server_counters": counters,
    }


def table_lines(rows: list[dict]) -> list[str]:
    baselines = {r["dtype"]: r["proteins_per_s"] for r in rows if r["mode"] == "off"}
    headers = ["batching", "weights", "round", "proteins/s", "tokens/s", "p50 ms", "p99 ms",
               "mean batch size (per call)", "forwards", "sequences/forward", "speedup vs off"]
    cells = []
    for r in rows:
        baseline = baselines.get(r["dtype"])  # the same weights dtype without batching
        speedup = f"{r['proteins_per_s'] / baseline:.1f}x" if baseline else "-"
        cells.append([
            r["description"], r["dtype"], str(r.get("round", 1)), common.format_number(r["proteins_per_s"]),
            common.format_number(round(r["tokens_per_s"])),
            common.format_number(r["latency_ms"]["p50"]),
            common.format_number(r["latency_ms"]["p99"]),
            common.format_number(r["mean_batch_size"]), common.format_number(r["forwards"]),
            common.format_number(r["sequences_per_forward"]), speedup,
        ])
    return [common.markdown_table(headers, cells, numeric_from=3)]


def header_lines(
    args: argparse.Namespace, info: ServerInfo, weights_note: str, workload: Workload
) -> list[str]:
    lengths = [len(s) + 2 for _, s in workload.records]
    device = torch.device(info.device)
    return [
        f"# {args.model}: load benchmark, {args.clients} concurrent clients, "
        f"one protein per Logits call ({args.output})",
        f"server: `esmc serve` subprocess on {info.device} "
        f"({', '.join(args.dtypes or [info.dtype])}), "
        f"{common.threads_note(args.server_threads)}; {common.device_description(device)}",
        weights_note,
        f"workload: {Path(args.fasta).name}, {len(workload.records)} proteins, "
        f"{sum(lengths):,} tokens (BOS/EOS included), median {statistics.median(lengths):.0f}, "
        f"longest {max(lengths):,}",
        common.long_sequence_note(args.long, workload.changed, workload.total, info.max_length - 2),
        "clients: AsyncESMCClient, one channel each, one asyncio loop in the benchmark process",
        "",
    ]


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_served_model_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="first N proteins only")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--output", default="mean_embedding", choices=list(OUTPUTS))
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}"
    )
    parser.add_argument("--max-wait-ms", type=float, default=None, help="default: the server's")
    parser.add_argument(
        "--long", default="crop", choices=common.LONG_POLICIES,
        help="sequences over the model's limit: crop them (default) or skip them",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument(
        "--dtypes", default=None,
        help="comma-separated server dtypes (e.g. float32,int8): every mode is run once per "
        "dtype in the same run, one row each, interleaved with --rounds (default: --dtype alone)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the modes N times, interleaved")
    args = parser.parse_args(argv)
    args.modes = common.parse_modes(parser, args.modes, MODES)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.dtypes else []
    unknown = set(args.dtypes) - {"float32", "bfloat16", "float16", "int8", "auto"}
    if unknown:
        parser.error(f"--dtypes: unknown {sorted(unknown)}")
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    records = common.load_proteins(args.fasta, args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        model, weights_note = common.weights_to_serve(
            args.model, args.weights, Path(directory), args.seed
        )
        args.secrets_dir = directory
        for round_ in range(1, args.rounds + 1):
            for dtype in args.dtypes or [None]:
                for mode in args.modes:
                    row, info, workload = run_mode(model, mode, records, args, dtype)
                    rows.append({**row, "round": round_})

    payload = {
        "benchmark": "load",
        "model": args.model,
        "weights": weights_note,
        "server": {
            "device": info.device, "dtype": info.dtype, "process": "esmc serve",
            "threads": args.server_threads,
        },
        "device": common.device_description(torch.device(info.device)),
        "output": args.output,
        "clients": args.clients,
        "fasta": str(args.fasta),
        "proteins": len(workload.records),
        "tokens": sum(len(s) + 2 for _, s in workload.records),
        "long_sequences": {
            "policy": args.long, "max_residues": info.max_length - 2, "affected": workload.changed,
        },
        "rows": rows,
        "load": common.load_note(load_at_start),
    }
    header = header_lines(args, info, weights_note, workload)
    header.insert(-1, payload["load"])
    common.emit(header + table_lines(rows), payload, args.json)
    return payload


if __name__ == "__main__":
    main()
