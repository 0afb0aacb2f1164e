"""``dist-pgkm bench dkm``: DKM, IDKM and IDKM-JFB on a real layer as the iterations t grow.

Part ``memory`` (issue 6 §3). SmolLM2-135M's ``model.layers.0.mlp.up_proj`` weight
(``(1536, 576)``, float32) is cut into sub-vectors of 8, started from a 256-centroid PG k-means
codebook, and for each method and ``t`` a fresh child process runs::

    c = soft_kmeans(x, c0, tau, t, method, chunk=chunk)     # x requires grad
    loss = (soft_weight(x, c, tau, chunk) * g).sum()         # g: a fixed random probe
    loss.backward()

with ``tau`` as :class:`~dist_pgkm.dkm.wrap.DKMLayer` sets it (1.0 times the mean squared
distance of a sub-vector to its nearest initial centroid). Each child reports

* **autograd saved**: the distinct storages the forward hands to autograd's saved-tensor hook,
  other than ``x``'s and ``g``'s own (which exist anyway);
* **peak RSS**: the process's high-water RSS during the first forward + backward above the RSS
  just before it. The high-water mark is reset first by writing ``5`` to
  ``/proc/self/clear_refs`` (so loading the inputs does not count); where that is not allowed,
  the baseline is the high-water mark itself (``peak_method`` says which). A warm-up on 1,024
  sub-vectors precedes it, so that one-time initialisation (thread pool, kernels) is not billed
  to the first case while nothing of the measured size has been allocated and freed yet;
* **forward / backward seconds**: the median of the runs (the first is the memory run; its
  saved-tensor hook costs one dictionary insert per saved tensor);
* IDKM's backward solve: iterations, last residual, fallbacks to the Jacobian-free gradient.

``chunk`` defaults to None (the whole ``(n, k)`` attention at once), where the memory story is
plainest: unrolled DKM keeps every step's attention. With a chunk (``add_dkm`` uses one) the
steps are checkpointed and DKM keeps only the centroids per step (``--chunk N`` to see it).

Targets: DKM's saved bytes grow linearly in ``t`` (least-squares R² >= 0.99); IDKM's and
IDKM-JFB's peak RSS at t = 16 within 1.1x of t = 1; IDKM-JFB's backward time at t = 16 within
1.2x of t = 1. The JFB backward does the same work whatever ``t`` (one step's graph), so the
ratio is 1 up to timing noise. 1.2 leaves room for that noise on a shared 2-core machine (single
runs of this same backward at different ``t`` were up to ~1.2x apart while a CI job ran beside
them) while DKM's backward, which grows about t-fold, stays far outside it.

Part ``quality`` (issue 6 §2): each method fine-tunes a model at the same bits with the same
budget, and the result is evaluated as ``bench ptq`` evaluates (same held-out data):

* **SmolLM2-135M** (held-out perplexity): the staged iPQ preset
  (``configs/smollm2-135m-ipq-finetune.yaml``: MLP, then the tied embedding / LM head, then
  attention; bs 8 / 4 / 8, K 256) with a smaller step budget (:data:`QUALITY`), because a
  DKM-family step clusters all 90 MLP weights softly in its forward;
* **all-MiniLM-L6-v2** (gloss-to-lemma retrieval top-1): ``configs/minilm-ipq-finetune.yaml``,
  the same three stages on the encoder, trained by distilling the original's sentence
  embeddings (``objective: embedding-distill``) on WordNet texts no retrieval query or
  candidate can be.

For every method the config is the preset's with only the MLP stage's ``method:`` (and its
``dkm:`` options) changed (:func:`quality_config`): ``ipq`` is staged iPQ + Quant-Noise with PG
k-means; ``dkm``, ``idkm``, ``idkm-jfb`` and ``lr2vq`` train that stage's float weights
through soft k-means started from the same PG k-means codebooks. Embeddings and attention are
``ipq`` stages for every method. Each run is the real ``dist-pgkm finetune`` in a child
process (its wall time and peak RSS are its own), loaded back with :func:`dist_pgkm.load` and
evaluated; the original model and one-shot ``dist-pgkm quantize`` with the same quantize
config are the reference rows.

A run of some parts (or some models and methods of the quality part) can start from an earlier
report (``--json`` of an existing file does): what it does not run is kept, with the commit and
machine it was measured on.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dist_pgkm.bench.common import (  # type: ignore[import-not-found, unused-ignore]
    MARKDOWN_INTRO,
    Target,
    format_bytes,
    format_value,
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    replace_marker_section,
    targets_markdown,
    targets_rich_table,
    utc_now,
)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dist_pgkm.dkm.functional import Method, SolverStats, soft_kmeans, soft_weight, sq_distances
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = [
    "METHODS",
    "PARTS",
    "QUALITY",
    "QUALITY_METHODS",
    "DKMBenchOptions",
    "DKMBenchReport",
    "QualitySpec",
    "compute_targets",
    "linear_fit",
    "markdown_section",
    "measure_case",
    "memory_child",
    "quality_cases",
    "quality_config",
    "quality_targets",
    "render_report",
    "run_benchmark",
    "write_markdown",
]

logger = logging.getLogger(__name__)

ProgressHook = Callable[[int, int, str], None]

PARTS = ("memory", "quality")
METHODS: tuple[Method, ...] = ("dkm", "idkm", "idkm-jfb")
MODEL = "smollm2-135m"
LAYER = "model.layers.0.mlp.up_proj"
BLOCK_SIZE = 8
K = 256
TAU = 1.0  # relative, as DKMOptions.tau
SEED = 0  # of the PG k-means start and of the probe g
ITERS = (1, 2, 4, 8, 16)
QUICK_ITERS = (1, 4)
QUICK_ROWS = 128  # output rows of the weight in quick mode: 128 * 576 / 8 = 9,216 sub-vectors
REPEATS = 3
QUICK_REPEATS = 2
WARMUP_ROWS = 1024
LINEAR_R2_GOAL = 0.99  # DKM's saved bytes against t
FLAT_PEAK_GOAL = 1.1  # IDKM / IDKM-JFB peak RSS, largest t / smallest t
JFB_BACKWARD_GOAL = 1.2  # IDKM-JFB backward seconds, largest t / smallest t (timing noise)

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUALITY_METHODS = ("ipq", "dkm", "idkm", "idkm-jfb", "lr2vq")
QUALITY_QUICK_STEPS = 1  # per stage, quick mode
BITS_SPREAD_GOAL = 0.01  # max / min bits per weight over one model's rows, minus 1


@dataclass(frozen=True)
class QualitySpec:
    """How the quality part trains one model: a finetune preset and the budget of every method.

    Attributes:
        model: Packaged model name (``dist-pgkm finetune MODEL``).
        preset: Finetune preset in ``configs/``; its quantize config sets every layer's block
            size and K (so the bits), its stages, learning rates and Quant-Noise are kept.
        stage: Name of the stage whose ``method:`` varies (the MLP: most of the weights).
        steps: Optimizer steps per stage, in the preset's order (None: the preset's).
        train: Overrides of the preset's ``train`` section (batch size, warm-up).
        dkm: ``dkm:`` options of every DKM-family method in that stage.
        method_dkm: Further ``dkm:`` options per method.
    """

    model: str
    preset: str
    stage: str
    steps: tuple[int, ...] | None = None
    train: Mapping[str, Any] = field(default_factory=dict)
    dkm: Mapping[str, Any] = field(default_factory=dict)
    method_dkm: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# Soft k-means options shared by the DKM family: 2 steps per forward from the previous step's
# centroids (with 1, DKM's unrolled gradient and JFB's are the same function), tau as
# DKMLayer's default. IDKM's backward solve is capped at 4 iterations (vector-Jacobian products
# through one soft step each): the default 50 would make one SmolLM2 step take hours on 2 cores
# (docs/dkm.md: the solve runs to its cap from PG k-means' codebooks). LR²VQ clusters its
# rank-d space (d by the rule) with IDKM-JFB, the cheapest gradient.
_DKM: dict[str, Any] = {"tau": 1.0, "iters": 2}
_METHOD_DKM: dict[str, dict[str, Any]] = {
    "idkm": {"solver_iters": 4},
    "lr2vq": {"rank": "auto", "clusterer": "idkm-jfb"},
}

QUALITY: dict[str, QualitySpec] = {
    # The preset as it is (minilm-ipq-finetune.yaml is this benchmark's budget).
    "minilm-l6": QualitySpec(
        model="minilm-l6",
        preset="minilm-ipq-finetune.yaml",
        stage="mlp",
        dkm=_DKM,
        method_dkm=_METHOD_DKM,
    ),
    # 4 steps per stage instead of the preset's 100 / 60 / 100: a DKM-family step clusters all
    # 90 MLP weights (110,592 sub-vectors x 256 centroids each) softly in its forward and
    # backward (tokens/s of each method in docs/benchmarks.md).
    "smollm2-135m": QualitySpec(
        model="smollm2-135m",
        preset="smollm2-135m-ipq-finetune.yaml",
        stage="mlp",
        steps=(4, 4, 4),
        train={"batch_size": 8, "warmup_steps": 1},
        dkm=_DKM,
        method_dkm=_METHOD_DKM,
    ),
}
"""The models of the quality part and the budget every method gets on each."""


@dataclass(frozen=True)
class DKMBenchOptions:
    """What to run.

    Attributes:
        quick: t in :data:`QUICK_ITERS` on the first :data:`QUICK_ROWS` output rows of the
            layer, :data:`QUICK_REPEATS` runs per case: a smoke run, targets not judged.
        parts: Parts to run (:data:`PARTS`).
        work_dir: Where the inputs shared by the child processes are written (default: a temp
            dir removed at the end).
        command: The command line, recorded in the report.
        chunk: Sub-vectors per piece of the attention (None: the whole ``(n, k)`` at once).
        repeats: Runs per case, the first being the memory run (default: :data:`REPEATS`, or
            :data:`QUICK_REPEATS` in quick mode).
        models: Models of the quality part (keys of :data:`QUALITY`).
        methods: Methods of the quality part (:data:`QUALITY_METHODS`); the original and
            one-shot rows come with any of them.

    Raises:
        InvalidInputError: An unknown part, model or method, ``chunk < 1`` or ``repeats < 1``.
    """

    quick: bool = False
    parts: tuple[str, ...] = PARTS
    work_dir: Path | None = None
    command: str = "dist-pgkm bench dkm"
    chunk: int | None = None
    repeats: int | None = None
    models: tuple[str, ...] = tuple(QUALITY)
    methods: tuple[str, ...] = QUALITY_METHODS

    def __post_init__(self) -> None:
        for what, given, known in (
            ("parts", self.parts, PARTS),
            ("models", self.models, tuple(QUALITY)),
            ("methods", self.methods, QUALITY_METHODS),
        ):
            if not given or any(g not in known for g in given):
                raise InvalidInputError(
                    f"bench dkm {what} {list(given)}: choose among {', '.join(known)}."
                )
        if (self.chunk is not None and self.chunk < 1) or (
            self.repeats is not None and self.repeats < 1
        ):
            raise InvalidInputError(
                f"bench dkm needs chunk >= 1 (or none) and repeats >= 1; got chunk={self.chunk}, "
                f"repeats={self.repeats}."
            )

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def iters(self) -> tuple[int, ...]:
        return QUICK_ITERS if self.quick else ITERS

    @property
    def runs(self) -> int:
        if self.repeats is not None:
            return self.repeats
        return QUICK_REPEATS if self.quick else REPEATS


@dataclass
class DKMBenchReport:
    """Everything measured; :meth:`as_dict` is the JSON file, :meth:`from_dict` reads it back.

    ``setup`` holds what each part ran on, by part name; ``runs`` where and when each part last
    ran (command, commit, date, machine, seconds), by part name; ``memory_rows`` one row per
    method and ``t``; ``quality_rows`` one row per model and method (each with its commit).
    The top-level command, commit and date are the last invocation's.
    """

    mode: str
    command: str
    machine: dict[str, Any]
    commit: str | None
    date: str
    setup: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_rows: list[dict[str, Any]] = field(default_factory=list)
    quality_rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "dkm",
            "mode": self.mode,
            "command": self.command,
            "machine": self.machine,
            "commit": self.commit,
            "date": self.date,
            "seconds": self.seconds,
            "runs": self.runs,
            "setup": self.setup,
            "memory_rows": self.memory_rows,
            "quality_rows": self.quality_rows,
            "targets": [t.as_dict() for t in self.targets],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DKMBenchReport:
        """A report written by :meth:`as_dict` (an earlier run, possibly of fewer parts).

        Raises:
            InvalidInputError: ``data`` is not a ``bench dkm`` report.
        """
        if data.get("benchmark") != "dkm":
            raise InvalidInputError(
                f"not a bench dkm report (benchmark: {data.get('benchmark')!r}); pass the JSON "
                "file `dist-pgkm bench dkm --json` wrote, or another path to start a new one."
            )
        runs = {k: dict(v) for k, v in (data.get("runs") or {}).items()}
        if not runs and data.get("memory_rows"):  # written before runs were recorded per part
            runs["memory"] = {k: data.get(k) for k in _RUN_KEYS}
        return cls(
            mode=data["mode"],
            command=data["command"],
            machine=dict(data["machine"]),
            commit=data.get("commit"),
            date=data["date"],
            setup=dict(data.get("setup") or {}),
            runs=runs,
            memory_rows=list(data.get("memory_rows") or []),
            quality_rows=list(data.get("quality_rows") or []),
            targets=[Target(**t) for t in data.get("targets") or []],
            seconds=float(data.get("seconds") or 0.0),
        )


_RUN_KEYS = ("command", "commit", "date", "machine", "seconds")


# --- one case, in a child process -------------------------------------------------------------


def _solver_defaults() -> dict[str, Any]:
    """IDKM's backward-solve settings the benchmark runs with (``soft_kmeans``'s defaults)."""
    params = inspect.signature(soft_kmeans).parameters
    return {
        "solver_iters": params["solver_iters"].default,
        "solver_tol": params["solver_tol"].default,
    }


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _current_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _saved_storages(storages: dict[int, int], skip: Sequence[torch.Tensor]) -> Iterator[None]:
    """Record ``data_ptr -> nbytes`` of every storage autograd saves, except ``skip``'s."""
    skipped = {t.untyped_storage().data_ptr() for t in skip}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skipped:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _forward_backward(
    x: torch.Tensor,
    c0: torch.Tensor,
    g: torch.Tensor,
    tau: float,
    iters: int,
    method: Method,
    chunk: int | None,
    stats: SolverStats | None,
    storages: dict[int, int] | None = None,
) -> tuple[float, float]:
    """One forward and backward to ``x``; returns their seconds."""
    hooks = _saved_storages(storages, (x, g)) if storages is not None else contextlib.nullcontext()
    start = time.perf_counter()
    with hooks:
        c = soft_kmeans(x, c0, tau, iters, method, stats=stats, chunk=chunk)
        loss = (soft_weight(x, c, tau, chunk) * g).sum()
    mid = time.perf_counter()
    loss.backward()  # type: ignore[no-untyped-call]
    return mid - start, time.perf_counter() - mid


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def measure_case(
    inputs: Path, method: Method, iters: int, tau: float, chunk: int | None, runs: int
) -> dict[str, Any]:
    """Measure one method at ``iters`` steps on the inputs :func:`run_benchmark` wrote.

    Meant to run in a process of its own, so that its peak RSS is its own.

    Args:
        inputs: safetensors file with ``x`` (sub-vectors), ``c0`` (start) and ``g`` (probe).
        method: ``dkm``, ``idkm`` or ``idkm-jfb``.
        iters: Soft k-means steps ``t``.
        tau: Absolute temperature.
        chunk: Sub-vectors per piece of the attention (None: all at once).
        runs: Forward + backward runs; the first measures memory, all are timed.

    Returns:
        ``saved_bytes`` and ``saved_storages`` (what autograd keeps, besides ``x`` and ``g``),
        ``peak_rss_bytes`` (above ``baseline_rss_bytes``, measured as ``peak_method`` says),
        ``forward_s`` and ``backward_s`` (medians of ``forward_runs_s`` / ``backward_runs_s``),
        ``threads``, and for IDKM ``solver_iterations`` and ``solver_residuals`` (per run),
        ``solver_calls``, ``solver_fallbacks`` and ``solver_truncated`` (solves cut at the cap).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(inputs))
    x, c0, g = tensors["x"].requires_grad_(), tensors["c0"], tensors["g"]
    with_stats = method == "idkm"
    warm = x[:WARMUP_ROWS].detach().clone().requires_grad_()
    _forward_backward(warm, c0, g[:WARMUP_ROWS], tau, 1, method, chunk, SolverStats())
    del warm
    gc.collect()

    reset = _reset_peak()
    current = _current_rss_bytes()
    baseline = current if reset and current is not None else peak_rss_bytes()
    storages: dict[int, int] = {}
    forward, backward, iterations, residuals = [], [], [], []
    stats = SolverStats()
    peak = 0
    for run in range(runs):
        x.grad = None
        fwd, bwd = _forward_backward(
            x, c0, g, tau, iters, method, chunk, stats if with_stats else None,
            storages if run == 0 else None,
        )  # fmt: skip
        if run == 0:
            peak = peak_rss_bytes() - baseline
        forward.append(fwd)
        backward.append(bwd)
        if with_stats:
            iterations.append(stats.iterations)
            residuals.append(_finite(stats.residual))
        gc.collect()
    row: dict[str, Any] = {
        "saved_bytes": sum(storages.values()),
        "saved_storages": len(storages),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_method": "VmHWM reset by clear_refs" if reset else "high-water mark, not reset",
        "forward_s": statistics.median(forward),
        "backward_s": statistics.median(backward),
        "forward_runs_s": forward,
        "backward_runs_s": backward,
        "threads": torch.get_num_threads(),
    }
    if with_stats:
        row.update(
            solver_iterations=iterations,
            solver_residuals=residuals,
            solver_calls=stats.calls,
            solver_fallbacks=stats.fallbacks,
            solver_truncated=stats.truncated,
        )
    return row


def memory_child(spec: str) -> None:
    """Body of a child process: :func:`measure_case` of a JSON spec; one JSON line on stdout."""
    args = json.loads(spec)
    row = measure_case(
        Path(args["inputs"]), args["method"], args["iters"], args["tau"], args["chunk"],
        args["runs"],
    )  # fmt: skip
    sys.stdout.write(json.dumps(row) + "\n")


def _run_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    code = f"from dist_pgkm.bench.dkm import memory_child; memory_child({json.dumps(spec)!r})"
    command = [sys.executable, "-c", code]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


# --- the memory part --------------------------------------------------------------------------


def _prepare_inputs(options: DKMBenchOptions, path: Path) -> dict[str, Any]:
    """Write the layer's sub-vectors, the PG k-means start and the probe; return the setup."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dist_pgkm.models import offline
    from dist_pgkm.pq.codec import to_subvectors
    from dist_pgkm.pq.quantize import quantize_weight

    with safe_open(str(offline.smollm2_dir() / "model.safetensors"), "pt") as f:
        weight = f.get_tensor(f"{LAYER}.weight").float()  # (out, in) = (1536, 576)
    shape = tuple(weight.shape)
    if options.quick:
        weight = weight[:QUICK_ROWS]  # (QUICK_ROWS, in)
    start = time.perf_counter()
    c0 = quantize_weight(weight, BLOCK_SIZE, K, seed=SEED, name=LAYER).centroids.float()
    init_seconds = time.perf_counter() - start
    x = to_subvectors(weight, BLOCK_SIZE, LAYER).contiguous()  # (out * in / bs, bs)
    # DKMLayer's temperature: TAU times the mean squared distance to the nearest start centroid.
    tau = TAU * max(float(sq_distances(x, c0).amin(1).mean()), 1e-30)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED))  # (n, bs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x, "c0": c0.contiguous(), "g": g}, str(path))
    return {
        "model": MODEL,
        "layer": LAYER,
        "weight_shape": list(shape),
        "rows": weight.shape[0],
        "n": x.shape[0],
        "block_size": BLOCK_SIZE,
        "k": c0.shape[0],
        "dtype": "float32",
        "init": f"pgkm, seed {SEED}",
        "init_seconds": init_seconds,
        "tau_relative": TAU,
        "tau": tau,
        "chunk": options.chunk,
        "iters": list(options.iters),
        "runs": options.runs,
        "warmup_rows": WARMUP_ROWS,
        **_solver_defaults(),
    }


