"""k-means benchmark: PG k-means against fairseq-EM, faiss and k-means++ on real weights.

Every method of :func:`dist_pgkm.cluster` runs on the same sub-vectors with the same ``n_iter``,
seed and ``backend="auto"``; torch and faiss use the same number of threads. The data sets are
real layers of SmolLM2-135M and all-MiniLM-L6-v2 (read tensor by tensor, never the whole model),
in the regimes where empty clusters occur (DESIGN.md §3):

* ``clean``: the weights as they are, K = 256;
* ``zero20`` / ``zero50``: 20 % / 50 % of the sub-vectors set exactly to zero (pruned weights);
* ``fp16``: the weights rounded to float16 and handed over in float16 (fairseq-em runs in it);
* ``large-k``: K = 4096 or 65536 with block size 8, i.e. only a few sub-vectors per centroid;
* ``speed``: a 300k x 8 Gaussian mixture, pgkm against faiss, 20 iterations;
* ``hard``: 80k x 8 synthetic points, K = 256, built to stress PG k-means' own steps
  (consolidation, partition, split repair, moves): heavy-tailed values, many exact zeros, rows
  repeated from a small pool, and all of them at once rounded through fp16.

Every data set also records pgkm's total time over faiss's (on all points, same ``n_iter``).

In full mode a child process also clusters 10M x 8 random points to measure peak memory.
The targets (:func:`compute_targets`) are computed from the measured rows, never typed in.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dist_pgkm.config.quantize import LayerRule, load_config
from dist_pgkm.errors import ConfigError, DistributedError, ModelSourceError
from dist_pgkm.models.offline import minilm_dir, smollm2_dir
from dist_pgkm.pgkm.api import METHODS, cluster
from dist_pgkm.pq.codec import to_subvectors
from dist_pgkm.utils.memory import peak_rss_bytes
from dist_pgkm.utils.optional import faiss_available, import_faiss
from dist_pgkm.utils.threads import available_cores

# Relative: mypy checks this directory as the package `benchmarks` and cannot follow
# setuptools' package-dir mapping to `dist_pgkm.bench` (the name it has at run time).
from .common import (
    MARKDOWN_INTRO,
    Target,
    format_bytes,
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    replace_marker_section,
    targets_markdown,
    targets_rich_table,
    utc_now,
)

__all__ = [
    "ALL_METHODS",
    "DATASETS",
    "MEMORY_DATASET",
    "BenchOptions",
    "DatasetSpec",
    "KMeansReport",
    "ProgressHook",
    "build_subvectors",
    "compute_targets",
    "make_rows",
    "markdown_section",
    "measure_memory",
    "memory_child",
    "render_report",
    "run_benchmark",
    "select_datasets",
    "speed_summary",
    "write_markdown",
]

logger = logging.getLogger(__name__)

ALL_METHODS: tuple[str, ...] = ("pgkm", "fairseq-em", "faiss", "kmeans++")
VARIANTS: tuple[str, ...] = ("clean", "zero20", "zero50", "fp16")
_ZERO_FRACTION = {"zero20": 0.2, "zero50": 0.5}
# Codebooks this large hold only a few sub-vectors per centroid: their own regime.
_LARGE_K = 1024
# Data variants (zero rows, mixtures) use their own seed, so --seed only changes the clustering.
_DATA_SEED = 0

# Targets (DESIGN.md §3 and the benchmark brief); the report shows each next to its measurement.
EMPTY_RATIO_GOAL = 100.0
SSE_RATIO_GOAL = 1.005
SPEED_RATIO_GOAL = 1.0
TIME_TO_SSE_GOAL = 0.5
TOTAL_TIME_GOAL = 1.0  # pgkm's whole call (init included) against faiss.Kmeans on all points
MEMORY_GOAL_BYTES = 1.5e9

# The speed set: a seeded Gaussian mixture, pgkm against faiss only.
_SPEED_N, _SPEED_D, _SPEED_CENTRES, _SPEED_K, _SPEED_ITERS = 300_000, 8, 1000, 256, 20
# The memory set: random points, pgkm only, in a fresh child process.
_MEM_N, _MEM_D, _MEM_K, _MEM_ITERS = 10_000_000, 8, 256, 5
MEMORY_DATASET = "synthetic.random10M.d8.k256"
# The hard synthetic sets: what real compressed weights do to the engine, in one knob each.
_HARD_N, _HARD_D, _HARD_K = 80_000, 8, 256
HARD_KINDS: tuple[str, ...] = ("heavy", "zeros", "pool", "mix")

_MODEL_DIRS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_dir, "minilm": minilm_dir}

ProgressHook = Callable[[int, int, str], None]
"""Called before each step with ``(steps done, total steps, description)``."""


@dataclass(frozen=True)
class DatasetSpec:
    """One clustering problem of the benchmark.

    Attributes:
        name: Unique name, ``<source>.<layer>.bs<bs>.k<k>.<variant>`` for real weights.
        regime: ``clean``, ``zero20``, ``zero50``, ``fp16``, ``large-k`` or ``speed``.
        variant: How the sub-vectors were altered: ``clean``, ``zero20``, ``zero50``, ``fp16``.
        k: Number of centroids.
        source: ``smollm2``, ``minilm`` or ``synthetic``.
        tensor: Name of the weight in the model's safetensors file (empty for synthetic).
        block_size: Sub-vector length (the dimension ``d``).
        methods: Methods run on it (intersected with the run's ``--methods``).
        n_iter: Iterations, or None for the run's ``--n-iter``.
        quick: Part of ``--quick`` mode (every data set is part of full mode).
    """

    name: str
    regime: str
    variant: str
    k: int
    source: str
    tensor: str
    block_size: int
    methods: tuple[str, ...] = ALL_METHODS
    n_iter: int | None = None
    quick: bool = False


def _real(
    source: str,
    label: str,
    tensor: str,
    bs: int,
    k: int,
    variants: Sequence[str],
    quick: Sequence[str] = (),
) -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name=f"{source}.{label}.bs{bs}.k{k}.{variant}",
            regime="large-k" if k >= _LARGE_K else variant,
            variant=variant,
            k=k,
            source=source,
            tensor=tensor,
            block_size=bs,
            quick=variant in quick,
        )
        for variant in variants
    ]


_SM0 = "model.layers.0."
_SM15 = "model.layers.15."
_BERT0 = "encoder.layer.0."

# Specs of one tensor are adjacent, so each tensor is read once (see _TensorCache).
DATASETS: tuple[DatasetSpec, ...] = (
    # SmolLM2-135M layer 0. k_proj: (192, 576); q_proj: (576, 576); down_proj: (576, 1536).
    *_real("smollm2", "L0.k_proj", _SM0 + "self_attn.k_proj.weight", 8, 256, VARIANTS, VARIANTS),
    # 13,824 sub-vectors for 4096 centroids: 3.4 per centroid (1.7 distinct ones with zero50).
    *_real(
        "smollm2",
        "L0.k_proj",
        _SM0 + "self_attn.k_proj.weight",
        8,
        4096,
        ("clean", "zero50", "fp16"),
        quick=("clean", "zero50"),
    ),
    *_real("smollm2", "L0.k_proj", _SM0 + "self_attn.k_proj.weight", 4, 256, VARIANTS),
    *_real("smollm2", "L0.q_proj", _SM0 + "self_attn.q_proj.weight", 4, 256, VARIANTS),
    *_real("smollm2", "L0.down_proj", _SM0 + "mlp.down_proj.weight", 8, 256, VARIANTS),
    # k-means++ seeding alone takes ~40 s here on a busy 2-core machine: full mode only.
    *_real("smollm2", "L0.down_proj", _SM0 + "mlp.down_proj.weight", 8, 4096, ("clean", "zero50")),
    # ~2-3 s per distance pass on 2 cores, and fairseq-em may spend 101 of them.
    *_real("smollm2", "L0.down_proj", _SM0 + "mlp.down_proj.weight", 8, 65536, ("clean", "zero50")),
    # A middle layer.
    *_real("smollm2", "L15.k_proj", _SM15 + "self_attn.k_proj.weight", 8, 256, ("clean", "fp16")),
    *_real("smollm2", "L15.down_proj", _SM15 + "mlp.down_proj.weight", 8, 256, ("clean", "zero50")),
    *_real("smollm2", "L15.down_proj", _SM15 + "mlp.down_proj.weight", 8, 4096, ("clean",)),
    # (49152, 576): 3.5M sub-vectors, full mode only.
    *_real("smollm2", "embed_tokens", "model.embed_tokens.weight", 8, 256, ("clean", "fp16")),
    # all-MiniLM-L6-v2 layer 0. intermediate: (1536, 384); query: (384, 384).
    *_real("minilm", "L0.intermediate", _BERT0 + "intermediate.dense.weight", 8, 256, VARIANTS),
    *_real("minilm", "L0.intermediate", _BERT0 + "intermediate.dense.weight", 8, 4096, ("clean",)),
    *_real(
        "minilm",
        "L0.query",
        _BERT0 + "attention.self.query.weight",
        4,
        256,
        VARIANTS,
        quick=("clean", "fp16"),
    ),
    DatasetSpec(
        name=f"synthetic.gmm300k.d{_SPEED_D}.k{_SPEED_K}",
        regime="speed",
        variant="clean",
        k=_SPEED_K,
        source="synthetic",
        tensor="",
        block_size=_SPEED_D,
        methods=("pgkm", "faiss"),
        n_iter=_SPEED_ITERS,
        quick=True,
    ),
    *(
        DatasetSpec(
            name=f"synthetic.{kind}80k.d{_HARD_D}.k{_HARD_K}" + (".fp16" if kind == "mix" else ""),
            regime="hard",
            variant="fp16" if kind == "mix" else "clean",
            k=_HARD_K,
            source="synthetic",
            tensor=kind,
            block_size=_HARD_D,
            methods=("pgkm", "faiss", "kmeans++"),
            quick=kind == "mix",
        )
        for kind in HARD_KINDS
    ),
)


@dataclass(frozen=True)
class BenchOptions:
    """What to run.

    Attributes:
        quick: The short selection (under 2 minutes on 2 cores) instead of the full one.
        n_iter: Lloyd iterations of every real data set (the speed set uses its own 20).
        seed: Seed of every clustering run.
        methods: Methods to compare (a subset of :data:`ALL_METHODS`).
        memory: Measure peak memory on 10M x 8 points (full mode only).
        threads: torch and faiss threads; None means the cores this process may use
            (:func:`dist_pgkm.utils.threads.available_cores`).
        datasets: Names or shell patterns restricting the data sets (empty: the mode's set).
            Matching names are taken from every data set, whatever the mode.
        command: The command line, recorded in the report.
    """

    quick: bool = False
    n_iter: int = 15
    seed: int = 0
    methods: tuple[str, ...] = ALL_METHODS
    memory: bool = True
    threads: int | None = None
    datasets: tuple[str, ...] = ()
    command: str = "dist-pgkm bench kmeans"

    @property
    def mode(self) -> str:
        """``quick`` or ``full``."""
        return "quick" if self.quick else "full"


@dataclass
class KMeansReport:
    """Everything one benchmark run measured; :meth:`as_dict` is the JSON file."""

    mode: str
    command: str
    machine: dict[str, Any]
    commit: str | None
    date: str
    options: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    speed: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON document ``--json`` writes.

        Returns:
            ``benchmark``, ``mode``, ``command``, ``machine``, ``commit``, ``date``,
            ``seconds``, ``options``, ``rows``, the ``speed`` and ``memory`` summaries (None
            when not run) and ``targets``.
        """
        return {
            "benchmark": "kmeans",
            "mode": self.mode,
            "command": self.command,
            "machine": self.machine,
            "commit": self.commit,
            "date": self.date,
            "seconds": self.seconds,
            "options": self.options,
            "rows": self.rows,
            "speed": self.speed,
            "memory": self.memory,
            "targets": [t.as_dict() for t in self.targets],
        }


# --- data --------------------------------------------------------------------------------------


def select_datasets(quick: bool, patterns: Sequence[str] = ()) -> list[DatasetSpec]:
    """The data sets of a run, in benchmark order.

    Args:
        quick: Select the ``--quick`` data sets (ignored when ``patterns`` is given).
        patterns: Exact names or shell patterns (``fnmatch``); empty selects the mode's set.

    Raises:
        ConfigError: A pattern matches no data set.
    """
    if not patterns:
        return [s for s in DATASETS if s.quick or not quick]
    names = [s.name for s in DATASETS] + [MEMORY_DATASET]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"no benchmark data set matches {pattern!r}. Data sets: {', '.join(names)}."
            )
    return [s for s in DATASETS if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def _gaussian_mixture(n: int, d: int, centres: int, seed: int) -> torch.Tensor:
    """``n`` float32 points around ``centres`` random centres (spread 3, noise 0.3)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 3.0  # (centres, d)
    return c[torch.randint(0, centres, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.3


def hard_points(
    kind: str, n: int = _HARD_N, d: int = _HARD_D, seed: int = _DATA_SEED
) -> torch.Tensor:
    """``(n, d)`` float32 points of one hard synthetic set.

    Args:
        kind: ``heavy``: Gaussian values times a log-normal scale per value (heavy tails, a
            few values ~50x the typical one); ``zeros``: the same with 40 % of the rows and
            20 % of the remaining values exactly zero (pruned weights); ``pool``: the same with
            half of the rows copied from a pool of 200 rows (repeated sub-vectors, as a 4-bit
            checkpoint expanded to float has); ``mix``: zeros and pool at once (the caller
            rounds it through fp16).
        n: Points.
        d: Dimension.
        seed: Seed of the data.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, d, generator=g))
    if kind in ("zeros", "mix"):
        x[torch.rand(n, d, generator=g) < 0.2] = 0.0
        x[torch.randperm(n, generator=g)[: int(0.4 * n)]] = 0.0
    if kind in ("pool", "mix"):
        pool = x[torch.randperm(n, generator=g)[:200]].clone()
        rows = torch.randperm(n, generator=g)[: n // 2]
        x[rows] = pool[torch.randint(0, 200, (rows.numel(),), generator=g)]
    return x


def _apply_variant(x: torch.Tensor, variant: str, seed: int) -> torch.Tensor:
    """Sub-vectors ``(n, d)`` altered as ``variant`` says (a new tensor unless ``clean``)."""
    if variant == "clean":
        return x
    if variant == "fp16":
        return x.half()
    fraction = _ZERO_FRACTION[variant]
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    out[torch.randperm(x.shape[0], generator=g)[: round(fraction * x.shape[0])]] = 0.0
    return out


class _TensorCache:
    """Reads one weight at a time from a model's safetensors file and keeps the last one."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._tensor: torch.Tensor | None = None

    def get(self, source: str, tensor: str) -> torch.Tensor:
        if self._key == (source, tensor) and self._tensor is not None:
            return self._tensor
        from safetensors import safe_open

        self._tensor = None  # let the previous weight go before reading the next
        path = _MODEL_DIRS[source]() / "model.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            if tensor not in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                raise ModelSourceError(
                    f"{path} holds no tensor {tensor!r}; the installed {source} model is not the "
                    "one this benchmark expects. Reinstall it (`make setup`)."
                )
            self._tensor = fh.get_tensor(tensor)
        self._key = (source, tensor)
        return self._tensor


def build_subvectors(spec: DatasetSpec, cache: _TensorCache | None = None) -> torch.Tensor:
    """The ``(n, d)`` points of a data set, as they are handed to :func:`dist_pgkm.cluster`.

    Args:
        spec: The data set.
        cache: Reader keeping the last weight (a fresh one reads from disk).

    Returns:
        float32 points, or float16 for the ``fp16`` variant.

    Raises:
        ModelSourceError: The model is not installed or lacks the tensor.
    """
    if spec.source == "synthetic" and spec.regime == "hard":
        return _apply_variant(hard_points(spec.tensor), spec.variant, _DATA_SEED)
    if spec.source == "synthetic":
        return _gaussian_mixture(_SPEED_N, spec.block_size, _SPEED_CENTRES, _DATA_SEED)
    weight = (cache or _TensorCache()).get(spec.source, spec.tensor)
    x = to_subvectors(weight, spec.block_size, spec.tensor)  # (out * in / bs, bs)
    return _apply_variant(x, spec.variant, _DATA_SEED)


# --- rows, summaries, targets ------------------------------------------------------------------

# KMeansStats.as_dict() keys copied into every row, in the order of the JSON rows.
_STAT_KEYS = (
    "n",
    "d",
    "k",
    "n_distinct",
    "empty_after_init",
    "empty_total",
    "empty_final",
    "repair_passes",
    "distance_passes",
    "iterations",
    "sse",
)
_TIME_KEYS = ("seconds", "seconds_per_iter", "k_used", "aborted")


def _ratio(a: float, b: float | None) -> float | str | None:
    """``a / b``; ``"inf"`` for a positive ``a`` over 0; None without ``b``."""
    if b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else "inf"
    return a / b


def make_rows(
    spec: DatasetSpec, stats: Mapping[str, Mapping[str, Any]], n_iter: int
) -> list[dict[str, Any]]:
    """One JSON row per method run on ``spec``.

    Args:
        spec: The data set.
        stats: ``KMeansStats.as_dict()`` of each method, by method name.
        n_iter: The iteration budget the methods were given.

    Returns:
        Rows with the stats fields, ``dataset``, ``regime``, ``method`` and
        ``sse_vs_best_baseline`` (SSE over the lowest SSE among the non-pgkm methods).
    """
    baselines = [s["sse"] for m, s in stats.items() if m != "pgkm"]
    best = min(baselines) if baselines else None
    rows = []
    for method, s in stats.items():
        row: dict[str, Any] = {"dataset": spec.name, "regime": spec.regime, "method": method}
        row.update({key: s[key] for key in _STAT_KEYS})
        row["sse_vs_best_baseline"] = _ratio(s["sse"], best)
        row.update({key: s[key] for key in _TIME_KEYS})
        row.update({"variant": spec.variant, "backend": s["backend"], "n_iter": n_iter})
        rows.append(row)
    return rows


def speed_summary(
    dataset: str, pgkm: Mapping[str, Any], faiss: Mapping[str, Any]
) -> dict[str, Any]:
    """Compare pgkm with faiss on the speed set.

    Args:
        dataset: Name of the speed set.
        pgkm: pgkm's ``KMeansStats.as_dict()``.
        faiss: faiss's ``KMeansStats.as_dict()``.

    Returns:
        Seconds per iteration of both and their ratio (pgkm / faiss), and when pgkm first
        reached faiss's final SSE: the first iteration whose assignment SSE (``objective``) is
        at most faiss's ``sse``, the seconds since pgkm's call started at the end of that
        iteration (``elapsed``) and their ratio to faiss's total ``seconds``; None when pgkm
        never reached it.
    """
    target = float(faiss["sse"])
    hit = next((i for i, obj in enumerate(pgkm["objective"]) if obj <= target), None)
    reached = None if hit is None else float(pgkm["elapsed"][hit])
    return {
        "dataset": dataset,
        "pgkm_seconds_per_iter": pgkm["seconds_per_iter"],
        "faiss_seconds_per_iter": faiss["seconds_per_iter"],
        "seconds_per_iter_ratio": _ratio(pgkm["seconds_per_iter"], faiss["seconds_per_iter"]),
        "pgkm_seconds": pgkm["seconds"],
        "faiss_seconds": faiss["seconds"],
        "pgkm_sse": pgkm["sse"],
        "faiss_sse": target,
        "pgkm_iterations_to_faiss_sse": None if hit is None else hit + 1,
        "pgkm_seconds_to_faiss_sse": reached,
        "time_to_faiss_sse_ratio": None if reached is None else _ratio(reached, faiss["seconds"]),
    }


def _by_dataset(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    out: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["dataset"], {})[row["method"]] = row
    return out


def _as_float(value: float | str | None) -> float:
    """A ratio as a float (``"inf"`` becomes infinity)."""
    return float("inf") if value == "inf" else float(value or 0.0)


def _goal_met(value: float | str | None, goal: float, *, below: bool) -> bool | None:
    if value is None:
        return None
    v = _as_float(value)
    return v <= goal if below else v >= goal


def compute_targets(
    rows: Sequence[Mapping[str, Any]],
    speed: Mapping[str, Any] | None = None,
    memory: Mapping[str, Any] | None = None,
    memory_skipped: str = "not run",
) -> list[Target]:
    """Check the benchmark's targets against the measured rows and summaries.

    Args:
        rows: Rows from :func:`make_rows`.
        speed: The summary from :func:`speed_summary`, or None when the speed set did not run.
        memory: The summary from :func:`measure_memory`, or None when it did not run.
        memory_skipped: Why memory was not measured (shown in place of a value).

    Returns:
        Targets 1, 2, 3, 4a, 4b, 5a, 5b, 5c and 6, in that order; a target is ``met=None``
        when this run measured nothing it applies to.
    """
    runs = {name: r for name, r in _by_dataset(rows).items() if "pgkm" in r}
    return [
        _target_no_empty(runs),
        _target_fewer_empties(runs),
        _target_no_repair_pass(runs),
        _target_sse_vs_best(runs),
        _target_sse_vs_fairseq(runs),
        *_targets_speed(speed),
        _target_total_time(runs),
        _target_memory(memory, memory_skipped),
    ]


_Runs = Mapping[str, Mapping[str, Mapping[str, Any]]]  # data set -> method -> row


def _failing(items: Mapping[str, object]) -> str:
    return "failing: " + ", ".join(f"{n} ({v})" for n, v in items.items()) if items else ""


def _target_no_empty(runs: _Runs) -> Target:
    # Fewer distinct points than k leave empty clusters by necessity.
    eligible = [r["pgkm"] for r in runs.values() if r["pgkm"]["n_distinct"] >= r["pgkm"]["k"]]
    left = {r["dataset"]: int(r["empty_final"]) for r in eligible if r["empty_final"]}
    return Target(
        id="1",
        name="pgkm empty clusters left (Σ empty_final where n_distinct ≥ k)",
        measured=sum(left.values()) if eligible else None,
        target="0",
        met=(not left) if eligible else None,
        note=_failing(left) or f"{len(eligible)} data sets",
        detail={"datasets_checked": len(eligible), "failing": left},
    )


def _target_fewer_empties(runs: _Runs) -> Target:
    hard = [
        r
        for r in runs.values()
        if "fairseq-em" in r and r["pgkm"]["regime"] in ("zero20", "zero50", "fp16", "large-k")
    ]
    fs_sum = sum(int(r["fairseq-em"]["empty_total"]) for r in hard)
    pg_sum = sum(int(r["pgkm"]["empty_total"]) for r in hard)
    # 0 / 0: neither method met an empty cluster, so the ratio says nothing.
    ratio = None if not hard or fs_sum == pg_sum == 0 else _ratio(fs_sum, pg_sum)
    return Target(
        id="2",
        name="Σ fairseq-em empty_total / Σ pgkm empty_total (zero-block, fp16, large-K)",
        measured=ratio if hard else None,
        target=f"≥ {EMPTY_RATIO_GOAL:g}",
        met=_goal_met(ratio, EMPTY_RATIO_GOAL, below=False),
        note=f"fairseq-em {fs_sum} / pgkm {pg_sum} over {len(hard)} data sets",
        detail={
            "datasets": len(hard),
            "fairseq_em_empty_total": fs_sum,
            "pgkm_empty_total": pg_sum,
        },
    )


def _target_no_repair_pass(runs: _Runs) -> Target:
    extra = {
        name: int(r["pgkm"]["distance_passes"]) - int(r["pgkm"]["iterations"])
        for name, r in runs.items()
        if r["pgkm"]["distance_passes"] != r["pgkm"]["iterations"]
    }
    return Target(
        id="3",
        name="data sets where pgkm distance_passes ≠ iterations",
        measured=len(extra) if runs else None,
        target="0",
        met=(not extra) if runs else None,
        note=_failing(extra) or f"{len(runs)} data sets",
        detail={"datasets_checked": len(runs), "extra_passes": extra},
    )


def _worst(
    ratios: Mapping[str, float | str | None],
) -> tuple[str | None, float | str | None]:
    """The data set with the largest ratio and that ratio (None, None when there is none)."""
    if not ratios:
        return None, None
    name = max(ratios, key=lambda n: _as_float(ratios[n]))
    return name, ratios[name]


def _target_sse_vs_best(runs: _Runs) -> Target:
    ratios = {
        name: r["pgkm"]["sse_vs_best_baseline"]
        for name, r in runs.items()
        if r["pgkm"]["regime"] != "speed" and r["pgkm"]["sse_vs_best_baseline"] is not None
    }
    worst, value = _worst(ratios)
    return Target(
        id="4a",
        name="worst pgkm SSE / best baseline SSE (real data sets)",
        measured=value,
        target=f"≤ {SSE_RATIO_GOAL:g}",
        met=_goal_met(value, SSE_RATIO_GOAL, below=True),
        note="" if worst is None else f"at {worst}",
        detail={"datasets_checked": len(ratios), "worst_dataset": worst},
    )


def _target_sse_vs_fairseq(runs: _Runs) -> Target:
    ratios = {
        name: _ratio(r["pgkm"]["sse"], r["fairseq-em"]["sse"])
        for name, r in runs.items()
        if "fairseq-em" in r and r["pgkm"]["variant"] in ("zero20", "zero50")
    }
    worst, value = _worst(ratios)
    return Target(
        id="4b",
        name="worst pgkm SSE / fairseq-em SSE (zero-block data sets)",
        measured=value,
        target="< 1",
        met=None if value is None else _as_float(value) < 1.0,
        note="" if worst is None else f"at {worst}",
        detail={"datasets_checked": len(ratios), "worst_dataset": worst},
    )


def _targets_speed(speed: Mapping[str, Any] | None) -> list[Target]:
    name_a = "pgkm / faiss seconds per iteration (300k x 8, K 256)"
    name_b = "pgkm time to faiss's final SSE / faiss total time (goal)"
    if speed is None:
        return [
            Target(id="5a", name=name_a, measured=None, target=f"≤ {SPEED_RATIO_GOAL:g}", met=None),
            Target(id="5b", name=name_b, measured=None, target=f"≤ {TIME_TO_SSE_GOAL:g}", met=None),
        ]
    spi = speed["seconds_per_iter_ratio"]
    a = Target(
        id="5a",
        name=name_a,
        measured=spi,
        target=f"≤ {SPEED_RATIO_GOAL:g}",
        met=_goal_met(spi, SPEED_RATIO_GOAL, below=True),
        note=(
            f"pgkm {speed['pgkm_seconds_per_iter']:.4f} s, "
            f"faiss {speed['faiss_seconds_per_iter']:.4f} s"
        ),
        detail=dict(speed),
    )
    reached = speed["time_to_faiss_sse_ratio"]
    if reached is None:
        measured: float | str = "never reached"
        met = False
        note = f"pgkm's SSE stayed above faiss's {speed['faiss_sse']:.6g}"
    else:
        measured = reached
        met = bool(_goal_met(reached, TIME_TO_SSE_GOAL, below=True))
        note = (
            f"iteration {speed['pgkm_iterations_to_faiss_sse']} at "
            f"{speed['pgkm_seconds_to_faiss_sse']:.2f} s; faiss {speed['faiss_seconds']:.2f} s"
        )
    b = Target(
        id="5b",
        name=name_b,
        measured=measured,
        target=f"≤ {TIME_TO_SSE_GOAL:g}",
        met=met,
        note=note,
        detail={
            "iterations": speed["pgkm_iterations_to_faiss_sse"],
            "seconds": speed["pgkm_seconds_to_faiss_sse"],
            "faiss_seconds": speed["faiss_seconds"],
            "faiss_sse": speed["faiss_sse"],
        },
    )
    return [a, b]


def _target_total_time(runs: _Runs) -> Target:
    ratios = {
        name: _ratio(r["pgkm"]["seconds"], r["faiss"]["seconds"])
        for name, r in runs.items()
        if "faiss" in r
    }
    worst, value = _worst(ratios)
    over = {n: round(_as_float(v), 3) for n, v in ratios.items() if _as_float(v) > TOTAL_TIME_GOAL}
    return Target(
        id="5c",
        name="worst pgkm / faiss total seconds (every data set, same n_iter)",
        measured=value,
        target=f"≤ {TOTAL_TIME_GOAL:g}",
        met=_goal_met(value, TOTAL_TIME_GOAL, below=True),
        note="" if worst is None else f"at {worst}; {len(over)} of {len(ratios)} data sets over",
        detail={"datasets_checked": len(ratios), "worst_dataset": worst, "over": over},
    )


def _target_memory(memory: Mapping[str, Any] | None, skipped: str) -> Target:
    name = f"peak RSS (GB), pgkm on {_MEM_N // 1_000_000}M x {_MEM_D}, K {_MEM_K}"
    goal = f"< {MEMORY_GOAL_BYTES / 1e9:g}"
    if memory is None:
        return Target(id="6", name=name, measured=skipped, target=goal, met=None)
    peak = int(memory["peak_rss_bytes"])
    return Target(
        id="6",
        name=name,
        measured=round(peak / 1e9, 3),
        target=goal,
        met=peak < MEMORY_GOAL_BYTES,
        note=(
            f"baseline (imports + input) {format_bytes(memory['baseline_rss_bytes'])}, "
            f"input {format_bytes(memory['input_bytes'])}"
        ),
        detail=dict(memory),
    )


# --- memory ------------------------------------------------------------------------------------


def memory_child(kind: str, n: int, d: int, k: int, n_iter: int, seed: int, threads: int) -> None:
    """Body of the memory child process; writes one JSON line to stdout.

    Args:
        kind: ``baseline`` (only imports and the input) or ``pgkm`` (also clusters).
        n: Points.
        d: Dimension.
        k: Centroids.
        n_iter: Iterations.
        seed: Seed of the data and of the run.
        threads: torch and faiss threads.
    """
    torch.set_num_threads(threads)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))  # (n, d) float32
    out: dict[str, Any] = {"kind": kind}
    if kind == "pgkm":
        if faiss_available():
            import_faiss().omp_set_num_threads(threads)
        out.update(cluster(x, k, method="pgkm", n_iter=n_iter, seed=seed).stats.as_dict())
    out["own_peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write(json.dumps(out) + "\n")


def _run_child(
    kind: str, n: int, d: int, k: int, n_iter: int, seed: int, threads: int
) -> tuple[int, dict[str, Any]]:
    """Run :func:`memory_child` in a fresh interpreter; return its peak RSS and its output."""
    code = (
        "from dist_pgkm.bench.kmeans import memory_child; "
        f"memory_child({kind!r}, {n}, {d}, {k}, {n_iter}, {seed}, {threads})"
    )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err)
        # The child reports its own VmHWM; wait4's rusage is the fallback off Linux (and
        # RUSAGE_CHILDREN would be the maximum over every child reaped so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(
            f"the memory benchmark child ({kind}) exited with {proc.returncode}:\n{stderr[-2000:]}"
        )
    report = json.loads(stdout.strip().splitlines()[-1])
    own = report.get("own_peak_rss_bytes")
    peak = int(own) if own is not None else int(usage.ru_maxrss) * 1024  # KiB on Linux
    return peak, report


def measure_memory(
    seed: int,
    threads: int,
    n: int = _MEM_N,
    d: int = _MEM_D,
    k: int = _MEM_K,
    n_iter: int = _MEM_ITERS,
) -> dict[str, Any]:
    """Peak RSS of pgkm on ``n`` x ``d`` random points, each run in a fresh child process.

    Two children run: a baseline that only imports torch and dist_pgkm and allocates the input,
    and one that also clusters it; their difference is what clustering costs.

    Returns:
        ``n``, ``d``, ``k``, ``n_iter``, ``input_bytes``, ``baseline_rss_bytes``,
        ``peak_rss_bytes`` and the pgkm run's ``seconds``, ``iterations``, ``sse``,
        ``empty_final``.

    Raises:
        RuntimeError: A child process failed.
    """
    base, _ = _run_child("baseline", n, d, k, n_iter, seed, threads)
    peak, stats = _run_child("pgkm", n, d, k, n_iter, seed, threads)
    return {
        "dataset": MEMORY_DATASET,
        "method": "pgkm",
        "n": n,
        "d": d,
        "k": k,
        "n_iter": n_iter,
        "input_bytes": n * d * 4,
        "baseline_rss_bytes": base,
        "peak_rss_bytes": peak,
        "seconds": stats["seconds"],
        "iterations": stats["iterations"],
        "sse": stats["sse"],
        "empty_final": stats["empty_final"],
    }


# --- run ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use ``n`` torch and faiss threads inside the block, then restore the previous counts."""
    faiss = import_faiss() if faiss_available() else None
    old_torch = torch.get_num_threads()
    old_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if faiss is not None:
            faiss.omp_set_num_threads(old_faiss)


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"unknown or no method(s) {unknown or list(methods)}; choose among "
            f"{', '.join(ALL_METHODS)} (comma-separated)."
        )


