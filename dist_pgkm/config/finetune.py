"""The ``finetune`` configuration: staged iPQ with Quant-Noise, fine-tuned under DeepSpeed.

One YAML file, validated by pydantic (unknown keys are errors). It names the quantize config
that decides every layer's block size and codebook (``quantize``: a path relative to this
file, or the mapping itself), the stages in which the selected layers are quantized, and how
each stage fine-tunes::

    version: 1
    seed: 0
    quantize: smollm2-135m-ipq.yaml
    stages:                      # default: mlp -> embeddings -> attention
      - {name: mlp, match: "re:.*\\.mlp\\..*", steps: 100}
      - {name: embeddings, match: ["re:.*embed_tokens", "lm_head"], steps: 100}
      - {name: attention, match: "re:.*\\.self_attn\\..*", steps: 100}
    train: {batch_size: 4, seq_len: 256, lr: 1.0e-4, distill: 0.0}
    noise: {p: 0.05, mode: drop}
    deepspeed: {zero_stage: 0, dtype: fp32, checkpoint_every: 50}

Each layer the quantize config selects belongs to the first stage whose patterns match it;
a selected layer no stage matches, or a stage matching no selected layer, is an error.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dist_pgkm.config.quantize import QuantizeConfig, load_config, name_matches
from dist_pgkm.errors import ConfigError

__all__ = [
    "DEFAULT_STAGES",
    "DKMConfig",
    "DeepSpeedOptions",
    "FinetuneConfig",
    "NoiseOptions",
    "Stage",
    "TrainOptions",
    "load_finetune_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DKMConfig(_Strict):
    """How a stage with a differentiable clusterer clusters its layers (docs/dkm.md).

    Attributes:
        tau: Attention temperature, relative to each layer's mean squared quantization error
            after PG k-means (which gives the starting codebook).
        iters: Soft k-means steps per training forward.
        chunk: Sub-vectors per piece of the attention (bounds its memory).
        rank: ``method: lr2vq`` only: the dimension ``d`` its sub-vectors are clustered in
            (``1..block_size``), or ``auto``: chosen per layer by
            :func:`dist_pgkm.dkm.lr2vq.choose_rank` when the stage starts.
        clusterer: ``method: lr2vq`` only: the soft k-means it runs in the rank-``d`` space.
        solver_iters: IDKM's backward solve: at most this many fixed-point iterations per
            layer and step (each one vector-Jacobian product through a soft k-means step);
            a solve cut there uses the series so far (docs/dkm.md).
    """

    tau: float = Field(1.0, gt=0)
    iters: int = Field(5, ge=1)
    chunk: int = Field(65536, ge=1)
    solver_iters: int = Field(50, ge=1)
    rank: int | Literal["auto"] = "auto"
    clusterer: Literal["dkm", "idkm", "idkm-jfb"] = "idkm"

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"rank {value}: give a dimension of at least 1, or 'auto'")
        return value


class Stage(_Strict):
    """One stage: quantize the layers it matches, then fine-tune ``steps`` optimizer steps.

    Attributes:
        name: Shown in progress and checkpoints.
        match: Exact module names or ``re:`` patterns (full match), like quantize rules.
        steps: Optimizer steps after quantizing this stage's layers (0: quantize only).
        method: ``ipq`` (codes fixed by PG k-means, codebooks trained), or a differentiable
            clusterer that trains the float weights and re-clusters them in every forward,
            starting from PG k-means' codebook: ``dkm``, ``idkm`` or ``idkm-jfb``; or
            ``lr2vq``, which trains a rank-``dkm.rank`` representation of the sub-vectors and
            clusters that. Either way the stage ends with fixed codes and trainable codebooks
            for the stages after it.
        dkm: Options of the differentiable clusterers.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    match: list[str]
    steps: int = Field(100, ge=0)
    method: Literal["ipq", "dkm", "idkm", "idkm-jfb", "lr2vq"] = "ipq"
    dkm: DKMConfig = Field(default_factory=lambda: DKMConfig.model_validate({}))

    @model_validator(mode="after")
    def _lr2vq_options(self) -> Stage:
        given = {"rank", "clusterer"} & self.dkm.model_fields_set
        if given and self.method != "lr2vq":
            raise ValueError(
                f"dkm.{sorted(given)[0]} applies to method: lr2vq only (this stage's method is "
                f"{self.method})"
            )
        idkm = self.method == "idkm" or (self.method == "lr2vq" and self.dkm.clusterer == "idkm")
        if "solver_iters" in self.dkm.model_fields_set and not idkm:
            raise ValueError(
                "dkm.solver_iters sets IDKM's backward solve; this stage does not run IDKM "
                "(method idkm, or lr2vq with clusterer idkm)"
            )
        return self

    @field_validator("match", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def matches(self, name: str) -> bool:
        return name_matches(self.match, name)


# MLP first, then embeddings (and an untied LM head), attention last: the iPQ order. The
# patterns cover Llama-style (mlp, self_attn) and BERT-style (intermediate / output) names.
_MLP = [r"re:.*\.mlp\..*", r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]
DEFAULT_STAGES = (
    Stage(name="mlp", match=_MLP, steps=100),
    Stage(name="embeddings", match=[r"re:.*embed.*", "lm_head"], steps=100),
    Stage(name="attention", match=[r"re:.*\.(self_attn|attention)\..*"], steps=100),
)


class TrainOptions(_Strict):
    """The fine-tuning loop.

    Attributes:
        batch_size: Sequences per optimizer step (per rank: micro batch x accumulation).
        micro_batch_size: Sequences per forward (None: ``batch_size``).
        seq_len: Tokens per sequence (windows of the training text).
        lr: Learning rate of the float parameters (AdamW, constant after warm-up).
        centroid_lr: Learning rate of the codebooks (None: ``lr``).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up at the start of each stage.
        distill: ``causal-lm`` only: weight of the KL divergence to the original model's
            logits (0: off).
        temperature: Distillation temperature.
        text: Training text: ``wordnet`` (default), or a path to a UTF-8 file.
        max_grad_norm: Gradient clipping (0: off).
        objective: ``causal-lm`` (default): next-token loss of a causal LM on windows of the
            text. ``embedding-distill``: for sentence encoders (e.g. all-MiniLM-L6-v2, a
            ``BertModel``): one minus the cosine similarity between the model's mean-pooled
            sentence embedding and the original model's, on sentences of the text padded to
            ``seq_len`` tokens (with ``wordnet``, glosses no retrieval evaluation uses).
    """

    batch_size: int = Field(4, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-4, gt=0)
    centroid_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    distill: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    text: str = "wordnet"
    max_grad_norm: float = Field(1.0, ge=0)
    objective: Literal["causal-lm", "embedding-distill"] = "causal-lm"

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainOptions:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ValueError(f"micro_batch_size {micro} must divide batch_size {self.batch_size}")
        return self

    @model_validator(mode="after")
    def _distill_is_causal(self) -> TrainOptions:
        if self.objective == "embedding-distill" and self.distill > 0:
            raise ValueError(
                "distill (the KL to the original logits) applies to objective causal-lm; "
                "embedding-distill already trains towards the original model's embeddings: "
                "drop distill"
            )
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


class NoiseOptions(_Strict):
    """Quant-Noise on the selected layers still in float (DESIGN.md §4).

    Attributes:
        p: Fraction of blocks perturbed per forward (0: off).
        mode: ``drop`` (zero and rescale) or ``quantize`` (replace by the nearest codeword of a
            codebook fitted to the layer when its stage starts).
    """

    p: float = Field(0.05, ge=0, lt=1)
    mode: Literal["drop", "quantize"] = "drop"


class DeepSpeedOptions(_Strict):
    """What DeepSpeed runs (translated to its config dict by the engine; one source of truth).

    Attributes:
        zero_stage: ZeRO stage 0, 1, 2 or 3 (3 needs 2+ ranks to shard anything).
        dtype: Training dtype: ``fp32``, ``bf16`` (CPU or Ampere+ GPUs) or ``fp16`` (GPU only).
        checkpoint_every: Steps between DeepSpeed checkpoints (the end of a stage always is one).
        keep_checkpoints: Checkpoints kept on disk (older ones are deleted).
    """

    zero_stage: Literal[0, 1, 2, 3] = 0
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class FinetuneConfig(_Strict):
    """Everything that decides a fine-tuning run (fingerprinted for resume).

    Attributes:
        version: Config format version (1).
        seed: Seeds data order, Quant-Noise masks and initialisation of the run.
        quantize: The quantize config (resolved from a path relative to the config file).
        stages: Stages in order (default: mlp, embeddings, attention).
        train: The training loop.
        noise: Quant-Noise on layers not yet quantized.
        deepspeed: ZeRO stage, dtype, checkpoints.
    """

    version: Literal[1] = 1
    seed: int = Field(0, ge=0)
    quantize: QuantizeConfig
    stages: list[Stage] = Field(default_factory=lambda: list(DEFAULT_STAGES), min_length=1)
    train: TrainOptions = Field(default_factory=lambda: TrainOptions.model_validate({}))
    noise: NoiseOptions = Field(default_factory=lambda: NoiseOptions.model_validate({}))
    deepspeed: DeepSpeedOptions = Field(default_factory=lambda: DeepSpeedOptions.model_validate({}))

    @model_validator(mode="after")
    def _unique_stage_names(self) -> FinetuneConfig:
        names = [s.name for s in self.stages]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        return self

    def stage_of(self, name: str) -> int | None:
        """Index of the first stage matching the module ``name`` (None: no stage)."""
        return next((i for i, s in enumerate(self.stages) if s.matches(name)), None)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @cached_property
    def sha256(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def load_finetune_config(source: str | Path | dict[str, Any]) -> FinetuneConfig:
    """Read and validate a finetune config (YAML file or parsed mapping).

    ``quantize`` may be a path (relative to the config file's directory, then to ``configs/``)
    or an inline mapping.

    Raises:
        ConfigError: Missing or unreadable file, bad YAML, unknown key, value out of range, or
            an invalid quantize config.
    """
    import yaml

    where, base = "config", Path.cwd()
    if isinstance(source, dict):
        data: Any = dict(source)
    else:
        path = Path(source)
        where, base = str(path), path.parent
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such finetune config file.") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read it as YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level.")
    if "quantize" not in data:
        raise ConfigError(
            f"{where}: `quantize` is missing: name the quantize config that gives every layer "
            "its block size and codebook (e.g. quantize: smollm2-135m-ipq.yaml)."
        )
    quantize = data["quantize"]
    if isinstance(quantize, str):
        candidates = [base / quantize, Path(__file__).resolve().parents[2] / "configs" / quantize]
        found = next((p for p in candidates if p.is_file()), candidates[0])
        data["quantize"] = load_config(found)
    elif isinstance(quantize, dict):
        data["quantize"] = load_config(quantize)
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (a typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(
            f"{where}: invalid finetune config:\n" + "\n".join(lines) + "\nSee docs/finetune.md "
            "for the keys and configs/ for presets."
        ) from exc
