"""Helpers shared by the benchmark commands: workload, device, timing, table and JSON output,
and a model served by ``esmc serve`` in its own process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from esmc.config import CONFIGS, get_config
from esmc.fasta import read_fasta
from esmc import ESMC
from esmc.weights import SHIPPED_MODELS, WeightsError, save_safetensors, shipped_weights

LONG_POLICIES = ("crop", "skip")


def load_proteins(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``(id, sequence)`` pairs from a FASTA file in file order, at most ``limit`` of them."""
    records = []
    for record in read_fasta(path):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    if not records:
        raise ValueError(f"no sequences in {path}")
    return records


def fit_to_length(
    records: Sequence[tuple[str, str]], max_residues: int, policy: str = "crop"
) -> tuple[list[tuple[str, str]], int]:
    """Crop sequences to ``max_residues`` or drop them; returns the records and how many changed."""
    if policy not in LONG_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {LONG_POLICIES}")
    fitted, changed = [], 0
    for name, sequence in records:
        if len(sequence) <= max_residues:
            fitted.append((name, sequence))
            continue
        changed += 1
        if policy == "crop":
            fitted.append((name, sequence[:max_residues]))
    return fitted, changed


def long_sequence_note(policy: str, changed: int, total: int, max_residues: int) -> str:
    """One line saying what happened to sequences over the model's limit."""
    verb = "cropped to" if policy == "crop" else "skipped, limit"
    return f"sequences longer than {max_residues} residues: {changed} of {total} {verb} {max_residues}"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes, with the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_description(device: torch.device) -> str:
    """A line naming the hardware and software a benchmark ran on."""
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / 2**30
        return f"{props.name} ({memory:.0f} GiB), CUDA {torch.version.cuda}, {versions}"
    threads = torch.get_num_threads()
    return (
        f"CPU {_cpu_name()} ({os.cpu_count()} cores, {threads} torch threads; {_cpu_features()}),"
        f" {versions}"
    )


def _cpu_features() -> str:
    """The features that decide int8 and bf16 speed, as torch sees them."""
    from esmc.runtime import cpu_capabilities

    have = cpu_capabilities()
    names = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
    found = [name for name in names if have.get(name)]
    return ", ".join(found) if found else "none of AVX2/AVX-512/VNNI/AMX"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_number(value: float | int | None, digits: int = 3) -> str:
    """Thousands separators for large values, ``digits`` significant digits for small ones."""
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 10 ** (digits - 1):
        return f"{round(value):,}"
    return f"{value:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 2) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def emit(lines: Sequence[str], payload: dict, json_path: str | Path | None) -> None:
    """Print ``lines`` then ``payload`` as JSON on stdout, and write the JSON to ``json_path``."""
    text = json.dumps(payload, indent=2)
    print("\n".join(lines))
    print()
    print(text)
    if json_path is not None:
        Path(json_path).write_text(text + "\n")


# -- a served model (bench_load, bench_generation) --------------------------------------------

WEIGHT_MODES = ("auto", "pretrained", "random")


def weights_to_serve(model: str, mode: str, directory: Path, seed: int = 0) -> tuple[str, str]:
    """What ``esmc serve --model`` gets, and a line saying which weights those are.

    ``auto``: the real weights of a local path, a hub repo id or a shipped model whose file
    exists; random weights for any other registry name (e.g. ``esmc-300m``: no download).
    ``random``: a registry config with random weights written to ``directory``.
    """
    if mode == "pretrained" or (mode == "auto" and _has_local_or_repo_weights(model)):
        return model, f"weights: {model} (pretrained)"
    if model not in CONFIGS:
        names = ", ".join(CONFIGS)
        raise ValueError(f"random weights need a registry name ({names}), got {model!r}")
    torch.manual_seed(seed)
    path = Path(directory) / "model.safetensors"
    save_safetensors(ESMC(get_config(model)), path)
    note = f"weights: random, {model} config, seed {seed} (speed does not depend on weight values)"
    return str(path), note


