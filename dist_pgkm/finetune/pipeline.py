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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.checkpoint.atomic import atomic_write_json, exclusive_run
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import decode_layer, encode_layer, read_shard, write_shard
from dist_pgkm.checkpoint.spec import TENSOR_SUFFIXES
from dist_pgkm.checkpoint.verify import FINETUNE_STATE_NAME
from dist_pgkm.config.finetune import FinetuneConfig
from dist_pgkm.config.quantize import LayerRule, QuantizeConfig
from dist_pgkm.distributed.coordinator import package_version, quantize_model, shard_path
from dist_pgkm.distributed.plan import LayerJob, plan_run
from dist_pgkm.errors import CheckpointError, ConfigError, DistPGKMError, DistributedError
from dist_pgkm.finetune.data import Batches, padded_sentences, training_sequences
from dist_pgkm.kmeans.types import KMeansStats
from dist_pgkm.models.layers import find_layers
from dist_pgkm.models.source import open_source
from dist_pgkm.noise import Codebook, QuantNoise, add_quant_noise
from dist_pgkm.pq.codec import to_subvectors
from dist_pgkm.pq.modules import PQModule, pq_module_for
from dist_pgkm.pq.quantize import QuantizedWeight, quantize_weight
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = ["FinetuneSummary", "StepReport", "finetune_model", "stage_layers"]

logger = logging.getLogger(__name__)

STATE_NAME = FINETUNE_STATE_NAME
STATE_VERSION = 1


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


# --- state -------------------------------------------------------------------------------------


@dataclass
class _State:
    path: Path
    data: dict[str, Any]
    writer: bool = True  # rank 0 writes the file; the other ranks keep the same data in memory

    @classmethod
    def open(cls, out: Path, fingerprint: dict[str, Any], resume: bool) -> _State:
        path = out / STATE_NAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("fingerprint") != fingerprint:
                old = data.get("fingerprint", {})
                changed = sorted(
                    k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
                )
                raise CheckpointError(
                    f"{out} holds another fine-tuning run (its {', '.join(changed)} differ), so it "
                    "cannot be resumed. Run with the same model, config and text, or choose a "
                    "new --out directory."
                )
            return cls(path, data)
        if resume:
            raise CheckpointError(
                f"{out}: --resume given, but there is no fine-tuning run to resume "
                f"({STATE_NAME} is missing). Drop --resume to start one."
            )
        if out.exists() and any(p.name not in (".lock", RAY_TRAIN_DIR) for p in out.iterdir()):
            raise CheckpointError(
                f"{out} is not empty and holds no fine-tuning run. Choose an empty or new "
                "--out directory."
            )
        data = {"version": STATE_VERSION, "fingerprint": fingerprint, "stage": 0,
                "phase": "quantize", "history": [], "merged": None}  # fmt: skip
        state = cls(path, data)
        state.save()
        return state

    def save(self) -> None:
        if self.writer:
            atomic_write_json(self.path, self.data)


