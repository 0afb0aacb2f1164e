"""``dist-pgkm bench ptq --aware``: activation-aware PG k-means and its levers, one-shot.

Issue 7's suite. For each bit level (~4, ~3, ~2 bits/weight) a preset in ``configs/``
(``llm-4bit.yaml``, ...) turns on every lever: the ``hessian`` metric (calibrated on the
WordNet *calibration* windows, disjoint from the evaluation windows), scales, row-group
codebooks, outliers. The benchmark runs the real command, ``dist-pgkm quantize ... --calib
wordnet``, in a child process for

* the preset as it is (``all``), PG k-means with no lever (``plain``), and, at the ablation
  level, every lever alone on top of ``plain`` (``+metric``, ``+scales``, ``+books``,
  ``+outliers``, set as :data:`LEVERS` says), so each lever's worth is visible;
* faiss and fairseq-em (iPQ's k-means) on ``plain``: the same codebook shapes, no lever (they
  cluster with the Euclidean distance only), in the LLM convention and on MiniLM;
* per-group round-to-nearest (group 64, fp16 scale and minimum) at 4, 3 and 2 bits on the same
  layers;

in the LLM convention (the linear layers inside the blocks; embeddings and LM head kept, as
GPTQ, AWQ, VPTQ and AQLM report) and in iPQ's (every layer, embeddings included). Every row is
evaluated like ``bench ptq``'s: SmolLM2-135M perplexity on the held-out WordNet windows,
MiniLM gloss-to-lemma retrieval top-1.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console

from .common import (
    MARKDOWN_INTRO,
    RowsReport,
    Target,
    format_value,
    print_rows,
    replace_marker_section,
    rows_section,
)
from .ptq import (
    MODELS,
    RTN_GROUP,
    _Evaluator,
    quantize_row,
    rtn_row,
)

__all__ = [
    "CALIB_TEXT",
    "LEVELS",
    "VARIANTS",
    "AwareOptions",
    "AwareReport",
    "Case",
    "cases",
    "compute_targets",
    "markdown_section",
    "render_report",
    "run_benchmark",
    "variant_config",
    "write_markdown",
]

logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CALIB_TEXT = "wordnet"
LEVELS: dict[int, str] = {4: "llm-4bit.yaml", 3: "llm-3bit.yaml", 2: "llm-2bit.yaml"}
"""Bit level -> the preset with every lever on (LLM convention)."""
ABLATION_LEVEL = 3
PLAIN: dict[str, Any] = {"metric": "weight", "scale": "none", "codebook_rows": 0, "outliers": 0.0}
LEVERS: dict[str, dict[str, Any]] = {
    "+metric": {"metric": "hessian"},
    "+scales": {"scale": "row"},
    "+books": {"codebook_rows": 64},
    "+outliers": {"outliers": 0.0025},
}
"""The ablation: each lever alone on top of ``plain`` (one codebook per 64 rows: 64 divides
the row counts of SmolLM2's and MiniLM's layers)."""
VARIANTS = ("all", "plain", *LEVERS)
BASELINES = ("faiss", "fairseq-em")
PPL_GOALS = {4: 1.3, 3: 2.0}  # ppl <= goal x the original's, LLM convention
MINILM_LEVEL = 3
MINILM_GOAL = 0.9  # top-1 >= goal x the original's


@dataclass(frozen=True)
class Case:
    """One row to measure."""

    model: str
    convention: str  # "llm" or "ipq"
    level: int
    variant: str  # a VARIANTS entry, "rtn" or "original"
    method: str = "pgkm"

    @property
    def label(self) -> str:
        return f"{self.model} {self.convention} ~{self.level}b {self.variant} {self.method}"

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row`` is this case's result."""
        if self.variant == "original":
            return row.get("model") == self.model and row.get("variant") == "original"
        return all(row.get(key) == getattr(self, key) for key in Case.__dataclass_fields__)


@dataclass(frozen=True)
class AwareOptions:
    """What to run.

    Attributes:
        quick: SmolLM2, LLM convention, ~3 bits: the original, ``plain`` and ``all`` only.
        models: Models to run.
        work_dir: Where configs and checkpoints go (default: a temp dir removed at the end).
        command: The command line, recorded in the report.
        done: Rows of an earlier, interrupted run of the same commit (``--resume``): their
            cases are not run again.
        done_seconds: Time that interrupted run had spent; the report's total includes it.
        done_date: When that run started; the report keeps it as its date.
    """

    quick: bool = False
    models: tuple[str, ...] = tuple(MODELS)
    work_dir: Path | None = None
    command: str = "dist-pgkm bench ptq --aware"
    done: tuple[dict[str, Any], ...] = ()
    done_seconds: float = 0.0
    done_date: str | None = None

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


@dataclass
class AwareReport(RowsReport):
    """Everything one run measured; :meth:`as_dict` is the JSON file."""

    benchmark: ClassVar[str] = "ptq-aware"


