"""Peak memory of this process, measured the same way everywhere."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["format_bytes", "peak_rss_bytes"]


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
