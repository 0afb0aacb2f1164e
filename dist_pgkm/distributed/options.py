"""Where a run's jobs run, as data: in this process or on Ray (no import of ray here).

The coordinator, the command line and fine-tuning build one :class:`RayOptions`; only
:mod:`dist_pgkm.distributed.ray_executor` (which imports ray) reads its Ray-specific fields.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RayOptions"]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a run is.

    Attributes:
        workers: Number of actors. 0 with an ``address``: one per CPU slot of the cluster (or
            per GPU slot with ``gpus_per_worker``); 0 without an address is the in-process
            path (:attr:`in_process`), which never imports ray.
        address: ``HOST:PORT`` of a running cluster's head (GCS), ``"auto"`` for the one in
            ``RAY_ADDRESS`` (set inside Ray jobs and by the launchers), or None for an embedded
            Ray on this machine with ``workers`` CPUs.
        gpus_per_worker: GPUs each actor reserves (0: CPU actors).
        cpus_per_worker: CPUs each CPU actor reserves, and the threads its kernels use.
        max_attempts: Tries per job before a job whose worker dies every time fails the run.
        connect_timeout: Seconds to reach ``address`` before giving up; during a run on a
            cluster, also how long the head's GCS may refuse connections before the run
            ends with "lost the head node".
        placement_timeout: Seconds without any live actor (none placed yet, or all lost and
            no replacement placed) before the run fails: the cluster lacks the resources.
        min_workers: On a cluster, wait before the run starts until it has slots for this
            many workers (0: start with what is there).
        min_workers_timeout: Seconds to wait for ``min_workers`` slots before failing.
    """

    workers: int = 0
    address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    max_attempts: int = 3
    connect_timeout: float = 10.0
    placement_timeout: float = 60.0
    min_workers: int = 0
    min_workers_timeout: float = 600.0

    @property
    def in_process(self) -> bool:
        """No worker and no cluster: the jobs run in this process, one after the other."""
        return self.workers == 0 and self.address is None