class _Ranks:
    """This process's rank in the training group, and what only rank 0 does.

    Rank 0 alone writes to the output directory (state, quantize phases, stage weights, the
    merged checkpoint); the other ranks wait for it and share its result, or its error, so that
    a failure on rank 0 stops every rank at once instead of leaving them in a collective.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def on_leader(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; every rank returns its result or raises its error."""
        result: Any = None
        error: BaseException | None = None
        if self.leader:
            try:
                result = fn()
            except Exception as exc:  # shared with the other ranks, then re-raised here
                error = exc
        if self.world > 1:
            import torch.distributed as dist

            shared = [(result, _shareable(error))]
            dist.broadcast_object_list(shared, src=0)
            result, other_error = shared[0]
            if not self.leader:
                error = other_error
        if error is not None:
            raise error
        return result

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks."""
        return self._reduce(value, "sum") / self.world

    def max(self, value: float) -> float:
        """The largest ``value`` of any rank."""
        return self._reduce(value, "max")

    def _reduce(self, value: float, op: str) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(t.item())


def _shareable(error: BaseException | None) -> BaseException | None:
    """``error`` itself when it is one of ours (they pickle), else a DistributedError naming it."""
    if error is None or isinstance(error, DistPGKMError):
        return error
    return DistributedError(f"rank 0 failed: {type(error).__name__}: {error}")


# --- model surgery -----------------------------------------------------------------------------


def _swap_in(model: nn.Module, job: LayerJob, q: QuantizedWeight) -> None:
    """Replace ``job``'s module (and the modules tied to it) by trainable PQ modules.

    The codebook(s) and scales train; codes and outliers are frozen (docs/finetune.md).
    """
    module = model.get_submodule(job.name)
    pq = pq_module_for(module).from_quantized(module, q)
    for param in _codebook_parameters(pq):
        param.requires_grad_(True)
    model.set_submodule(job.name, pq)
    for tied in job.tied:
        other = model.get_submodule(tied)
        pq_tied = pq_module_for(other).from_quantized(other, q)
        pq_tied.tie_to(pq)
        model.set_submodule(tied, pq_tied)


def _codebook_parameters(module: PQModule) -> list[nn.Parameter]:
    """A PQ module's trained parameters besides its bias: codebook(s) and scales."""
    return [p for p in (module.centroids, module.scales) if p is not None]


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
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


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to restore a stage's end: the full state dict, shared tensors once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous().clone()
    return out


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
    if config.train.objective == "causal-lm":
        sequences = training_sequences(train_ids, config.train.seq_len)
    else:
        sequences = padded_sentences(train_ids, config.train.seq_len)
    rank, world = ds_engine.init_distributed()
    ranks = _Ranks(rank, world)
    if world > 1 and workers:
        raise ConfigError(
            f"--workers {workers} with {world} training ranks: the quantize phases run on rank "
            "0 while the other ranks wait, and a Ray session inside a multi-rank job is not "
            "supported. Drop --workers (or use --address to quantize on a separate cluster)."
        )
    # One global batch per step (batch_size per rank), each rank takes its slice.
    batches = Batches(sequences, config.train.batch_size * world, config.seed)
    fingerprint = {
        "dist_pgkm_version": package_version(),
        "config": config.sha256,
        "source": hashlib.sha256(json.dumps(source.fingerprint()).encode()).hexdigest(),
        "text": hashlib.sha256(train_ids.numpy().tobytes()).hexdigest(),
        "ranks": world,
    }
    lock = exclusive_run(out) if ranks.leader else contextlib.nullcontext()
    with lock:
        state: _State = ranks.on_leader(lambda: _State.open(out, fingerprint, resume))
        state.writer = ranks.leader
        resumed_from = (
            {"stage": state.data["stage"], "phase": state.data["phase"]}
            if state.data["stage"] or state.data["phase"] != "quantize" or state.data["history"]
            else None
        )
        run = _Run(Path(model), config, out, state, stages, batches, workers, address, progress,
                   ranks)  # fmt: skip
        run.execute()
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


