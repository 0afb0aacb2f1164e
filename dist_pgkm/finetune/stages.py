"""The stages of a run: which layers each one quantizes, and its quantize phase.

Stage ``i`` lives in ``stages/<i>-<name>/``: ``quantize/`` is its quantize run (shards,
manifest), ``source/`` the weights as the previous stages left them (deleted once quantized),
``trained.safetensors`` all weights at the stage's end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dist_pgkm.checkpoint.shard import write_shard
from dist_pgkm.config.finetune import FinetuneConfig
from dist_pgkm.config.quantize import LayerRule, QuantizeConfig
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.errors import ConfigError
from dist_pgkm.finetune.surgery import dense_state_dict
from dist_pgkm.pq.codec import to_subvectors

__all__ = [
    "drop_stage_inputs",
    "lr2vq_ranks",
    "quantize_stage",
    "stage_config",
    "stage_dir",
    "stage_layers",
]

logger = logging.getLogger(__name__)


def stage_layers(jobs: Sequence[LayerJob], config: FinetuneConfig) -> list[list[LayerJob]]:
    """The quantize jobs of each stage.

    Raises:
        ConfigError: A selected layer belongs to no stage, or a stage has no layer.
    """
    stages: list[list[LayerJob]] = [[] for _ in config.stages]
    orphans = []
    for job in jobs:
        i = config.stage_of(job.name)
        if i is None:
            orphans.append(job.name)
        else:
            stages[i].append(job)
    if orphans:
        raise ConfigError(
            f"{len(orphans)} layers the quantize config selects are in no stage (e.g. "
            f"{', '.join(orphans[:3])}). Add a stage whose `match` covers them, or exclude them "
            "from the quantize config."
        )
    if empty := [s.name for s, layers in zip(config.stages, stages, strict=True) if not layers]:
        raise ConfigError(
            f"stage {', '.join(empty)} matches no layer the quantize config selects. Fix its "
            "`match` patterns (full-match regexes, `re:` prefix) or remove the stage."
        )
    for stage, layers in zip(config.stages, stages, strict=True):
        if stage.method != "ipq" and (stored := [j for j in layers if _has_extras(j)]):
            raise ConfigError(
                f"stage {stage.name}: method {stage.method} on {stored[0].name}, whose rule asks "
                "for scales, codebook_rows or outliers, is not supported: DKM, IDKM and LR²VQ "
                "train one codebook of plain sub-vectors. Give such layers a stage with method: "
                "ipq (which trains their codebooks and scales), or drop those options."
            )
        rank = stage.dkm.rank if stage.method == "lr2vq" else "auto"
        if too_small := [job for job in layers if rank != "auto" and job.block_size < rank]:
            raise ConfigError(
                f"stage {stage.name}: dkm.rank {rank} exceeds the block size of "
                f"{too_small[0].name} ({too_small[0].block_size}); LR²VQ clusters in d <= "
                "block size dimensions. Lower the rank or use rank: auto."
            )
    return stages


def _has_extras(job: LayerJob) -> bool:
    """Whether a layer's rule stores more than a codebook and codes (books, scales, outliers)."""
    options = job.options
    return options.scale != "none" or options.codebook_rows > 0 or options.outliers > 0


def stage_dir(out: Path, config: FinetuneConfig, i: int) -> Path:
    """Stage ``i``'s folder in the output directory ``out``."""
    return out / "stages" / f"{i}-{config.stages[i].name}"


def stage_config(config: FinetuneConfig, jobs: Sequence[LayerJob]) -> QuantizeConfig:
    """The quantize config of a stage: the run's, with one rule per layer of the stage."""
    rules = [  # each layer's own rule, its options (scales, books, outliers...) included
        LayerRule(match=[job.name], block_size=job.block_size, k=job.k, **job.options.model_dump())
        for job in jobs
    ]
    return config.quantize.model_copy(update={"rules": rules})


def quantize_stage(
    model: nn.Module,
    model_dir: Path,
    directory: Path,
    config: FinetuneConfig,
    i: int,
    jobs: Sequence[LayerJob],
    workers: int,
    address: str | None,
) -> None:
    """Quantize stage ``i``'s layers into ``directory/quantize`` (resumed when begun).

    Stage 0 reads the model's own files; a later stage the weights as the previous stages left
    them, written to ``directory/source`` first.
    """
    q_dir = directory / "quantize"
    source = model_dir
    if i > 0:  # the weights as the previous stages left them
        source = directory / "source"
        if not (source / "model.safetensors").is_file():
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / "config.json", source / "config.json")
            write_shard(source / "model.safetensors", dense_state_dict(model), {"format": "pt"})
    logger.info("Stage %s: quantizing %d layers", config.stages[i].name, len(jobs))
    quantize_model(
        source,
        stage_config(config, jobs),
        q_dir,
        resume=(q_dir / "manifest.json").is_file(),
        workers=workers,
        address=address,
    )


def drop_stage_inputs(directory: Path) -> None:
    """Delete the quantize run's merged copy and its source: the shards are all we need."""
    q_dir = directory / "quantize"
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (q_dir / name).unlink(missing_ok=True)
    shutil.rmtree(directory / "source", ignore_errors=True)


def lr2vq_ranks(model: nn.Module, rank: int | str, jobs: Sequence[LayerJob]) -> dict[str, int]:
    """Each layer's LR²VQ rank: ``rank``, or chosen from its weight with ``rank: auto``."""
    from dist_pgkm.dkm.lr2vq import choose_rank

    chosen: dict[str, int] = {}
    for job in jobs:
        if rank != "auto":
            assert isinstance(rank, int)
            chosen[job.name] = rank
            continue
        weight = model.get_submodule(job.name).weight
        assert isinstance(weight, torch.Tensor)
        sub = to_subvectors(weight.detach().float(), job.block_size, job.name)
        choice = choose_rank(sub, job.k, seed=job.seed)
        chosen[job.name] = choice.d
        logger.info("%s: LR²VQ rank %d of %d", job.name, choice.d, job.block_size)
    return chosen
