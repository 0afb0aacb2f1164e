"""Memory of this process: peak measured the same way everywhere, freed heap given back."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

__all__ = ["format_bytes", "peak_rss_bytes", "release_freed_heap"]


def format_bytes(n: float | None, digits: int = 2) -> str:
    """``1.23 GB``-style text (decimal units); ``?`` for None."""
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def peak_rss_bytes() -> int:
    """High-water RSS of this process's own address space.

    ``VmHWM`` from ``/proc/self/status`` where it exists (Linux): unlike ``ru_maxrss`` it does
    not carry over the RSS of the parent that forked this process (a benchmark holding a model
    would otherwise be billed to every child it starts). Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux-style KiB


def release_freed_heap() -> bool:
    """Return the heap pages freed so far to the OS (glibc ``malloc_trim``).

    glibc keeps freed memory mapped for reuse, so a process's RSS also counts what it no
    longer holds: after loading a model from its codes, ~20 MB of loading temporaries
    (docs/inference.md). Elsewhere than Linux with glibc, nothing is done.

    Returns:
        Whether the heap was trimmed (False: not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    trim(0)
    return True