def run_benchmark(options: BenchOptions, progress: ProgressHook | None = None) -> KMeansReport:
    """Run the k-means benchmark.

    Args:
        options: What to run.
        progress: Called before each clustering run (and memory child) for progress display.

    Returns:
        The report, targets computed.

    Raises:
        ConfigError: Unknown method, or a data set pattern matching nothing.
        ModelSourceError: A model is not installed.
    """
    _check_methods(options.methods)
    specs = select_datasets(options.quick, options.datasets)
    threads = options.threads or available_cores()
    run_memory = (
        options.memory
        and not options.quick
        and (
            not options.datasets
            or any(fnmatch.fnmatchcase(MEMORY_DATASET, p) for p in options.datasets)
        )
    )
    plan = [(s, [m for m in s.methods if m in options.methods]) for s in specs]
    total = sum(len(methods) for _, methods in plan) + (2 if run_memory else 0)
    done = 0
    start = time.perf_counter()
    report = KMeansReport(
        mode=options.mode,
        command=options.command,
        machine={},
        commit=git_commit(),
        date=utc_now(),
        options={
            "n_iter": options.n_iter,
            "seed": options.seed,
            "methods": list(options.methods),
            "memory": options.memory,
            "threads": threads,
            "datasets": list(options.datasets),
            "backend": "auto",
        },
    )
    cache = _TensorCache()
    with _threads(threads):
        faiss_threads = import_faiss().omp_get_max_threads() if faiss_available() else None
        report.machine = machine_info(
            {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss_threads}
        )
        for spec, methods in plan:
            if not methods:
                continue
            x = build_subvectors(spec, cache)
            n_iter = spec.n_iter or options.n_iter
            logger.info("%s: %d x %d %s, K %d", spec.name, *x.shape, x.dtype, spec.k)
            stats: dict[str, dict[str, Any]] = {}
            for method in methods:
                if progress is not None:
                    progress(done, total, f"{spec.name} · {method}")
                res = cluster(
                    x, spec.k, method=method, n_iter=n_iter, seed=options.seed, backend="auto"
                )
                stats[method] = res.stats.as_dict()
                done += 1
                logger.info(
                    "%s %s: %d empty total, SSE %.6g, %.2f s",
                    spec.name,
                    method,
                    res.stats.empty_total,
                    res.stats.sse,
                    res.stats.seconds,
                )
                del res
            report.rows.extend(make_rows(spec, stats, n_iter))
            if spec.regime == "speed" and {"pgkm", "faiss"} <= stats.keys():
                report.speed = speed_summary(spec.name, stats["pgkm"], stats["faiss"])
        if run_memory:
            if progress is not None:
                progress(done, total, f"{MEMORY_DATASET} · peak memory (2 child processes)")
            report.memory = measure_memory(options.seed, threads)
            done += 2
    if progress is not None:
        progress(done, total, "done")
    if options.quick:
        skipped = "not run (quick mode)"
    elif not options.memory:
        skipped = "not run (--no-memory)"
    else:
        skipped = "not run (data sets restricted)"
    report.targets = compute_targets(report.rows, report.speed, report.memory, skipped)
    report.seconds = time.perf_counter() - start
    return report