def _run_memory(
    options: DKMBenchOptions,
    work: Path,
    report: DKMBenchReport,
    progress: ProgressHook,
    on_row: Callable[[DKMBenchReport], None] | None,
    start: float,
) -> None:
    inputs = work / "dkm-inputs.safetensors"
    progress(0, 1, "PG k-means start")
    setup = _prepare_inputs(options, inputs)
    report.setup["memory"] = setup
    cases = [(method, t) for method in METHODS for t in options.iters]
    for i, (method, t) in enumerate(cases):
        label = f"{method} t={t}"
        progress(i, len(cases), label)
        logger.info("dkm bench: %s", label)
        spec = {
            "inputs": str(inputs),
            "method": method,
            "iters": t,
            "tau": setup["tau"],
            "chunk": options.chunk,
            "runs": options.runs,
        }
        measured = _run_child(spec)
        report.memory_rows.append(
            {"method": method, "t": t, "n": setup["n"], "k": setup["k"], "chunk": options.chunk}
            | measured
        )
        report.targets = compute_targets(
            report.memory_rows, quick=options.quick, quality_rows=report.quality_rows
        )
        report.seconds = time.perf_counter() - start
        if on_row is not None:
            on_row(report)
    progress(len(cases), len(cases), "done")


# --- the quality part -------------------------------------------------------------------------


