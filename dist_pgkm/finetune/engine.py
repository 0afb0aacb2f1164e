"""DeepSpeed behind a few functions: the only place dist-pgkm imports ``deepspeed``.

The rest of the package sees a DeepSpeed engine as an opaque object that it calls
(``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``) and hands back to these
functions:

- :func:`check_hardware` refuses a ZeRO stage or dtype this machine cannot run, before anything
  starts; :func:`deepspeed_config` is the one translation of our config into DeepSpeed's dict.
- :func:`init_distributed` joins the process group of a launcher (torchrun, ``deepspeed``) or
  makes a single-process one; on CPU it uses gloo and keeps DeepSpeed from JIT-compiling its
  shared-memory collective (a 55-90 s C++ build that is only an optimisation).
- :func:`build_engine` wraps a model with a torch AdamW (so no C++ optimizer is built either)
  and a constant-after-warm-up LR schedule that DeepSpeed checkpoints with the optimizer.
- :func:`save_checkpoint` / :func:`load_checkpoint` keep DeepSpeed checkpoints under our own
  atomic marker (``latest_complete.json``), so a crash mid-save never leaves a "latest" that
  points at a partial checkpoint; :func:`gathered_parameters` reads full fp32 parameters under
  any ZeRO stage; :func:`close` gives the model back as plain tensors, ready for the next engine.

Every function here that talks to other ranks must be called by all ranks, in the same order.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import socket
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from dist_pgkm.checkpoint.atomic import atomic_open, atomic_write_json, fsync_dir
from dist_pgkm.config.finetune import DeepSpeedOptions, TrainOptions
from dist_pgkm.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    DistributedError,
    InvalidInputError,
)

__all__ = [
    "MARKER",
    "build_engine",
    "check_hardware",
    "close",
    "deepspeed_config",
    "gathered_parameters",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "shutdown_distributed",
]

logger = logging.getLogger(__name__)

MARKER = "latest_complete.json"
"""File in a checkpoint directory naming the complete checkpoints, newest last."""

_MARKER_FORMAT = 1
_CLIENT_KEY = "dist_pgkm"  # our client state, nested so it cannot collide with DeepSpeed's keys
COLLECTIVE_TIMEOUT = timedelta(hours=4)
"""How long a collective waits for the other ranks. Long, because in ``finetune`` the ranks
wait at a barrier while rank 0 quantizes a stage (hours for a 70B model on few workers)."""

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_env_we_set: list[str] = []  # variables init_distributed invented for a single process


def _deepspeed() -> ModuleType:
    """Import DeepSpeed on first use (after ``DS_ACCELERATOR`` is decided).

    Raises:
        BackendUnavailableError: DeepSpeed is not installed.
    """
    if not torch.cuda.is_available():
        # DeepSpeed otherwise probes for accelerators and warns that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        deepspeed = importlib.import_module("deepspeed")
    except ImportError as exc:
        raise BackendUnavailableError(
            "DeepSpeed is not installed, so fine-tuning is unavailable. Install it with "
            "`pip install 'dist-pgkm[finetune]'` after torch (an unpinned torch pulled in by "
            "deepspeed would be a CUDA build)."
        ) from exc
    return deepspeed


def check_hardware(ds: DeepSpeedOptions, world_size: int = 1) -> None:
    """Refuse a dtype or ZeRO stage this machine cannot run, before anything is built.

    Measured with DeepSpeed 0.19.8 on CPU (gloo): ZeRO 0, 1, 2 and 3 all train with fp32 and
    bf16, with one process and with two ranks; fp16 is refused by DeepSpeed's CPU accelerator.

    Args:
        ds: The DeepSpeed options.
        world_size: Number of ranks that will train.

    Raises:
        ConfigError: fp16 without a CUDA device; bf16 on a GPU without bf16 support; a world
            size below 1.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be at least 1, got {world_size}.")
    cuda = torch.cuda.is_available()
    if ds.dtype == "fp16" and not cuda:
        raise ConfigError(
            "deepspeed.dtype fp16 needs a CUDA GPU: DeepSpeed's CPU accelerator has no fp16 "
            "training path (it refuses it at initialize). Use dtype: bf16 (supported on CPU) or "
            "fp32 on this machine."
        )
    if ds.dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ConfigError(
            f"deepspeed.dtype bf16 is not supported by this GPU ({name}; bf16 needs compute "
            "capability 8.0+, e.g. A100, H100, RTX 30xx). Use dtype: fp16 or fp32."
        )
    if ds.zero_stage == 3 and world_size == 1:
        logger.info("ZeRO-3 with a single rank shards nothing; it runs, but ZeRO-0 is faster.")