# --- rendering ---------------------------------------------------------------------------------

_COLUMNS = (
    "dataset",
    "method",
    "n (distinct)",
    "k",
    "empty init/total/final",
    "repairs",
    "dist. passes",
    "iters",
    "SSE",
    "×best",
    "s",
    "s/iter",
    "aborted",
)
_ALIGN = "llrrrrrrrrrrl"


def _fmt_ratio(value: float | str | None) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value:.4f}"


def _cells(row: Mapping[str, Any]) -> list[str]:
    n = f"{row['n']}" if row["n_distinct"] == row["n"] else f"{row['n']} ({row['n_distinct']})"
    return [
        row["dataset"],
        row["method"],
        n,
        str(row["k"]),
        f"{row['empty_after_init']}/{row['empty_total']}/{row['empty_final']}",
        str(row["repair_passes"]),
        str(row["distance_passes"]),
        str(row["iterations"]),
        f"{row['sse']:.6g}",
        _fmt_ratio(row["sse_vs_best_baseline"]),
        f"{row['seconds']:.2f}",
        f"{row['seconds_per_iter']:.3g}",
        "yes" if row["aborted"] else "",
    ]


def _memory_lines(memory: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        ("input", format_bytes(memory["input_bytes"])),
        ("baseline RSS (imports + input)", format_bytes(memory["baseline_rss_bytes"])),
        ("peak RSS (pgkm)", format_bytes(memory["peak_rss_bytes"])),
        ("pgkm run", f"{memory['iterations']} iterations, {memory['seconds']:.1f} s"),
    ]


