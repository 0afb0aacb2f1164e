"""Thread pools sized to the cores this process really gets, and idle threads that sleep.

Two OpenMP runtimes live in one process here: torch's (``torch/lib/libgomp``) and faiss-cpu's
(its own ``libgomp`` and an OpenMP OpenBLAS). By default an idle OpenMP thread spins for a
while before it sleeps. On a busy machine the spinning threads of one runtime take the cores
the other runtime (or another process) is working on: PG k-means' partition on 80k points
took 6-9 s with spinning threads on a loaded 2-core machine, 0.56 s with passive ones.
``OMP_WAIT_POLICY`` is read once, when a runtime is loaded, i.e. when torch (or faiss) is
first imported; :func:`passive_wait` therefore runs at the top of ``dist_pgkm/__init__.py``,
before the package imports torch. A process that imported torch earlier keeps its policy.

:func:`available_cores` counts the CPUs this process may run on (affinity mask) and caps them
by the cgroup CPU quota (containers, SLURM, Kubernetes limits), where ``os.cpu_count()``
reports every core of the host. :func:`set_threads` sizes both pools.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

__all__ = ["available_cores", "cgroup_cpu_limit", "passive_wait", "set_threads"]

logger = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def passive_wait() -> bool:
    """Make OpenMP runtimes loaded from now on sleep when idle (``OMP_WAIT_POLICY=PASSIVE``).

    A value the user set is kept. Must run before torch or faiss is imported to have an effect.

    Returns:
        Whether the policy in effect for runtimes loaded later is passive.
    """
    policy = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return policy.upper() == "PASSIVE"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(root: Path, relative: str) -> float | None:
    """Smallest ``cpu.max`` quota from the process's cgroup (v2) up to the root, in CPUs."""
    limit: float | None = None
    node = root / relative.lstrip("/")
    while True:
        text = _read(node / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                cpus = int(quota) / int(period)
                limit = cpus if limit is None else min(limit, cpus)
        if node == root or root not in node.parents:
            return limit
        node = node.parent


def _v1_limit(root: Path, relative: str) -> float | None:
    """``cpu.cfs_quota_us / cpu.cfs_period_us`` of the process's cgroup (v1), in CPUs."""
    for base in (root / "cpu" / relative.lstrip("/"), root / "cpu"):
        quota, period = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0 and int(period) > 0:
            return int(quota) / int(period)
    return None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited.

    Args:
        root: Where the cgroup file system is mounted.
        proc_cgroup: The process's cgroup membership file (default ``/proc/self/cgroup``).
    """
    text = _read(proc_cgroup or Path("/proc/self/cgroup")) or ""
    v2_path, v1_path = "/", "/"
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path or "/"
        elif "cpu" in controllers.split(","):
            v1_path = path or "/"
    if (root / "cgroup.controllers").exists():
        return _v2_limit(root, v2_path)
    return _v1_limit(root, v1_path)


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (at least 1).

    A fractional quota is rounded up (1.5 CPUs -> 2 threads): with passive waiting a thread
    that is throttled costs little, one core left idle costs half the work.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def set_threads(n: int | None = None) -> int:
    """Size torch's CPU pool and, when faiss is installed, faiss's OpenMP pool.

    Args:
        n: Threads; None for :func:`available_cores`.

    Returns:
        The number of threads set.
    """
    import torch

    from dist_pgkm.utils.optional import faiss_available, import_faiss

    threads = available_cores() if n is None else max(1, int(n))
    torch.set_num_threads(threads)
    if faiss_available():
        import_faiss().omp_set_num_threads(threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        logger.debug("OpenMP threads spin when idle (OMP_WAIT_POLICY is not PASSIVE)")
    return threads
