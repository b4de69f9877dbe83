"""Process-level settings that make CPU inference fast and steady."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_NEVER_TRIM = 2**62


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the OS.

    By default glibc returns large freed blocks to the kernel, so the next forward's
    activations fault their pages in again. Measured here (2-core VM, esmc-tiny): after one
    run of large packed batches, one-sequence forwards ran 9x slower until the process ended;
    with this setting they do not slow down. Tensors above 32 MiB are still mapped per
    allocation (glibc's limit), so CPU batches should stay below that (a few thousand
    tokens). Returns whether the setting took effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(_NEVER_TRIM, 2**31 - 1))) == 1) and ok
    if not ok:
        log.warning("mallopt refused the allocator settings; CPU forwards may slow down")
    return ok


# -- bfloat16 on the CPU -----------------------------------------------------------------------

BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU features that compute bfloat16 natively: x86 AVX-512 BF16 and AMX-BF16 (torch's names),
Arm's BF16 extension (``/proc/cpuinfo``). Without one, oneDNN emulates bf16 matmuls through
float32 and they run slower than float32 (measured 2.7x slower on an AVX-512 Xeon without BF16)."""


def cpu_capabilities() -> dict[str, bool]:
    """The CPU's features as torch reports them (its ``cpuinfo``), plus ``/proc/cpuinfo`` flags."""
    import torch

    capabilities: dict[str, bool] = {}
    report = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if report is not None:
        try:
            capabilities.update({k: v for k, v in report().items() if isinstance(v, bool)})
        except (RuntimeError, AttributeError):
            pass
    probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    for name, probe in probes:  # the public helpers, if the report above lacked them
        if name not in capabilities and hasattr(torch.cpu, probe):
            capabilities[name] = bool(getattr(torch.cpu, probe)())
    for flag in _proc_cpuinfo_flags():
        capabilities.setdefault(flag, True)
    return capabilities


def _proc_cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(capabilities: dict[str, bool] | None = None) -> bool:
    """Whether this CPU (or the given ``capabilities``) computes bfloat16 natively."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    return any(capabilities.get(name, False) for name in BF16_CPU_FEATURES)


def resolve_dtype(name: str | None, device, capabilities: dict[str, bool] | None = None):
    """The weights dtype for ``name`` on ``device``.

    ``None``: the reference's choice, bfloat16 on CUDA and exact float32 elsewhere.
    ``"auto"``: bfloat16 on CUDA, and on a CPU with native bf16 (:func:`cpu_has_native_bf16`);
    float32 on any other CPU, where bf16 would be both slower and less accurate.
    Otherwise ``float32`` / ``bfloat16`` / ``float16``, or ``int8`` on the CPU
    (:mod:`esmc.quantize`; never chosen by ``auto``).
    """
    import torch

    device = torch.device(device)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "int8" and device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU only, not on {device.type}")
    names["int8"] = torch.int8
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16(capabilities)):
            return torch.bfloat16
        return torch.float32
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(names)}")
    return names[name]
