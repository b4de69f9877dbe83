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
