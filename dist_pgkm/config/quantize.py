"""The ``quantize`` configuration: which layers, at which block size and codebook size.

A YAML file, validated by pydantic; unknown keys are errors. Layers are chosen by rules, the
first rule whose pattern matches a layer's module name wins; a pattern is an exact name or
``re:<regex>`` matched against the whole name. Layers matched by no rule stay in float::

    version: 1
    seed: 0
    rules:
      - match: "re:.*\\.mlp\\..*"
        block_size: 8
        k: 256
      - match: ["model.embed_tokens", "re:.*\\.self_attn\\..*"]
        block_size: 4
        k: 256
      - match: "re:.*\\.layers\\.0\\..*"
        skip: true

A rule may also ask for the activation-aware levers (docs/quantize.md): ``metric: hessian``
(the k-means error of a block is weighted by the layer's input second moment, which needs
calibration text: ``--calib``), per-row or per-group ``scale``, one codebook per
``codebook_rows`` output rows, and a fraction of ``outliers`` kept exactly. ``convention: llm``
keeps every layer outside the model's repeated blocks (embeddings, LM head) in float, whatever
the rules say.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dist_pgkm.config.kmeans import METHOD_OPTIONS
from dist_pgkm.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "CalibrationConfig",
    "LayerQuantOptions",
    "LayerRule",
    "QuantizeConfig",
    "load_config",
    "name_matches",
]

CONFIG_VERSION = 1
_MAX_K = 65536  # codes are at most 16 bits


def name_matches(patterns: Sequence[str], name: str) -> bool:
    """Whether ``name`` is one of the exact names or fully matches one of the ``re:`` patterns."""
    return any(
        re.fullmatch(p[3:], name) is not None if p.startswith("re:") else p == name
        for p in patterns
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Metric = Literal["weight", "hessian", "hessian-diag"]
Scale = Literal["none", "row", "group"]


class LayerQuantOptions(_Strict):
    """How a selected layer is quantized beyond its block size and codebook size.

    The defaults are plain product quantization: k-means on the weights themselves, one
    codebook per layer, no scales, no outliers.

    Attributes:
        metric: The k-means error of a sub-vector ``w`` against a centroid ``c``: ``weight``
            is ``|w - c|^2``; ``hessian`` is ``(w - c)^T H_b (w - c)`` with ``H_b`` the
            ``bs x bs`` diagonal block of the layer's input second moment ``H = X^T X`` for
            that block's input features (collected from calibration text); ``hessian-diag``
            keeps only the diagonal of ``H_b``. Linear layers only (and an embedding tied to
            an output layer, which takes that layer's ``H``); other layers use ``weight``.
        scale: ``row``: every output row is divided by an fp16 scale before clustering and
            multiplied back when decoding; ``group``: one scale per ``scale_group`` input
            features of a row; ``none``.
        scale_group: Input features per scale with ``scale: group`` (a multiple of the block
            size that divides the layer's width).
        codebook_rows: 0: one codebook per layer; ``R``: one codebook per ``R`` output rows
            (each needs at least ``k`` blocks).
        outliers: Fraction of the weights kept exactly, in fp16, in a sparse side matrix:
            those with the largest ``w^2 * H_jj`` (``w^2`` without calibration).
    """

    metric: Metric = "weight"
    scale: Scale = "none"
    scale_group: int = Field(default=64, ge=1)
    codebook_rows: int = Field(default=0, ge=0)
    outliers: float = Field(default=0.0, ge=0.0, le=0.1)

    @property
    def plain(self) -> bool:
        """Whether no lever is on (plain product quantization; ``scale_group`` is then unused)."""
        return (
            self.metric == "weight"
            and self.scale == "none"
            and self.codebook_rows == 0
            and self.outliers == 0.0
        )

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing needs the layer's input second moment from calibration."""
        return self.metric != "weight"


class CalibrationConfig(_Strict):
    """Calibration text run through the model once to collect every layer's ``H = X^T X``.

    Attributes:
        text: A corpus name (``wordnet``, ``debian-reference``, ``wikitext-2``) or a UTF-8
            text file; ``--calib`` sets it. The windows are the calibration split of that
            text, disjoint from the evaluation windows.
        samples: Windows of ``seq_len`` tokens.
        seq_len: Tokens per window.
        damp: Added to the diagonal of every ``H_b``: ``damp`` times the mean of the layer's
            ``diag(H)``, so a block whose inputs never vary is still a valid metric.
    """

    text: str | None = None
    samples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=2)
    damp: float = Field(default=0.01, ge=0.0)


class LayerRule(LayerQuantOptions):
    """One selection rule.

    Attributes:
        match: Exact module name(s) or ``re:`` patterns (full match).
        block_size: Sub-vector length (must divide the layer's input width).
        k: Codebook size, 2..65536.
        skip: Keep matching layers in float (shadows later rules).

    The :class:`LayerQuantOptions` fields (``metric``, ``scale``, ...) apply to the layers the
    rule selects.
    """

    match: list[str]
    block_size: int | None = Field(None, ge=1, le=64)
    k: int | None = Field(None, ge=2, le=_MAX_K)
    skip: bool = False

    @field_validator("match", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("match")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("match needs at least one name or re: pattern")
        for pattern in value:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(
                        f"{pattern!r} is not a valid regular expression: {exc}"
                    ) from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> LayerRule:
        if not self.skip and (self.block_size is None or self.k is None):
            raise ValueError("a rule needs block_size and k (or skip: true)")
        return self

    def matches(self, name: str) -> bool:
        """Whether ``name`` is one of the exact names or fully matches a ``re:`` pattern."""
        return name_matches(self.match, name)

    def quant_options(self) -> LayerQuantOptions:
        """The rule's :class:`LayerQuantOptions` on their own."""
        return LayerQuantOptions(
            **{key: getattr(self, key) for key in LayerQuantOptions.model_fields}
        )


class QuantizeConfig(_Strict):
    """Everything that decides the bytes of a quantized checkpoint (fingerprinted for resume).

    Attributes:
        version: Config format version (1).
        seed: Run seed; each layer's seed derives from it and the layer's name.
        method: Clustering method (``pgkm``, ``fairseq-em``, ``faiss``, ``kmeans++``).
        n_iter: Lloyd iterations per layer.
        method_options: Options of the method (see ``dist_pgkm.config.kmeans``).
        centroid_dtype: Storage dtype of the codebooks.
        on_unsupported: A selected layer that cannot be quantized as asked (width not a
            multiple of the block size, fewer blocks than ``k``): ``skip`` keeps it in float
            and reports it, ``error`` stops before any work.
        convention: ``ipq``: every layer a rule selects, embeddings and LM head included
            (iPQ's convention); ``llm``: only the layers inside the model's repeated blocks
            (a module path with a numeric index, ``model.layers.3.mlp.up_proj``); embeddings,
            the LM head and anything else outside the blocks stay in float, as GPTQ, AWQ,
            VPTQ and AQLM report their results.
        calibration: The calibration text, for rules with ``metric: hessian``.
        rules: Layer selection, first match wins.
    """

    version: Literal[1] = 1
    seed: int = Field(0, ge=0)
    method: Literal["pgkm", "fairseq-em", "faiss", "kmeans++"] = "pgkm"
    n_iter: int = Field(15, ge=1, le=1000)
    method_options: dict[str, Any] = Field(default_factory=dict)
    centroid_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    on_unsupported: Literal["skip", "error"] = "skip"
    convention: Literal["ipq", "llm"] = "ipq"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    rules: list[LayerRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _method_options_valid(self) -> QuantizeConfig:
        options = METHOD_OPTIONS[self.method]
        try:
            options.model_validate(self.method_options)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            problem = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            raise ValueError(
                f"method_options.{key}: {problem} for method {self.method!r} (it accepts: "
                f"{', '.join(sorted(options.model_fields)) or 'none'})"
            ) from None
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether a rule asks for a metric that needs calibration text."""
        return any(not rule.skip and rule.needs_hessian for rule in self.rules)

    def rule_for(self, name: str) -> LayerRule | None:
        """The first rule matching ``name`` (None: not selected)."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    @cached_property
    def sha256(self) -> str:
        """Digest of the canonical JSON form: two configs with equal settings share it."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (a typo?)")
        else:
            lines.append(f"  {where}: {err['msg']}")
    return (
        f"{source}: invalid quantize config:\n" + "\n".join(lines) + "\nSee docs/quantize.md for "
        "the keys and configs/ for presets."
    )


def load_config(source: str | Path | dict[str, Any], **overrides: Any) -> QuantizeConfig:
    """Read and validate a config from a YAML file (or an already parsed dict).

    Args:
        source: Path of a YAML file, or its parsed content.
        **overrides: Top-level keys replacing the file's (e.g. ``method`` from the CLI); None
            values are ignored.

    Raises:
        ConfigError: Missing or unreadable file, bad YAML, unknown key, value out of range.
    """
    import yaml

    where = "config"
    if isinstance(source, dict):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            presets = Path(__file__).resolve().parents[2] / "configs"
            hint = f" Presets: {presets}." if presets.is_dir() else ""
            raise ConfigError(f"{path}: no such config file.{hint}") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read it as YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level.")
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return QuantizeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from exc