def _priority(case: Case) -> int:
    """Rank of a case in the run: the originals (ratios need them), then the rows the targets
    judge (LLM convention, every lever and per-group rounding), plain PG k-means, the other
    k-means, the ablation, and the iPQ convention last: a run stopped midway has what matters."""
    if case.variant == "original":
        return 0
    if case.convention != "llm":
        return 5
    if case.variant in ("all", "rtn"):
        return 1
    if case.variant == "plain":
        return 2 if case.method == "pgkm" else 3
    return 4


def cases(options: AwareOptions) -> list[Case]:
    """Every row of the run, in order (:func:`_priority`; by model within a rank)."""
    if options.quick:
        return [
            Case("smollm2-135m", "llm", ABLATION_LEVEL, "original"),
            Case("smollm2-135m", "llm", ABLATION_LEVEL, "plain"),
            Case("smollm2-135m", "llm", ABLATION_LEVEL, "all"),
        ]
    out: list[Case] = []
    for model in options.models:
        out.append(Case(model, "-", 0, "original"))
        levels = sorted(LEVELS, reverse=True) if model == "smollm2-135m" else [MINILM_LEVEL]
        for convention in ("llm", "ipq"):
            # SmolLM2 in iPQ's convention: the points (all, plain, RTN); the baselines
            # and the ablation run where the targets are judged (LLM convention) and on MiniLM.
            full = convention == "llm" or model != "smollm2-135m"
            for level in levels:
                out.append(Case(model, convention, level, "rtn", f"rtn-g{RTN_GROUP}"))
                out.append(Case(model, convention, level, "all"))
                out.append(Case(model, convention, level, "plain"))
                if full:
                    out += [Case(model, convention, level, "plain", m) for m in BASELINES]
                if level == ABLATION_LEVEL and convention == "llm":
                    out += [Case(model, convention, level, v) for v in LEVERS]
    return sorted(out, key=_priority)


def variant_config(level: int, convention: str, variant: str, work: Path) -> Path:
    """Write the config of a case: the level's preset, the convention, the variant's levers.

    ``all`` keeps the preset's levers; ``plain`` turns every lever off; ``+LEVER`` is ``plain``
    with that lever as :data:`LEVERS` sets it. Block sizes and codebook sizes stay the
    preset's.
    """
    import yaml

    data: dict[str, Any] = yaml.safe_load((_CONFIGS / LEVELS[level]).read_text(encoding="utf-8"))
    data["convention"] = convention
    if variant != "all":
        for rule in data["rules"]:
            if not rule.get("skip"):
                rule.update(PLAIN)
                rule.update(LEVERS.get(variant, {}))
    path = work / "configs" / f"{Path(LEVELS[level]).stem}-{convention}-{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _needs_calibration(path: Path) -> bool:
    from dist_pgkm.config.quantize import load_config

    return load_config(path).needs_calibration


def run_benchmark(
    options: AwareOptions,
    progress: Callable[[int, int, str], None] | None = None,
    on_row: Callable[[AwareReport], None] | None = None,
) -> AwareReport:
    """Run every case, then compute the targets from the rows.

    Args:
        options: What to run.
        progress: Called before each case.
        on_row: Called with the report so far after each case (a long run stopped midway
            keeps its rows).
    """
    from dist_pgkm.models import offline

    report_progress = progress or (lambda done, total, description: None)
    start = time.perf_counter()
    report = AwareReport.start(options.mode, options.command)
    report.rows = [dict(row) for row in options.done]
    report.date = options.done_date or report.date
    report.seconds = options.done_seconds
    dirs = {"smollm2-135m": offline.smollm2_dir, "minilm-l6": offline.minilm_dir}
    todo = cases(options)
    evaluators: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-aware-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(todo):
            if any(case.matches(row) for row in report.rows):
                continue  # measured by the interrupted run this one resumes
            report_progress(i, len(todo), case.label)
            logger.info("ptq --aware: %s", case.label)
            if case.model not in evaluators:
                evaluators[case.model] = _Evaluator(MODELS[case.model], dirs[case.model]())
            evaluate = evaluators[case.model]
            t0 = time.perf_counter()
            if case.variant == "original":
                row = {"method": "original", "bits_per_weight": 32.0}
                row.update(evaluate(evaluate.original()))
                row["quantize_s"] = time.perf_counter() - t0
            elif case.variant == "rtn":
                row = rtn_row(evaluate, case.level, case.convention)
            else:
                config = variant_config(case.level, case.convention, case.variant, work)
                extra = ["--calib", CALIB_TEXT] if _needs_calibration(config) else []
                row = quantize_row(evaluate, case.model, config, case.method, work, extra)
                row.pop("per_layer", None)
            row.update(
                model=case.model,
                convention=case.convention,
                level=case.level,
                variant=case.variant,
                method=row.get("method", case.method),
            )
            report.rows.append(row)
            report.targets = compute_targets(report.rows)
            report.seconds = options.done_seconds + time.perf_counter() - start
            if on_row is not None:
                on_row(report)
        report_progress(len(todo), len(todo), "done")
    return report


# --- targets ----------------------------------------------------------------------------------


