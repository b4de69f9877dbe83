"""Helpers shared by the benchmark commands: workload, device, timing, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from esmc.fasta import read_fasta

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
    return f"CPU {_cpu_name()} ({os.cpu_count()} cores, {threads} torch threads), {versions}"


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
