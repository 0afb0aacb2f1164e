"""What a run is doing, for the live display and the end-of-run summary (pure: no Ray).

The executors report four events to a :class:`RunTracker`: a worker is ready, a job is
handed to it, its result arrives, a worker is lost. Before them, a calibration (if the run
needs one) reports each finished block. From those the tracker answers "how far,
how fast, how long still" at any moment (:meth:`RunTracker.snapshot`) and, at the end, where
the time went (:meth:`RunTracker.summary`): time per layer, per worker, and the share of each
worker's life it spent waiting.

The ETA comes from the remaining work (:func:`~dist_pgkm.distributed.eta.remaining_seconds`):
every layer left is predicted by a cost model from the plan's multiply-adds, scaled by the
median measured / predicted time of the layers finished so far and shared by the live workers.
It is never extrapolated from the first layers (the largest, run first, which also pay the
warm-up). The summary records how far the estimate made at mid-run was from the real rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dist_pgkm.distributed.eta import CostModel, remaining_seconds
from dist_pgkm.distributed.plan import LayerJob

__all__ = [
    "CalibrationStatus",
    "LayerTime",
    "ProgressSnapshot",
    "RunTracker",
    "WorkerActivity",
    "WorkerStats",
]


@dataclass
class WorkerStats:
    """One worker over the run (an in-process run has one, ``local``).

    ``busy_seconds`` counts the jobs whose results arrived; ``lost_seconds`` the time a lost
    worker had spent on the job it died with (work done, then lost): neither is idle.
    """

    label: str
    node: str
    ready_at: float
    jobs: int = 0
    busy_seconds: float = 0.0
    lost_seconds: float = 0.0
    ended_at: float | None = None
    peak_rss_bytes: int = 0
    lost: bool = False
    job: str | None = None
    job_since: float = 0.0

    def alive_seconds(self, now: float) -> float:
        return max(0.0, (self.ended_at if self.ended_at is not None else now) - self.ready_at)

    def as_dict(self, now: float) -> dict[str, Any]:
        alive = self.alive_seconds(now)
        worked = self.busy_seconds + self.lost_seconds
        return {
            "worker": self.label,
            "node": self.node,
            "jobs": self.jobs,
            "busy_seconds": round(self.busy_seconds, 3),
            "lost_seconds": round(self.lost_seconds, 3),
            "alive_seconds": round(alive, 3),
            "idle_share": round(max(0.0, 1.0 - worked / alive), 4) if alive > 0 else 0.0,
            "peak_rss_bytes": self.peak_rss_bytes,
            "lost": self.lost,
        }


@dataclass(frozen=True)
class LayerTime:
    """A finished layer: where it ran and how long its job took there."""

    name: str
    worker: str
    seconds: float
    n_weights: int


@dataclass(frozen=True)
class WorkerActivity:
    """A live worker as the display shows it: its current layer (None: idle)."""

    label: str
    node: str
    job: str | None
    job_seconds: float
    jobs_done: int


@dataclass(frozen=True)
class CalibrationStatus:
    """How far the calibration is (it runs before any layer is quantized).

    Attributes:
        blocks_done: Blocks of the model run so far (in this call).
        blocks_total: Blocks this call runs.
        tokens_per_second: Calibration tokens through one block per second (last block).
        eta_seconds: Time left, from the mean block time so far.
    """

    blocks_done: int
    blocks_total: int
    tokens_per_second: float
    eta_seconds: float | None


@dataclass(frozen=True)
class ProgressSnapshot:
    """The run at one moment (``calibration`` is set while the calibration runs)."""

    done: int
    total: int
    description: str
    elapsed: float
    weights_per_second: float
    eta_seconds: float | None
    workers: tuple[WorkerActivity, ...]
    last_finished: LayerTime | None = None
    calibration: CalibrationStatus | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total


Listener = Callable[[ProgressSnapshot], None]


@dataclass
class RunTracker:
    """Collects the executor's events; the single source of progress and timing figures.

    Args:
        jobs: Every job of the plan (finished ones included, for the totals).
        done: Names of the jobs already finished before this call (a resumed run).
        listener: Called with a fresh snapshot after every event.
        clock: Seconds, monotonic (tests pass their own).
        cost_model: A layer's predicted time from its ``est_cost`` (None: proportional to
            it); its scale does not matter, only how it weighs small layers beside large ones.
    """

    jobs: Sequence[LayerJob]
    done: set[str] = field(default_factory=set)
    listener: Listener | None = None
    clock: Callable[[], float] = time.monotonic
    cost_model: CostModel | None = None
    started: float = field(init=False)
    workers: dict[str, WorkerStats] = field(init=False, default_factory=dict)
    layers: list[LayerTime] = field(init=False, default_factory=list)
    description: str = field(init=False, default="quantizing")
    calibration: CalibrationStatus | None = field(init=False, default=None)
    _cost: dict[str, float] = field(init=False)
    _cost_left: float = field(init=False)
    _cost_done: float = field(init=False, default=0.0)
    _weights_done: int = field(init=False, default=0)
    _first_ready: float | None = field(init=False, default=None)
    _cost_todo: float = field(init=False)
    _mid_run: tuple[float, float | None] | None = field(init=False, default=None)
    _closed_at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.done = set(self.done)
        self._cost = {job.name: job.est_cost for job in self.jobs}
        self._cost_left = sum(c for name, c in self._cost.items() if name not in self.done)
        self._cost_todo = self._cost_left

    # --- events -------------------------------------------------------------------------------

    def worker_ready(self, label: str, node: str) -> None:
        now = self.clock()
        if self._first_ready is None:
            self._first_ready = now
        self.workers[label] = WorkerStats(label, node, ready_at=now)
        self._notify()

    def dispatched(self, job: LayerJob, label: str) -> None:
        worker = self.workers[label]
        worker.job, worker.job_since = job.name, self.clock()
        self._notify()

    def finished(self, job: LayerJob, label: str, seconds: float, peak_rss: int = 0) -> None:
        """A job's result arrived: its compute time and its worker's peak memory so far."""
        worker = self.workers[label]
        worker.peak_rss_bytes = max(worker.peak_rss_bytes, peak_rss)
        worker.jobs += 1
        worker.busy_seconds += seconds
        worker.job = None
        self.done.add(job.name)
        self.layers.append(LayerTime(job.name, label, seconds, job.n_weights))
        self._cost_left -= self._cost.get(job.name, 0.0)
        self._cost_done += self._cost.get(job.name, 0.0)
        self._weights_done += job.n_weights
        if self._mid_run is None and self._cost_done >= self._cost_todo / 2:
            self._mid_run = (self.clock(), self._eta())  # checked against the end in summary()
        self._notify()

    def worker_lost(self, label: str) -> None:
        """A worker died; the time it spent on its job in flight counts as lost work."""
        worker = self.workers.get(label)
        if worker is not None:
            now = self.clock()
            if worker.job is not None:
                worker.lost_seconds += now - worker.job_since
            worker.lost, worker.ended_at, worker.job = True, now, None
        self._notify()

    def stage(self, description: str) -> None:
        """A new phase of the run (``merging``), shown instead of ``quantizing``."""
        self.description = description
        self.calibration = None
        self._notify()

    def calibrating(self, status: CalibrationStatus) -> None:
        """The calibration finished a block (:meth:`stage` ends the calibration phase)."""
        self.description = "calibrating"
        self.calibration = status
        self._notify()

    def close(self) -> None:
        """The quantize phase is over: stop every worker's clock."""
        now = self.clock()
        self._closed_at = now
        for worker in self.workers.values():
            if worker.ended_at is None:
                worker.ended_at = now

    # --- views --------------------------------------------------------------------------------

    def snapshot(self) -> ProgressSnapshot:
        now = self.clock()
        elapsed = now - self.started
        # Rates count from the first ready worker: starting Ray is not quantizing.
        working = now - (self._first_ready if self._first_ready is not None else now)
        eta = self._eta()
        return ProgressSnapshot(
            done=len(self.done),
            total=len(self.jobs),
            description=self.description,
            elapsed=elapsed,
            weights_per_second=self._weights_done / working if working > 0 else 0.0,
            eta_seconds=eta,
            workers=tuple(
                WorkerActivity(
                    w.label,
                    w.node,
                    w.job,
                    now - w.job_since if w.job is not None else 0.0,
                    w.jobs,
                )
                for w in self.workers.values()
                if not w.lost
            ),
            last_finished=self.layers[-1] if self.layers else None,
            calibration=self.calibration,
        )

    def summary(self, slowest: int = 10) -> dict[str, Any]:
        """Where the time went: per worker (busy, lost with a dead worker, alive, idle share)
        and the slowest layers; and the ETA shown once half of the work was done beside the
        time the rest really took (``eta_check``, None before that point)."""
        now = self.clock()
        eta_check = None
        if self._mid_run is not None:
            at, estimate = self._mid_run
            end = self._closed_at if self._closed_at is not None else now
            eta_check = {
                "at_seconds": round(at - self.started, 3),
                "estimate_seconds": None if estimate is None else round(estimate, 3),
                "actual_seconds": round(end - at, 3),
            }
        busy = sum(w.busy_seconds for w in self.workers.values())
        lost = sum(w.lost_seconds for w in self.workers.values())
        alive = sum(w.alive_seconds(now) for w in self.workers.values())
        layers = sorted(self.layers, key=lambda t: t.seconds, reverse=True)
        return {
            "workers": [w.as_dict(now) for w in self.workers.values()],
            "busy_seconds": round(busy, 3),
            "lost_seconds": round(lost, 3),
            "idle_share": round(max(0.0, 1.0 - (busy + lost) / alive), 4) if alive > 0 else 0.0,
            "layer_seconds": {t.name: round(t.seconds, 3) for t in self.layers},
            "slowest_layers": [
                {"name": t.name, "worker": t.worker, "seconds": round(t.seconds, 3)}
                for t in layers[:slowest]
            ],
            "eta_check": eta_check,
        }

    def _eta(self) -> float | None:
        """Seconds until every layer is done (:func:`remaining_seconds`); None before the
        first layer of this call finishes: nothing measured, no honest number."""
        if self._cost_left <= 0:
            return 0.0
        if not self.layers:
            return None
        done = [(self._cost.get(t.name, 0.0), t.seconds) for t in self.layers]
        remaining = [cost for name, cost in self._cost.items() if name not in self.done]
        live = sum(1 for w in self.workers.values() if not w.lost)
        return remaining_seconds(done, remaining, workers=max(1, live), model=self.cost_model)

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener(self.snapshot())