def quality_config(model: str, method: str, quick: bool = False) -> dict[str, Any]:
    """The finetune config ``method`` runs on ``model`` in the quality part (YAML-ready).

    The preset of :data:`QUALITY` ``[model]`` with the spec's steps and ``train`` overrides (or
    :data:`QUALITY_QUICK_STEPS` per stage in quick mode), its quantize config given by absolute
    path, and in the spec's stage ``method: METHOD`` plus, for the DKM family, the spec's
    ``dkm:`` options and the method's own. Nothing else differs between methods.

    Raises:
        InvalidInputError: An unknown model or method.
    """
    import yaml

    if model not in QUALITY or method not in QUALITY_METHODS:
        raise InvalidInputError(
            f"quality config for {model!r}, {method!r}: models are {', '.join(QUALITY)}, "
            f"methods {', '.join(QUALITY_METHODS)}."
        )
    spec = QUALITY[model]
    data: dict[str, Any] = yaml.safe_load((_CONFIGS / spec.preset).read_text(encoding="utf-8"))
    data["quantize"] = str(_CONFIGS / data["quantize"])
    data["train"] = {**data.get("train", {}), **spec.train}
    stages = data["stages"]
    steps = spec.steps or tuple(stage["steps"] for stage in stages)
    assert len(steps) == len(stages), f"{spec.preset}: one step count per stage"
    for stage, n in zip(stages, steps, strict=True):
        stage["steps"] = QUALITY_QUICK_STEPS if quick else n
    (stage,) = [st for st in stages if st["name"] == spec.stage]
    stage["method"] = method
    if method != "ipq":
        stage["dkm"] = {**spec.dkm, **spec.method_dkm.get(method, {})}
    return data