def render_report(console: Console, report: KMeansReport) -> None:
    """Print the results, memory and targets tables to ``console``."""
    table = Table(title=f"k-means benchmark ({report.mode})", title_justify="left")
    for col, align in zip(_COLUMNS, _ALIGN, strict=True):
        table.add_column(col, justify="right" if align == "r" else "left")
    previous = None
    for row in report.rows:
        cells = _cells(row)
        if row["dataset"] == previous:
            cells[0] = ""
        elif previous is not None:
            table.add_section()
        previous = row["dataset"]
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    if report.memory is not None:
        mem = Table(title=f"Memory: pgkm on {MEMORY_DATASET}", title_justify="left")
        mem.add_column("")
        mem.add_column("value", justify="right")
        for label, value in _memory_lines(report.memory):
            mem.add_row(label, value)
        console.print(mem)
    console.print(targets_rich_table(report.targets))
    console.print(
        f"{report.mode} mode, {report.seconds:.1f} s, commit {report.commit or 'unknown'}",
        markup=False,
        highlight=False,
    )


_ABOUT = (
    "Every method of `dist_pgkm.cluster` on the same sub-vectors of real SmolLM2-135M and "
    "all-MiniLM-L6-v2 layers (clean; 20 % / 50 % zero blocks; fp16; K = 4096 / 65536 with only "
    "a few sub-vectors per centroid), same `n_iter`, seed and `backend=auto`; a 300k x 8 speed "
    "set (pgkm vs faiss); four hard 80k x 8 synthetic sets (heavy tails, exact zeros, rows "
    "from a small pool, all three in fp16; pgkm, faiss, k-means++) and, in full mode, peak "
    "memory on 10M x 8. Target 5c is pgkm's whole call over faiss's on every set. Empties are "
    "counted after init / over all iterations / at the end; ×best is SSE over the best non-pgkm "
    "SSE. "
    "Column definitions: docs/kmeans.md."
)