def deepspeed_config(ds: DeepSpeedOptions, train: TrainOptions, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for our options: the one place the translation happens.

    No ``optimizer`` or ``scheduler`` section: :func:`build_engine` passes a torch AdamW and a
    torch LR scheduler, so DeepSpeed builds no C++ optimizer (``cpu_adam``, ``fused_adam``).

    Args:
        ds: ZeRO stage and dtype.
        train: Batch sizes (``batch_size`` is per rank) and gradient clipping.
        world_size: Number of data-parallel ranks.

    Returns:
        A JSON-serialisable dict for ``deepspeed.initialize(config=...)``.
    """
    config: dict[str, Any] = {
        "train_batch_size": train.batch_size * world_size,
        "train_micro_batch_size_per_gpu": train.micro,
        "gradient_accumulation_steps": train.batch_size // train.micro,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**12,  # progress is ours to report
        "wall_clock_breakdown": False,
    }
    if ds.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0}  # 0: dynamic loss scaling
    if train.max_grad_norm > 0:
        config["gradient_clipping"] = train.max_grad_norm
    return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def init_distributed() -> tuple[int, int]:
    """Join (or make) the process group DeepSpeed runs in; idempotent.

    Under torchrun or the ``deepspeed`` launcher their ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` are used. With none of them set, this is a single
    process: they are set to rank 0 of 1 on 127.0.0.1 and a free port. The backend is gloo on
    CPU and nccl on GPUs (each rank on GPU ``LOCAL_RANK``). On CPU, DeepSpeed's shared-memory
    collective (``deepspeed_shm_comm``) is marked unavailable before DeepSpeed's communication
    backend is created, so it is never JIT-compiled; DeepSpeed then uses plain gloo collectives.

    Returns:
        ``(rank, world_size)``.

    Raises:
        DistributedError: Some launcher variables are set and others missing.
        BackendUnavailableError: DeepSpeed is not installed.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    deepspeed = _deepspeed()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        env = os.environ
        present = [v for v in _LAUNCHER_ENV if v in env]
        if not present:
            single = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
            }
            env.update(single)
            _env_we_set[:] = list(single)
        elif missing := [v for v in _LAUNCHER_ENV if v not in env]:
            raise DistributedError(
                f"{', '.join(present)} are set but {', '.join(missing)} are not, so this process "
                "cannot join its process group. Start multi-rank runs with `torchrun "
                "--nproc_per_node=N ...` (or the deepspeed launcher), which set all of them, "
                "or unset them all for a single process."
            )
        if cuda:
            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            timeout=COLLECTIVE_TIMEOUT,
        )
    if not cuda:
        # deepspeed.ops.__compatible_ops__ is only read by comm/torch.py's build_shm_op; an op
        # marked incompatible there is not built and gloo collectives are used. The table is
        # computed on first access by probing every op builder (compiler test runs that print
        # linker errors for optional ops such as async_io); setting it first skips the probe.
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.comm.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, dist_init_required=False
    )
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Destroy the process group and forget the variables :func:`init_distributed` invented.

    For tests and tools that run more than one job in a process; a later
    :func:`init_distributed` makes a fresh group (on a new port).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() > 1:
            # No rank tears its gloo pairs down while another still talks to it (a rank that
            # left early made the other abort: "terminate called without an active exception").
            dist.barrier()
        dist.destroy_process_group()
    for name in _env_we_set:
        os.environ.pop(name, None)
    _env_we_set.clear()