def quality_cases(options: DKMBenchOptions) -> list[tuple[str, str]]:
    """``(model, case)`` of the quality part in order: ``original``, ``one-shot``, methods."""
    return [
        (model, case)
        for model in options.models
        for case in ("original", "one-shot", *options.methods)
    ]


def _quality_setup(model: str, options: DKMBenchOptions) -> dict[str, Any]:
    """What every method of ``model`` shares (from the configs themselves), for the report."""
    from dist_pgkm.config.finetune import load_finetune_config

    spec = QUALITY[model]
    base = load_finetune_config(quality_config(model, "ipq", options.quick))
    return {
        "preset": spec.preset,
        "quantize": Path(quality_config(model, "ipq")["quantize"]).name,
        "stage": spec.stage,
        "stages": [{"name": s.name, "steps": s.steps} for s in base.stages],
        "train": base.train.model_dump(mode="json"),
        "noise": base.noise.model_dump(mode="json"),
        "deepspeed": base.deepspeed.model_dump(mode="json"),
        "dkm": {method: _stage_dkm(model, method) for method in QUALITY_METHODS[1:]},
    }


def _stage_dkm(model: str, method: str) -> dict[str, Any]:
    """The ``dkm:`` options ``method`` trains ``model``'s varied stage with."""
    stages = quality_config(model, method)["stages"]
    (stage,) = [s for s in stages if s["name"] == QUALITY[model].stage]
    return dict(stage.get("dkm", {}))


def _evaluator(model: str) -> Any:
    from dist_pgkm.bench.ptq import MODELS, _Evaluator  # type: ignore[import-not-found, unused-ignore]

    from dist_pgkm.models import offline

    directory = offline.smollm2_dir() if model == "smollm2-135m" else offline.minilm_dir()
    return _Evaluator(MODELS[model], directory)


