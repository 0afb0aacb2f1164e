"""Staged iPQ: quantize a group of layers, fine-tune, repeat; resumable at any point.

For each stage of the config, in order:

1. **Quantize** the stage's layers with the quantize pipeline
   (:func:`dist_pgkm.distributed.coordinator.quantize_model`, on Ray when asked), from the
   weights as the previous stages left them (written to ``stages/<i>-<name>/source``).
2. **Swap** them for PQ modules: trainable codebooks, frozen codes. The selected layers of later
   stages, still in float, get Quant-Noise in the same block layout.
3. **Fine-tune** ``steps`` optimizer steps under DeepSpeed on the causal LM loss (plus, when
   asked, the KL divergence to the original model's logits), checkpointing every
   ``checkpoint_every`` steps and at the end of the stage.

Then every quantized layer is encoded from its trained codebook and the whole model is merged
into the checkpoint format of ``quantize`` (``dist_pgkm.load`` reads it).

Output directory::

    finetune.json               state: fingerprint, stage, phase, loss history
    stages/<i>-<name>/quantize/ the stage's quantize run (shards, manifest)
    stages/<i>-<name>/trained.safetensors   all weights at the end of the stage
    deepspeed/                  DeepSpeed checkpoints within the current stage (deleted
                                once the final checkpoint is merged)
    shards/, model.safetensors, config.json, ...   the final checkpoint

Resume: the same call again. Finished stages are rebuilt from their files; the current stage
continues from its last DeepSpeed checkpoint; batches and Quant-Noise masks are functions of
(seed, stage, step), so on CPU the final parameters equal those of an uninterrupted run.

This module runs the schedule and merges; the pieces are their own modules:
:mod:`~dist_pgkm.finetune.stages` (layers per stage, the quantize phase),
:mod:`~dist_pgkm.finetune.surgery` (PQ modules, DKM, Quant-Noise, stage weights),
:mod:`~dist_pgkm.finetune.objectives` (the losses), :mod:`~dist_pgkm.finetune.loop` (the steps
of a stage), :mod:`~dist_pgkm.finetune.state` (``finetune.json``) and
:mod:`~dist_pgkm.finetune.ranks` (what rank 0 alone does).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_pgkm.checkpoint.atomic import exclusive_run
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import encode_layer, write_shard
from dist_pgkm.config.finetune import FinetuneConfig
from dist_pgkm.distributed.coordinator import package_version, shard_path
from dist_pgkm.distributed.plan import LayerJob, plan_run
from dist_pgkm.errors import ConfigError
from dist_pgkm.finetune import stages as st
from dist_pgkm.finetune import surgery
from dist_pgkm.finetune.data import Batches, padded_sentences, training_sequences
from dist_pgkm.finetune.loop import Progress, StepReport, Trainer
from dist_pgkm.finetune.objectives import objective, pad_token_id
from dist_pgkm.finetune.ranks import Ranks
from dist_pgkm.finetune.stages import stage_layers
from dist_pgkm.finetune.state import RAY_TRAIN_DIR, STATE_NAME, RunState, nothing_to_resume
from dist_pgkm.kmeans.result import KMeansStats
from dist_pgkm.models.layers import find_layers
from dist_pgkm.models.source import open_source
from dist_pgkm.pq.modules import PQModule
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = [
    "RAY_TRAIN_DIR",
    "STATE_NAME",
    "FinetuneSummary",
    "Progress",
    "StepReport",
    "finetune_model",
    "stage_layers",
]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSummary:
    """What a call did: per stage, the layers, steps and losses; the merged files."""

    out_dir: Path
    stages: list[dict[str, Any]]
    history: list[dict[str, Any]]
    files: dict[str, str]
    seconds: float
    peak_rss_bytes: int
    resumed_from: dict[str, Any] | None = None
    tokens_per_second: float = 0.0
    ranks: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "stages": self.stages,
            "history": self.history,
            "files": self.files,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "resumed_from": self.resumed_from,
            "tokens_per_second": self.tokens_per_second,
            "ranks": self.ranks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSummary:
        """The inverse of :meth:`as_dict` (a summary sent back by a Ray Train rank)."""
        return cls(**{**data, "out_dir": Path(data["out_dir"])})


# --- the run -----------------------------------------------------------------------------------


def finetune_model(
    model: str | Path,
    config: FinetuneConfig,
    out_dir: str | Path,
    train_ids: torch.Tensor,
    *,
    resume: bool = False,
    workers: int = 0,
    address: str | None = None,
    progress: Progress | None = None,
    max_shard_bytes: int = 5 * 10**9,
    ray_ranks: int = 0,
    cpus_per_rank: int = 1,
    gpus_per_rank: float = 0.0,
) -> FinetuneSummary:
    """Run the staged schedule of ``config`` on ``model`` into ``out_dir``.

    Args:
        model: An HF causal-LM directory (safetensors).
        config: Stages, training loop, Quant-Noise, DeepSpeed.
        out_dir: Output directory: new, empty, or holding this same run (then resumed).
        train_ids: The training corpus as 1-D token ids (evaluation windows are excluded here).
        resume: Require an existing run in ``out_dir``.
        workers, address: Where each stage's quantization runs (see ``quantize_model``).
        progress: Called after every optimizer step (on rank 0; not with ``ray_ranks``,
            where rank 0 logs a line per 1% of the steps instead).
        max_shard_bytes: Largest file of the merged checkpoint.
        ray_ranks: Train on this many Ray Train workers (on the cluster at ``address``, or an
            embedded Ray) instead of in this process; the quantize phases then run in rank 0's
            process. 0: this process is the rank (alone, or one of torchrun's).
        cpus_per_rank, gpus_per_rank: Resources of each Ray Train worker.

    Raises:
        ConfigError: A stage matches no layer; a layer is in no stage; DeepSpeed settings the
            hardware cannot run.
        DataError: The text is too short for one batch.
        CheckpointError: ``out_dir`` holds another run, or nothing to resume.
    """
    from dist_pgkm.finetune import engine as ds_engine

    if ray_ranks and workers:
        raise ConfigError(
            f"--ranks {ray_ranks} with --workers {workers}: under Ray Train the quantize phases "
            "run in rank 0's process, on its CPUs. Drop --workers."
        )
    if ray_ranks:
        return _on_ray_train(
            model, config, Path(out_dir), train_ids, resume, ray_ranks, address,
            cpus_per_rank, gpus_per_rank, max_shard_bytes,
        )  # fmt: skip
    start = time.perf_counter()
    out = Path(out_dir)
    ds_engine.check_hardware(config.deepspeed)
    source = open_source(model)
    plan = plan_run(find_layers(source), config.quantize)
    stages = stage_layers(plan.jobs, config)
    sequences = _sequences(config, train_ids)
    rank, world = ds_engine.init_distributed()
    ranks = Ranks(rank, world)
    if world > 1 and workers:
        raise ConfigError(
            f"--workers {workers} with {world} training ranks: the quantize phases run on rank "
            "0 while the other ranks wait, and a Ray session inside a multi-rank job is not "
            "supported. Drop --workers (or use --address to quantize on a separate cluster)."
        )
    # One global batch per step (batch_size per rank), each rank takes its slice.
    batches = Batches(sequences, config.train.batch_size * world, config.seed)
    fingerprint = _fingerprint(config, source, train_ids, world)
    lock = exclusive_run(out) if ranks.leader else contextlib.nullcontext()
    with lock:
        state: RunState = ranks.on_leader(lambda: RunState.open(out, fingerprint, resume))
        state.writer = ranks.leader
        resumed_from = (
            {"stage": state.data["stage"], "phase": state.data["phase"]}
            if state.data["stage"] or state.data["phase"] != "quantize" or state.data["history"]
            else None
        )
        run = _Run(Path(model), config, out, state, stages, workers, address, ranks)
        run.execute(batches, progress)
        files = ranks.on_leader(lambda: run.merge(source, plan.jobs, max_shard_bytes))
    seconds = time.perf_counter() - start
    return FinetuneSummary(
        out_dir=out,
        stages=run.stage_summaries(),
        history=state.data["history"],
        files=files,
        seconds=seconds,
        peak_rss_bytes=int(ranks.max(peak_rss_bytes())),  # of the largest rank
        resumed_from=resumed_from,
        tokens_per_second=run.tokens_per_second(),
        ranks=world,
    )


def _sequences(config: FinetuneConfig, train_ids: torch.Tensor) -> torch.Tensor:
    """The training sequences of the objective: windows of the text, or padded sentences."""
    if config.train.objective == "causal-lm":
        return training_sequences(train_ids, config.train.seq_len)
    return padded_sentences(train_ids, config.train.seq_len)


def _fingerprint(
    config: FinetuneConfig, source: Any, train_ids: torch.Tensor, world: int
) -> dict[str, Any]:
    """What a run is: package version, config, source files, text and number of ranks."""
    return {
        "dist_pgkm_version": package_version(),
        "config": config.sha256,
        "source": hashlib.sha256(json.dumps(source.fingerprint()).encode()).hexdigest(),
        "text": hashlib.sha256(train_ids.numpy().tobytes()).hexdigest(),
        "ranks": world,
    }


def _on_ray_train(
    model: str | Path,
    config: FinetuneConfig,
    out: Path,
    train_ids: torch.Tensor,
    resume: bool,
    ranks: int,
    address: str | None,
    cpus_per_rank: int,
    gpus_per_rank: float,
    max_shard_bytes: int,
) -> FinetuneSummary:
    from dist_pgkm.distributed.options import RayOptions
    from dist_pgkm.distributed.ray_train import run_on_ray_train

    if resume and not (out / STATE_NAME).is_file():
        raise nothing_to_resume(out)
    arg = {
        "model": str(Path(model).resolve()),
        "config": config,
        "out_dir": str(out.resolve()),
        "train_ids": train_ids,
        "max_shard_bytes": max_shard_bytes,
    }
    options = RayOptions(
        address=address, cpus_per_worker=cpus_per_rank, gpus_per_worker=gpus_per_rank
    )
    result = run_on_ray_train(
        _ray_rank_main, arg, ranks=ranks, options=options, storage=out / RAY_TRAIN_DIR
    )
    return FinetuneSummary.from_dict(result)


def _ray_rank_main(arg: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train rank: the run, resumed if a restart finds it (Ray Train retries)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # this module's lines (progress, stages), not every library's
    every = max(1, arg["config"].total_steps // 100)

    def log_progress(report: StepReport) -> None:
        if report.done_steps % every == 0 or report.done_steps == report.total_steps:
            eta = f", eta {report.eta_seconds:.0f} s" if report.eta_seconds is not None else ""
            logger.info(  # reaches the driver's terminal through Ray's log forwarding
                "stage %s (%d/%d) step %d/%d loss %.4f %s tokens/s%s",
                report.stage, report.stage_index + 1, report.n_stages, report.step,
                report.steps, report.loss, f"{report.tokens_per_second:,.0f}", eta,
            )  # fmt: skip

    summary = finetune_model(
        arg["model"],
        arg["config"],
        arg["out_dir"],
        arg["train_ids"],
        progress=log_progress,
        max_shard_bytes=arg["max_shard_bytes"],
    )
    return summary.as_dict()


@dataclass
class _Run:
    """One process's part of the run: the model through the stages, then the merge."""

    model_dir: Path
    config: FinetuneConfig
    out: Path
    state: RunState
    stages: list[list[LayerJob]]
    workers: int
    address: str | None
    ranks: Ranks
    model: nn.Module = field(init=False)
    trainer: Trainer | None = field(init=False, default=None)
    dkm: Any = field(init=False, default=None)  # the current stage's DKM wrappers, if any
    metrics: dict[str, str] = field(init=False, default_factory=dict)  # layer -> its metric

    def stage_dir(self, i: int) -> Path:
        return st.stage_dir(self.out, self.config, i)

    # --- orchestration ------------------------------------------------------------------------

    def execute(self, batches: Batches, progress: Progress | None) -> None:
        torch.manual_seed(self.config.seed)
        self.model, teacher, pad_id = self._load_models()
        self.trainer = Trainer(
            self.model, self.config, self.state, batches, self.ranks,
            objective(self.config.train, teacher, pad_id), self.out / "deepspeed", progress,
        )  # fmt: skip
        current = self.state.data["stage"]
        # Rebuild the finished stages: their PQ modules, then the weights they ended with.
        for i in range(min(current, len(self.stages))):
            self._swap_stage(i)
        if current > 0:
            surgery.load_trained(
                self.model, self.stage_dir(current - 1) / "trained.safetensors", self.out
            )
        for i in range(current, len(self.stages)):
            if self.state.data["phase"] == "quantize":
                self.ranks.on_leader(functools.partial(self._quantize_stage, i))
                self._start_stage(i)
                self.ranks.on_leader(functools.partial(st.drop_stage_inputs, self.stage_dir(i)))
                self.state.data["phase"] = "train"
                self.state.save()
            else:
                self._start_stage(i)
            self._train_stage(i)
            self.state.data.update(stage=i + 1, phase="quantize")
            self.state.save()

    def _load_models(self) -> tuple[nn.Module, nn.Module | None, int]:
        """The model to train; the original (frozen) when the objective needs it; the padding
        token of a sentence encoder (0 for a causal LM)."""
        import transformers

        train = self.config.train
        auto: Any = (
            transformers.AutoModelForCausalLM
            if train.objective == "causal-lm"
            else transformers.AutoModel
        )
        model = auto.from_pretrained(self.model_dir, dtype=torch.float32)
        teacher = None
        if train.distill > 0 or train.objective == "embedding-distill":
            teacher = auto.from_pretrained(self.model_dir, dtype=torch.float32)
            teacher.eval().requires_grad_(False)
        if train.objective != "embedding-distill":
            return model, teacher, 0
        pad_id = pad_token_id(model)
        # The target is the original's embedding without dropout; train-mode dropout
        # (0.1 in BERT) alone puts the student 0.055 (1 - cos) away from it on MiniLM.
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model, teacher, pad_id

    def _quantize_stage(self, i: int) -> None:
        st.quantize_stage(
            self.model, self.model_dir, self.stage_dir(i), self.config, i, self.stages[i],
            self.workers, self.address,
        )  # fmt: skip

    def _swap_stage(self, i: int) -> None:
        q_dir = self.stage_dir(i) / "quantize"
        self.metrics.update(surgery.swap_stage(self.model, self.stages[i], q_dir))

    def _start_stage(self, i: int) -> None:
        """The stage's layers as they train: PQ modules (ipq) or DKM-wrapped float layers."""
        stage = self.config.stages[i]
        if stage.method == "ipq":
            self._swap_stage(i)
            return
        lr2vq = stage.method == "lr2vq"
        ranks = self.ranks.on_leader(functools.partial(self._lr2vq_ranks, i)) if lr2vq else {}
        q_dir = self.stage_dir(i) / "quantize"
        self.dkm = surgery.wrap_dkm(self.model, stage, self.stages[i], q_dir, ranks)

    def _lr2vq_ranks(self, i: int) -> dict[str, int]:
        """Each layer's LR²VQ rank, kept in the state so a resumed run builds the same
        parameters."""
        saved = self.state.data.setdefault("lr2vq_rank", {})
        if str(i) in saved:
            return dict(saved[str(i)])
        chosen = st.lr2vq_ranks(self.model, self.config.stages[i].dkm.rank, self.stages[i])
        saved[str(i)] = chosen
        self.state.save()
        return chosen

    def _train_stage(self, i: int) -> None:
        later = [job for stage in self.stages[i + 1 :] for job in stage]
        noise = surgery.add_stage_noise(self.model, self.config, i, later)
        assert self.trainer is not None
        self.trainer.train_stage(i, noise)
        self._freeze_dkm(i)
        trained = self.stage_dir(i) / "trained.safetensors"
        self.ranks.on_leader(
            lambda: write_shard(trained, surgery.trainable_state(self.model), {"stage": str(i)})
        )

    def _freeze_dkm(self, i: int) -> None:
        """End of a DKM stage: hard-assign every layer and swap in PQ modules (codes fixed)."""
        if self.dkm is None:
            return
        if (solves := surgery.idkm_solves(self.dkm)) is not None:
            # IDKM's backward solves in this process (a resumed stage counts from its restart).
            self.state.data.setdefault("idkm_solves", {})[str(i)] = solves
        surgery.freeze_dkm(self.model, self.dkm, self.stages[i])
        for job in self.stages[i]:
            self.metrics[job.name] = "weight"  # re-clustered in weight space while training
        self.dkm = None

    # --- reports ------------------------------------------------------------------------------

    def tokens_per_second(self) -> float:
        return self.trainer.tokens_per_second() if self.trainer is not None else 0.0

    def stage_summaries(self) -> list[dict[str, Any]]:
        rows = []
        for i, (stage, jobs) in enumerate(zip(self.config.stages, self.stages, strict=True)):
            losses = [h["loss"] for h in self.state.data["history"] if h["stage"] == i]
            ranks = self.state.data.get("lr2vq_rank", {}).get(str(i))
            solves = self.state.data.get("idkm_solves", {}).get(str(i))
            rows.append({
                "name": stage.name, "method": stage.method, "layers": len(jobs),
                **({"lr2vq_rank": ranks} if ranks else {}),
                **({"idkm_solves": solves} if solves else {}),
                "steps": stage.steps,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
            })  # fmt: skip
        return rows

    # --- the final checkpoint -----------------------------------------------------------------

    def merge(self, source: Any, jobs: Sequence[LayerJob], max_shard_bytes: int) -> dict[str, str]:
        merged = self.state.data.get("merged")
        if merged and all((self.out / name).is_file() for name in merged):
            return dict(merged)
        final_src = self.out / "final-source"
        final_src.mkdir(parents=True, exist_ok=True)
        for aux in [*source.aux_files(), self.model_dir / "config.json"]:
            shutil.copy2(aux, final_src / Path(aux).name)
        write_shard(
            final_src / "model.safetensors", surgery.dense_state_dict(self.model), {"format": "pt"}
        )
        layers = []
        dtype = self.config.quantize.centroid_dtype
        for job in jobs:
            module = self.model.get_submodule(job.name)
            assert isinstance(module, PQModule), job.name
            q = module.quantized(metric=self.metrics.get(job.name, "weight"))
            # The header records how the codebook was made: trained, not clustered.
            made = KMeansStats("finetuned", "none", module.n_blocks, module.block_size, module.k)
            tensors, meta = encode_layer(job.name, q, dtype, kind=job.kind, k=job.k, stats=made)
            rel = shard_path(job.name)
            write_shard(self.out / rel, tensors, meta)
            layers.append(QuantizedLayer(job.name, job.tensor, self.out / rel, job.tied))
        quantization = {
            "method": f"ipq-finetune ({self.config.quantize.method})",
            "centroid_dtype": dtype,
        }
        files = merge_checkpoint(
            self.out, open_source(final_src), layers, quantization, max_shard_bytes
        )
        shutil.rmtree(final_src, ignore_errors=True)
        self.state.data["merged"] = files
        self.state.save()
        # Only a run inside a stage resumes from these (GBs: fp32 weights and Adam moments).
        shutil.rmtree(self.out / "deepspeed", ignore_errors=True)
        return files