def markdown_section(report: KMeansReport) -> str:
    """The report as markdown: command, machine line, results table, targets table."""
    lines = [
        f"### k-means ({report.mode} mode)",
        "",
        _ABOUT,
        "",
        f"Command: `{report.command}` ({report.seconds:.0f} s)",
        "",
        machine_line(report.machine, report.commit, report.date),
        "",
        markdown_table(
            _COLUMNS, [_cells(r) for r in report.rows], align=_ALIGN, group_first_column=True
        ),
    ]
    if report.memory is not None:
        lines += [
            markdown_table(["memory", "value"], _memory_lines(report.memory), align="lr"),
        ]
    lines += [targets_markdown(report.targets)]
    return "\n".join(lines)


def write_markdown(path: Path, report: KMeansReport) -> None:
    """Rewrite the ``kmeans`` section of the markdown file ``path`` (created if absent)."""
    replace_marker_section(path, "kmeans", markdown_section(report), intro=MARKDOWN_INTRO)


# --- the activation-aware path: hessian vs plain per layer shape --------------------------------

AWARE_LEVELS: dict[int, str] = {4: "llm-4bit.yaml", 3: "llm-3bit.yaml", 2: "llm-2bit.yaml"}
"""Bit level -> the LLM preset whose block size, K, n_iter, scales and outliers are used."""
# One layer per distinct SmolLM2-135M Linear shape (v_proj = k_proj, o_proj = q_proj,
# up_proj = gate_proj).
AWARE_LAYERS: tuple[tuple[str, str], ...] = (
    ("q_proj", _SM0 + "self_attn.q_proj.weight"),
    ("k_proj", _SM0 + "self_attn.k_proj.weight"),
    ("gate_proj", _SM0 + "mlp.gate_proj.weight"),
    ("down_proj", _SM0 + "mlp.down_proj.weight"),
)
HESSIAN_TIME_GOAL = 1.5
_CALIB_TOKENS = 4096
_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class AwareOptions:
    """What the ``--aware`` part runs.

    Attributes:
        levels: Bit levels (keys of :data:`AWARE_LEVELS`).
        layers: Layer labels (from :data:`AWARE_LAYERS`).
        repeats: Timed runs of each (plain, hessian) pair, interleaved; the minimum is kept.
        threads: torch and faiss threads (None: the cores this process may use).
        command: The command line, recorded in the report.
    """

    levels: tuple[int, ...] = (4, 3, 2)
    layers: tuple[str, ...] = tuple(label for label, _ in AWARE_LAYERS)
    repeats: int = 2
    threads: int | None = None
    command: str = "dist-pgkm bench kmeans --aware"