def _quality_row(
    model: str, case: str, options: DKMBenchOptions, work: Path, evaluate: Any
) -> dict[str, Any]:
    """Run one case (train or quantize in a child process), load it back, evaluate it."""
    import yaml
    from dist_pgkm.bench.finetune import (  # type: ignore[import-not-found, unused-ignore]
        finetune_row,
        one_shot_row,
    )

    import dist_pgkm

    start = time.perf_counter()
    if case == "original":
        row: dict[str, Any] = {"bits_per_weight": 32.0, **evaluate(evaluate.original())}
        row["seconds"] = time.perf_counter() - start
        return row
    out = work / f"{model}-{case}"
    if case == "one-shot":
        row = one_shot_row(model, Path(quality_config(model, "ipq")["quantize"]), out)
    else:
        config_path = work / f"{model}-{case}.yaml"
        config_path.write_text(
            yaml.safe_dump(quality_config(model, case, options.quick), sort_keys=False),
            encoding="utf-8",
        )
        row = finetune_row(model, config_path, out)
    loaded = dist_pgkm.load(out, dense=True)
    row.update(evaluate(loaded))
    del loaded
    shutil.rmtree(out, ignore_errors=True)
    return row


def _run_quality(
    options: DKMBenchOptions,
    work: Path,
    report: DKMBenchReport,
    progress: ProgressHook,
    on_row: Callable[[DKMBenchReport], None] | None,
    start: float,
) -> None:
    cases = quality_cases(options)
    setups = report.setup.setdefault("quality", {})
    for model in options.models:
        setups[model] = _quality_setup(model, options)
    # Rows of an earlier run that this one does not redo are kept (with their commit).
    redo = set(cases)
    report.quality_rows = [r for r in report.quality_rows if (r["model"], r["method"]) not in redo]
    evaluators: dict[str, Any] = {}  # one per model: the held-out data is prepared once
    for i, (model, case) in enumerate(cases):
        label = f"{model} {case}"
        progress(i, len(cases), label)
        logger.info("dkm bench quality: %s", label)
        if model not in evaluators:
            evaluators[model] = _evaluator(model)
        try:
            row = _quality_row(model, case, options, work, evaluators[model])
        except RuntimeError as exc:  # its child process failed: keep it, go on with the rest
            logger.error("dkm bench quality: %s failed: %s", label, exc)
            row = {"error": str(exc)[-2000:]}
        report.quality_rows.append(
            {"model": model, "method": case, **row, "commit": report.commit, "date": utc_now()}
        )
        report.quality_rows.sort(key=_quality_order)
        report.targets = compute_targets(
            report.memory_rows, quick=options.quick, quality_rows=report.quality_rows
        )
        report.runs["quality"]["seconds"] = time.perf_counter() - start
        report.seconds = time.perf_counter() - start
        if on_row is not None:
            on_row(report)
    progress(len(cases), len(cases), "done")


def _quality_order(row: Mapping[str, Any]) -> tuple[int, int]:
    models = list(QUALITY)
    cases = ["original", "one-shot", *QUALITY_METHODS]
    return (
        models.index(row["model"]) if row["model"] in models else len(models),
        cases.index(row["method"]) if row["method"] in cases else len(cases),
    )


def run_benchmark(
    options: DKMBenchOptions,
    progress: ProgressHook | None = None,
    on_row: Callable[[DKMBenchReport], None] | None = None,
    previous: DKMBenchReport | None = None,
) -> DKMBenchReport:
    """Run the selected parts, then compute the targets from their rows.

    Args:
        options: What to run.
        progress: Called before each case.
        on_row: Called with the report so far after each case, so that a long run interrupted
            midway still leaves its finished rows.
        previous: An earlier report to continue: the parts (and quality rows) this run does
            not redo are kept as they were measured.

    Raises:
        ModelSourceError: SmolLM2-135M (or MiniLM, for the quality part) is not installed.
        RuntimeError: A child process failed.
    """
    report_progress = progress or (lambda done, total, description: None)
    start = time.perf_counter()
    machine = machine_info({"torch_threads": torch.get_num_threads()})
    commit, date = git_commit(), utc_now()
    if previous is not None:
        report = previous
        report.mode, report.command, report.machine = options.mode, options.command, machine
        report.commit, report.date = commit, date
    else:
        report = DKMBenchReport(
            mode=options.mode, command=options.command, machine=machine, commit=commit, date=date
        )
    redo = set(quality_cases(options))
    for part in options.parts:
        earlier = report.runs.get(part)
        run: dict[str, Any] = {
            "command": options.command, "commit": commit, "date": date, "machine": machine,
            "seconds": 0.0, "mode": options.mode,
        }  # fmt: skip
        kept = [r for r in report.quality_rows if (r["model"], r["method"]) not in redo]
        if part == "quality" and earlier and kept:  # rows of earlier runs stay in the table
            previous_run = {k: earlier.get(k) for k in ("command", "commit", "date", "seconds")}
            run["earlier"] = _runs_with_rows([*earlier.get("earlier", []), previous_run], kept)
        report.runs[part] = run
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-dkm-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "memory" in options.parts:
            report.memory_rows = []
            _run_memory(options, work, report, report_progress, on_row, start)
            report.runs["memory"]["seconds"] = time.perf_counter() - start
        if "quality" in options.parts:
            quality_start = time.perf_counter()
            _run_quality(options, work, report, report_progress, on_row, quality_start)
    report.seconds = time.perf_counter() - start
    report.targets = compute_targets(
        report.memory_rows, quick=options.quick, quality_rows=report.quality_rows
    )
    return report


