"""The plan of a run: which layers become which clustering jobs (pure: no I/O, no Ray).

A job's bytes depend only on the job (its weight, block size, codebook size, method and
seed), and its seed only on the run seed and the layer's name, so the output is identical
whatever executes the jobs, in whatever order, after whatever restarts.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dist_pgkm.config.quantize import LayerQuantOptions, QuantizeConfig
from dist_pgkm.errors import ConfigError
from dist_pgkm.models.layers import LayerInfo
from dist_pgkm.utils.seeding import derive_seed

__all__ = [
    "LayerJob",
    "Plan",
    "SkippedLayer",
    "in_repeated_block",
    "layer_seed",
    "plan_run",
    "unused_rules",
]

logger = logging.getLogger(__name__)


def layer_seed(run_seed: int, name: str) -> int:
    """A layer's clustering seed: 63 bits of ``sha256(f"{run_seed}:{name}")``."""
    return derive_seed(run_seed, name)


@dataclass(frozen=True)
class LayerJob:
    """Quantize one layer.

    Attributes:
        name: Module name (``model.layers.0.mlp.down_proj``).
        kind: ``linear``, ``embedding`` or ``conv2d``.
        tensor: Checkpoint key of the weight.
        shape: Weight shape.
        block_size: Sub-vector length.
        k: Requested codebook size.
        seed: Clustering seed (:func:`layer_seed`).
        tied: Modules whose weight is this one's.
        est_cost: Relative cost, ``n_blocks * k * block_size * n_iter`` (one distance pass is
            ``n_blocks * k * block_size`` multiply-adds).
        options: The rule's metric, scales, codebook granularity and outliers.
    """

    name: str
    kind: str
    tensor: str
    shape: tuple[int, ...]
    block_size: int
    k: int
    seed: int
    tied: tuple[str, ...]
    est_cost: float
    options: LayerQuantOptions = field(default_factory=LayerQuantOptions)

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.n_weights // self.block_size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedLayer:
    """A layer a rule selected that cannot be quantized as asked, kept in float."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Plan:
    """Jobs, longest first, and the selected layers that were skipped."""

    jobs: tuple[LayerJob, ...]
    skipped: tuple[SkippedLayer, ...]
    n_float: int  # layers no rule selected (kept in float)

    @property
    def n_weights(self) -> int:
        return sum(job.n_weights for job in self.jobs)


_IN_BLOCKS = re.compile(r"(^|\.)\d+\.")  # a numeric path component: a ModuleList entry


def in_repeated_block(name: str) -> bool:
    """Whether a module sits inside a repeated block (``model.layers.3.mlp.up_proj``)."""
    return _IN_BLOCKS.search(name) is not None


def _unsupported(
    layer: LayerInfo, block_size: int, k: int, options: LayerQuantOptions
) -> str | None:
    width = math.prod(layer.shape[1:])
    if width % block_size:
        return f"input width {width} is not a multiple of block size {block_size}"
    n_blocks = math.prod(layer.shape) // block_size
    if n_blocks < k:
        return f"{n_blocks} blocks of {block_size} are fewer than k = {k} codewords"
    if options.scale == "group" and (
        options.scale_group % block_size or width % options.scale_group
    ):
        return (
            f"scale_group {options.scale_group} must be a multiple of block size {block_size} "
            f"and divide the input width {width}"
        )
    if options.codebook_rows:
        rows = layer.shape[0]
        if rows % options.codebook_rows:
            return f"codebook_rows {options.codebook_rows} does not divide the {rows} output rows"
        per_book = options.codebook_rows * width // block_size
        if per_book < k:
            return (
                f"a codebook of {options.codebook_rows} rows has {per_book} blocks, fewer than "
                f"k = {k} codewords"
            )
    return None


def plan_run(layers: Sequence[LayerInfo], config: QuantizeConfig) -> Plan:
    """Match every layer against the config's rules and order the jobs longest-first.

    Raises:
        ConfigError: No layer is selected, or (``on_unsupported: error``) a selected layer
            cannot be quantized as asked.
    """
    jobs: list[LayerJob] = []
    skipped: list[SkippedLayer] = []
    n_float = 0
    for layer in layers:
        rule = config.rule_for(layer.name)
        outside = config.convention == "llm" and not in_repeated_block(layer.name)
        if rule is None or rule.skip or outside:
            n_float += 1
            continue
        assert rule.block_size is not None
        assert rule.k is not None
        options = rule.quant_options()
        reason = _unsupported(layer, rule.block_size, rule.k, options)
        if reason is not None:
            skipped.append(SkippedLayer(layer.name, layer.shape, reason))
            continue
        n_blocks = math.prod(layer.shape) // rule.block_size
        jobs.append(
            LayerJob(
                name=layer.name,
                kind=layer.kind,
                tensor=layer.tensor,
                shape=layer.shape,
                block_size=rule.block_size,
                k=rule.k,
                seed=layer_seed(config.seed, layer.name),
                tied=layer.tied,
                est_cost=float(n_blocks * rule.k * rule.block_size * config.n_iter),
                options=options,
            )
        )
    if skipped and config.on_unsupported == "error":
        listing = "; ".join(f"{s.name} {s.shape}: {s.reason}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise ConfigError(
            f"{len(skipped)} selected layer(s) cannot be quantized as configured: {listing}"
            f"{more}. Change their rule's block_size / k, exclude them with a `skip: true` "
            "rule, or set `on_unsupported: skip`."
        )
    for warning in unused_rules(layers, config):
        logger.warning("%s", warning)
    if not jobs and skipped:
        listing = "; ".join(f"{s.name} {s.shape}: {s.reason}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise ConfigError(
            f"no layer can be quantized as configured: the rules select {len(skipped)} "
            f"layer(s), and every one is skipped (`on_unsupported: skip`): {listing}{more}. "
            "Choose a block_size that divides the layers' input width and a k no larger than "
            "their number of blocks."
        )
    if not jobs:
        names = ", ".join(layer.name for layer in layers[:4])
        raise ConfigError(
            f"the config selects no layer to quantize among the model's {len(layers)} "
            f"quantizable layers (e.g. {names}). Check the rules' `match` patterns: a pattern "
            "is an exact module name or `re:` + a regular expression matching the whole name."
        )
    # Longest first, ties by name: the order is part of no output, but keep it reproducible.
    jobs.sort(key=lambda job: (-job.est_cost, job.name))
    return Plan(tuple(jobs), tuple(skipped), n_float)


def unused_rules(layers: Sequence[LayerInfo], config: QuantizeConfig) -> list[str]:
    """One message per rule that decides no layer of the model, when another rule does.

    A rule decides no layer when none of its patterns matches a layer name (a typo, another
    architecture's names) or when every layer it matches is taken by an earlier rule (first
    match wins). When no rule decides anything, the "selects no layer" error says it instead.
    """
    decided = [0] * len(config.rules)
    matched = [0] * len(config.rules)
    for layer in layers:
        first = None
        for i, rule in enumerate(config.rules):
            if rule.matches(layer.name):
                matched[i] += 1
                if first is None:
                    first = i
        if first is not None:
            decided[first] += 1
    if not any(decided):
        return []
    messages = []
    for i, rule in enumerate(config.rules):
        if decided[i]:
            continue
        what = f"rule {i + 1} (match: {', '.join(rule.match)})"
        if matched[i]:
            messages.append(
                f"{what} decides no layer: each of the {matched[i]} layer(s) it matches is "
                "taken by an earlier rule (first match wins). Move it up, or remove it."
            )
        else:
            messages.append(
                f"{what} matches none of the model's {len(layers)} quantizable layers (e.g. "
                f"{', '.join(layer.name for layer in layers[:3])}). Check its pattern: an "
                "exact module name, or `re:` + a regular expression matching the whole name."
            )
    return messages
