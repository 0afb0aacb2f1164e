"""The coordinator: plans a run, executes its jobs, and alone writes the output directory.

``quantize_model`` is the whole-model job on one machine: open the source lazily, plan the
layers, start or resume the run in the output directory (``manifest.json``), collect the
calibration statistics when a rule asks for ``metric: hessian`` (the only sequential part:
``OUT/calib/``), quantize every unfinished layer into its own atomic shard, then merge into
one checkpoint. Killed at any point, the same call continues where it stopped and writes the
same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.checkpoint.atomic import exclusive_run, remove_stale_temp_files
from dist_pgkm.checkpoint.calib import CalibStore, HessianFile, cache_key
from dist_pgkm.checkpoint.manifest import LayerRecord, Manifest
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import file_sha256, write_shard
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.eta import PLAIN_FIT
from dist_pgkm.distributed.executor import Executor, open_executor, preflight
from dist_pgkm.distributed.options import RayOptions
from dist_pgkm.distributed.plan import LayerJob, Plan, plan_run
from dist_pgkm.distributed.progress import CalibrationStatus, ProgressSnapshot, RunTracker
from dist_pgkm.distributed.worker import JobResult, weight_sha256
from dist_pgkm.errors import CheckpointError, ConfigError, InvalidInputError
from dist_pgkm.models.calibrate import (
    HEAD,
    BlockResult,
    HessianRequest,
    windows_digest,
)
from dist_pgkm.models.layers import find_layers
from dist_pgkm.models.source import ModelSource, open_source
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = [
    "Progress",
    "RunSummary",
    "calibration_batch",
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


def fingerprint(
    source: ModelSource,
    config: QuantizeConfig,
    plan: Plan,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What decides a run's bytes: package version, config, source files, planned layers, and
    the calibration (its windows' digest, their number and length, the layers needing it with
    their block sizes) when the run has one."""
    data = {
        "dist_pgkm_version": package_version(),
        "config": config.model_dump(mode="json"),
        "source": source.fingerprint(),
        "layers": [[job.name, list(job.shape), job.block_size, job.k] for job in plan.jobs],
    }
    if calibration is not None:
        data["calibration"] = calibration
    return data