# --- targets ----------------------------------------------------------------------------------


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line through ``(xs, ys)``: ``(slope, intercept, R²)``.

    R² is 1 when the points lie on the line (constant ``ys`` included).

    Raises:
        ValueError: Fewer than two points, or all ``xs`` equal.
    """
    n = len(xs)
    if n < 2 or len(ys) != n or len(set(xs)) < 2:
        raise ValueError(f"a line needs two distinct xs and as many ys; got {xs} and {ys}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return slope, intercept, r2


def _by_t(rows: Sequence[Mapping[str, Any]], method: str) -> dict[int, Mapping[str, Any]]:
    return {int(r["t"]): r for r in rows if r["method"] == method}


def _judged(ts: Sequence[int], quick: bool) -> bool:
    """Targets are judged on a full run that measured every ``t`` (not on a partial report)."""
    return not quick and set(ITERS) <= set(ts)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _measured(value: float, digits: int) -> float | str:
    """A ratio for :class:`Target` (JSON has no infinity)."""
    return round(value, digits) if math.isfinite(value) else "inf"


def _dkm_linear(rows: Mapping[int, Mapping[str, Any]], quick: bool) -> Target:
    ts = sorted(rows)
    saved = [float(rows[t]["saved_bytes"]) for t in ts]
    slope, intercept, r2 = linear_fit(ts, saved)
    ratio = _ratio(saved[-1], saved[0])
    peak = [float(rows[t]["peak_rss_bytes"]) for t in ts]
    _, _, peak_r2 = linear_fit(ts, peak)
    return Target(
        id="dkm-linear",
        name="DKM: autograd-saved bytes linear in t (R² of a least-squares line)",
        measured=round(r2, 4),
        target=f">= {LINEAR_R2_GOAL}, growing",
        met=(r2 >= LINEAR_R2_GOAL and slope > 0) if _judged(ts, quick) else None,
        note=(
            f"{format_bytes(slope)} per step; t={ts[-1]} / t={ts[0]}: {ratio:.1f}x "
            f"({format_bytes(saved[0])} to {format_bytes(saved[-1])}); peak RSS R² {peak_r2:.4f}"
        ),
        detail={
            "slope_bytes_per_step": slope,
            "intercept_bytes": intercept,
            "ratio": _measured(ratio, 4),
            "saved_bytes": dict(zip(map(str, ts), saved, strict=True)),
            "peak_rss_bytes": dict(zip(map(str, ts), peak, strict=True)),
            "peak_rss_r2": peak_r2,
        },
    )


def _flat_peak(method: str, rows: Mapping[int, Mapping[str, Any]], quick: bool) -> Target:
    ts = sorted(rows)
    lo, hi = rows[ts[0]], rows[ts[-1]]
    ratio = _ratio(hi["peak_rss_bytes"], lo["peak_rss_bytes"])
    peaks = [rows[t]["peak_rss_bytes"] for t in ts]
    return Target(
        id=f"{method}-memory",
        name=f"{method.upper()}: peak RSS at t={ts[-1]} / at t={ts[0]}",
        measured=_measured(ratio, 3),
        target=f"<= {FLAT_PEAK_GOAL}",
        met=ratio <= FLAT_PEAK_GOAL if _judged(ts, quick) else None,
        note=(
            f"{format_bytes(lo['peak_rss_bytes'])} to {format_bytes(hi['peak_rss_bytes'])} above "
            f"baseline (max / min over t {_ratio(max(peaks), min(peaks)):.3f}); autograd saved "
            f"{format_bytes(lo['saved_bytes'])} to {format_bytes(hi['saved_bytes'])}"
        ),
        detail={
            "peak_rss_bytes": {str(t): rows[t]["peak_rss_bytes"] for t in ts},
            "saved_bytes": {str(t): rows[t]["saved_bytes"] for t in ts},
        },
    )


def _jfb_backward(
    rows: Mapping[int, Mapping[str, Any]], dkm: Mapping[int, Mapping[str, Any]], quick: bool
) -> Target:
    ts = sorted(rows)
    lo, hi = rows[ts[0]]["backward_s"], rows[ts[-1]]["backward_s"]
    note = f"{lo:.3g} s at t={ts[0]}, {hi:.3g} s at t={ts[-1]}"
    if ts[0] in dkm and ts[-1] in dkm:
        grow = _ratio(dkm[ts[-1]]["backward_s"], dkm[ts[0]]["backward_s"])
        note += f"; DKM's backward {grow:.1f}x over the same t"
    ratio = _ratio(hi, lo)
    return Target(
        id="jfb-backward",
        name=f"IDKM-JFB: backward seconds at t={ts[-1]} / at t={ts[0]}",
        measured=_measured(ratio, 3),
        target=f"<= {JFB_BACKWARD_GOAL}",
        met=ratio <= JFB_BACKWARD_GOAL if _judged(ts, quick) else None,
        note=note,
        detail={"backward_s": {str(t): rows[t]["backward_s"] for t in ts}},
    )


def _trained(rows: Sequence[Mapping[str, Any]], model: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["model"] == model and r["method"] in QUALITY_METHODS]


def quality_targets(rows: Sequence[Mapping[str, Any]]) -> list[Target]:
    """Matched bits and matched budget, per model of the quality rows.

    ``bits:MODEL``: the largest bits/weight of its one-shot and trained rows over the smallest,
    minus 1, at most :data:`BITS_SPREAD_GOAL` (the methods are compared at the same bits).
    ``budget:MODEL``: every trained row took the same optimizer steps of the same tokens.
    Both are facts of the runs, so they are judged in quick mode too.
    """
    targets: list[Target] = []
    rows = [r for r in rows if "error" not in r]  # a failed run measured nothing
    for model in dict.fromkeys(r["model"] for r in rows):
        quantized = [r for r in rows if r["model"] == model and r["method"] != "original"]
        bits = {r["method"]: float(r["bits_per_weight"]) for r in quantized}
        if len(bits) >= 2:
            spread = max(bits.values()) / min(bits.values()) - 1
            low, high = min(bits, key=bits.__getitem__), max(bits, key=bits.__getitem__)
            targets.append(
                Target(
                    id=f"bits:{model}",
                    name=f"{model}: bits/weight, largest / smallest over its rows, minus 1",
                    measured=round(spread, 6),
                    target=f"<= {BITS_SPREAD_GOAL}",
                    met=spread <= BITS_SPREAD_GOAL,
                    note=f"{low} {bits[low]:.4f}, {high} {bits[high]:.4f}"
                    if spread > 0
                    else f"all {len(bits)} rows {bits[low]:.4f}",
                    detail={"bits_per_weight": bits},
                )
            )
        trained = _trained(rows, model)
        budgets = {(r["train_steps"], r["train_tokens"]) for r in trained}
        if trained:
            steps, tokens = sorted(budgets)[0]
            targets.append(
                Target(
                    id=f"budget:{model}",
                    name=f"{model}: every method trained the same optimizer steps and tokens",
                    measured=f"{steps} steps, {tokens:,} tokens"
                    if len(budgets) == 1
                    else f"{len(budgets)} budgets",
                    target="one budget",
                    met=len(budgets) == 1,
                    note=", ".join(r["method"] for r in trained),
                    detail={r["method"]: [r["train_steps"], r["train_tokens"]] for r in trained},
                )
            )
    return targets


def compute_targets(
    memory_rows: Sequence[Mapping[str, Any]],
    quick: bool = False,
    quality_rows: Sequence[Mapping[str, Any]] = (),
) -> list[Target]:
    """The targets of issue 6 §3 from the memory rows (not judged in quick mode), then
    :func:`quality_targets` of the quality rows.

    A memory target appears once its method has rows at two values of ``t``; it is judged (met
    or MISSED) on a full run only once every ``t`` of :data:`ITERS` is there.
    """
    targets: list[Target] = []
    dkm = _by_t(memory_rows, "dkm")
    if len(dkm) >= 2:
        targets.append(_dkm_linear(dkm, quick))
    for method in ("idkm", "idkm-jfb"):
        rows = _by_t(memory_rows, method)
        if len(rows) >= 2:
            targets.append(_flat_peak(method, rows, quick))
    jfb = _by_t(memory_rows, "idkm-jfb")
    if len(jfb) >= 2:
        targets.append(_jfb_backward(jfb, dkm, quick))
    return targets + quality_targets(quality_rows)


# --- output -----------------------------------------------------------------------------------

_MEMORY_COLUMNS = (
    "method", "t", "autograd saved", "peak RSS", "forward s", "backward s", "solver its",
    "residual", "fallbacks",
)  # fmt: skip
_MEMORY_ALIGN = "lrrrrrrrr"


def _memory_cells(row: Mapping[str, Any]) -> list[str]:
    iterations = row.get("solver_iterations") or []
    residuals = [r for r in row.get("solver_residuals") or [] if r is not None]
    calls = row.get("solver_calls")
    return [
        row["method"],
        str(row["t"]),
        format_bytes(row["saved_bytes"]),
        format_bytes(row["peak_rss_bytes"]),
        format_value(row.get("forward_s"), ".3f"),
        format_value(row.get("backward_s"), ".3f"),
        ", ".join(map(str, iterations)) or "-",
        format_value(residuals[-1] if residuals else None, ".1e"),
        f"{row['solver_fallbacks']}/{calls}" if calls else "-",
    ]


_QUALITY_COLUMNS = (
    "model", "method", "bits/w", "ppl / top-1", "vs ipq", "steps", "tokens/s", "time s",
    "peak RSS", "note",
)  # fmt: skip
_QUALITY_ALIGN = "llrrrrrrrl"


def _metric(row: Mapping[str, Any]) -> float | None:
    value = row.get("ppl", row.get("top1"))
    return None if value is None else float(value)


def _versus_ipq(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """Perplexity over the ipq row's (``x1.23``), or top-1 minus the ipq row's (``+0.012``)."""
    ipq = next((r for r in rows if r["model"] == row["model"] and r["method"] == "ipq"), None)
    value = _metric(row)
    base = _metric(ipq) if ipq is not None else None
    if value is None or base is None:
        return "-"
    if "ppl" in row:
        return f"x{value / base:.3f}"
    return f"{value - base:+.3f}"


def _quality_note(row: Mapping[str, Any]) -> str:
    if error := row.get("error"):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"FAILED: {lines[-1][:160] if lines else 'no message'}"
    notes = []
    for stage in row.get("stages") or []:
        if ranks := stage.get("lr2vq_rank"):
            counts: dict[int, int] = {}
            for d in ranks.values():
                counts[d] = counts.get(d, 0) + 1
            notes.append("d " + ", ".join(f"{d} ({n} layers)" for d, n in sorted(counts.items())))
        if solves := stage.get("idkm_solves"):
            notes.append(
                f"solves cut at the cap {solves['truncated']}/{solves['calls']}, fell back "
                f"{solves['fallbacks']}"
            )
    return "; ".join(notes)


def _quality_cells(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    metric = _metric(row)
    return [
        row["model"],
        row["method"],
        format_value(row.get("bits_per_weight"), ".3f"),
        "-" if metric is None else f"{metric:,.1f}" if "ppl" in row else f"{metric:.3f}",
        _versus_ipq(row, rows),
        format_value(row.get("train_steps"), "d"),
        format_value(row.get("tokens_per_second"), ",.0f"),
        format_value(row.get("seconds"), ".1f"),
        format_bytes(row["peak_rss_bytes"]) if row.get("peak_rss_bytes") else "-",
        _quality_note(row),
    ]


def render_report(console: Console, report: DKMBenchReport) -> None:
    """Print the results and the targets."""
    if report.memory_rows:
        table = Table(title=f"DKM memory and time against t ({report.mode})", title_justify="left")
        for column, align in zip(_MEMORY_COLUMNS, _MEMORY_ALIGN, strict=True):
            table.add_column(column, justify="right" if align == "r" else "left")
        for row in report.memory_rows:
            table.add_row(*(escape(c) for c in _memory_cells(row)))
        console.print(table)
    if report.quality_rows:
        table = Table(title=f"Quality at matched bits ({report.mode})", title_justify="left")
        for column, align in zip(_QUALITY_COLUMNS, _QUALITY_ALIGN, strict=True):
            table.add_column(column, justify="right" if align == "r" else "left")
        for row in report.quality_rows:
            table.add_row(*(escape(c) for c in _quality_cells(row, report.quality_rows)))
        console.print(table)
    if report.targets:
        console.print(targets_rich_table(report.targets))
    console.print(
        f"{report.mode} mode, {report.seconds:.0f} s, commit {report.commit or 'unknown'}",
        markup=False,
        highlight=False,
    )


def _memory_about(setup: Mapping[str, Any]) -> str:
    rows, cols = setup["weight_shape"]
    runs = "one run" if setup["runs"] == 1 else f"median of {setup['runs']} runs"
    sample = "" if setup["rows"] == rows else f", its first {setup['rows']:,} rows"
    chunk = (
        "the whole attention at once (`chunk` none)"
        if setup["chunk"] is None
        else f"`chunk` {setup['chunk']:,}: checkpointed pieces, which keep their inputs (views of "
        "the sub-vectors) and recompute the rest backward, so autograd saves next to nothing "
        "and peak RSS is the measure"
    )
    return (
        f"SmolLM2-135M `{setup['layer']}` ({rows} x {cols}{sample}): {setup['n']:,} sub-vectors "
        f"of {setup['block_size']}, k = {setup['k']} ({setup['init']}), {setup['dtype']}, tau "
        f"{setup['tau_relative']} x the mean squared distance to the nearest start centroid "
        f"({setup['tau']:.4g}), {chunk}. Each (method, t) in a child process: `soft_kmeans` "
        "t steps, `soft_weight`, a fixed linear loss, backward to the sub-vectors. autograd "
        "saved: distinct storages the forward saves, besides the sub-vectors and the probe. "
        "peak RSS: high-water RSS of the first forward + backward above the RSS before it "
        f"(after a warm-up on {setup['warmup_rows']:,} sub-vectors). forward / backward: {runs}. "
        "solver its: IDKM's backward fixed-point iterations, per run "
        f"(cap {setup['solver_iters']}, tolerance {setup['solver_tol']:g} relative to the "
        "gradient); residual: the last run's last update, relative; fallbacks: backward passes "
        "that diverged and used the Jacobian-free gradient, of all passes."
    )


def _runs_with_rows(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier runs (oldest first) that measured at least one of ``rows``: a run's rows
    are dated from its start to the next run's. Rows without a date keep every run."""
    dates = [row.get("date") for row in rows]
    if not all(dates):
        return runs
    ends = [str(run.get("date") or "") for run in runs[1:]] + ["\uffff"]
    return [
        run
        for run, end in zip(runs, ends, strict=True)
        if any(str(run.get("date") or "") <= str(d) < end for d in dates)
    ]


