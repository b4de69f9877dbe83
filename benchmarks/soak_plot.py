"""The soak run's picture: small-request latency, resident memory per replica and errors
over time, with the faults marked on the time axis (matplotlib, Agg)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from benchmarks.soak_faults import Fault
from benchmarks.soak_measure import Sample

FAULT_COLOURS = {
    "SIGKILL": "tab:red", "SIGTERM drain": "tab:orange", "token rotation": "tab:purple",
    "certificate reload": "tab:green", "unexpected exit": "black",
}


def plot(path: Path, series: list[dict], samples: list[Sample], faults: list[Fault],
         title: str, run_end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lat, rss, err) = plt.subplots(3, 1, figsize=(12, 10), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 2, 2]})
    times = [row["t"] for row in series]
    methods = sorted({m for row in series for m in row["p99_ms"]})
    for method in methods:
        p99 = [row["p99_ms"].get(method) for row in series]
        p50 = [row["p50_ms"].get(method) for row in series]
        line, = lat.plot(times, p99, marker=".", label=f"{method} p99")
        lat.plot(times, p50, linestyle=":", color=line.get_color(), label=f"{method} p50")
    lat.set_yscale("log")
    lat.set_ylabel("small-request latency, ms")
    lat.legend(fontsize=7, ncol=3, loc="upper left")

    by_pid = defaultdict(list)
    for s in samples:
        by_pid[(s.replica, s.pid)].append((s.t, s.rss_mb))
    colours = {}
    for (replica, pid), points in sorted(by_pid.items(), key=lambda kv: kv[1][0][0]):
        kwargs = {"label": f"replica {replica}"} if replica not in colours else {}
        line, = rss.plot([t for t, _ in points], [m for _, m in points],
                         color=colours.get(replica), **kwargs)
        colours.setdefault(replica, line.get_color())
    rss.set_ylabel("resident memory, MB")
    rss.legend(fontsize=7, loc="upper left")

    keys = sorted({k for row in series for k in row["errors"]})
    bottom = [0] * len(series)
    width = (times[1] - times[0]) * 0.9 if len(times) > 1 else 1.0
    for key in keys:
        values = [row["errors"].get(key, 0) for row in series]
        err.bar(times, values, width=width, bottom=bottom, align="edge", label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    err.set_ylabel("failed steady calls,\nunexpected mischief codes")
    err.set_xlabel("seconds since the start of the run")
    if keys:
        err.legend(fontsize=7, loc="upper left")
    else:
        err.text(0.5, 0.5, "no steady-call errors, no unexpected codes", ha="center",
                 transform=err.transAxes)

    for f in faults:
        colour = FAULT_COLOURS.get(f.name, "grey")
        end = f.end if f.end is not None else run_end
        for axis in (lat, rss, err):
            axis.axvline(f.start, color=colour, linewidth=1.2, label=None)
            axis.axvspan(f.start, max(end, f.start + 0.5), color=colour, alpha=0.12)
        where = "" if f.replica is None else f" r{f.replica}"
        lat.annotate(f"{f.name}{where}", (f.start, 1.0), xycoords=("data", "axes fraction"),
                     rotation=90, fontsize=7, va="top", ha="right", color=colour)
    lat.set_xlim(0, run_end)
    lat.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
