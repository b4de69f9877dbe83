"""The summary of a soak run (JSON) and its picture (PNG).

Definitions used in the summary:

- **small requests**: the unary calls on short proteins (``Logits`` of 30-120 residues,
  ``ScoreVariants`` of 3 variants, ``PseudoLogLikelihood`` of 24 residues) of the steady load.
- **fault window**: from a fault's start to 15 s after its own action completed (the
  replica SERVING again, the reload or rotation checked).
- **steady p99**: the p99 latency of the small requests that started after the first
  ``latency_warmup_s`` and outside every fault window.
- **recovery**: the time from a fault's start to the first moment ``t`` such that the small
  requests ending in ``[t, t + 5 s]`` have a p99 at or under the steady p99 and no steady
  call ended with an error there (0 when the fault disturbed nothing).
- **RSS slope**: least-squares slope of a process's resident memory, in MB per minute, over
  its samples from ``rss_warmup_s`` after it turned SERVING to its end, for each process that
  lived at least ``min_lifetime_s``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from benchmarks.soak_faults import Fault
from benchmarks.soak_fleet import Replica
from benchmarks.soak_load import Call, Ledger
from benchmarks.soak_measure import Sample
from benchmarks.soak_mischief import EXPECTED

FAULT_TAIL_S = 15.0
RECOVERY_WINDOW_S = 5.0
RECOVERY_STEP_S = 0.5
BAD_CODES = ("INTERNAL", "UNKNOWN")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fault_windows(faults: list[Fault], run_end: float) -> list[tuple[float, float]]:
    return [(f.start, (f.end if f.end is not None else run_end) + FAULT_TAIL_S) for f in faults]


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def latency(calls: list[Call], faults: list[Fault], run_end: float, warmup_s: float) -> dict:
    """Small-request latency (ms) per method outside fault windows, and the worst p99."""
    windows = fault_windows(faults, run_end)
    quiet = defaultdict(list)
    for c in calls:
        if c.small and c.code == "OK" and c.start >= warmup_s and not _inside(c.start, windows) \
                and not _inside(c.end, windows):
            quiet[c.method].append(1000 * (c.end - c.start))
    per_method = {
        method: {"calls": len(v), "p50_ms": _round(percentile(v, 50)),
                 "p99_ms": _round(percentile(v, 99)), "max_ms": _round(max(v))}
        for method, v in sorted(quiet.items())
    }
    everything = [x for v in quiet.values() for x in v]
    worst = max((m["p99_ms"] for m in per_method.values()), default=None)
    return {"outside_fault_windows": per_method, "worst_method_p99_ms": worst,
            "all_small_p99_ms": _round(percentile(everything, 99))}


def recoveries(calls: list[Call], faults: list[Fault], steady_p99_ms: float | None,
               run_end: float) -> list[dict]:
    small = sorted((c for c in calls if c.small), key=lambda c: c.end)
    steady_errors = [c.end for c in calls if c.kind == "steady" and c.code != "OK"]
    out = []
    for f in faults:
        recovered = None
        t = f.start
        while steady_p99_ms is not None and t + RECOVERY_WINDOW_S <= run_end:
            window = [1000 * (c.end - c.start) for c in small
                      if t <= c.end <= t + RECOVERY_WINDOW_S and c.code == "OK"]
            errors = any(t <= e <= t + RECOVERY_WINDOW_S for e in steady_errors)
            if len(window) >= 3 and not errors and percentile(window, 99) <= steady_p99_ms:
                recovered = t - f.start
                break
            t += RECOVERY_STEP_S
        out.append({
            "fault": f.name, "replica": f.replica, "at_s": round(f.start, 1),
            "action_done_s": None if f.end is None else round(f.end - f.start, 1),
            "recovery_s": None if recovered is None else round(recovered, 1),
            "detail": f.detail,
        })
    return out


def rss_slopes(samples: list[Sample], replicas: list[Replica], warmup_s: float,
               min_lifetime_s: float, run_end: float) -> list[dict]:
    rows = []
    for replica in replicas:
        for life in replica.lifetimes:
            ended = life.ended if life.ended is not None else run_end
            lived = ended - life.started
            serving = life.serving if life.serving is not None else life.started
            points = [(s.t, s.rss_mb, s.fds) for s in samples
                      if s.pid == life.pid and s.t >= serving + warmup_s]
            mine = [s for s in samples if s.pid == life.pid]
            row = {
                "replica": replica.index, "pid": life.pid, "started_s": round(life.started, 1),
                "serving_s": None if life.serving is None else round(life.serving, 1),
                "ended_s": round(ended, 1), "how_it_ended": life.how or "end of run",
                "lifetime_s": round(lived, 1),
                "rss_mb_first": _round(mine[0].rss_mb if mine else None),
                "rss_mb_last": _round(mine[-1].rss_mb if mine else None),
                "rss_mb_max": _round(max((s.rss_mb for s in mine), default=None)),
                "fds_first": mine[0].fds if mine else None,
                "fds_last": mine[-1].fds if mine else None,
                "fds_max": max((s.fds for s in mine), default=None),
                "rss_slope_mb_per_min": None,
            }
            if lived >= min_lifetime_s and len(points) >= 3:
                row["rss_slope_mb_per_min"] = _round(60 * _slope([(t, m) for t, m, _ in points]))
                row["fds_slope_per_min"] = _round(60 * _slope([(t, f) for t, _, f in points]))
                row["slope_over_s"] = round(points[-1][0] - points[0][0], 1)
            rows.append(row)
    return rows


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mean_t) * (y - mean_y) for t, y in points) / var


def codes(calls: list[Call]) -> dict:
    """Calls by code; by method and code; steady failures and unexpected mischief codes."""
    by_code = Counter(c.code for c in calls)
    by_method = defaultdict(Counter)
    for c in calls:
        by_method[c.method][c.code] += 1
    steady_failures = Counter(
        (c.method, c.code, c.message[:160]) for c in calls if c.kind == "steady" and c.code != "OK"
    )
    unexpected_mischief = Counter(
        (c.kind, c.method, c.code, c.message[:160]) for c in calls
        if c.kind != "steady" and c.code not in EXPECTED.get(c.kind, ())
    )
    bad = Counter((c.method, c.kind, c.code, c.message[:200]) for c in calls if c.code in BAD_CODES)
    mischief = Counter(c.kind for c in calls if c.kind != "steady")
    return {
        "calls": len(calls),
        "steady_calls": sum(1 for c in calls if c.kind == "steady"),
        "mischief_calls": sum(mischief.values()),
        "by_code": dict(by_code.most_common()),
        "by_method": {m: dict(v.most_common()) for m, v in sorted(by_method.items())},
        "mischief_by_kind": dict(mischief.most_common()),
        "internal_or_unknown": sum(by_code[c] for c in BAD_CODES),
        "internal_or_unknown_calls": [
            {"method": m, "kind": k, "code": c, "message": msg, "count": n}
            for (m, k, c, msg), n in bad.most_common()
        ],
        "steady_failures": [
            {"method": m, "code": c, "message": msg, "count": n}
            for (m, c, msg), n in steady_failures.most_common()
        ],
        "mischief_unexpected_codes": [
            {"kind": k, "method": m, "code": c, "message": msg, "count": n}
            for (k, m, c, msg), n in unexpected_mischief.most_common()
        ],
    }


def server_view(samples: list[Sample]) -> dict:
    """Per replica: requests by code counted by the servers (last scrape of each process;
    a SIGKILLed process's last seconds are missing), mean batch size, max queue depth."""
    last: dict[int, Sample] = {}
    for s in samples:
        if s.requests or s.batch_sequences_count is not None:
            last[s.pid] = s
    by_code = defaultdict(Counter)
    batches = defaultdict(lambda: [0.0, 0.0])
    for s in last.values():
        for _, code, value in s.requests:
            by_code[s.replica][code] += int(value)
        batches[s.replica][0] += s.batch_sequences_sum or 0
        batches[s.replica][1] += s.batch_sequences_count or 0
    queue = defaultdict(float)
    for s in samples:
        queue[s.replica] = max(queue[s.replica], s.queue_depth or 0)
    return {
        str(r): {
            "requests_by_code": dict(by_code[r].most_common()),
            "forwards": int(batches[r][1]),
            "mean_sequences_per_forward": _round(batches[r][0] / batches[r][1])
            if batches[r][1] else None,
            "max_queue_depth": queue[r],
        }
        for r in sorted(set(by_code) | set(queue))
    }


def windows_series(calls: list[Call], samples: list[Sample], interval_s: float,
                   run_end: float) -> list[dict]:
    """Per interval: small-request p50/p99 per method, error counts, RSS per replica."""
    count = max(1, math.ceil(run_end / interval_s))
    rows = [{"t": (k + 1) * interval_s, "p50_ms": {}, "p99_ms": {}, "errors": Counter(),
             "rss_mb": {}, "queue_depth": {}} for k in range(count)]
    per_method = defaultdict(lambda: defaultdict(list))
    for c in calls:
        k = min(count - 1, int(c.end // interval_s))
        if c.small and c.code == "OK":
            per_method[k][c.method].append(1000 * (c.end - c.start))
        if c.kind == "steady" and c.code != "OK":
            rows[k]["errors"][f"steady {c.code}"] += 1
        elif c.kind != "steady" and c.code not in EXPECTED.get(c.kind, ()):
            rows[k]["errors"][f"mischief {c.code}"] += 1
    for k, methods in per_method.items():
        for method, values in methods.items():
            rows[k]["p50_ms"][method] = _round(percentile(values, 50))
            rows[k]["p99_ms"][method] = _round(percentile(values, 99))
    for s in samples:
        k = min(count - 1, int(s.t // interval_s))
        rows[k]["rss_mb"][str(s.replica)] = round(s.rss_mb, 1)
        if s.queue_depth is not None:
            rows[k]["queue_depth"][str(s.replica)] = s.queue_depth
    for row in rows:
        row["errors"] = dict(row["errors"])
    return rows


def driver_view(driver: list[dict]) -> dict:
    """The clients' process: first, last and largest memory, descriptors and asyncio tasks."""
    rows = [d for d in driver if d["rss_mb"] is not None]
    if not rows:
        return {}
    return {
        key: {"first": _round(rows[0][key]), "last": _round(rows[-1][key]),
              "max": _round(max(r[key] for r in rows))}
        for key in ("rss_mb", "fds", "tasks")
    } | {"samples": driver}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def ledger_invariants(ledger: Ledger) -> dict:
    return {
        "bulk_runs": ledger.bulk["runs"], "bulk_ids": ledger.bulk["ids"],
        "bulk_ids_lost": ledger.bulk["lost"], "bulk_ids_duplicated": ledger.bulk["duplicated"],
        "bulk_embeddings_differing": ledger.bulk["differing"],
        "generations": ledger.generations["runs"],
        "generations_differing": ledger.generations["differing"],
        "generations_failed": ledger.generations["failed"],
        "differences": ledger.differences[:20],
    }


def markdown(summary: dict) -> str:
    """The summary's figures as markdown tables (what docs and results show)."""
    goals, inv, codes = summary["goals"], summary["invariants"], summary["codes"]
    lines = [
        f"`{summary['command']}`: {summary['load_s']} s of load, {codes['calls']} calls "
        f"({codes['mischief_calls']} of them mischief); `uptime` before: "
        f"{summary['machine']['uptime_before']}; after: {summary['machine']['uptime_after']}",
        "",
        "| figure | value | goal |",
        "| --- | ---: | --- |",
        f"| calls answered INTERNAL or UNKNOWN | {goals['internal_or_unknown']} | 0 |",
        f"| bulk ids lost / answered twice (of {inv['bulk_ids']} in {inv['bulk_runs']} bulk "
        f"embeds) | {inv['bulk_ids_lost']} / {inv['bulk_ids_duplicated']} | 0 / 0 |",
        f"| bulk embeddings differing from the undisturbed run | "
        f"{inv['bulk_embeddings_differing']} | 0 |",
        f"| seeded generations differing (of {inv['generations']}; failed: "
        f"{inv['generations_failed']}) | {inv['generations_differing']} | 0 |",
        f"| largest RSS slope, MB/min | {goals['max_rss_slope_mb_per_min']} | <= 5 |",
        f"| worst small-request p99 outside fault windows, ms | "
        f"{goals['worst_small_p99_ms_outside_faults']} | reported |",
        "",
        "Calls by code: " + ", ".join(f"{k} {v}" for k, v in codes["by_code"].items()),
        "",
        "| fault | replica | at s | action done after s | recovery s | detail |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in summary["faults"]:
        lines.append(f"| {f['fault']} | {'all' if f['replica'] is None else f['replica']} | "
                     f"{f['at_s']} | {f['action_done_s']} | {f['recovery_s']} | {f['detail']} |")
    lines += ["", "| replica | pid | lifetime s | ended by | RSS MB first / last / max | "
                  "RSS slope MB/min | descriptors first / last / max |",
              "| ---: | ---: | ---: | --- | --- | ---: | --- |"]
    for p in summary["processes"]:
        lines.append(
            f"| {p['replica']} | {p['pid']} | {p['lifetime_s']} | {p['how_it_ended']} | "
            f"{p['rss_mb_first']} / {p['rss_mb_last']} / {p['rss_mb_max']} | "
            f"{p['rss_slope_mb_per_min'] if p['rss_slope_mb_per_min'] is not None else '-'} | "
            f"{p['fds_first']} / {p['fds_last']} / {p['fds_max']} |")
    lines += ["", "| small requests outside fault windows | calls | p50 ms | p99 ms | max ms |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for method, m in summary["latency"]["outside_fault_windows"].items():
        lines.append(
            f"| {method} | {m['calls']} | {m['p50_ms']} | {m['p99_ms']} | {m['max_ms']} |"
        )
    if codes["steady_failures"] or codes["mischief_unexpected_codes"]:
        lines += ["", "| what | method | code | message | count |",
                  "| --- | --- | --- | --- | ---: |"]
        for f in codes["steady_failures"]:
            lines.append(f"| steady call failed | {f['method']} | {f['code']} | {f['message']} | "
                         f"{f['count']} |")
        for f in codes["mischief_unexpected_codes"]:
            lines.append(f"| mischief '{f['kind']}' | {f['method']} | {f['code']} | "
                         f"{f['message']} | {f['count']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as handle:
        print(markdown(json.load(handle)))