def _run_line(run: Mapping[str, Any] | None) -> list[str]:
    """Command, time, machine and commit of one part's last run (markdown lines), and the
    commands of earlier runs whose rows the table keeps."""
    if not run:
        return []
    lines = [f"Command: `{run['command']}` ({float(run.get('seconds') or 0):.0f} s)"]
    lines += [
        f"Earlier rows: `{e['command']}` ({float(e.get('seconds') or 0):.0f} s, commit "
        f"`{e.get('commit') or 'unknown'}`, {e.get('date')})"
        for e in run.get("earlier") or []
    ]
    return [
        "\n".join(lines),
        "",
        machine_line(run.get("machine") or {}, run.get("commit"), run.get("date") or "?"),
        "",
    ]


def _memory_markdown(report: DKMBenchReport) -> list[str]:
    lines = ["#### Memory and time against t", "", *_run_line(report.runs.get("memory"))]
    setup = report.setup.get("memory")
    if setup is not None:
        lines += [_memory_about(setup), ""]
    cells = [_memory_cells(r) for r in report.memory_rows]
    lines.append(
        markdown_table(_MEMORY_COLUMNS, cells, align=_MEMORY_ALIGN, group_first_column=True)
    )
    return lines


_MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "minilm-l6": "all-MiniLM-L6-v2"}


