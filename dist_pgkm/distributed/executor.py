"""The executor seam: where a run's jobs and its calibration run (no import of ray here).

Two executors share one interface, :class:`Executor`: :class:`LocalExecutor` runs the jobs
in this process, one after the other, and the calibration as one pass over all windows;
``RayExecutor`` (:mod:`dist_pgkm.distributed.ray_executor`, the only importer of ray) runs
them on Ray actors. Both run :func:`~dist_pgkm.distributed.worker.run_layer` for each job and
hand every result to the caller's callback in the driver, which alone writes the output.
:func:`open_executor` picks one from :class:`~dist_pgkm.distributed.options.RayOptions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch

from dist_pgkm.checkpoint.calib import HessianFile
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.options import RayOptions
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.distributed.progress import RunTracker
from dist_pgkm.distributed.worker import JobResult, run_layer
from dist_pgkm.errors import DistributedError
from dist_pgkm.models.calibrate import (
    CalibrationSummary,
    HessianRequest,
    OnBlock,
    collect_hessians,
)
from dist_pgkm.models.source import ModelSource

__all__ = ["Executor", "LocalExecutor", "OnResult", "open_executor", "preflight"]

OnResult = Callable[[LayerJob, JobResult], None]
"""Called in the driver, once per job, as its result arrives (any order)."""


class Executor(Protocol):
    """Runs a run's jobs and its calibration pass; the caller keeps every piece of output."""

    def run(
        self,
        jobs: Sequence[LayerJob],
        on_result: OnResult,
        tracker: RunTracker | None = None,
        hessians: Mapping[str, HessianFile] | None = None,
    ) -> None:
        """Run ``jobs`` (started in the given order: the plan's, longest first).

        Args:
            jobs: The jobs left to do.
            on_result: Called in this process with each finished job, as it arrives; an
                error it raises ends the run.
            tracker: Told when workers start and die and jobs start and finish (progress).
            hessians: Layer -> its calibration file, read by whoever runs the layer.

        Raises:
            DistributedError: The jobs could not be run (a lost cluster, a job whose worker
                died on every attempt).
            DistPGKMError: A job raised one of dist-pgkm's errors (re-raised as is).
        """
        ...

    def calibrate(
        self,
        requests: Sequence[HessianRequest],
        windows: torch.Tensor,
        batch_size: int,
        on_block: OnBlock,
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> CalibrationSummary:
        """One calibration pass over ``windows``; ``on_block`` gets every folded stage.

        The ``H`` handed to ``on_block`` are the same bytes on every executor.

        Args:
            requests: The layers that need ``H``.
            windows: ``(samples, seq_len)`` token ids.
            batch_size: Windows per micro-batch (decides the bytes of ``H``).
            on_block: Called in this process with each stage, in order.
            resume: Saved hidden states ``(block, hidden)`` to start from; an executor that
                spreads the windows over processes starts at block 0 and ignores them.
        """
        ...


@dataclass(frozen=True)
class LocalExecutor:
    """The jobs in this process, one after the other (``--workers 0``, the default)."""

    source: ModelSource
    config: QuantizeConfig

    def run(
        self,
        jobs: Sequence[LayerJob],
        on_result: OnResult,
        tracker: RunTracker | None = None,
        hessians: Mapping[str, HessianFile] | None = None,
    ) -> None:
        """Run ``jobs`` here, in order (see :meth:`Executor.run`)."""
        files = hessians or {}
        if tracker is not None:
            tracker.worker_ready("local", "this process")
        for job in jobs:
            if tracker is not None:
                tracker.dispatched(job, "local")
            result = run_layer(self.source, job, self.config, files.get(job.name))
            on_result(job, result)
            if tracker is not None:
                tracker.finished(job, "local", result.seconds, result.peak_rss_bytes)

    def calibrate(
        self,
        requests: Sequence[HessianRequest],
        windows: torch.Tensor,
        batch_size: int,
        on_block: OnBlock,
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> CalibrationSummary:
        """One pass over all windows here, resuming from ``resume`` (see
        :func:`~dist_pgkm.models.calibrate.collect_hessians`)."""
        return collect_hessians(
            self.source, requests, windows, on_block, resume=resume, batch_size=batch_size
        )


def _ray_executor() -> ModuleType:
    """The Ray executor module, imported on first use (it imports ray)."""
    try:
        from dist_pgkm.distributed import ray_executor
    except ImportError as err:
        raise DistributedError(
            f"Running on Ray needs the ray package ({err}). Install it with "
            "`pip install 'dist-pgkm[ray]'`, or pass --workers 0 to run in this process."
        ) from err
    return ray_executor


def preflight(options: RayOptions) -> None:
    """Check what can be checked before a run touches anything (nothing in process).

    Raises:
        DistributedError: Ray is not installed; ``address`` is not ``HOST:PORT`` or nothing
            listens there; an embedded Ray is asked for no worker.
    """
    if not options.in_process:
        _ray_executor().preflight(options)


@contextlib.contextmanager
def open_executor(
    options: RayOptions, model: Path, source: ModelSource, config: QuantizeConfig
) -> Iterator[Executor]:
    """The executor ``options`` ask for: in this process, or connected to Ray until exit.

    Args:
        options: In process (:attr:`RayOptions.in_process`), an embedded Ray, or a cluster.
        model: The model's absolute path, as Ray workers open it.
        source: The same model, opened here.
        config: The run's configuration.

    Raises:
        DistributedError: Ray is not installed, or the cluster cannot be reached or joined.
    """
    if options.in_process:
        yield LocalExecutor(source, config)
        return
    with _ray_executor().open_executor(options, model, source, config) as executor:
        yield executor
