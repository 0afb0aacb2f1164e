"""``dist-pgkm bench ptq``: one-shot quantization of whole real models, end to end.

For each real model (SmolLM2-135M: held-out perplexity on WordNet glosses; all-MiniLM-L6-v2:
gloss-to-lemma retrieval top-1), each preset (``configs/*.yaml``) and each clustering method,
the benchmark runs the real command, ``dist-pgkm quantize``, in a child process (so its wall
time and peak RSS are its own), loads the checkpoint back with :func:`dist_pgkm.load`, and
evaluates it on the same held-out windows as the original. Per-group round-to-nearest
(asymmetric, group 64, fp16 scale and minimum: ``bits + 0.5`` bits/weight) on the same layers
is the simple baseline. Every figure in the report is computed from these runs.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console

from .common import (
    MARKDOWN_INTRO,
    RowsReport,
    Target,
    format_bytes,
    format_value,
    print_rows,
    replace_marker_section,
    rows_section,
)

__all__ = [
    "MODELS",
    "PTQOptions",
    "PTQReport",
    "render_report",
    "rtn_dequantize",
    "run_benchmark",
    "write_markdown",
]

logger = logging.getLogger(__name__)

ProgressHook = Callable[[int, int, str], None]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_METHODS = ("pgkm", "fairseq-em", "faiss", "kmeans++")
RTN_BITS = (4, 3, 2)
RTN_GROUP = 64
PPL_NOISE = 0.02  # relative ppl difference treated as a tie (see the targets)
TIME_GOAL_S = 180.0  # SmolLM2-135M end to end at the ~4-bit preset
RSS_GOAL_BYTES = 2e9
EVAL_TOKENS = 8192  # 16 windows of 512: 8,176 predicted tokens
EVAL_WINDOW = 512
RETRIEVAL_PAIRS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """A real model of the benchmark and how it is evaluated."""

    name: str
    task: str  # "ppl" (lower is better) or "retrieval" (top-1, higher is better)
    presets: tuple[str, ...]  # config files in configs/, full mode

    @property
    def metric(self) -> str:
        return "ppl" if self.task == "ppl" else "top1"


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "ppl", ("ptq-4bit.yaml", "ptq-3bit.yaml", "smollm2-135m-ipq.yaml")
    ),
    "minilm-l6": ModelSpec(
        "minilm-l6", "retrieval", ("ptq-4bit.yaml", "ptq-3bit.yaml", "minilm-ipq.yaml")
    ),
}


@dataclass(frozen=True)
class PTQOptions:
    """What to run.

    Attributes:
        quick: SmolLM2 at the ~4-bit preset with pgkm, 4-bit RTN and the original (``make
            demo``), instead of every model, preset and method.
        models: Models to run (full mode).
        methods: Clustering methods (full mode).
        presets: Preset file stems to run (empty: each model's presets).
        work_dir: Where checkpoints are written (default: a temp dir removed at the end).
        command: The command line, recorded in the report.
    """

    quick: bool = False
    models: tuple[str, ...] = tuple(MODELS)
    methods: tuple[str, ...] = ALL_METHODS
    presets: tuple[str, ...] = ()
    work_dir: Path | None = None
    command: str = "dist-pgkm bench ptq"

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


@dataclass
class PTQReport(RowsReport):
    """Everything one run measured; :meth:`as_dict` is the JSON file."""

    benchmark: ClassVar[str] = "ptq"


# --- the round-to-nearest baseline -------------------------------------------------------------


def rtn_dequantize(weight: torch.Tensor, bits: int, group: int = RTN_GROUP) -> torch.Tensor:
    """Per-group asymmetric round-to-nearest, returned dequantized (float32).

    Each run of ``group`` consecutive input-feature weights of a row gets a scale
    ``(max - min) / (2**bits - 1)`` and a minimum, both stored in fp16 (and rounded to fp16
    here, as a real kernel would store them), so the cost is ``bits + 32 / group`` bits/weight.
    """
    out_features = weight.shape[0]
    w = weight.detach().reshape(out_features, -1).to(torch.float32)
    if w.shape[1] % group:
        raise ValueError(f"width {w.shape[1]} is not a multiple of the group size {group}")
    groups = w.reshape(-1, group)  # (out * in / group, group)
    low = groups.amin(dim=1, keepdim=True).half().float()
    high = groups.amax(dim=1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).half().float()
    # A constant group has scale 0 (also after fp16 rounding): every code is then 0.
    q = ((groups - low) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, levels)
    out: torch.Tensor = (q * scale + low).reshape(weight.shape)
    return out


# --- evaluation -------------------------------------------------------------------------------


class _Evaluator:
    """Evaluates models of one real model family on fixed held-out data."""

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        import transformers

        from dist_pgkm.eval import load_text, retrieval_pairs, token_windows

        self.spec = spec
        self.model_dir = model_dir
        auto: Any = transformers.AutoTokenizer
        self.tokenizer = auto.from_pretrained(str(model_dir))
        if spec.task == "ppl":
            self.windows = token_windows(
                self.tokenizer, load_text(), window=EVAL_WINDOW, n_tokens=EVAL_TOKENS
            )
        else:
            self.pairs = retrieval_pairs(RETRIEVAL_PAIRS)

    def original(self) -> Any:
        import transformers

        cls: Any = (
            transformers.AutoModelForCausalLM if self.spec.task == "ppl" else transformers.AutoModel
        )
        return cls.from_pretrained(str(self.model_dir), dtype=torch.float32)

    def __call__(self, model: Any) -> dict[str, Any]:
        from dist_pgkm.eval import perplexity, retrieval_accuracy

        if self.spec.task == "ppl":
            result = perplexity(model, self.windows)
            return {"ppl": result.ppl, "eval_tokens": result.n_tokens, "eval_s": result.seconds}
        retrieval = retrieval_accuracy(model, self.tokenizer, self.pairs)
        return {"top1": retrieval.top1, "eval_queries": retrieval.n, "eval_s": retrieval.seconds}


def _weight_bytes_fp16(model: Any) -> int:
    return 2 * sum(int(p.numel()) for p in model.parameters())


def rtn_row(evaluate: _Evaluator, bits: int, convention: str = "ipq") -> dict[str, Any]:
    """Per-group RTN at ``bits`` on every layer (``ipq``) or on the layers inside the model's
    repeated blocks only (``llm``: embeddings and LM head kept)."""
    from dist_pgkm.distributed.plan import in_repeated_block
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.source import open_source

    start = time.perf_counter()
    model = evaluate.original()
    modules = dict(model.named_modules())
    n_weights = 0
    skipped = 0
    for layer in find_layers(open_source(evaluate.model_dir)):
        if convention == "llm" and not in_repeated_block(layer.name):
            continue
        module = modules[layer.name]
        if module.weight.shape[-1] % RTN_GROUP:
            skipped += 1
            continue
        with torch.no_grad():
            module.weight.copy_(rtn_dequantize(module.weight, bits))
        n_weights += module.weight.numel()
    seconds = time.perf_counter() - start
    row = {
        "method": f"rtn-g{RTN_GROUP}",
        "preset": f"{bits}-bit",
        "convention": convention,
        "bits_per_weight": bits + 32 / RTN_GROUP,
        "quantized_params": n_weights,
        "layers_kept_float": skipped,
        "quantize_s": seconds,
        "empty_final": None,
        "empty_total": None,
        "peak_rss_bytes": None,
    }
    row.update(evaluate(model))
    return row


def quantize_row(
    evaluate: _Evaluator,
    model_arg: str,
    config: Path,
    method: str,
    work: Path,
    extra_args: Sequence[str] = (),
    label: str | None = None,
) -> dict[str, Any]:
    """Run ``dist-pgkm quantize`` with ``config`` in a child process, load and evaluate it.

    Args:
        evaluate: The model family's evaluator.
        model_arg: Model argument of the command.
        config: Config file.
        method: Clustering method (``--method``).
        work: Where the checkpoint and the run's JSON summary go (removed after evaluation).
        extra_args: More arguments of the command (e.g. ``--calib wordnet``).
        label: The row's ``preset`` (default: the config's file stem).
    """
    import dist_pgkm

    preset = label or config.stem
    out = work / f"{evaluate.spec.name}-{preset}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    summary_path = work / f"{out.name}.json"
    command = [
        sys.executable, "-m", "dist_pgkm.cli", "quantize", model_arg,
        "--config", str(config), "--method", method, "--out", str(out),
        "--json", str(summary_path), *extra_args,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    info = summary["checkpoint"]
    row = {
        "method": method,
        "preset": preset,
        "bits_per_weight": info["bits_per_weight"],
        "model_bits_per_param": info["model_bits_per_param"],
        "compression_vs_fp16": info["compression_vs_fp16"],
        "checkpoint_bytes": info["checkpoint_bytes"],
        "quantized_params": info["quantized_params"],
        "layers": summary["layers"],
        "layers_skipped": len(summary["skipped"]),
        "empty_final": info["empty_final"],
        "empty_total": info["empty_total"],
        "rel_sse": _weighted_rel_sse(info["layers"]),
        "quantize_s": wall,
        "peak_rss_bytes": summary["peak_rss_bytes"],
        "per_layer": {
            layer["name"]: {"empty_total": layer["empty_total"], "rel_sse": layer["rel_sse"]}
            for layer in info["layers"]
        },
    }
    model = dist_pgkm.load(out, dense=True)
    row.update(evaluate(model))
    del model
    shutil.rmtree(out, ignore_errors=True)
    return row


def _weighted_rel_sse(layers: Sequence[Mapping[str, Any]]) -> float | None:
    sse = [layer.get("sse") for layer in layers]
    norm = [layer.get("weight_sq") for layer in layers]
    if any(v is None for v in sse + norm):
        return None
    return float(sum(sse) / max(sum(norm), 1e-30))  # type: ignore[arg-type]


# --- the run ----------------------------------------------------------------------------------


def _cases(options: PTQOptions) -> list[tuple[str, str, str]]:
    """(model, preset, method) of every quantization run, plus RTN as (model, "rtn", bits)."""
    if options.quick:
        return [
            ("smollm2-135m", "original", ""),
            ("smollm2-135m", "ptq-4bit.yaml", "pgkm"),
            ("smollm2-135m", "rtn", "4"),
        ]
    cases: list[tuple[str, str, str]] = []
    for name in options.models:
        presets = [
            p
            for p in MODELS[name].presets
            if not options.presets or Path(p).stem in options.presets
        ]
        cases.append((name, "original", ""))
        cases += [(name, "rtn", str(bits)) for bits in RTN_BITS]
        cases += [(name, preset, m) for preset in presets for m in options.methods]
    return cases


def run_benchmark(
    options: PTQOptions,
    progress: ProgressHook | None = None,
    on_row: Callable[[PTQReport], None] | None = None,
) -> PTQReport:
    """Run every case, then compute the targets from the rows.

    Args:
        options: What to run.
        progress: Called before each case.
        on_row: Called with the report so far (targets included) after each case, so that a
            long run interrupted midway still leaves its finished rows.
    """
    from dist_pgkm.models import offline

    report_progress = progress or (lambda done, total, description: None)
    start = time.perf_counter()
    report = PTQReport.start(options.mode, options.command)
    dirs = {"smollm2-135m": offline.smollm2_dir, "minilm-l6": offline.minilm_dir}
    cases = _cases(options)
    evaluators: dict[str, _Evaluator] = {}
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-ptq-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for i, (name, preset, method) in enumerate(cases):
            label = f"{name} {Path(preset).stem} {method}".strip()
            report_progress(i, len(cases), label)
            logger.info("ptq: %s", label)
            if name not in evaluators:
                evaluators[name] = _Evaluator(MODELS[name], dirs[name]())
            evaluate = evaluators[name]
            if preset == "original":
                t0 = time.perf_counter()
                model = evaluate.original()
                row = {"method": "original", "preset": "-", "bits_per_weight": 32.0}
                row["weight_bytes_fp16"] = _weight_bytes_fp16(model)
                row.update(evaluate(model))
                row["quantize_s"] = time.perf_counter() - t0
            elif preset == "rtn":
                row = rtn_row(evaluate, int(method))
            else:
                row = quantize_row(evaluate, name, _CONFIGS / preset, method, work)
            row = {"model": name, **row}
            report.rows.append(row)
            if on_row is not None:
                report.targets = compute_targets(report.rows)
                report.seconds = time.perf_counter() - start
                on_row(report)
        report_progress(len(cases), len(cases), "done")
    report.targets = compute_targets(report.rows)
    report.seconds = time.perf_counter() - start
    return report


# --- targets ----------------------------------------------------------------------------------


def _better(task_metric: str, a: float, b: float) -> bool:
    """Whether ``a`` is at least as good as ``b`` within the noise band."""
    if task_metric == "ppl":
        return a <= b * (1 + PPL_NOISE)
    return a >= b - 0.01  # top-1 within one point


def compute_targets(rows: Sequence[Mapping[str, Any]]) -> list[Target]:
    """Targets of issue 3 §4, computed from the rows."""
    targets: list[Target] = []
    groups: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        if row["method"] in ALL_METHODS:
            groups.setdefault((row["model"], row["preset"]), {})[row["method"]] = row
    for (model, preset), by_method in groups.items():
        if "pgkm" not in by_method or len(by_method) < 2:
            continue
        metric = MODELS[model].metric
        pg = by_method["pgkm"][metric]
        others = {m: r[metric] for m, r in by_method.items() if m != "pgkm"}
        best_name = (min if metric == "ppl" else max)(others, key=lambda m: others[m])
        best = others[best_name]
        ratio = pg / best if metric == "ppl" else pg - best
        targets.append(
            Target(
                id=f"ppl:{model}:{preset}",
                name=f"{model} {preset}: pgkm {metric} vs best other k-means ({best_name})",
                measured=round(ratio, 4),
                target=(
                    f"<= {1 + PPL_NOISE:.2f} (ratio)" if metric == "ppl" else ">= -0.01 (diff)"
                ),
                met=_better(metric, pg, best),
                note=f"pgkm {pg:.4g}, {best_name} {best:.4g}",
                detail={"pgkm": pg, **others},
            )
        )
    for row in rows:
        if (
            row["model"] == "smollm2-135m"
            and row["preset"] == "ptq-4bit"
            and row["method"] == "pgkm"
        ):
            targets.append(
                Target(
                    id="time",
                    name="SmolLM2-135M end to end at ptq-4bit (load, all layers, merge), pgkm",
                    measured=round(row["quantize_s"], 1),
                    target=f"< {TIME_GOAL_S:.0f} s",
                    met=row["quantize_s"] < TIME_GOAL_S,
                    note="wall time of `dist-pgkm quantize` in its own process",
                )
            )
    rss = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes")]
    if rss:
        worst = max(rss)
        targets.append(
            Target(
                id="rss",
                name="peak RSS of any `dist-pgkm quantize` run",
                measured=format_bytes(worst),
                target=f"< {format_bytes(RSS_GOAL_BYTES)}",
                met=worst < RSS_GOAL_BYTES,
                detail={"bytes": worst},
            )
        )
    return targets


# --- output -----------------------------------------------------------------------------------

_COLUMNS = (
    "model", "preset", "method", "bits/w", "x fp16", "ppl / top-1", "rel SSE", "empty end/all",
    "time s", "peak RSS",
)  # fmt: skip
_ALIGN = "lllrrrrrrr"


def _cells(row: Mapping[str, Any]) -> list[str]:
    metric = row.get("ppl", row.get("top1"))
    metric_text = format_value(metric, ",.1f") if "ppl" in row else format_value(metric, ".3f")
    empties = (
        "-" if row.get("empty_final") is None else f"{row['empty_final']}/{row['empty_total']}"
    )
    return [
        row["model"],
        row["preset"],
        row["method"],
        format_value(row.get("bits_per_weight"), ".3f"),
        format_value(row.get("compression_vs_fp16"), ".2f"),
        metric_text,
        format_value(row.get("rel_sse"), ".4f"),
        empties,
        format_value(row.get("quantize_s"), ".1f"),
        format_bytes(row["peak_rss_bytes"]) if row.get("peak_rss_bytes") else "-",
    ]


def render_report(console: Console, report: PTQReport) -> None:
    """Print the results and the targets."""
    footer = (
        "bits/w = bits per quantized weight, codebooks included; x fp16 = the model in fp16 over "
        "the checkpoint"
    )
    cells = [_cells(r) for r in report.rows]
    print_rows(console, "PTQ benchmark", report, _COLUMNS, _ALIGN, cells, footer)


_ABOUT = (
    "`dist-pgkm quantize` on real models, each run in its own process (time and peak RSS are "
    "its own: load, every selected layer, merge), then `dist_pgkm.load(dense=True)` and the "
    f"same held-out evaluation as the original: SmolLM2-135M perplexity on {EVAL_TOKENS} tokens "
    f"of WordNet glosses (windows of {EVAL_WINDOW}; 8,176 predicted tokens), MiniLM top-1 of "
    f"gloss-to-lemma retrieval among {RETRIEVAL_PAIRS} lemmas. RTN: per-group asymmetric "
    f"round-to-nearest, group {RTN_GROUP}, fp16 scale and minimum, on the same layers. "
    "empty end/all: empty clusters at the end / met over all iterations, summed over layers. "
    f"Ties: pgkm's ppl within {PPL_NOISE:.0%} of the best other k-means counts as a tie."
)


def markdown_section(report: PTQReport) -> str:
    cells = [_cells(r) for r in report.rows]
    return rows_section("Whole-model PTQ", _ABOUT, report, _COLUMNS, _ALIGN, cells)


def write_markdown(path: Path, report: PTQReport) -> None:
    """Rewrite this mode's section (``ptq`` or ``ptq-quick``) of the markdown file ``path``."""
    name = "ptq" if report.mode == "full" else "ptq-quick"
    replace_marker_section(path, name, markdown_section(report), intro=MARKDOWN_INTRO)


