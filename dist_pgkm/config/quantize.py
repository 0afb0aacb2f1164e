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

__all__ = ["CONFIG_VERSION", "LayerRule", "QuantizeConfig", "load_config", "name_matches"]

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


class LayerRule(_Strict):
    """One selection rule.

    Attributes:
        match: Exact module name(s) or ``re:`` patterns (full match).
        block_size: Sub-vector length (must divide the layer's input width).
        k: Codebook size, 2..65536.
        skip: Keep matching layers in float (shadows later rules).
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
        rules: Layer selection, first match wins.
    """

    version: Literal[1] = 1
    seed: int = Field(0, ge=0)
    method: Literal["pgkm", "fairseq-em", "faiss", "kmeans++"] = "pgkm"
    n_iter: int = Field(15, ge=1, le=1000)
    method_options: dict[str, Any] = Field(default_factory=dict)
    centroid_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    on_unsupported: Literal["skip", "error"] = "skip"
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