@dataclass
class _EngineInfo:
    """What :func:`build_engine` remembers about an engine for the other functions."""

    keep_checkpoints: int
    zero_stage: int
    dtypes: dict[int, torch.dtype]  # id(tensor) -> dtype before DeepSpeed cast the model
    closed: bool = False


_engines: weakref.WeakKeyDictionary[Any, _EngineInfo] = weakref.WeakKeyDictionary()


def _info(engine: Any) -> _EngineInfo:
    info = _engines.get(engine)
    if info is None:
        raise InvalidInputError(
            f"{type(engine).__name__} was not made by dist_pgkm.finetune.engine.build_engine; "
            "build engines with it so that checkpoints and close() know their settings."
        )
    if info.closed:
        raise InvalidInputError("this engine was closed; build a new one with build_engine().")
    return info


class _LinearWarmup:
    """LR factor: linear from ``1 / (steps + 1)`` up to 1 over ``steps`` steps, then constant.

    A callable object rather than a lambda so that ``LambdaLR.state_dict()`` (saved by DeepSpeed
    in every checkpoint) records ``steps``.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / (self.steps + 1))


def _param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``groups`` with frozen and repeated (tied) parameters dropped, checked."""
    owned = {id(p): name for name, p in model.named_parameters()}
    seen: set[int] = set()
    cleaned = []
    for i, group in enumerate(groups):
        if "params" not in group:
            raise InvalidInputError(f"param group {i} has no 'params' list.")
        params = []
        for p in group["params"]:
            if id(p) not in owned:
                raise InvalidInputError(
                    f"param group {i} holds a {tuple(p.shape)} tensor that is not a parameter of "
                    f"the {type(model).__name__} being trained; pass the model's own parameters."
                )
            # A tied parameter (one codebook shared by an embedding and the LM head) may reach
            # us twice; torch refuses a parameter in two groups, so its first group wins.
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            cleaned.append({**group, "params": params})
    if not cleaned:
        raise InvalidInputError(
            "the param groups hold no trainable parameter (requires_grad=True); there is "
            "nothing to fine-tune."
        )
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if stray:
        raise InvalidInputError(
            f"{len(stray)} parameters require gradients but are in no param group (e.g. "
            f"{', '.join(stray[:3])}); the optimizer would never update them. Freeze them with "
            "requires_grad_(False) or add them to a group."
        )
    return cleaned