def _has_local_or_repo_weights(model: str) -> bool:
    if model in SHIPPED_MODELS:
        try:
            shipped_weights(model)
        except WeightsError:
            return False
        return True
    return model not in CONFIGS  # a path or a hub repo id: served as given


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A running ``esmc serve`` process: its gRPC target and its Prometheus URL."""

    target: str
    metrics_url: str
    command: tuple[str, ...]


@contextlib.contextmanager
def serve(
    model: str,
    options: Sequence[str] = (),
    threads: int | None = None,
    ready_s: float = 900.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServedModel]:
    """Run ``esmc serve --model MODEL *options`` in its own process until the block ends.

    ``threads`` sets the server's CPU threads (``OMP_NUM_THREADS``; None: torch's default).
    Yields once gRPC health says SERVING (model loaded and warmed up); SIGTERM at the end.
    ``credentials``: what the health probe needs when ``options`` turn TLS on.
    """
    port, metrics_port = free_ports(2)
    command = (
        sys.executable, "-m", "esmc_server.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--log-level", "WARNING",
        *options,
    )
    with tempfile.TemporaryFile() as log:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            target = f"127.0.0.1:{port}"
            _wait_serving(process, target, log, ready_s, credentials)
            yield ServedModel(target, f"http://127.0.0.1:{metrics_port}/metrics", command)
        finally:
            _terminate(process)


def threads_note(threads: int | None) -> str:
    """How many CPU threads a served model was given, in words."""
    return "torch's default CPU threads" if threads is None else f"OMP_NUM_THREADS={threads}"


def _wait_serving(
    process: subprocess.Popen, target: str, log, ready_s: float, credentials=None
) -> None:
    deadline = time.monotonic() + ready_s
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                output = log.read().decode(errors="replace")[-4000:]
                raise RuntimeError(f"esmc serve exited with {process.returncode}:\n{output}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"esmc serve on {target} was not SERVING after {ready_s:.0f} s")


def _terminate(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scrape_metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus endpoint, e.g. ``{"esmc_forwards_total": 12.0}``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def counter_deltas(before: dict[str, float], after: dict[str, float], names: Sequence[str]) -> dict:
    """How much each counter in ``names`` grew between two scrapes (as integers)."""
    return {name: round(after.get(name, 0.0) - before.get(name, 0.0)) for name in names}


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation) of ``seconds``, in milliseconds."""
    ordered = sorted(seconds)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return 1000 * (ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def add_served_model_arguments(parser) -> None:
    """The flags both service benchmarks share: which weights to serve, on what, and the data."""
    parser.add_argument("--model", default="esmc-tiny", help="registry name, hub repo id or path")
    parser.add_argument(
        "--weights", default="auto", choices=WEIGHT_MODES,
        help="auto: real weights when at hand (path, repo id, shipped esmc-tiny), else random",
    )
    parser.add_argument("--fasta", default="../shared/data/proteome.fasta")
    parser.add_argument("--device", default="auto", help="server device: auto, cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, help="server weights dtype (default: its own)")
    parser.add_argument(
        "--server-threads", type=int, default=None,
        help="CPU threads of the server (OMP_NUM_THREADS); default: torch's own choice",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: the server's")
    parser.add_argument("--json", default=None, help="also write the JSON here")


def parse_modes(parser, text: str, modes: tuple[str, ...]) -> list[str]:
    """A comma-separated subset of ``modes``; an argparse error otherwise."""
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    if not chosen or set(chosen) - set(modes):
        parser.error(f"--modes must be a subset of {modes}, got {chosen}")
    return chosen


def load_note(started: tuple[float, float, float]) -> str:
    """The machine's load average (``uptime``'s 1/5/15-minute figures) at start and now."""
    now = os.getloadavg()
    return (
        f"machine load average (1/5/15 min): {started[0]:.2f}/{started[1]:.2f}/{started[2]:.2f} "
        f"at start, {now[0]:.2f}/{now[1]:.2f}/{now[2]:.2f} at the end, {os.cpu_count()} CPUs"
    )
