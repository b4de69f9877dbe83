"""Soak and chaos run: N real ``esmc serve`` replicas (TLS and tokens on) under a steady mixed
load from many clients, with mischief mixed in and faults on a schedule; writes a JSON
summary and a PNG.

    python -m benchmarks.soak --duration 600 --replicas 3 --model esmc-tiny --out runs/soak

Each replica runs one torch thread. Before the clock starts, the seeded generations and the
embeddings of the bulk pool are computed once by the undisturbed fleet: the run compares
every generation and every bulk embedding with them. Then, for ``--duration`` seconds:

- the steady load (``benchmarks.soak_load``): ``--clients`` workers, each with its own
  ``AsyncESMCClient`` over every replica, calling Logits, bulk embed, seeded Generate,
  ScoreVariants or PseudoLogLikelihood in a loop;
- mischief (``benchmarks.soak_mischief``): ~5% of the requests malformed, oversized, with a
  wrong token or cancelled mid-stream, plus disconnects, slow readers and unread streams;
- faults (``benchmarks.soak_faults``): SIGKILL and restart, a token rotation, a certificate
  reload and a SIGTERM drain, at fixed fractions of the run; replica 0 is never taken down;
- measurement every ``--sample-s`` (``benchmarks.soak_measure``).

The summary's definitions are in ``benchmarks.soak_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import soak_report as report
from benchmarks.soak_faults import Faults, schedule
from benchmarks.soak_fleet import CLIENT_OPTIONS, Auth, Replica, Secrets
from benchmarks.soak_load import STEADY_KINDS, Ledger, SoakClient, Steady, load_data
from benchmarks.soak_load import undisturbed_run, worker
from benchmarks.soak_measure import sample_loop
from benchmarks.soak_mischief import MAX_REQUEST_BYTES, Mischief
from benchmarks.soak_plot import plot

STOP_GRACE_S = 180.0  # calls in flight at the end get this long to finish


class Clock:
    """Seconds since :meth:`reset` (the start of the load)."""

    def __init__(self):
        self.origin = time.monotonic()

    def reset(self) -> float:
        """Start counting from now; returns how far the origin moved (seconds)."""
        now = time.monotonic()
        shift, self.origin = now - self.origin, now
        return shift

    def __call__(self) -> float:
        return time.monotonic() - self.origin


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--replicas", type=int, default=3, help="esmc serve processes (default 3)")
    p.add_argument("--clients", type=int, default=8, help="steady workers, one client each")
    p.add_argument("--model", default="esmc-tiny")
    p.add_argument("--fasta", default="../shared/data/proteome.fasta")
    p.add_argument("--out", default="runs/soak", help="directory for the JSON, PNG and logs")
    p.add_argument("--think-s", type=float, default=0.3, help="pause between a worker's calls")
    p.add_argument("--mischief-rate", type=float, default=0.05)
    p.add_argument("--sample-s", type=float, default=5.0, help="measurement interval")
    p.add_argument("--forward-timeout-s", type=float, default=60.0,
                   help="the replicas' --forward-timeout-s (a shared 2-core CPU: 60)")
    p.add_argument("--idle-timeout-s", type=float, default=20.0,
                   help="the replicas' --stream-idle-timeout-s (unread streams end after it)")
    p.add_argument("--bulk-size", type=int, default=60, help="proteins per bulk embed")
    p.add_argument("--prompts", type=int, default=6, help="seeded generation prompts")
    p.add_argument("--rss-warmup-s", type=float, default=120.0,
                   help="RSS slopes start this long after a process started")
    p.add_argument("--min-lifetime-s", type=float, default=180.0,
                   help="RSS slopes only for processes that lived this long")
    p.add_argument("--latency-warmup-s", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line about the machine, kept in the JSON")
    args = p.parse_args(argv)
    if args.replicas < 1 or args.clients < 1 or args.duration <= 0:
        p.error("--replicas and --clients must be >= 1, --duration > 0")
    return args


def server_flags(args: argparse.Namespace, secrets: Secrets) -> list[str]:
    return [
        *secrets.server_flags(), "--threads", "1",
        "--forward-timeout-s", str(args.forward_timeout_s),
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--stream-idle-timeout-s", str(args.idle_timeout_s),
        "--drain-delay-s", "2", "--grace-s", "15", "--max-connection-age-s", "120",
    ]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return Path("/proc/loadavg").read_text().strip()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


async def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "uptime_before": uptime(),
               "note": args.note}
    clock = Clock()
    secrets = Secrets(logs)
    credentials = secrets.channel_credentials()
    replicas = [Replica(i, args.model, server_flags(args, secrets), logs, clock)
                for i in range(args.replicas)]
    for replica in replicas:
        replica.start()
    try:
        await asyncio.gather(*(r.wait_serving(credentials, 600) for r in replicas))
        return await drive(args, replicas, secrets, clock, machine)
    finally:
        for replica in replicas:
            replica.stop()


async def drive(args, replicas: list[Replica], secrets: Secrets, clock: Clock,
                machine: dict) -> dict:
    target = "ipv4:" + ",".join(r.address for r in replicas)
    auth = Auth(secrets.token)

    def new_client() -> SoakClient:
        return SoakClient(target, token=auth.token, root_certificates=secrets.ca_pem,
                          options=CLIENT_OPTIONS)

    data = load_data(args.fasta, args.prompts, args.seed)
    t_reference = time.monotonic()
    async with new_client() as client:
        reference = await undisturbed_run(client, data)
    reference_s = time.monotonic() - t_reference

    shift = clock.reset()
    for replica in replicas:  # started before the clock: negative times
        replica.shift_clock(shift)
    ledger = Ledger(clock)
    steady = Steady(ledger, data, reference, args.bulk_size)
    mischief = Mischief(ledger, data, target, secrets.channel_credentials(), auth,
                        args.idle_timeout_s)
    faults = Faults(replicas, secrets, auth, clock, ready_timeout_s=300,
                    drain_timeout_s=60)
    plan = schedule(args.duration, args.replicas)
    samples: list = []
    driver: list[dict] = []
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(worker(
            STEADY_KINDS[k % len(STEADY_KINDS)], k, steady, mischief, new_client,
            auth, stop, args.think_s, args.mischief_rate, args.seed,
        ))
        for k in range(args.clients)
    ]
    tasks.append(asyncio.create_task(
        mischief.long_loop(stop, random.Random(args.seed), pause_s=args.idle_timeout_s / 2)
    ))
    background = [
        asyncio.create_task(sample_loop(replicas, clock, args.sample_s, stop, samples, driver,
                                        faults.supervise)),
        asyncio.create_task(faults.run(plan, stop)),
    ]
    await asyncio.sleep(args.duration)
    stop.set()
    load_end = clock()
    done, pending = await asyncio.wait(tasks + background, timeout=STOP_GRACE_S)
    await faults.settle(timeout=STOP_GRACE_S)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    run_end = clock()
    for replica in replicas:  # lifetimes end with the run
        replica.stop()
    machine["uptime_after"] = uptime()
    out = Path(args.out)
    with open(out / "calls.jsonl", "w") as handle:  # every call, for a closer look
        for call in ledger.calls:
            handle.write(json.dumps(dataclasses.asdict(call)) + "\n")
    summary = summarize(args, ledger, samples, faults.faults, replicas, plan, machine,
                        load_end, run_end, reference_s, len(pending))
    summary["driver"] = report.driver_view(driver)
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = (f"soak: {args.replicas} replicas of {args.model}, {args.clients} clients, "
             f"{load_end:.0f} s, {summary['codes']['calls']} calls; {machine['cpu']} "
             f"({machine['cores']} cores, shared; load before/after: "
             f"{_load(machine['uptime_before'])} / {_load(machine['uptime_after'])})")
    plot(out / "soak.png", summary["series"], samples, faults.faults, title, run_end)
    return summary


def _load(uptime_line: str) -> str:
    return uptime_line.rsplit("load average:", 1)[-1].strip()


def summarize(args, ledger, samples, faults, replicas, plan, machine, load_end, run_end,
              reference_s, unfinished) -> dict:
    latency = report.latency(ledger.calls, faults, run_end, args.latency_warmup_s)
    steady_p99 = latency["all_small_p99_ms"]
    recoveries = report.recoveries(ledger.calls, faults, steady_p99, run_end)
    processes = report.rss_slopes(samples, replicas, args.rss_warmup_s, args.min_lifetime_s,
                                  run_end)
    codes = report.codes(ledger.calls)
    invariants = report.ledger_invariants(ledger)
    slopes = [p["rss_slope_mb_per_min"] for p in processes
              if p["rss_slope_mb_per_min"] is not None]
    summary = {
        "command": "python -m benchmarks.soak " + shlex.join(sys.argv[1:]),
        "settings": {**vars(args), "server_flags": server_flags(args, _NoSecrets())},
        "machine": machine,
        "load_s": round(load_end, 1), "run_s": round(run_end, 1),
        "undisturbed_run_s": round(reference_s, 1),
        "calls_unfinished_at_end": unfinished,
        "goals": {
            "internal_or_unknown": codes["internal_or_unknown"],
            "bulk_ids_lost": invariants["bulk_ids_lost"],
            "bulk_ids_duplicated": invariants["bulk_ids_duplicated"],
            "generations_differing": invariants["generations_differing"],
            "max_rss_slope_mb_per_min": max(slopes) if slopes else None,
            "worst_small_p99_ms_outside_faults": latency["worst_method_p99_ms"],
            "steady_small_p99_ms_outside_faults": steady_p99,
            "recovery_s": [r["recovery_s"] for r in recoveries],
        },
        "invariants": invariants,
        "codes": codes,
        "latency": latency,
        "faults": recoveries,
        "planned_faults": [{"at_s": t, "fault": f, "replica": r} for t, f, r in plan],
        "processes": processes,
        "servers": report.server_view(samples),
        "series": report.windows_series(ledger.calls, samples, args.sample_s, run_end),
    }
    return summary


class _NoSecrets:
    """Stands in for :class:`Secrets` to print the flags without paths."""

    def server_flags(self) -> list[str]:
        return ["--tls-cert", "server.pem", "--tls-key", "server.key",
                "--auth-tokens-file", "tokens.txt"]


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    print(report.markdown(summary))
    print(f"wrote {Path(args.out) / 'soak.json'} and {Path(args.out) / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