def write_plots(img_dir: Path, report: PTQReport) -> list[Path]:
    """PNG plots: quality vs bits/weight per model, and empty clusters per layer and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in MODELS.items():
        rows = [r for r in report.rows if r["model"] == name and spec.metric in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        original = next((r for r in rows if r["method"] == "original"), None)
        for method in (*ALL_METHODS, f"rtn-g{RTN_GROUP}"):
            points = sorted(
                (r["bits_per_weight"], r[spec.metric]) for r in rows if r["method"] == method
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        if original is not None:
            ax.axhline(original[spec.metric], color="k", linestyle="--", label="original")
        if spec.metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codebooks / scales included)")
        ax.set_ylabel("held-out perplexity" if spec.metric == "ppl" else "retrieval top-1")
        ax.set_title(f"{name}: one-shot quantization")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = img_dir / f"ptq-{name}-quality.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        layered = [r for r in rows if r.get("per_layer")]
        if layered:
            fig, ax = plt.subplots(figsize=(7.5, 4))
            for r in layered:
                empties = [v["empty_total"] or 0 for v in r["per_layer"].values()]
                ax.plot(empties, label=f"{r['method']} {r['preset']}", linewidth=1)
            ax.set_yscale("symlog")
            ax.set_xlabel("layer (sorted by name)")
            ax.set_ylabel("empty clusters met, all iterations")
            ax.set_title(f"{name}: empty clusters per layer")
            ax.legend(fontsize=7, ncol=2)
            path = img_dir / f"ptq-{name}-empty.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