def _find(rows: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def compute_targets(rows: Sequence[Mapping[str, Any]]) -> list[Target]:
    """Issue 7's targets, from the rows measured so far (missing rows: not judged yet)."""
    targets: list[Target] = []
    original = _find(rows, model="smollm2-135m", variant="original")
    for level, goal in PPL_GOALS.items():
        best = _find(rows, model="smollm2-135m", convention="llm", level=level, variant="all")
        if original is None or best is None:
            continue
        ratio = best["ppl"] / original["ppl"]
        targets.append(
            Target(
                id=f"ppl{level}",
                name=f"SmolLM2-135M, LLM convention, ~{level} bits/weight: ppl / original",
                measured=round(ratio, 3),
                target=f"<= {goal}",
                met=ratio <= goal,
                note=(
                    f"{best['ppl']:.1f} at {best['bits_per_weight']:.2f} bits/weight; "
                    f"original {original['ppl']:.1f}"
                ),
            )
        )
    best2 = _find(rows, model="smollm2-135m", convention="llm", level=2, variant="all")
    rtn3 = _find(rows, model="smollm2-135m", convention="llm", level=3, variant="rtn")
    if best2 is not None and rtn3 is not None:
        targets.append(
            Target(
                id="ppl2",
                name="SmolLM2-135M, LLM convention, ~2 bits/weight: ppl below 3-bit RTN's",
                measured=round(best2["ppl"], 1),
                target=f"< {rtn3['ppl']:.1f}",
                met=best2["ppl"] < rtn3["ppl"],
                note=(
                    f"at {best2['bits_per_weight']:.2f} bits/weight; RTN 3-bit g{RTN_GROUP} at "
                    f"{rtn3['bits_per_weight']:.2f}"
                ),
            )
        )
    mini = _find(rows, model="minilm-l6", variant="original")
    for convention in ("llm", "ipq"):
        best = _find(
            rows, model="minilm-l6", convention=convention, level=MINILM_LEVEL, variant="all"
        )
        if mini is None or best is None:
            continue
        ratio = best["top1"] / mini["top1"]
        targets.append(
            Target(
                id=f"minilm-{convention}",
                name=f"MiniLM, {convention} convention, ~{MINILM_LEVEL} bits/weight: top-1 / "
                "original",
                measured=round(ratio, 3),
                target=f">= {MINILM_GOAL}",
                met=ratio >= MINILM_GOAL,
                note=(
                    f"{best['top1']:.3f} at {best['bits_per_weight']:.2f} bits/weight; "
                    f"original {mini['top1']:.3f}"
                ),
            )
        )
    return targets


# --- output -----------------------------------------------------------------------------------

_COLUMNS = (
    "model", "conv.", "level", "variant", "method", "bits/w", "ppl / top-1", "x original",
    "rel SSE", "time s",
)  # fmt: skip
_ALIGN = "llrllrrrrr"


def _cells(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    metric = "ppl" if "ppl" in row else "top1"
    original = _find(rows, model=row["model"], variant="original")
    ratio = (
        row[metric] / original[metric]
        if original is not None and metric in original and row.get(metric) is not None
        else None
    )
    return [
        row["model"],
        row["convention"],
        f"~{row['level']}" if row["level"] else "-",
        row["variant"],
        row["method"],
        format_value(row.get("bits_per_weight"), ".3f"),
        format_value(row.get(metric), ",.1f" if metric == "ppl" else ".3f"),
        format_value(ratio, ".2f"),
        format_value(row.get("rel_sse"), ".4f"),
        format_value(row.get("quantize_s"), ".0f"),
    ]


def render_report(console: Console, report: AwareReport) -> None:
    """Print the results and the targets."""
    cells = [_cells(r, report.rows) for r in report.rows]
    print_rows(console, "Activation-aware PTQ", report, _COLUMNS, _ALIGN, cells)


_ABOUT = (
    "`dist-pgkm quantize` in a child process per row, then `dist_pgkm.load(dense=True)` and the "
    "same held-out evaluation as `bench ptq` (SmolLM2-135M perplexity on WordNet windows, MiniLM "
    "gloss-to-lemma retrieval top-1). Calibration (`--calib wordnet`): the calibration windows, "
    "disjoint from the evaluation windows. Conventions: `llm` quantizes the linear layers inside "
    "the blocks (embeddings and LM head kept, bits/weight over the quantized layers), `ipq` "
    "every layer. Variants: `all` is the level's preset (`configs/llm-*bit.yaml`) with every "
    "lever; `plain` turns them all off; `+LEVER` is `plain` plus that lever; faiss and "
    f"fairseq-em run `plain`. RTN: per-group round-to-nearest, group {RTN_GROUP}, fp16 scale "
    "and minimum, on the same layers."
)


def markdown_section(report: AwareReport) -> str:
    cells = [_cells(r, report.rows) for r in report.rows]
    return rows_section("Activation-aware PTQ", _ABOUT, report, _COLUMNS, _ALIGN, cells)


def write_markdown(path: Path, report: AwareReport) -> None:
    """Rewrite this mode's section (``ptq-aware`` or ``ptq-aware-quick``) of ``path``."""
    name = "ptq-aware" if report.mode == "full" else "ptq-aware-quick"
    replace_marker_section(path, name, markdown_section(report), intro=MARKDOWN_INTRO)