def build_engine(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    ds: DeepSpeedOptions,
    train: TrainOptions,
) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with AdamW and a warm-up-then-constant LR.

    Joins the process group first (:func:`init_distributed`). The model may hold PQ modules
    (trainable ``centroids``, integer buffers) and layers wrapped with Quant-Noise; a parameter
    shared by two modules (tied codebooks) is trained once. DeepSpeed casts the model to the
    training dtype in place (bf16/fp16) and, under ZeRO-3, partitions its parameters; call
    :func:`close` to get plain parameters in their original dtypes back.

    Args:
        model: The model; every parameter with ``requires_grad`` must be in a group.
        param_groups: torch optimizer groups, e.g. ``[{"params": floats, "lr": lr},
            {"params": centroids, "lr": centroid_lr, "weight_decay": 0.0}]``; keys not given
            default to ``train.lr`` and ``train.weight_decay``. Frozen parameters are skipped.
        ds: ZeRO stage, dtype and checkpoints kept.
        train: Batch sizes, LR, weight decay, warm-up steps, gradient clipping.

    Returns:
        The DeepSpeed engine (``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``).

    Raises:
        ConfigError: The dtype cannot run here (:func:`check_hardware`).
        InvalidInputError: A group holds a foreign or no trainable parameter, or a trainable
            parameter is in no group.
    """
    groups = _param_groups(model, param_groups)
    deepspeed = _deepspeed()
    _, world_size = init_distributed()
    check_hardware(ds, world_size)
    dtypes = {id(t): t.dtype for t in [*model.parameters(), *model.buffers()]}
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmup(train.warmup_steps))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, train, world_size),
        dist_init_required=False,
    )
    _engines[engine] = _EngineInfo(ds.keep_checkpoints, ds.zero_stage, dtypes)
    return engine


@contextlib.contextmanager
def _gathered(param: nn.Parameter) -> Iterator[torch.Tensor]:
    """The full value of ``param`` (gathered under ZeRO-3) for the duration of the block."""
    if hasattr(param, "ds_id"):
        with _deepspeed().zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
    else:
        yield param.data


def _full_values(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(param) -> full fp32 master value`` (trainable) or full value (frozen), as copies.

    Collective under ZeRO 1-3: every rank iterates the parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    values: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        full = None
        if hasattr(p, "_z3_optimizer") or getattr(p, "_hp_mapping", None) is not None:
            full = safe_get_full_fp32_param(p)
        if full is None:
            with _gathered(p) as data:
                full = data
        values[id(p)] = full.detach().clone()
    return values


def gathered_parameters(engine: Any) -> dict[str, torch.Tensor]:
    """Full parameters of the engine's model by name, as fp32 CPU copies (all ranks call it).

    Trainable parameters come from the optimizer's fp32 master copy under bf16/fp16 and
    ZeRO 1-3; tied parameters appear once (under their first name).
    """
    _info(engine)
    model: nn.Module = engine.module
    values = _full_values(model)
    return {
        name: values[id(p)].to(device="cpu", dtype=torch.float32)
        for name, p in model.named_parameters()
    }


def close(engine: Any) -> None:
    """Give the model back as plain parameters and free DeepSpeed's state (all ranks call it).

    Every parameter is replaced (in every module that holds it, so ties survive) by a new plain
    ``Parameter`` with its full value in its dtype from before :func:`build_engine`: trainable
    ones from the optimizer's fp32 master copy, frozen ones as gathered (a frozen parameter
    cast to bf16/fp16 by DeepSpeed keeps that rounding). Float buffers get their dtype back.
    DeepSpeed's hooks are removed and its optimizer state is dropped, so a new engine (for
    example with another set of trainable parameters) can be built on the same model.
    Re-read parameters from the model afterwards: references taken before are stale.
    """
    info = _info(engine)
    model: nn.Module = engine.module
    values = _full_values(model)
    engine.destroy()
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if type(module._parameters) is not dict:  # ZeRO-3's ZeROOrderedDict (gathers on access)
            module._parameters = dict(module._parameters)
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in fresh:
                value = values[id(p)].to(info.dtypes.get(id(p), values[id(p)].dtype))
                fresh[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
            module._parameters[name] = fresh[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.dtype != info.dtypes.get(id(b), b.dtype):
                module._buffers[name] = b.to(info.dtypes[id(b)])
    engine.optimizer = None
    engine.lr_scheduler = None
    info.closed = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- checkpoints ---------------------------------------------------------------------------


def _check_tag(tag: str) -> None:
    if not tag or tag in {".", ".."} or "/" in tag or "\\" in tag or tag == MARKER:
        raise InvalidInputError(
            f"checkpoint tag {tag!r} must be a plain directory name (e.g. 'stage0-step50')."
        )


def _read_marker(directory: Path) -> list[str]:
    """Complete tags in ``directory``, oldest first (empty without a marker)."""
    path = directory / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} cannot be read ({exc}); it names the complete checkpoints. Delete it to "
            "start over, or restore it from the tag directories you trust."
        ) from exc
    tags = data.get("complete") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != _MARKER_FORMAT
        or not isinstance(tags, list)
        or not all(isinstance(t, str) for t in tags)
    ):
        raise CheckpointError(
            f"{path} is not a dist-pgkm checkpoint marker (format {_MARKER_FORMAT}); delete it "
            "to start over."
        )
    return list(tags)


def _write_marker(directory: Path, tags: list[str]) -> None:
    data = {"format": _MARKER_FORMAT, "latest": tags[-1] if tags else None, "complete": tags}
    atomic_write_json(directory / MARKER, data)


def _is_deepspeed_tag(path: Path) -> bool:
    """Whether ``path`` looks like a (possibly partial) DeepSpeed checkpoint directory."""
    return path.is_dir() and (
        not any(path.iterdir()) or all("_rank_" in f.name for f in path.iterdir() if f.is_file())
    )


def latest_checkpoint(directory: Path, prefix: str = "") -> str | None:
    """The newest complete checkpoint tag in ``directory`` starting with ``prefix``.

    Args:
        directory: Checkpoint directory (need not exist).
        prefix: Only tags starting with it, e.g. ``"stage2-"`` for the checkpoints of one
            stage (an engine built for stage 2 cannot load a stage-1 checkpoint).

    Returns:
        The tag, or None when there is none.

    Raises:
        CheckpointError: The marker is unreadable, or names a tag whose directory is gone.
    """
    directory = Path(directory)
    tags = [t for t in _read_marker(directory) if t.startswith(prefix)]
    if not tags:
        return None
    if not (directory / tags[-1]).is_dir():
        raise CheckpointError(
            f"{directory / MARKER} names checkpoint {tags[-1]!r} but {directory / tags[-1]} is "
            "missing; restore it, or delete the marker to start over."
        )
    return tags[-1]


def save_checkpoint(engine: Any, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Save a DeepSpeed checkpoint and record it as complete only once it is (all ranks call it).

    Layout: ``directory/<tag>/`` is DeepSpeed's (module, optimizer partitions, LR scheduler,
    ``client_state``); ``directory/latest_complete.json`` lists the complete tags. Rank 0
    rewrites that marker atomically after every rank has finished writing and the files are
    fsynced, then points DeepSpeed's own ``latest`` file at it (for DeepSpeed's tools such as
    ``zero_to_fp32.py``; never read here) and deletes the tags beyond ``keep_checkpoints`` and
    leftovers of interrupted saves. ``directory`` must be shared by all ranks (one machine, or a
    shared file system).

    Args:
        engine: From :func:`build_engine`.
        directory: Checkpoint directory (created if missing).
        tag: Name of this checkpoint, a plain directory name (e.g. ``stage1-step200``). Saving a
            tag that already exists replaces it.
        client_state: Anything else to restore on resume (step, data position, Quant-Noise
            generator states, ...); returned as is by :func:`load_checkpoint`.
    """
    import torch.distributed as dist

    info = _info(engine)
    _check_tag(tag)
    directory = Path(directory)
    rank = dist.get_rank()
    complete = _read_marker(directory)  # on every rank: a bad marker fails all, none waits
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tag in complete:  # replaced: never leave it marked complete while it is rewritten
            complete.remove(tag)
            _write_marker(directory, complete)
        if (directory / tag).exists():
            shutil.rmtree(directory / tag)
    dist.barrier()
    engine.save_checkpoint(
        str(directory), tag=tag, client_state={_CLIENT_KEY: client_state}, save_latest=False
    )
    dist.barrier()  # every rank's files are written
    if rank == 0:
        for path in sorted((directory / tag).rglob("*")):
            if path.is_file():
                fsync_dir(path)  # os.fsync of a read-only descriptor: files and directories
        fsync_dir(directory / tag)
        complete = [t for t in _read_marker(directory) if t != tag] + [tag]
        kept = complete[-info.keep_checkpoints :]
        _write_marker(directory, kept)
        # DeepSpeed's own pointer, for its tools (zero_to_fp32.py); written after ours and
        # never read by load_checkpoint.
        with atomic_open(directory / "latest") as f:
            f.write(tag.encode())
        for path in directory.iterdir():
            if path.name not in kept and _is_deepspeed_tag(path):
                shutil.rmtree(path)
    dist.barrier()  # nobody reads the marker before it is written
    logger.info("saved checkpoint %s in %s", tag, directory)


