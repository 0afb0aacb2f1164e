"""The coordinator: plans a run, executes its jobs, and alone writes the output directory.

``quantize_model`` is the whole-model job on one machine: open the source lazily, plan the
layers, start or resume the run in the output directory (``manifest.json``), quantize every
unfinished layer into its own atomic shard, then merge into one checkpoint. Killed at any
point, the same call continues where it stopped and writes the same bytes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dist_pgkm.checkpoint.atomic import exclusive_run, remove_stale_temp_files
from dist_pgkm.checkpoint.manifest import LayerRecord, Manifest
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import file_sha256, write_shard
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.plan import LayerJob, Plan, plan_run
from dist_pgkm.distributed.progress import ProgressSnapshot, RunTracker
from dist_pgkm.distributed.worker import JobResult, run_job
from dist_pgkm.errors import CheckpointError, DistributedError, InvalidInputError
from dist_pgkm.models.layers import find_layers
from dist_pgkm.models.source import ModelSource, open_source
from dist_pgkm.utils.memory import peak_rss_bytes

if TYPE_CHECKING:
    from dist_pgkm.distributed.ray_executor import RayOptions

__all__ = [
    "Progress",
    "RunSummary",
    "fingerprint",
    "package_version",
    "quantize_model",
    "shard_path",
]

logger = logging.getLogger(__name__)

Progress = Callable[[ProgressSnapshot], None]
"""Called with a fresh snapshot whenever a worker or a job changes state."""


def package_version() -> str:
    """The installed dist-pgkm version (the source tree's when not installed)."""
    try:
        return importlib.metadata.version("dist-pgkm")
    except importlib.metadata.PackageNotFoundError:
        from dist_pgkm import __version__

        return __version__


def fingerprint(source: ModelSource, config: QuantizeConfig, plan: Plan) -> dict[str, Any]:
    """What decides a run's bytes: package version, config, source files, planned layers."""
    return {
        "dist_pgkm_version": package_version(),
        "config": config.model_dump(mode="json"),
        "source": source.fingerprint(),
        "layers": [[job.name, list(job.shape), job.block_size, job.k] for job in plan.jobs],
    }


def shard_path(name: str) -> str:
    """A layer's shard, relative to the output directory."""
    return f"shards/{name}.safetensors"


@dataclass
class RunSummary:
    """What one call did (a resumed run reports only its own work in the timings)."""

    out_dir: Path
    plan: Plan
    files: dict[str, str]
    done_before: int
    redone: list[str] = field(default_factory=list)
    seconds: float = 0.0
    quantize_seconds: float = 0.0
    merge_seconds: float = 0.0
    peak_rss_bytes: int = 0
    timing: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the plan as counts and skipped layers)."""
        return {
            "out_dir": str(self.out_dir),
            "layers": len(self.plan.jobs),
            "skipped": [
                {"name": s.name, "shape": list(s.shape), "reason": s.reason}
                for s in self.plan.skipped
            ],
            "float_layers": self.plan.n_float,
            "files": self.files,
            "done_before": self.done_before,
            "redone": self.redone,
            "seconds": self.seconds,
            "quantize_seconds": self.quantize_seconds,
            "merge_seconds": self.merge_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "timing": self.timing,
        }


def quantize_model(
    model: str | Path,
    config: QuantizeConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    workers: int = 0,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: int = 1,
) -> RunSummary:
    """Quantize the selected layers of ``model`` into one checkpoint in ``out_dir``.

    Args:
        model: HF model dir, ``.safetensors`` file, or GGUF file/dir.
        config: Layer rules and clustering settings.
        out_dir: Output directory: new, empty, or holding this same run (then resumed).
        resume: Require an existing run in ``out_dir`` (``--resume``).
        max_shard_bytes: Split the merged checkpoint into files of at most this many bytes.
        progress: Called with a :class:`ProgressSnapshot` (layers done, throughput, ETA, what
            each worker is doing) whenever a worker or a job changes state.
        workers: Ray workers (actors). 0 without ``address``: run the jobs in this process,
            one after the other; N: an embedded Ray on this machine with N workers, or N
            workers on the cluster at ``address`` (0 there: one per CPU or GPU slot).
        address: ``HOST:PORT`` of a Ray cluster to join instead of running on this machine.
        gpus_per_worker: GPUs each Ray worker reserves (0: CPU workers).
        cpus_per_worker: CPUs each CPU Ray worker reserves; its kernels use as many threads.

    Returns:
        What was done, with timings and peak memory.

    Raises:
        ModelSourceError: The model cannot be read.
        ConfigError: The config selects nothing, or an unsupported layer with
            ``on_unsupported: error``.
        CheckpointError: ``out_dir`` holds another run or is not a run directory.
        DistributedError: Ray is not installed, the cluster cannot be reached, no worker can
            be placed, or a layer's worker died on every attempt.
    """
    start = time.perf_counter()
    if workers < 0 or gpus_per_worker < 0 or cpus_per_worker < 1:
        raise InvalidInputError(
            f"workers={workers}, gpus_per_worker={gpus_per_worker}, cpus_per_worker="
            f"{cpus_per_worker}: workers and GPUs must be >= 0, CPUs per worker >= 1."
        )
    executor = _Executor(workers, address, gpus_per_worker, cpus_per_worker)
    if executor.in_process and gpus_per_worker > 0:
        raise InvalidInputError(
            f"gpus_per_worker={gpus_per_worker} without Ray workers: GPUs are given to Ray "
            "workers only. Add --workers N (or --address HOST:PORT)."
        )
    if not executor.in_process:
        _ray_executor().preflight(executor.options())
    out = Path(out_dir)
    source = open_source(model)
    plan = plan_run(find_layers(source), config)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; --out must be a directory.")
    with exclusive_run(out):
        return _run(
            Path(model).absolute(),  # workers may run in another directory or node
            source,
            plan,
            config,
            out,
            resume,
            max_shard_bytes,
            progress,
            start,
            executor,
        )


@dataclass(frozen=True)
class _Executor:
    """Where the jobs run: in this process (``workers == 0`` and no address) or on Ray."""

    workers: int
    address: str | None
    gpus_per_worker: float
    cpus_per_worker: int

    @property
    def in_process(self) -> bool:
        return self.workers == 0 and self.address is None

    def options(self) -> RayOptions:
        options: RayOptions = _ray_executor().RayOptions(
            workers=self.workers,
            address=self.address,
            gpus_per_worker=self.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
        )
        return options


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


def _run(
    model: Path,
    source: ModelSource,
    plan: Plan,
    config: QuantizeConfig,
    out: Path,
    resume: bool,
    max_shard_bytes: int,
    progress: Progress | None,
    start: float,
    executor: _Executor,
) -> RunSummary:
    manifest = Manifest.open(out, fingerprint(source, config, plan), resume=resume)
    if removed := remove_stale_temp_files(out):
        logger.info("Removed %d temp files left by an interrupted run", removed)
    redone = manifest.verify()
    done = manifest.layers
    todo = [job for job in plan.jobs if job.name not in done]
    total = len(plan.jobs)
    logger.info(
        "%d layers to quantize (%d already done), %d skipped, %d kept in float",
        len(todo),
        total - len(todo),
        len(plan.skipped),
        plan.n_float,
    )
    tracker = RunTracker(plan.jobs, done=set(done), listener=progress)

    def record(job: LayerJob, result: JobResult) -> None:
        _record(job, result, manifest)

    if executor.in_process:
        tracker.worker_ready("local", "this process")
        for job in todo:
            tracker.dispatched(job, "local")
            weight = source.read(job.tensor)
            result = run_job(job, weight, config)
            del weight
            record(job, result)
            tracker.finished(job, "local", result.seconds, result.peak_rss_bytes)
    elif todo:
        _run_on_ray(todo, model, config, executor, record, tracker)
    tracker.close()
    quantize_end = time.perf_counter()

    files = manifest.merged
    if files is None or not _merged_intact(out, files):
        tracker.stage("merging")
        layers = [
            QuantizedLayer(job.name, job.tensor, out / shard_path(job.name), job.tied)
            for job in plan.jobs
        ]
        quantization = {"method": config.method, "centroid_dtype": config.centroid_dtype}
        files = merge_checkpoint(out, source, layers, quantization, max_shard_bytes)
        manifest.set_merged(files)
    end = time.perf_counter()
    return RunSummary(
        out_dir=out,
        plan=plan,
        files=files,
        done_before=total - len(todo),
        redone=redone,
        seconds=end - start,
        quantize_seconds=quantize_end - start,
        merge_seconds=end - quantize_end,
        peak_rss_bytes=peak_rss_bytes(),
        timing=tracker.summary(),
    )


def _merged_intact(out: Path, files: dict[str, str]) -> bool:
    """Whether every merged file is still there with the sha256 it was written with."""
    for name, digest in files.items():
        path = out / name
        if not path.is_file() or file_sha256(path) != digest:
            logger.warning("%s is missing or modified; merging again", path)
            return False
    return True


def _run_on_ray(
    jobs: list[LayerJob],
    model: Path,
    config: QuantizeConfig,
    executor: _Executor,
    record: Callable[[LayerJob, JobResult], None],
    tracker: RunTracker,
) -> None:
    # Absolute, not resolved (see open_source): workers may run in another directory.
    path = str(model.expanduser().absolute())
    _ray_executor().run_on_ray(jobs, path, config, executor.options(), record, tracker)


def _record(job: LayerJob, result: JobResult, manifest: Manifest) -> None:
    """Write a finished job's shard and mark it done: only the coordinator writes."""
    rel = shard_path(job.name)
    digest = write_shard(manifest.out_dir / rel, result.tensors, result.meta)
    manifest.record(job.name, LayerRecord(rel, digest, round(result.seconds, 3)))
    logger.debug("%s done in %.2f s", job.name, result.seconds)
