"""The run loop of a stage: optimizer steps under DeepSpeed, checkpoints, progress.

Each rank takes its slice of the step's global batch (a function of seed, stage and step), so
a resumed stage continues with the batches it would have seen. A DeepSpeed checkpoint (with the
Quant-Noise generators) is saved every ``checkpoint_every`` steps and at the stage's end, and
``finetune.json`` with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_pgkm.config.finetune import FinetuneConfig, TrainOptions
from dist_pgkm.finetune.data import Batches
from dist_pgkm.finetune.objectives import Objective
from dist_pgkm.finetune.ranks import Ranks
from dist_pgkm.finetune.state import RunState
from dist_pgkm.finetune.surgery import NoiseGroups, codebook_parameters
from dist_pgkm.pq.modules import PQModule

__all__ = ["Progress", "StepReport", "Trainer", "param_groups"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, for progress displays."""

    stage: str
    stage_index: int
    n_stages: int
    step: int
    steps: int
    done_steps: int
    total_steps: int
    loss: float
    tokens_per_second: float
    eta_seconds: float | None


Progress = Callable[[StepReport], None]


def param_groups(model: nn.Module, train: TrainOptions) -> list[dict[str, Any]]:
    """The optimizer's groups: codebooks and scales at the codebook learning rate, without
    weight decay; every other trainable parameter at ``lr``."""
    codebook_ids = {
        id(p) for m in model.modules() if isinstance(m, PQModule) for p in codebook_parameters(m)
    }
    centroids = [p for p in model.parameters() if id(p) in codebook_ids]
    others = [p for p in model.parameters() if id(p) not in codebook_ids and p.requires_grad]
    groups = [{"params": others, "lr": train.lr, "weight_decay": train.weight_decay}]
    if centroids:
        groups.append(
            {"params": centroids, "lr": train.centroid_lr or train.lr, "weight_decay": 0.0}
        )
    return groups


@dataclass
class Trainer:
    """Trains the stages of one run, one after the other, and keeps its throughput."""

    model: nn.Module
    config: FinetuneConfig
    state: RunState
    batches: Batches
    ranks: Ranks
    loss: Objective
    ckpt_dir: Path
    progress: Progress | None
    tokens: int = field(init=False, default=0)
    seconds: float = field(init=False, default=0.0)

    def train_stage(self, i: int, noise: NoiseGroups | None) -> None:
        """Stage ``i``'s steps from its last checkpoint; ``noise`` is removed at the end."""
        from dist_pgkm.finetune import engine as ds_engine

        stage = self.config.stages[i]
        self.model.train()
        groups = param_groups(self.model, self.config.train)
        engine = ds_engine.build_engine(
            self.model, groups, self.config.deepspeed, self.config.train
        )
        step = self._resume(engine, i, noise)
        try:
            while step < stage.steps:
                loss = self._step(engine, i, step)
                step += 1
                self.state.data["history"].append({"stage": i, "step": step, "loss": loss})
                if step % self.config.deepspeed.checkpoint_every == 0 or step == stage.steps:
                    noise_state = noise.state_dict() if noise is not None else None
                    client = {"stage": i, "step": step, "noise": noise_state}
                    ds_engine.save_checkpoint(engine, self.ckpt_dir, f"stage{i}-step{step}", client)
                    self.state.save()
                self._report(i, step, loss)
        finally:
            if noise is not None:
                noise.remove()
        ds_engine.close(engine)  # puts full fp32 parameters back (ZeRO-3 partitions, bf16)

    def _resume(self, engine: Any, i: int, noise: NoiseGroups | None) -> int:
        """The step stage ``i`` resumes at (0 without a checkpoint of this stage)."""
        from dist_pgkm.finetune import engine as ds_engine

        loaded = None
        if self.ckpt_dir.is_dir():  # this stage's checkpoints only: earlier ones fit other modules
            loaded = ds_engine.load_checkpoint(engine, self.ckpt_dir, prefix=f"stage{i}-")
        if loaded is None:
            return 0
        client = loaded[1]
        step = int(client["step"])
        if noise is not None and client.get("noise") is not None:
            noise.load_state_dict(client["noise"])
        self.state.data["history"] = [
            h for h in self.state.data["history"] if (h["stage"], h["step"]) < (i, step + 1)
        ]
        stage = self.config.stages[i]
        logger.info("Stage %s: resumed at step %d of %d", stage.name, step, stage.steps)
        return step

    def _step(self, engine: Any, i: int, step: int) -> float:
        """One optimizer step per micro-batch of this rank's slice; the ranks' mean loss."""
        t0 = time.perf_counter()
        per_rank = self.config.train.batch_size
        rank = self.ranks.rank
        batch = self.batches.get(i, step)[rank * per_rank : (rank + 1) * per_rank]
        total = 0.0
        for micro in torch.split(batch, self.config.train.micro):
            loss = self.loss(engine, micro)
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) * micro.shape[0] / batch.shape[0]
        mean = self.ranks.mean(total)
        self.seconds += time.perf_counter() - t0
        self.tokens += self.batches.batch_size * self.batches.seq_len
        return mean

    def _report(self, i: int, step: int, loss: float) -> None:
        if self.progress is None or not self.ranks.leader:
            return
        done = sum(s.steps for s in self.config.stages[:i]) + step
        total = self.config.total_steps
        rate = self.seconds / max(1, sum(1 for h in self.state.data["history"]))
        self.progress(
            StepReport(
                stage=self.config.stages[i].name,
                stage_index=i,
                n_stages=len(self.config.stages),
                step=step,
                steps=self.config.stages[i].steps,
                done_steps=done,
                total_steps=total,
                loss=loss,
                tokens_per_second=self.tokens_per_second(),
                eta_seconds=(total - done) * rate if rate > 0 else None,
            )
        )

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