def _load_module_zero3(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a ZeRO-3 module state: buffers only, with the parameters gathered meanwhile.

    Under ZeRO-3 the saved module state holds empty placeholders for the (partitioned)
    parameters; DeepSpeed restores them from the optimizer's fp32 partitions right after. The
    buffers (e.g. PQ ``codes``) are loaded here while every parameter is gathered, so modules
    that derive state from parameters and buffers on load (a PQ module re-deriving its
    ``index`` needs its codebook size) see full tensors.
    """
    params = {name for name, _ in dst.named_parameters(remove_duplicate=False)}
    buffers = {k: v for k, v in src.items() if k not in params}
    with _deepspeed().zero.GatheredParameters(list(dst.parameters()), modifier_rank=None):
        result = dst.load_state_dict(buffers, strict=False)
    missing = set(result.missing_keys) - params
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the checkpoint's module state does not fit this model (missing: "
            f"{sorted(missing)[:3]}, unexpected: {sorted(result.unexpected_keys)[:3]}); it was "
            "written for another model or stage. Use another directory or delete it."
        )


def _deepspeed_data_classes() -> list[Any]:
    """The DeepSpeed classes its checkpoints hold beyond tensors and plain data (ZeRO-2/3
    optimizer states): plain records, safe to rebuild, and nothing else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain data and the DeepSpeed records
    above; any other object in the file is refused before it is built, so nothing in it runs."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain data ({first[:200]}); "
            "dist-pgkm never unpickles those, since that can run code from the file. The "
            "checkpoint was not written by dist-pgkm's DeepSpeed, or was replaced. If the "
            "directory is not yours, do not use it; otherwise delete its deepspeed/ folder to "
            "restart the current stage from its start, or use a new --out directory."
        ) from exc


