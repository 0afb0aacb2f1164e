"""Run one function on N ranks of a Ray cluster through Ray Train (``TorchTrainer``).

``dist-pgkm finetune --ranks N`` uses this: Ray Train places N workers (CPUs or GPUs) on the
cluster, joins them in a torch process group (gloo on CPU, nccl on GPU) and calls the same
function on each; rank 0's return value comes back to the caller. The function is passed in,
so this module does not import the fine-tuning code (DESIGN.md §8: ``distributed/`` is the only
importer of ray, ``finetune/`` the only importer of deepspeed).

A worker that dies (or a lost node) makes Ray Train restart the whole group, up to
``max_failures`` times; the function must therefore be restartable. ``finetune_model`` is: it
resumes from its last DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_pgkm import errors
from dist_pgkm.distributed.options import RayOptions
from dist_pgkm.distributed.ray_executor import ray_session
from dist_pgkm.errors import DistPGKMError, DistributedError

__all__ = ["run_on_ray_train"]

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 4 * 3600
"""Seconds a collective waits for the other ranks (rank 0 quantizes while the others wait)."""


def _worker_loop(payload: dict[str, Any]) -> None:
    """Ray Train's per-worker function: call the user's function; rank 0 writes the outcome.

    Ray Train v2 returns metrics only with checkpoints, so the outcome goes through a JSON
    file in the storage directory, which the driver reads after ``fit()``.
    """
    import ray.train

    from dist_pgkm.checkpoint.atomic import atomic_write_json

    fn: Callable[[Any], Any] = payload["fn"]
    try:
        outcome = {"result": fn(payload["arg"]), "error": None}
    except DistPGKMError as exc:  # ours are final (bad input, another run's dir): no restart
        outcome = {"result": None, "error": [type(exc).__name__, str(exc)]}
    if ray.train.get_context().get_world_rank() == 0:
        atomic_write_json(Path(payload["outcome"]), outcome)


def run_on_ray_train(
    fn: Callable[[Any], Any],
    arg: Any,
    *,
    ranks: int,
    options: RayOptions,
    storage: Path,
    max_failures: int = 2,
) -> Any:
    """Call ``fn(arg)`` on ``ranks`` Ray Train workers; return rank 0's result.

    Args:
        fn: A module-level (picklable) function; run by every rank in its own process, inside
            an initialized ``torch.distributed`` group. Rank 0's result (JSON-serialisable)
            is returned.
        arg: Its argument, sent to every worker.
        ranks: Number of training processes.
        options: The cluster (``address``; None: an embedded Ray with ``ranks *
            cpus_per_worker`` CPUs) and each rank's resources (``cpus_per_worker``,
            ``gpus_per_worker``; with GPUs, one per rank).
        storage: A directory every node can reach, for Ray Train's run records.
        max_failures: Restarts of the worker group after a worker or node failure.

    Raises:
        DistPGKMError: ``fn`` raised one of dist-pgkm's errors (re-raised as is, no restart).
        DistributedError: The cluster cannot run the workers, or they failed ``max_failures +
            1`` times.
    """
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise DistributedError(
            f"--ranks needs Ray Train ({exc}). Install it with `pip install 'dist-pgkm[ray]'` "
            "(which pulls ray[train]), or run the ranks with torchrun instead."
        ) from exc

    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": float(options.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(options.gpus_per_worker)
    session = RayOptions(
        workers=ranks,
        address=options.address,
        gpus_per_worker=options.gpus_per_worker,
        cpus_per_worker=options.cpus_per_worker,
        connect_timeout=options.connect_timeout,
    )
    storage.mkdir(parents=True, exist_ok=True)
    outcome_path = storage / f"outcome-{uuid.uuid4().hex}.json"
    with ray_session(session, log_to_driver=True):
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"fn": fn, "arg": arg, "outcome": str(outcome_path)},
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S
            ),
            scaling_config=ScalingConfig(
                num_workers=ranks, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name="ray-train",
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train's TrainingFailedError and friends
            raise DistributedError(
                f"Ray Train failed after {max_failures} restarts: {exc}. The workers' logs are "
                f"under {tempfile.gettempdir()}/ray (embedded) or the cluster's session logs."
            ) from exc
    try:
        outcome = json.loads(outcome_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistributedError(
            f"Ray Train finished but rank 0 left no outcome in {outcome_path} ({exc})."
        ) from exc
    finally:
        outcome_path.unlink(missing_ok=True)
    if outcome["error"] is not None:
        name, message = outcome["error"]
        raise getattr(errors, name, DistributedError)(message)
    return outcome["result"]
