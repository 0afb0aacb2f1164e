"""Model surgery: the modules a stage trains, and the weights it reads and writes.

A stage's layers train as PQ modules (iPQ: trainable codebooks and scales, frozen codes) or as
float layers wrapped with DKM (soft assignments, frozen into PQ modules at the stage's end);
the selected layers of later stages, still in float, get Quant-Noise in the same block layout.
Nothing here writes into a parameter in a forward (docs/finetune.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_pgkm.checkpoint.shard import decode_layer, read_shard
from dist_pgkm.checkpoint.spec import TENSOR_SUFFIXES
from dist_pgkm.config.finetune import FinetuneConfig, Stage
from dist_pgkm.distributed.coordinator import shard_path
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.errors import CheckpointError
from dist_pgkm.noise import Codebook, QuantNoise, add_quant_noise
from dist_pgkm.pq.modules import PQModule, pq_module_for
from dist_pgkm.pq.quantize import QuantizedWeight, quantize_weight

__all__ = [
    "NoiseGroups",
    "add_stage_noise",
    "codebook_parameters",
    "dense_state_dict",
    "freeze_dkm",
    "idkm_solves",
    "load_trained",
    "swap_in",
    "swap_stage",
    "trainable_state",
    "wrap_dkm",
]


# --- PQ modules --------------------------------------------------------------------------------


def swap_in(model: nn.Module, job: LayerJob, q: QuantizedWeight) -> None:
    """Replace ``job``'s module (and the modules tied to it) by trainable PQ modules.

    The codebook(s) and scales train; codes and outliers are frozen (docs/finetune.md).
    """
    module = model.get_submodule(job.name)
    pq = pq_module_for(module).from_quantized(module, q)
    for param in codebook_parameters(pq):
        param.requires_grad_(True)
    model.set_submodule(job.name, pq)
    for tied in job.tied:
        other = model.get_submodule(tied)
        pq_tied = pq_module_for(other).from_quantized(other, q)
        pq_tied.tie_to(pq)
        model.set_submodule(tied, pq_tied)


def swap_stage(model: nn.Module, jobs: Sequence[LayerJob], q_dir: Path) -> dict[str, str]:
    """Swap in the PQ modules of a stage's quantize run in ``q_dir``.

    Returns:
        Each layer's k-means metric.
    """
    metrics = {}
    for job in jobs:
        tensors, meta = read_shard(q_dir / shard_path(job.name))
        _, q = decode_layer(tensors, meta, where=str(q_dir))
        swap_in(model, job, q)
        metrics[job.name] = q.metric
    return metrics


def codebook_parameters(module: PQModule) -> list[nn.Parameter]:
    """A PQ module's trained parameters besides its bias: codebook(s) and scales."""
    return [p for p in (module.centroids, module.scales) if p is not None]


# --- DKM ---------------------------------------------------------------------------------------


def wrap_dkm(
    model: nn.Module,
    stage: Stage,
    jobs: Sequence[LayerJob],
    q_dir: Path,
    ranks: Mapping[str, int],
) -> Any:
    """Wrap a DKM stage's float layers, from the codebooks of its quantize run in ``q_dir``.

    Args:
        ranks: LR²VQ stages: each layer's rank (unused by the other methods).

    Returns:
        The stage's :class:`~dist_pgkm.dkm.wrap.DKM` handle.
    """
    from dist_pgkm.dkm.wrap import DKM, DKMLayer, DKMOptions, add_dkm

    lr2vq = stage.method == "lr2vq"
    options = DKMOptions(
        method=stage.dkm.clusterer if lr2vq else stage.method,  # type: ignore[arg-type]
        tau=stage.dkm.tau,
        iters=stage.dkm.iters,
        chunk=stage.dkm.chunk,
        solver_iters=stage.dkm.solver_iters,
    )
    layers: list[DKMLayer] = []
    for job in jobs:
        tensors, meta = read_shard(q_dir / shard_path(job.name))
        _, q = decode_layer(tensors, meta, where=str(q_dir))
        centroids = q.centroids  # plain: extras were refused at config time (stage_layers)
        opts = dataclasses.replace(options, rank=ranks[job.name]) if lr2vq else options
        handle = add_dkm(
            model, [job.name], job.block_size, {job.name: centroids}, opts,
            tied={job.name: job.tied},
        )  # fmt: skip
        layers.extend(handle)
    return DKM(layers)