def load_checkpoint(
    engine: Any, directory: Path, prefix: str = ""
) -> tuple[str, dict[str, Any]] | None:
    """Load the newest complete checkpoint into ``engine`` (all ranks call it).

    Restores the module, the optimizer (partitions) and the LR scheduler. A checkpoint that
    DeepSpeed wrote but the marker does not list (a crash before it was recorded) is never
    loaded. Nothing is unpickled beyond tensors, plain data and three DeepSpeed records (its
    loss scaler, ZeRO stage and fragment addresses): DeepSpeed's own ``torch.load`` with
    ``weights_only=False`` would run any code a replaced file carries.

    Args:
        engine: From :func:`build_engine`.
        directory: Checkpoint directory (need not exist).
        prefix: Only consider tags starting with it (e.g. ``"stage2-"``): a checkpoint of
            another stage has other trainable parameters and cannot be loaded.

    Returns:
        ``(tag, client_state)`` as given to :func:`save_checkpoint`, or None when ``directory``
        holds no complete checkpoint.

    Raises:
        CheckpointError: The marker is unreadable or names a missing checkpoint, a file holds
            other Python objects (refused unbuilt), or DeepSpeed cannot load it (e.g. written
            for another model or ZeRO layout).
    """
    info = _info(engine)
    directory = Path(directory)
    tag = latest_checkpoint(directory, prefix)
    if tag is None:
        return None
    # DeepSpeed reads its files through its checkpoint engine, whose torch.load unpickles
    # anything (weights_only=False): this engine's reads go through _load_weights_only instead.
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = _load_weights_only
    try:
        path, state = engine.load_checkpoint(
            str(directory),
            tag=tag,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=_load_module_zero3 if info.zero_stage == 3 else None,
        )
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {directory / tag} cannot be loaded into this model ({exc}); it was "
            "written for another model, stage or ZeRO layout. Use another directory or delete "
            "it to start over."
        ) from exc
    finally:
        del checkpoint_engine.load  # the class's own again
    if path is None or not isinstance(state, dict) or _CLIENT_KEY not in state:
        raise CheckpointError(
            f"checkpoint {directory / tag} is incomplete or was not written by dist-pgkm; delete "
            f"it and its entry in {directory / MARKER}."
        )
    client: dict[str, Any] = state[_CLIENT_KEY]
    logger.info("loaded checkpoint %s from %s", tag, directory)
    return tag, client