def _dkm_options(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "defaults"


def _quality_about(model: str, setup: Mapping[str, Any]) -> str:
    train, noise, ds = setup["train"], setup["noise"], setup["deepspeed"]
    stages = " -> ".join(
        f"{s['name']} ({'METHOD' if s['name'] == setup['stage'] else 'ipq'}, {s['steps']})"
        for s in setup["stages"]
    )
    dkm = "; ".join(f"{m}: {_dkm_options(o)}" for m, o in setup["dkm"].items())
    objective = (
        "next-token loss"
        if train["objective"] == "causal-lm"
        else "distillation of the original's mean-pooled sentence embeddings (1 - cosine)"
    )
    return (
        f"{_MODEL_NAMES.get(model, model)}: preset `{setup['preset']}` (quantize config "
        f"`{setup['quantize']}`, so the same bits for every row). Stages (method, optimizer "
        f"steps): {stages}; each step {train['batch_size']} sequences of {train['seq_len']} "
        f"tokens, {objective}, lr {train['lr']:g} for float weights and "
        f"{train['centroid_lr'] or train['lr']:g} for codebooks, warm-up {train['warmup_steps']} "
        f"steps, Quant-Noise p {noise['p']:g} ({noise['mode']}) on the layers of later stages, "
        f"DeepSpeed ZeRO-{ds['zero_stage']} {ds['dtype']}. Soft k-means options (`dkm:`) "
        f"per method: {dkm}."
    )


_QUALITY_INTRO = (
    "Each method trains the stage named METHOD (the MLP, most of the weights) and nothing else "
    "differs between rows of a model: ipq is staged iPQ + Quant-Noise with PG k-means (codes "
    "fixed, codebooks trained); dkm / idkm / idkm-jfb / lr2vq train the float weights through "
    "soft k-means started from the same PG k-means codebooks and fix the codes at the end of "
    "the stage. Each run is `dist-pgkm finetune` in its own process (time and peak RSS are its "
    "own), then `dist_pgkm.load(dense=True)` and the evaluation of `bench ptq`: SmolLM2 "
    "perplexity on 8,176 held-out tokens of WordNet glosses (training uses the other windows), "
    "MiniLM top-1 of gloss-to-lemma retrieval among 1,000 lemmas (training uses WordNet texts "
    "that are no query or candidate of any draw). one-shot: `dist-pgkm quantize` with the same "
    "quantize config. vs ipq: ppl over the ipq row's, or top-1 minus the ipq row's. tokens/s: "
    "training only (MiniLM: padded positions); time: the whole command; note: LR²VQ ranks "
    "chosen, IDKM backward solves that reached their cap (and fell back to JFB) over all of them."
)


def _quality_markdown(report: DKMBenchReport) -> list[str]:
    lines = ["#### Quality at matched bits", "", *_run_line(report.runs.get("quality"))]
    lines += [_QUALITY_INTRO, ""]
    for model, setup in (report.setup.get("quality") or {}).items():
        lines += [_quality_about(model, setup), ""]
    commits = sorted({str(r.get("commit")) for r in report.quality_rows})
    if len(commits) > 1:
        lines += [f"Rows measured at commits {', '.join(f'`{c}`' for c in commits)}.", ""]
    cells = [_quality_cells(r, report.quality_rows) for r in report.quality_rows]
    lines.append(
        markdown_table(_QUALITY_COLUMNS, cells, align=_QUALITY_ALIGN, group_first_column=True)
    )
    return lines


def markdown_section(report: DKMBenchReport) -> str:
    """The ``dkm`` section of ``docs/benchmarks.md``: every part that has rows, then targets."""
    title = "### DKM, IDKM, IDKM-JFB, LR²VQ" + (" (quick mode)" if report.mode == "quick" else "")
    lines = [title, ""]
    if report.memory_rows:
        lines += _memory_markdown(report)
    if report.quality_rows:
        lines += _quality_markdown(report)
    lines.append(targets_markdown(report.targets))
    return "\n".join(lines)


def write_markdown(path: Path, report: DKMBenchReport) -> None:
    """Rewrite this mode's section (``dkm`` or ``dkm-quick``) of ``path``."""
    name = "dkm" if report.mode == "full" else "dkm-quick"
    replace_marker_section(path, name, markdown_section(report), intro=MARKDOWN_INTRO)