def idkm_solves(dkm: Any) -> dict[str, int] | None:
    """IDKM's backward solves in this process (None when there were none)."""
    if not any(layer.stats.calls for layer in dkm):
        return None
    return {
        "calls": sum(layer.stats.calls for layer in dkm),
        "truncated": sum(layer.stats.truncated for layer in dkm),
        "fallbacks": sum(layer.stats.fallbacks for layer in dkm),
    }


def freeze_dkm(model: nn.Module, dkm: Any, jobs: Sequence[LayerJob]) -> None:
    """End of a DKM stage: hard-assign every layer and swap in PQ modules (codes fixed)."""
    for job in jobs:
        centroids, codes = dkm[job.name].export()
        weight = model.get_submodule(job.name).weight
        assert isinstance(weight, torch.Tensor)
        swap_in(model, job, QuantizedWeight(centroids, codes, tuple(weight.shape)))
    dkm.remove()


# --- Quant-Noise -------------------------------------------------------------------------------


class NoiseGroups:
    """Several Quant-Noise groups (one per block size) handled as one."""

    def __init__(self, groups: list[QuantNoise]) -> None:
        self.groups = groups

    def state_dict(self) -> list[Any]:
        return [g.state_dict() for g in self.groups]

    def load_state_dict(self, states: list[Any]) -> None:
        for g, s in zip(self.groups, states, strict=True):
            g.load_state_dict(s)

    def remove(self) -> None:
        for g in self.groups:
            g.remove()


def add_stage_noise(
    model: nn.Module, config: FinetuneConfig, i: int, later: Sequence[LayerJob]
) -> NoiseGroups | None:
    """Quant-Noise on the ``later`` stages' layers while stage ``i`` trains (None: no noise)."""
    noise = config.noise
    if noise.p <= 0 or not later:
        return None
    groups: dict[int, list[LayerJob]] = {}
    for job in later:
        groups.setdefault(job.block_size, []).append(job)
    handles: list[QuantNoise] = []
    for bs, jobs in groups.items():
        codebooks = None
        if noise.mode == "quantize":
            codebooks = {job.name: _noise_codebook(model, config, job) for job in jobs}
        handles.append(
            add_quant_noise(
                model,
                [job.name for job in jobs],
                noise.p,
                bs,
                mode=noise.mode,
                codebooks=codebooks,
                seed=config.seed + 1000 * (i + 1) + bs,
            )
        )
    return NoiseGroups(handles)


def _noise_codebook(model: nn.Module, config: FinetuneConfig, job: LayerJob) -> Codebook:
    """The quantize-mode noise codebook of a later stage's layer: its rule's codebooks,
    scales and outliers fitted to the current weight (weight metric: no calibration here);
    perturbed blocks take their nearest codeword at every step."""
    weight = model.get_submodule(job.name).weight
    assert isinstance(weight, torch.Tensor)
    weight = weight.detach()
    options = job.options.model_copy(update={"metric": "weight"})
    q = quantize_weight(
        weight, job.block_size, job.k, method=config.quantize.method, seed=job.seed,
        n_iter=config.quantize.n_iter, options=options,
    )  # fmt: skip
    return Codebook(
        q.centroids,
        scales=q.scales,
        outlier_idx=q.outlier_idx if q.n_outliers else None,
        shape=tuple(weight.shape),
    )


# --- weights -----------------------------------------------------------------------------------


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a float checkpoint: PQ modules decoded, shared tensors once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    pq_prefixes = {name for name, m in model.named_modules() if isinstance(m, PQModule)}
    for name, m in model.named_modules():
        if isinstance(m, PQModule):
            if id(m.centroids) in seen:
                continue  # tied to a module written already
            seen.add(id(m.centroids))
            with torch.no_grad():
                out[f"{name}.weight"] = m.weight.detach().float().contiguous()
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in pq_prefixes and key.rpartition(".")[2] in TENSOR_SUFFIXES:
            continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous().clone()
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to restore a stage's end: the full state dict, shared tensors once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous().clone()
    return out


def load_trained(model: nn.Module, path: Path, out: Path) -> None:
    """Load a stage's end (``trained.safetensors``) into the model rebuilt from the stages.

    Raises:
        CheckpointError: The file does not fit the model (``out`` is the run to start over).
    """
    tensors, _ = read_shard(path)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Tied tensors are saved once; anything else missing is a mismatch.
    real_missing = [k for k in missing if not _is_shared(model, k, tensors)]
    if real_missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model rebuilt from the stages (missing "
            f"{real_missing[:3]}, unexpected {unexpected[:3]}). Delete {out} and start "
            "over."
        )
    for m in model.modules():
        if isinstance(m, PQModule):
            m.refresh_index()


def _is_shared(model: nn.Module, key: str, saved: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in saved if k in state)
