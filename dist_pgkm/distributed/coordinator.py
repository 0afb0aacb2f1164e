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
from typing import Any

from dist_pgkm.checkpoint.atomic import exclusive_run, remove_stale_temp_files
from dist_pgkm.checkpoint.manifest import LayerRecord, Manifest
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import file_sha256, write_shard
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.plan import LayerJob, Plan, plan_run
from dist_pgkm.distributed.worker import run_job
from dist_pgkm.errors import CheckpointError
from dist_pgkm.models.layers import find_layers
from dist_pgkm.models.source import ModelSource, open_source
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = ["Progress", "RunSummary", "fingerprint", "quantize_model", "shard_path"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""``(layers done, layers total, description)``: called as the run advances."""


def _version() -> str:
    try:
        return importlib.metadata.version("dist-pgkm")
    except importlib.metadata.PackageNotFoundError:
        from dist_pgkm import __version__

        return __version__


def fingerprint(source: ModelSource, config: QuantizeConfig, plan: Plan) -> dict[str, Any]:
    """What decides a run's bytes: package version, config, source files, planned layers."""
    return {
        "dist_pgkm_version": _version(),
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
        }


def quantize_model(
    model: str | Path,
    config: QuantizeConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
) -> RunSummary:
    """Quantize the selected layers of ``model`` into one checkpoint in ``out_dir``.

    Args:
        model: HF model dir, ``.safetensors`` file, or GGUF file/dir.
        config: Layer rules and clustering settings.
        out_dir: Output directory: new, empty, or holding this same run (then resumed).
        resume: Require an existing run in ``out_dir`` (``--resume``).
        max_shard_bytes: Split the merged checkpoint into files of at most this many bytes.
        progress: Called after each layer with ``(done, total, description)``.

    Returns:
        What was done, with timings and peak memory.

    Raises:
        ModelSourceError: The model cannot be read.
        ConfigError: The config selects nothing, or an unsupported layer with
            ``on_unsupported: error``.
        CheckpointError: ``out_dir`` holds another run or is not a run directory.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    source = open_source(model)
    plan = plan_run(find_layers(source), config)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; --out must be a directory.")
    with exclusive_run(out):
        return _run(source, plan, config, out, resume, max_shard_bytes, progress, start)


def _run(
    source: ModelSource,
    plan: Plan,
    config: QuantizeConfig,
    out: Path,
    resume: bool,
    max_shard_bytes: int,
    progress: Progress | None,
    start: float,
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
    report = progress or (lambda done, total, description: None)
    report(total - len(todo), total, "quantizing")
    for i, job in enumerate(todo, start=total - len(todo) + 1):
        _run_and_record(job, source, config, manifest)
        report(i, total, job.name)
    quantize_end = time.perf_counter()

    files = manifest.merged
    if files is None or not _merged_intact(out, files):
        report(total, total, "merging")
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
    )


def _merged_intact(out: Path, files: dict[str, str]) -> bool:
    """Whether every merged file is still there with the sha256 it was written with."""
    for name, digest in files.items():
        path = out / name
        if not path.is_file() or file_sha256(path) != digest:
            logger.warning("%s is missing or modified; merging again", path)
            return False
    return True


def _run_and_record(
    job: LayerJob, source: ModelSource, config: QuantizeConfig, manifest: Manifest
) -> None:
    weight = source.read(job.tensor)
    result = run_job(job, weight, config)
    del weight
    rel = shard_path(job.name)
    digest = write_shard(manifest.out_dir / rel, result.tensors, result.meta)
    manifest.record(job.name, LayerRecord(rel, digest, round(result.seconds, 3)))
    logger.debug("%s done in %.2f s", job.name, result.seconds)