def synthetic_hessian(width: int, block_size: int, seed: int = _DATA_SEED) -> torch.Tensor:
    """``(width / bs, bs, bs)`` diagonal blocks of ``X^T X`` for ``4096`` synthetic tokens.

    The activations are Gaussian with a log-normal scale per input channel and a shared
    component (so blocks are correlated and a few channels dominate, as in LLM activations).
    Only the timing is measured with it; the metric's numbers do not change the work done.
    """
    g = torch.Generator().manual_seed(seed + width)
    scale = torch.exp(torch.randn(width, generator=g))  # (width,)
    shared = torch.randn(_CALIB_TOKENS, 1, generator=g)
    x = (torch.randn(_CALIB_TOKENS, width, generator=g) + 0.5 * shared) * scale  # (T, width)
    blocks = x.reshape(_CALIB_TOKENS, -1, block_size)  # (T, G, bs)
    return torch.einsum("tgi,tgj->gij", blocks, blocks)


def _preset_rule(level: int) -> tuple[LayerRule, int, float]:
    """The preset's first rule, its n_iter and its damping."""
    config = load_config(_CONFIGS / AWARE_LEVELS[level])
    return config.rules[0], config.n_iter, config.calibration.damp


def run_aware(options: AwareOptions, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Time ``quantize_weight`` with ``metric: hessian`` against the same rule with ``metric:
    weight`` (same block size, K, n_iter, scales, outliers), per SmolLM2 layer shape and level.

    The two runs of a pair are interleaved (plain, hessian, plain, hessian, ...) so both see
    the same machine load; the ratio is the point. Each row also records a sha256 of the
    hessian result's codes and codebook, so a change of the code path can be checked for
    unchanged output.

    Returns:
        The JSON document: ``benchmark`` (``kmeans-aware``), ``command``, ``machine``,
        ``commit``, ``date``, ``seconds``, ``rows`` and ``targets``.
    """
    import hashlib

    from dist_pgkm.pq.quantize import quantize_weight

    layers = [(label, t) for label, t in AWARE_LAYERS if label in options.layers]
    threads = options.threads or available_cores()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cache = _TensorCache()
    total = len(layers) * len(options.levels)
    with _threads(threads):
        machine = machine_info({"torch_threads": torch.get_num_threads(), "load": os.getloadavg()})
        for level in options.levels:
            rule, n_iter, damp = _preset_rule(level)
            for label, tensor in layers:
                if progress is not None:
                    progress(len(rows), total, f"~{level}b {label}")
                weight = cache.get("smollm2", tensor)
                h = synthetic_hessian(weight.shape[1], int(rule.block_size or 0))
                times: dict[str, list[float]] = {"weight": [], "hessian": []}
                cpu: dict[str, list[float]] = {"weight": [], "hessian": []}
                results: dict[str, Any] = {}
                for _ in range(options.repeats):
                    for metric in ("weight", "hessian"):
                        opts = rule.quant_options().model_copy(update={"metric": metric})
                        t0, c0 = time.perf_counter(), time.process_time()
                        q = quantize_weight(
                            weight,
                            int(rule.block_size or 0),
                            int(rule.k or 0),
                            seed=0,
                            name=label,
                            options=opts,
                            hessian=h,
                            damp=damp,
                            n_iter=n_iter,
                        )
                        times[metric].append(time.perf_counter() - t0)
                        cpu[metric].append(time.process_time() - c0)
                        results[metric] = q
                hq = results["hessian"]
                digest = hashlib.sha256(
                    hq.codes.numpy().tobytes() + hq.centroids.numpy().tobytes()
                ).hexdigest()[:16]
                plain_s, hess_s = min(times["weight"]), min(times["hessian"])
                rows.append(
                    {
                        "level": level,
                        "layer": label,
                        "shape": list(weight.shape),
                        "block_size": rule.block_size,
                        "k": rule.k,
                        "n_iter": n_iter,
                        "plain_seconds": plain_s,
                        "hessian_seconds": hess_s,
                        "ratio": hess_s / plain_s,
                        "plain_all": times["weight"],
                        "hessian_all": times["hessian"],
                        # CPU seconds of all threads: what a loaded machine inflates least.
                        "plain_cpu_seconds": min(cpu["weight"]),
                        "hessian_cpu_seconds": min(cpu["hessian"]),
                        "cpu_ratio": min(cpu["hessian"]) / min(cpu["weight"]),
                        "plain_sse": results["weight"].stats.sse,
                        "hessian_sse": hq.stats.sse,
                        "hessian_metric_sse": hq.stats.metric_sse,
                        "hessian_digest": digest,
                        "load_after": os.getloadavg()[0],
                    }
                )
    worst = max(rows, key=lambda r: r["ratio"]) if rows else None
    target = Target(
        id="A1",
        name="worst hessian / plain quantize seconds per layer (same bs, K, n_iter)",
        measured=None if worst is None else worst["ratio"],
        target=f"≤ {HESSIAN_TIME_GOAL:g}",
        met=None if worst is None else worst["ratio"] <= HESSIAN_TIME_GOAL,
        note="" if worst is None else f"at ~{worst['level']}b {worst['layer']}",
    )
    return {
        "benchmark": "kmeans-aware",
        "command": options.command,
        "machine": machine,
        "commit": git_commit(),
        "date": utc_now(),
        "seconds": time.perf_counter() - start,
        "options": {"levels": list(options.levels), "repeats": options.repeats, "threads": threads},
        "rows": rows,
        "targets": [target.as_dict()],
    }


_AWARE_COLUMNS = (
    "level",
    "layer",
    "shape",
    "bs",
    "K",
    "plain s",
    "hessian s",
    "ratio",
    "CPU ratio",
    "SSE plain / hessian",
)


def aware_markdown(report: Mapping[str, Any]) -> str:
    """The ``--aware`` report as markdown: command, machine line, per-layer table, target."""
    cells = [
        (
            f"~{r['level']}b",
            r["layer"],
            "x".join(str(s) for s in r["shape"]),
            str(r["block_size"]),
            str(r["k"]),
            f"{r['plain_seconds']:.2f}",
            f"{r['hessian_seconds']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['plain_sse']:.5g} / {r['hessian_sse']:.5g}",
        )
        for r in report["rows"]
    ]
    t = report["targets"][0]
    status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
    measured = "—" if t["measured"] is None else f"{t['measured']:.2f}"
    return "\n".join(
        [
            "### Activation-aware clustering time (hessian vs plain)",
            "",
            "`quantize_weight` on SmolLM2-135M layer-0 weights (one per distinct Linear shape) "
            "with each LLM preset's rule (block size, K, n_iter, row scales, outliers), "
            "`metric: hessian` against `metric: weight`, interleaved in one run; minimum of "
            "the repeats. H is synthetic (4096 Gaussian tokens, log-normal channel scales): "
            "the timing is the point. CPU ratio: the same with CPU seconds of all threads, "
            "which a loaded machine inflates least. SSE: the Euclidean SSE of each.",
            "",
            f"Command: `{report['command']}` ({report['seconds']:.0f} s)",
            "",
            machine_line(report["machine"], report["commit"], report["date"])
            + f" · load {report['machine']['load'][0]:.1f} at start",
            "",
            markdown_table(_AWARE_COLUMNS, cells, align="llrrrrrrrr"),
            f"Target: {t['name']}: {measured} (goal {t['target']}, {status}; {t['note']}).",
        ]
    )


def write_aware_markdown(path: Path, report: Mapping[str, Any]) -> None:
    """Rewrite the ``kmeans-aware`` section of the markdown file ``path``."""
    replace_marker_section(path, "kmeans-aware", aware_markdown(report), intro=MARKDOWN_INTRO)


# --- a busy machine: the in-process path beside a CPU hog, against Ray workers -----------------

HOG_RATIO_GOAL = 1.3


def run_hog(
    workers: int = 2, hogs: int | None = None, config_name: str = "minilm-ipq.yaml"
) -> dict[str, Any]:
    """``quantize`` MiniLM in-process and on ``workers`` Ray workers, each beside a CPU hog.

    The hog is ``hogs`` busy-looping processes (default: one per available core) started
    before each run and killed after it. Both runs must give the same bytes (checked).

    Returns:
        The JSON document: ``benchmark`` (``kmeans-hog``), ``machine``, ``commit``, ``date``,
        ``rows`` (per mode: seconds, CPU seconds of this process, load average, sha256 of
        ``model.safetensors``) and ``targets``.
    """
    import hashlib

    from dist_pgkm.distributed.coordinator import quantize_model
    from dist_pgkm.utils.threads import set_threads

    n_hogs = hogs or available_cores()
    config = load_config(_CONFIGS / config_name)
    model = _MODEL_DIRS["minilm"]()
    rows: list[dict[str, Any]] = []
    machine = machine_info({"load": os.getloadavg(), "hogs": n_hogs})
    for mode, n_workers in (("in-process", 0), (f"ray x{workers}", workers)):
        set_threads()  # what `dist-pgkm quantize` does before it starts
        procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_hogs)
        ]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "q"
                load = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    quantize_model(model, config, out, workers=n_workers)
                    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
                except DistributedError as exc:  # e.g. Ray workers not placed on a busy machine
                    digest = f"failed: {exc}"
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - c0
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        rows.append(
            {
                "mode": mode,
                "workers": n_workers,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "load_at_start": load,
                "sha256": digest,
            }
        )
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    target = Target(
        id="H1",
        name=f"in-process / Ray ({workers} workers) seconds beside {n_hogs} CPU hogs",
        measured=ratio,
        target=f"≤ {HOG_RATIO_GOAL:g}",
        met=ratio <= HOG_RATIO_GOAL and rows[0]["sha256"] == rows[1]["sha256"],
        note=f"same bytes: {rows[0]['sha256'] == rows[1]['sha256']}",
    )
    return {
        "benchmark": "kmeans-hog",
        "machine": machine,
        "commit": git_commit(),
        "date": utc_now(),
        "config": config_name,
        "rows": rows,
        "targets": [target.as_dict()],
    }


def hog_markdown(report: Mapping[str, Any]) -> str:
    """The ``--hog`` report as markdown."""
    cells = [
        (
            r["mode"],
            f"{r['seconds']:.1f}",
            f"{r['cpu_seconds']:.1f}",
            f"{r['load_at_start']:.1f}",
            r["sha256"][:12],
        )
        for r in report["rows"]
    ]
    t = report["targets"][0]
    status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
    return "\n".join(
        [
            "### A busy machine: in-process vs Ray beside a CPU hog",
            "",
            f"`quantize minilm-l6 --config configs/{report['config']}` in-process and on Ray "
            f"workers, each beside {report['machine']['hogs']} busy-looping processes.",
            "",
            machine_line(report["machine"], report["commit"], report["date"]),
            "",
            markdown_table(
                ("mode", "s", "driver CPU s", "load at start", "sha256"), cells, align="lrrrl"
            ),
            f"Target: {t['name']}: {t['measured']:.2f} (goal {t['target']}, {status}; "
            f"{t['note']}).",
        ]
    )


def write_hog_markdown(path: Path, report: Mapping[str, Any]) -> None:
    """Rewrite the ``kmeans-hog`` section of the markdown file ``path``."""
    replace_marker_section(path, "kmeans-hog", hog_markdown(report), intro=MARKDOWN_INTRO)