RAY_TRAIN_DIR = "ray-train"
"""Ray Train's run records inside the output directory (``--ranks``)."""


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
        raise CheckpointError(
            f"{out}: --resume given, but there is no fine-tuning run to resume ({STATE_NAME} "
            "is missing). Drop --resume to start one."
        )
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
    model_dir: Path
    config: FinetuneConfig
    out: Path
    state: _State
    stages: list[list[LayerJob]]
    batches: Batches
    workers: int
    address: str | None
    progress: Progress | None
    ranks: _Ranks
    model: nn.Module = field(init=False)
    teacher: Any = field(init=False, default=None)
    pad_id: int = field(init=False, default=0)  # embedding-distill: the padding token
    dkm: Any = field(init=False, default=None)  # the current stage's DKM wrappers, if any
    metrics: dict[str, str] = field(init=False, default_factory=dict)  # layer -> its metric
    _tokens: int = field(init=False, default=0)
    _train_seconds: float = field(init=False, default=0.0)

    def stage_dir(self, i: int) -> Path:
        return self.out / "stages" / f"{i}-{self.config.stages[i].name}"

    # --- orchestration ------------------------------------------------------------------------

    def execute(self) -> None:
        import transformers

        torch.manual_seed(self.config.seed)
        train = self.config.train
        auto: Any = (
            transformers.AutoModelForCausalLM
            if train.objective == "causal-lm"
            else transformers.AutoModel
        )
        self.model = auto.from_pretrained(self.model_dir, dtype=torch.float32)
        if train.distill > 0 or train.objective == "embedding-distill":
            self.teacher = auto.from_pretrained(self.model_dir, dtype=torch.float32)
            self.teacher.eval().requires_grad_(False)
        if train.objective == "embedding-distill":
            self.pad_id = _pad_token_id(self.model)
            # The target is the original's embedding without dropout; train-mode dropout
            # (0.1 in BERT) alone puts the student 0.055 (1 - cos) away from it on MiniLM.
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        current = self.state.data["stage"]
        # Rebuild the finished stages: their PQ modules, then the weights they ended with.
        for i in range(min(current, len(self.stages))):
            self._swap_stage(i)
        if current > 0:
            self._load_trained(current - 1)
        for i in range(current, len(self.stages)):
            if self.state.data["phase"] == "quantize":
                self.ranks.on_leader(functools.partial(self._quantize_stage, i))
                self._start_stage(i)
                self.ranks.on_leader(functools.partial(self._drop_stage_inputs, i))
                self.state.data["phase"] = "train"
                self.state.save()
            else:
                self._start_stage(i)
            self._train_stage(i)
            self.state.data.update(stage=i + 1, phase="quantize")
            self.state.save()

    def _stage_config(self, i: int) -> QuantizeConfig:
        rules = [  # each layer's own rule, its options (scales, books, outliers...) included
            LayerRule(
                match=[job.name], block_size=job.block_size, k=job.k, **job.options.model_dump()
            )
            for job in self.stages[i]
        ]
        return self.config.quantize.model_copy(update={"rules": rules})

    def _quantize_stage(self, i: int) -> None:
        stage_dir = self.stage_dir(i)
        q_dir = stage_dir / "quantize"
        source = self.model_dir
        if i > 0:  # the weights as the previous stages left them
            source = stage_dir / "source"
            if not (source / "model.safetensors").is_file():
                source.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.model_dir / "config.json", source / "config.json")
                write_shard(
                    source / "model.safetensors", _dense_state_dict(self.model), {"format": "pt"}
                )
        logger.info(
            "Stage %s: quantizing %d layers", self.config.stages[i].name, len(self.stages[i])
        )
        quantize_model(
            source,
            self._stage_config(i),
            q_dir,
            resume=(q_dir / "manifest.json").is_file(),
            workers=self.workers,
            address=self.address,
        )

    def _drop_stage_inputs(self, i: int) -> None:
        """Delete the quantize run's merged copy and its source: the shards are all we need."""
        q_dir = self.stage_dir(i) / "quantize"
        for name in ("model.safetensors", "model.safetensors.index.json"):
            (q_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.stage_dir(i) / "source", ignore_errors=True)

    def _swap_stage(self, i: int) -> None:
        q_dir = self.stage_dir(i) / "quantize"
        for job in self.stages[i]:
            tensors, meta = read_shard(q_dir / shard_path(job.name))
            _, q = decode_layer(tensors, meta, where=str(q_dir))
            _swap_in(self.model, job, q)
            self.metrics[job.name] = q.metric

    def _start_stage(self, i: int) -> None:
        """The stage's layers as they train: PQ modules (ipq) or DKM-wrapped float layers."""
        if self.config.stages[i].method == "ipq":
            self._swap_stage(i)
        else:
            self._wrap_dkm(i)

    def _wrap_dkm(self, i: int) -> None:
        from dist_pgkm.dkm.wrap import DKM, DKMLayer, DKMOptions, add_dkm

        stage = self.config.stages[i]
        lr2vq = stage.method == "lr2vq"
        options = DKMOptions(
            method=stage.dkm.clusterer if lr2vq else stage.method,  # type: ignore[arg-type]
            tau=stage.dkm.tau,
            iters=stage.dkm.iters,
            chunk=stage.dkm.chunk,
            solver_iters=stage.dkm.solver_iters,
        )
        ranks = self.ranks.on_leader(functools.partial(self._lr2vq_ranks, i)) if lr2vq else {}
        q_dir = self.stage_dir(i) / "quantize"
        layers: list[DKMLayer] = []
        for job in self.stages[i]:
            tensors, meta = read_shard(q_dir / shard_path(job.name))
            _, q = decode_layer(tensors, meta, where=str(q_dir))
            centroids = q.centroids  # plain: extras were refused at config time (stage_layers)
            opts = dataclasses.replace(options, rank=ranks[job.name]) if lr2vq else options
            handle = add_dkm(
                self.model, [job.name], job.block_size, {job.name: centroids}, opts,
                tied={job.name: job.tied},
            )  # fmt: skip
            layers.extend(handle)
        self.dkm = DKM(layers)

    def _lr2vq_ranks(self, i: int) -> dict[str, int]:
        """Each layer's LR²VQ rank: the stage's, or chosen by the rule (kept in the state, so a
        resumed run builds the same parameters)."""
        from dist_pgkm.dkm.lr2vq import choose_rank

        saved = self.state.data.setdefault("lr2vq_rank", {})
        if str(i) in saved:
            return dict(saved[str(i)])
        rank = self.config.stages[i].dkm.rank
        chosen: dict[str, int] = {}
        for job in self.stages[i]:
            if rank != "auto":
                chosen[job.name] = rank
                continue
            weight = self.model.get_submodule(job.name).weight
            assert isinstance(weight, torch.Tensor)
            sub = to_subvectors(weight.detach().float(), job.block_size, job.name)
            choice = choose_rank(sub, job.k, seed=job.seed)
            chosen[job.name] = choice.d
            logger.info("%s: LR²VQ rank %d of %d", job.name, choice.d, job.block_size)
        saved[str(i)] = chosen
        self.state.save()
        return chosen

    def _freeze_dkm(self, i: int) -> None:
        """End of a DKM stage: hard-assign every layer and swap in PQ modules (codes fixed)."""
        if self.dkm is None:
            return
        if any(layer.stats.calls for layer in self.dkm):
            # IDKM's backward solves in this process (a resumed stage counts from its restart).
            self.state.data.setdefault("idkm_solves", {})[str(i)] = {
                "calls": sum(layer.stats.calls for layer in self.dkm),
                "truncated": sum(layer.stats.truncated for layer in self.dkm),
                "fallbacks": sum(layer.stats.fallbacks for layer in self.dkm),
            }
        for job in self.stages[i]:
            centroids, codes = self.dkm[job.name].export()
            stats = KMeansStats("dkm-export", "none", codes.numel(), job.block_size, job.k)
            weight = self.model.get_submodule(job.name).weight
            assert isinstance(weight, torch.Tensor)
            _swap_in(self.model, job, QuantizedWeight(centroids, codes, tuple(weight.shape), stats))
            self.metrics[job.name] = "weight"  # re-clustered in weight space while training
        self.dkm.remove()
        self.dkm = None

    def _load_trained(self, i: int) -> None:
        path = self.stage_dir(i) / "trained.safetensors"
        tensors, _ = read_shard(path)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        # Tied tensors are saved once; anything else missing is a mismatch.
        real_missing = [k for k in missing if not self._is_shared(k, tensors)]
        if real_missing or unexpected:
            raise CheckpointError(
                f"{path} does not fit the model rebuilt from the stages (missing "
                f"{real_missing[:3]}, unexpected {unexpected[:3]}). Delete {self.out} and start "
                "over."
            )
        for m in self.model.modules():
            if isinstance(m, PQModule):
                m.refresh_index()

    def _is_shared(self, key: str, saved: dict[str, torch.Tensor]) -> bool:
        state = self.model.state_dict()
        ptr = state[key].data_ptr()
        return any(state[k].data_ptr() == ptr for k in saved if k in state)

    # --- training -----------------------------------------------------------------------------

    def _noise(self, i: int) -> _NoiseGroups | None:
        noise = self.config.noise
        later = [job for stage in self.stages[i + 1 :] for job in stage]
        if noise.p <= 0 or not later:
            return None
        groups: dict[int, list[LayerJob]] = {}
        for job in later:
            groups.setdefault(job.block_size, []).append(job)
        handles: list[QuantNoise] = []
        for bs, jobs in groups.items():
            codebooks = None
            if noise.mode == "quantize":
                codebooks = {job.name: self._codebook(job) for job in jobs}
            handles.append(
                add_quant_noise(
                    self.model,
                    [job.name for job in jobs],
                    noise.p,
                    bs,
                    mode=noise.mode,
                    codebooks=codebooks,
                    seed=self.config.seed + 1000 * (i + 1) + bs,
                )
            )
        return _NoiseGroups(handles)

    def _codebook(self, job: LayerJob) -> Codebook:
        """The quantize-mode noise codebook of a later stage's layer: its rule's codebooks,
        scales and outliers fitted to the current weight (weight metric: no calibration here);
        perturbed blocks take their nearest codeword at every step."""
        weight = self.model.get_submodule(job.name).weight
        assert isinstance(weight, torch.Tensor)
        weight = weight.detach()
        options = job.options.model_copy(update={"metric": "weight"})
        q = quantize_weight(
            weight, job.block_size, job.k, method=self.config.quantize.method, seed=job.seed,
            n_iter=self.config.quantize.n_iter, options=options,
        )  # fmt: skip
        return Codebook(
            q.centroids,
            scales=q.scales,
            outlier_idx=q.outlier_idx if q.n_outliers else None,
            shape=tuple(weight.shape),
        )

    def _train_stage(self, i: int) -> None:
        from dist_pgkm.finetune import engine as ds_engine

        stage = self.config.stages[i]
        noise = self._noise(i)
        train = self.config.train
        # Codebooks and scales train at the codebook learning rate, without weight decay.
        codebook_ids = {
            id(p)
            for m in self.model.modules()
            if isinstance(m, PQModule)
            for p in _codebook_parameters(m)
        }
        centroids = [p for p in self.model.parameters() if id(p) in codebook_ids]
        others = [
            p for p in self.model.parameters() if id(p) not in codebook_ids and p.requires_grad
        ]
        groups = [{"params": others, "lr": train.lr, "weight_decay": train.weight_decay}]
        if centroids:
            groups.append(
                {"params": centroids, "lr": train.centroid_lr or train.lr, "weight_decay": 0.0}
            )
        self.model.train()
        engine = ds_engine.build_engine(self.model, groups, self.config.deepspeed, train)
        ckpt_dir = self.out / "deepspeed"
        step = 0
        loaded = None
        if ckpt_dir.is_dir():  # this stage's checkpoints only: earlier ones fit other modules
            loaded = ds_engine.load_checkpoint(engine, ckpt_dir, prefix=f"stage{i}-")
        if loaded is not None:
            client = loaded[1]
            step = int(client["step"])
            if noise is not None and client.get("noise") is not None:
                noise.load_state_dict(client["noise"])
            self.state.data["history"] = [
                h for h in self.state.data["history"] if (h["stage"], h["step"]) < (i, step + 1)
            ]
            logger.info("Stage %s: resumed at step %d of %d", stage.name, step, stage.steps)
        rank, per_rank = self.ranks.rank, train.batch_size
        try:
            while step < stage.steps:
                t0 = time.perf_counter()
                batch = self.batches.get(i, step)[rank * per_rank : (rank + 1) * per_rank]
                loss = self.ranks.mean(self._step(engine, batch))
                step += 1
                self._train_seconds += time.perf_counter() - t0
                self._tokens += self.batches.batch_size * self.batches.seq_len
                self.state.data["history"].append({"stage": i, "step": step, "loss": loss})
                if step % self.config.deepspeed.checkpoint_every == 0 or step == stage.steps:
                    noise_state = noise.state_dict() if noise is not None else None
                    client = {"stage": i, "step": step, "noise": noise_state}
                    ds_engine.save_checkpoint(engine, ckpt_dir, f"stage{i}-step{step}", client)
                    self.state.save()
                self._report(i, step, loss)
        finally:
            if noise is not None:
                noise.remove()
        ds_engine.close(engine)  # puts full fp32 parameters back (ZeRO-3 partitions, bf16)
        self._freeze_dkm(i)
        trained = self.stage_dir(i) / "trained.safetensors"
        self.ranks.on_leader(
            lambda: write_shard(trained, _trainable_state(self.model), {"stage": str(i)})
        )

    def _step(self, engine: Any, batch: torch.Tensor) -> float:
        train = self.config.train
        total = 0.0
        for micro in torch.split(batch, train.micro):
            if train.objective == "embedding-distill":
                loss = self._embedding_loss(engine, micro)
                engine.backward(loss)
                engine.step()
                total += float(loss.detach()) * micro.shape[0] / batch.shape[0]
                continue
            logits = engine(input_ids=micro).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), micro[:, 1:].reshape(-1)
            )
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(input_ids=micro).logits
                t = train.temperature
                kl = (
                    F.kl_div(
                        F.log_softmax(logits.float() / t, -1),
                        F.log_softmax(target.float() / t, -1),
                        log_target=True,
                        reduction="batchmean",
                    )
                    * (t * t)
                    / micro.shape[1]
                )
                loss = loss + train.distill * kl
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) * micro.shape[0] / batch.shape[0]
        return total

    def _embedding_loss(self, engine: Any, micro: torch.Tensor) -> torch.Tensor:
        """1 - cosine similarity of the mean-pooled sentence embeddings to the original's."""
        mask = (micro != self.pad_id).long()  # (b, seq)
        student = _mean_pool(engine(input_ids=micro, attention_mask=mask).last_hidden_state, mask)
        with torch.no_grad():
            teacher = _mean_pool(
                self.teacher(input_ids=micro, attention_mask=mask).last_hidden_state, mask
            )
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()

    def _report(self, i: int, step: int, loss: float) -> None:
        if self.progress is None or not self.ranks.leader:
            return
        done = sum(s.steps for s in self.config.stages[:i]) + step
        total = self.config.total_steps
        rate = self._train_seconds / max(1, sum(1 for h in self.state.data["history"]))
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
        return self._tokens / self._train_seconds if self._train_seconds > 0 else 0.0

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
            final_src / "model.safetensors", _dense_state_dict(self.model), {"format": "pt"}
        )
        layers = []
        dtype = self.config.quantize.centroid_dtype
        for job in jobs:
            module = self.model.get_submodule(job.name)
            assert isinstance(module, PQModule), job.name
            stats = KMeansStats("finetuned", "none", module.n_blocks, module.block_size, module.k)
            q = module.quantized(stats, metric=self.metrics.get(job.name, "weight"))
            tensors, meta = encode_layer(job.name, q, dtype, kind=job.kind, k=job.k)
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


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(b, seq, h)`` over the tokens ``mask`` ``(b, seq)`` keeps, float32."""
    weights = mask.unsqueeze(-1).to(torch.float32)  # (b, seq, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (b, h)


def _pad_token_id(model: nn.Module) -> int:
    """The padding token of a sentence encoder, from its config (embedding-distill masks it)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None:
        raise ConfigError(
            "objective embedding-distill pads sentences, and this model's config.json has no "
            "pad_token_id. Add one (the tokenizer's padding token id) or use objective causal-lm."
        )
    return int(pad)


class _NoiseGroups:
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