def calibration_batch(seq_len: int) -> int:
    """Windows per calibration forward pass: about 4096 tokens.

    A function of ``seq_len`` alone, so that the per-micro-batch float32 sums, hence the
    ``H`` bytes, are the same on every run and resume of the same calibration.
    """
    return max(1, 4096 // seq_len)


CALIB_LAYOUT = "diagonal-blocks-lcm-2-3-4-8"
"""How ``H`` is stored (:func:`~dist_pgkm.models.calibrate.stored_block_size`): in identities."""


@dataclass(frozen=True)
class _Calibration:
    """The calibration a run needs: its windows, its identity (fingerprinted with the run's
    layers and block sizes) and the identity of its stored files (without them)."""

    windows: torch.Tensor
    identity: dict[str, Any]
    cache: Path | None = None

    def store_identity(self, source: ModelSource) -> dict[str, Any]:
        """What decides the bytes of every ``H`` file: the same for every preset.

        The model's weight files and its ``config.json`` (the architecture the windows run
        through: a model cut to fewer blocks shares the weight files but not the tail's ``H``).
        """
        data = {k: v for k, v in self.identity.items() if k != "layers"}
        config = json.dumps(source.config(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(config.encode()).hexdigest()
        return {**data, "source": source.fingerprint(), "config_sha256": digest}


def _calibration_for(
    config: QuantizeConfig,
    plan: Plan,
    calib_ids: torch.Tensor | None,
    cache: Path | None = None,
) -> _Calibration | None:
    """Check the calibration windows against the config; None when no job needs ``H``."""
    jobs = tuple(job for job in plan.jobs if job.options.needs_hessian)
    if not jobs:
        if calib_ids is not None:
            logger.info("Calibration windows given, but no rule asks for metric: hessian")
        return None
    if calib_ids is None:
        names = ", ".join(job.name for job in jobs[:3]) + (", ..." if len(jobs) > 3 else "")
        raise ConfigError(
            f"{len(jobs)} layer(s) ({names}) are to be quantized with `metric: hessian`, "
            "which needs calibration text run through the model, and none was given. Pass "
            "--calib wordnet (a corpus name or a text file) on the command line, or "
            "`calib_ids` (token windows from dist_pgkm.eval.calibration_windows) in Python; "
            "or use `metric: weight` in those rules."
        )
    cal = config.calibration
    if calib_ids.dim() != 2 or calib_ids.dtype.is_floating_point or calib_ids.dtype == torch.bool:
        raise InvalidInputError(
            f"calib_ids must be a 2-D tensor of token ids (samples, seq_len); got shape "
            f"{tuple(calib_ids.shape)} and dtype {calib_ids.dtype}."
        )
    if tuple(calib_ids.shape) != (cal.samples, cal.seq_len):
        raise InvalidInputError(
            f"calib_ids has shape {tuple(calib_ids.shape)}, but the config's calibration asks "
            f"for {cal.samples} samples of {cal.seq_len} tokens. Cut the windows with "
            "calibration.samples and calibration.seq_len, or set those to the windows' shape."
        )
    identity = {
        "windows_sha256": windows_digest(calib_ids),
        "samples": cal.samples,
        "seq_len": cal.seq_len,
        "batch": calibration_batch(cal.seq_len),
        "layout": CALIB_LAYOUT,
        "layers": sorted([job.name, job.block_size] for job in jobs),
    }
    return _Calibration(calib_ids.to(torch.int64), identity, cache)


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
    metrics: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

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
            "metrics": self.metrics,
            "calibration": self.calibration,
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
    calib_ids: torch.Tensor | None = None,
    calib_checkpoint_every: float = 120.0,
    min_workers: int = 0,
    min_workers_timeout: float = 600.0,
    calib_cache: str | Path | None = None,
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
        calib_ids: ``(calibration.samples, calibration.seq_len)`` token ids of the calibration
            text (:func:`dist_pgkm.eval.calibration_windows`), needed when a rule asks for
            ``metric: hessian``. Their digest is part of the run's fingerprint.
        calib_checkpoint_every: Minimum seconds between two saves of the calibration's hidden
            states (its resume points).
        min_workers: With ``address``: wait, before anything is written, until the cluster
            has slots for this many workers (nodes joining later get workers too).
        min_workers_timeout: Seconds ``min_workers`` waits before the run fails.
        calib_cache: A folder shared by runs: the calibration lives in
            ``calib_cache/<key>`` (key: digest of the model files, windows, samples, seq_len),
            where every later run on the same model and windows, whatever its block sizes,
            finds it. None: in ``out_dir/calib``.

    Returns:
        What was done, with timings, peak memory, the metric of every layer and what the
        calibration did.

    Raises:
        ModelSourceError: The model cannot be read (or, with calibration, run).
        ConfigError: The config selects nothing, or an unsupported layer with
            ``on_unsupported: error``, or asks for ``metric: hessian`` without ``calib_ids``.
        InvalidInputError: ``calib_ids`` do not match the config's calibration or the model;
            a layer needing ``H`` is never reached by the forward pass, or its ``H`` is not
            finite.
        CheckpointError: ``out_dir`` holds another run or is not a run directory.
        DistributedError: Ray is not installed, the cluster cannot be reached, no worker can
            be placed, or a layer's worker died on every attempt.
    """
    start = time.perf_counter()
    if min_workers > 0 and address is None:
        raise InvalidInputError(
            f"min_workers={min_workers} without a cluster: it waits for a cluster's nodes. "
            "Add --address HOST:PORT, or drop --min-workers."
        )
    if workers < 0 or gpus_per_worker < 0 or cpus_per_worker < 1:
        raise InvalidInputError(
            f"workers={workers}, gpus_per_worker={gpus_per_worker}, cpus_per_worker="
            f"{cpus_per_worker}: workers and GPUs must be >= 0, CPUs per worker >= 1."
        )
    options = RayOptions(
        workers=workers,
        address=address,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        min_workers=min_workers,
        min_workers_timeout=min_workers_timeout,
    )
    if options.in_process and gpus_per_worker > 0:
        raise InvalidInputError(
            f"gpus_per_worker={gpus_per_worker} without Ray workers: GPUs are given to Ray "
            "workers only. Add --workers N (or --address HOST:PORT)."
        )
    preflight(options)
    out = Path(out_dir)
    source = open_source(model)
    plan = plan_run(find_layers(source), config)
    cache = None if calib_cache is None else Path(calib_cache).expanduser().absolute()
    calibration = _calibration_for(config, plan, calib_ids, cache)
    if calib_checkpoint_every < 0:
        raise InvalidInputError(f"calib_checkpoint_every={calib_checkpoint_every}: use >= 0.")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; --out must be a directory.")
    with contextlib.ExitStack() as stack:
        # Connect first, then create the run: a join that fails leaves --out untouched.
        # The model's path is absolute: workers may run in another directory or node.
        executor = stack.enter_context(
            open_executor(options, Path(model).absolute(), source, config)
        )
        stack.enter_context(exclusive_run(out))
        return _run(
            source,
            plan,
            config,
            out,
            resume,
            max_shard_bytes,
            progress,
            start,
            executor,
            calibration,
            calib_checkpoint_every,
        )


def _run(
    source: ModelSource,
    plan: Plan,
    config: QuantizeConfig,
    out: Path,
    resume: bool,
    max_shard_bytes: int,
    progress: Progress | None,
    start: float,
    executor: Executor,
    calibration: _Calibration | None,
    calib_checkpoint_every: float,
) -> RunSummary:
    identity = None if calibration is None else calibration.identity
    manifest = Manifest.open(out, fingerprint(source, config, plan, identity), resume=resume)
    if removed := remove_stale_temp_files(out):
        logger.info("Removed %d temp files left by an interrupted run", removed)
    redone = manifest.verify()
    redone += _changed_sources(manifest, source, plan)
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
    tracker = RunTracker(plan.jobs, done=set(done), listener=progress, cost_model=PLAIN_FIT)

    def record(job: LayerJob, result: JobResult) -> None:
        _record(job, result, manifest)

    hessians: dict[str, HessianFile] = {}
    calib_info: dict[str, Any] | None = None
    if calibration is not None:
        store_identity = calibration.store_identity(source)
        if calibration.cache is None:
            store = CalibStore.open(out, store_identity, calib_checkpoint_every)
            hessians, calib_info = _calibrate(calibration, todo, store, tracker, executor)
        else:
            folder = calibration.cache / cache_key(store_identity)
            with exclusive_run(folder):  # one writer per cache entry
                store = CalibStore.at(folder, store_identity, calib_checkpoint_every)
                hessians, calib_info = _calibrate(calibration, todo, store, tracker, executor)
        calib_info["store"] = str(store.dir)
        tracker.stage("quantizing")

    executor.run(todo, record, tracker, hessians)
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
        metrics={name: rec.metric for name, rec in sorted(manifest.layers.items())},
        calibration=calib_info,
    )


def _changed_sources(manifest: Manifest, source: ModelSource, plan: Plan) -> list[str]:
    """Finished layers whose source weight is not the one they were quantized from.

    The run's fingerprint sees a weight file's size, header and first and last MiB; an edit
    in between (the same tensors at the same offsets with other values) is caught here: each
    finished layer's weight is read again and hashed, and a layer whose bytes changed is
    forgotten, so it is quantized again from the weight as it is now.

    Returns:
        Names of the layers to redo.
    """
    records = manifest.layers
    changed = []
    for job in plan.jobs:
        record = records.get(job.name)
        if record is None or not record.source_sha256:
            continue
        if weight_sha256(source.read(job.tensor)) != record.source_sha256:
            changed.append(job.name)
    if changed:
        logger.warning(
            "The source weights of %d finished layer(s) changed since they were quantized "
            "(same files, sizes and headers, other values): %s. Quantizing them again from "
            "the weights as they are now.",
            len(changed),
            ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""),
        )
        manifest.forget(changed)
    return changed


def _calibrate(
    calibration: _Calibration,
    todo: list[LayerJob],
    store: CalibStore,
    tracker: RunTracker,
    executor: Executor,
) -> tuple[dict[str, HessianFile], dict[str, Any]]:
    """Collect ``H`` for the unfinished layers that need it (resuming), file by file.

    In this process (resuming from saved hidden states), or on the run's Ray workers, each
    running a consecutive range of the windows (no hidden states are saved then: a rerun
    collects the missing layers' ``H`` from block 0).

    Returns:
        Layer -> its ``H`` file, for the layers to quantize that have one; and what the
        calibration did (for the run summary).
    """
    wanted = [job for job in todo if job.options.needs_hessian]
    have = store.hessians

    def served(job: LayerJob) -> bool:  # a file whose blocks hold the job's blocks
        file = have.get(job.name)
        return file is not None and file.block_size > 0 and file.block_size % job.block_size == 0

    missing = [job for job in wanted if not served(job) and job.name not in store.without_input]
    info: dict[str, Any] = {
        "layers": len(wanted),
        "reused": len(wanted) - len(missing),
        "samples": int(calibration.windows.shape[0]),
        "seq_len": int(calibration.windows.shape[1]),
        "seconds": 0.0,
        "blocks_run": 0,
        "start_block": None,
        "hidden_saves": 0,
        "tokens_per_second": None,
        "peak_rss_bytes": None,
        "workers": 0,
    }
    if missing:
        t0 = time.perf_counter()
        block_seconds: list[float] = []
        saves = 0
        requests = [HessianRequest(job.name, job.block_size, job.tied) for job in missing]
        resume = store.hidden()

        def on_block(result: BlockResult) -> None:
            nonlocal saves
            saves += store.add(result.hessians, result.inputs_of, result.block + 1, result.hidden)
            if result.block == HEAD:
                tracker.calibrating(CalibrationStatus(0, result.blocks_planned, 0.0, None))
            elif result.block < result.n_blocks:
                block_seconds.append(result.seconds)
                mean = sum(block_seconds) / len(block_seconds)
                tracker.calibrating(
                    CalibrationStatus(
                        result.blocks_done,
                        result.blocks_planned,
                        result.tokens / max(result.seconds, 1e-9),
                        mean * (result.blocks_planned - result.blocks_done),
                    )
                )

        batch = calibration_batch(int(calibration.windows.shape[1]))
        summary = executor.calibrate(requests, calibration.windows, batch, on_block, resume)
        info["workers"] = summary.workers
        info["worker_peak_rss_bytes"] = list(summary.worker_peak_rss_bytes)
        del resume
        store.complete(summary.without_input)
        seconds = time.perf_counter() - t0
        tokens = summary.tokens * summary.blocks_run
        info.update(
            seconds=round(seconds, 3),
            blocks_run=summary.blocks_run,
            n_blocks=summary.n_blocks,
            block_list=summary.block_list,
            start_block=summary.start_block,
            hidden_saves=saves,
            tokens_per_second=round(tokens / sum(block_seconds), 1) if block_seconds else None,
            peak_rss_bytes=peak_rss_bytes(),
        )
    without = sorted(job.name for job in wanted if job.name in store.without_input)
    if without:
        logger.warning(
            "%d layer(s) ask for metric: hessian but have no Linear input (an Embedding not "
            "tied to an output layer, a Conv2d) and are quantized with the weight metric: %s",
            len(without),
            ", ".join(without[:5]) + (", ..." if len(without) > 5 else ""),
        )
    info["without_input"] = without
    have = store.hessians
    return {job.name: have[job.name] for job in wanted if job.name in have}, info


def _merged_intact(out: Path, files: dict[str, str]) -> bool:
    """Whether every merged file is still there with the sha256 it was written with."""
    for name, digest in files.items():
        path = out / name
        if not path.is_file() or file_sha256(path) != digest:
            logger.warning("%s is missing or modified; merging again", path)
            return False
    return True


def _record(job: LayerJob, result: JobResult, manifest: Manifest) -> None:
    """Write a finished job's shard and mark it done: only the coordinator writes."""
    rel = shard_path(job.name)
    digest = write_shard(manifest.out_dir / rel, result.tensors, result.meta)
    record = LayerRecord(rel, digest, round(result.seconds, 3), result.metric, result.source_sha256)
    manifest.record(job.name, record)
    logger.debug("%s done in %.2f s", job.name, result.seconds)
