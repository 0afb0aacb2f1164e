"""Peak memory of this process, measured the same way everywhere."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_bytes"]


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
