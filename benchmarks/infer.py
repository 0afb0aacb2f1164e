"""``dist-pgkm bench infer``: a quantized model run from its codes, against the original.

SmolLM2-135M quantized at the presets asked for (``dist-pgkm quantize`` in a child process;
``llm-*`` presets calibrate on ``--calib`` text), then every variant measured in a child process
of its own, one after the other, in the same run: the original in float32 and bfloat16, the
``export-dense`` model of the first preset, and each checkpoint loaded by :func:`dist_pgkm.load`
with the code forward (the default) and, for the first preset, the decoding forward.

Per variant: greedy generation at batch 1 and batch 8 (prompts of ``PROMPT_TOKENS`` tokens of
WordNet glosses, ``new_tokens`` new tokens each; tokens/s = new tokens over the wall time of
``generate``, its prompt pass included), and one forward of ``prefill`` tokens (tokens/s).
Memory: the process's resident set (``VmRSS``) before loading the model (Python, torch,
transformers and the numba kernels already imported and compiled; the heap freed so far given
back to the OS first, as :func:`dist_pgkm.load` does after loading), after loading it, and its
peak (``VmHWM``, reset after loading through ``/proc/self/clear_refs``) during the two
generations, then during the prefill. "Model RSS" is a peak minus the RSS before loading.
The target compares the generation's model RSS with the checkpoint's quantized tensors plus
its float parameters at the dtype they are loaded in.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console

from dist_pgkm.utils.memory import release_freed_heap

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
    "InferOptions",
    "InferReport",
    "compute_targets",
    "measure",
    "render_report",
    "run_benchmark",
    "write_markdown",
]

logger = logging.getLogger(__name__)

ProgressHook = Callable[[int, int, str], None]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("ptq-4bit", "llm-4bit", "llm-3bit")
PROMPT_TOKENS = 32
RSS_GOAL = 1.3  # model RSS / (quantized tensors + float layers as loaded)
SPEED_GOAL = 1.0  # batch-1 tokens/s of the ~4-bit model / the float32 original's


@dataclass(frozen=True)
class InferOptions:
    """What to run.

    Attributes:
        presets: Preset stems (``configs/*.yaml``); the first is also exported dense and run
            with the decoding forward.
        calib: Calibration text of the ``llm-*`` presets (``quantize --calib``).
        new_tokens: New tokens per generation.
        prefill: Tokens of the prefill forward.
        threads: torch (and numba) threads of every measured process.
        decode_tokens: New tokens of the decoding-forward row (it is slow), batch 1 only.
        work_dir: Where checkpoints go; existing ones (``config.json`` present) are reused.
        command: The command line, recorded in the report.
    """

    presets: tuple[str, ...] = PRESETS
    calib: str = "wordnet"
    new_tokens: int = 32
    prefill: int = 512
    threads: int = 2
    decode_tokens: int = 4
    work_dir: Path | None = None
    command: str = "dist-pgkm bench infer"


@dataclass
class InferReport(RowsReport):
    """Everything one run measured; :meth:`as_dict` is the JSON file."""

    benchmark: ClassVar[str] = "infer"
    load: list[str] = field(default_factory=list)  # `uptime` before and after the timings


# --- one variant, in its own process ---------------------------------------------------------


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _prompts(tokenizer: Any, n: int, length: int) -> torch.Tensor:
    from dist_pgkm.eval import load_text, token_windows

    windows = token_windows(tokenizer, load_text(), window=length, n_tokens=n * length)
    return torch.stack([w[:length] for w in windows[:n]])  # (n, length)


def _warm_kernel() -> str:
    """Import and compile the kernels (table sums, decoded tiles) before the memory baseline."""
    from dist_pgkm.pq import PQLinear, infer

    layer = PQLinear(torch.randn(4, 2), torch.arange(8) % 4, (4, 4))
    layer.set_forward("codes")
    with torch.inference_mode():
        layer(torch.randn(1, 4))  # table sums
        layer(torch.randn(infer.LUT_MAX_TOKENS + 1, 4))  # a decoded tile
    return infer.lut_backend("cpu")


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Load one variant and time it (run in a child process by :func:`run_benchmark`).

    Args:
        spec: ``kind`` (``original``, ``dense``, ``codes``, ``decode``), ``path``, ``dtype``,
            ``new_tokens``, ``prefill``, ``threads``, ``batches``.

    Returns:
        The row's measured values.
    """
    import transformers

    import dist_pgkm

    torch.set_num_threads(int(spec["threads"]))
    backend = _warm_kernel()
    path = Path(spec["path"])
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(str(path))
    prompts = _prompts(tokenizer, 8, PROMPT_TOKENS)
    long_ids = _prompts(tokenizer, 1, int(spec["prefill"])) if spec["prefill"] else None
    dtype = getattr(torch, str(spec["dtype"]))
    # The baseline is what the process holds, not the heap it freed (the prompts' tokenizing
    # frees hundreds of MB): dist_pgkm.load gives freed heap back, which would otherwise be
    # counted as negative model memory.
    gc.collect()
    release_freed_heap()
    rss_before = _status("VmRSS")
    start = time.perf_counter()
    if spec["kind"] in ("codes", "decode"):
        model: Any = dist_pgkm.load(path, dtype=dtype, forward=spec["kind"])
    else:
        auto: Any = transformers.AutoModelForCausalLM
        model = auto.from_pretrained(str(path), dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - start
    rss_loaded = _status("VmRSS")
    row: dict[str, Any] = {"load_s": load_s, "lut_backend": backend}
    new = int(spec["new_tokens"])
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    with torch.inference_mode():
        model.generate(prompts[:1], max_new_tokens=2, do_sample=False, pad_token_id=pad)
        row["peak_reset"] = _reset_peak()
        for batch in spec["batches"]:
            t0 = time.perf_counter()
            out = model.generate(
                prompts[:batch],
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
            seconds = time.perf_counter() - t0
            row[f"b{batch}_tok_s"] = batch * new / seconds
            if batch == 1:
                row["b1_tokens"] = out[0, PROMPT_TOKENS:].tolist()
        gen_peak = _status("VmHWM")
        _reset_peak()
        if long_ids is not None:
            t0 = time.perf_counter()
            model(long_ids, use_cache=False)
            row["prefill_tok_s"] = long_ids.shape[1] / (time.perf_counter() - t0)
        prefill_peak = _status("VmHWM")
    row.update(
        rss_before=rss_before,
        rss_loaded=rss_loaded,
        gen_peak_rss=gen_peak,
        prefill_peak_rss=prefill_peak,
        model_rss_loaded=rss_loaded - rss_before,
        model_rss_gen=gen_peak - rss_before,
        model_rss_prefill=prefill_peak - rss_before,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )
    return row


def _child(spec: Mapping[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(spec["threads"])}
    command = [sys.executable, "-m", "dist_pgkm.bench.infer", json.dumps(dict(spec))]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- the run ---------------------------------------------------------------------------------


def _quantize(preset: str, out: Path, calib: str) -> float | None:
    """Quantize SmolLM2 at ``preset`` into ``out`` unless it is there; its wall time."""
    if (out / "config.json").is_file():
        return None
    command = [
        sys.executable, "-m", "dist_pgkm.cli", "quantize", "smollm2-135m",
        "--config", str(_CONFIGS / f"{preset}.yaml"), "--out", str(out),
    ]  # fmt: skip
    if preset.startswith("llm"):
        command += ["--calib", calib]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _export(src: Path, out: Path) -> None:
    if not (out / "config.json").is_file():
        from dist_pgkm.checkpoint.hf import export_dense

        export_dense(src, out)


def _sizes(path: Path) -> dict[str, Any]:
    from dist_pgkm.checkpoint.summary import describe

    info = describe(path)
    qconfig = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    return {
        "method": qconfig.get("method"),
        "checkpoint_bytes": info.checkpoint_bytes,
        "quantized_bytes": info.quantized_bytes,
        "float_params": info.float_params,
        "bits_per_weight": info.bits_per_weight,
        # float layers are loaded in float32 (the source's dtype)
        "reference_bytes": info.quantized_bytes + 4 * info.float_params,
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run_benchmark(
    options: InferOptions,
    progress: ProgressHook | None = None,
    on_row: Callable[[InferReport], None] | None = None,
) -> InferReport:
    """Quantize (or reuse) the checkpoints, then measure every variant in its own process.

    Args:
        options: What to run.
        progress: Called before each step.
        on_row: Called with the report so far after each measured row.
    """
    from dist_pgkm.models import offline

    report_progress = progress or (lambda done, total, description: None)
    start = time.perf_counter()
    report = InferReport.start("full", options.command)
    report.machine["torch_threads"] = options.threads
    original = offline.smollm2_dir()
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-infer-") as tmp:
        work = Path(options.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoints = {p: work / f"smollm2-{p}" for p in options.presets}
        quantize_s: dict[str, float | None] = {}
        steps = len(options.presets) + 1
        for i, (preset, out) in enumerate(checkpoints.items()):
            report_progress(i, steps, f"quantize {preset}")
            quantize_s[preset] = _quantize(preset, out, options.calib)
        first = options.presets[0]
        dense = work / f"smollm2-{first}-dense"
        report_progress(steps - 1, steps, f"export-dense {first}")
        _export(checkpoints[first], dense)
        base = {"new_tokens": options.new_tokens, "prefill": options.prefill,
                "threads": options.threads, "batches": [1, 8]}  # fmt: skip
        variants: list[tuple[dict[str, Any], dict[str, Any]]] = [
            ({"variant": "original fp32", "preset": "-"},
             {**base, "kind": "original", "path": str(original), "dtype": "float32"}),
            ({"variant": "original bf16", "preset": "-"},
             {**base, "kind": "original", "path": str(original), "dtype": "bfloat16"}),
            ({"variant": "export-dense", "preset": first},
             {**base, "kind": "dense", "path": str(dense), "dtype": "float32"}),
        ]  # fmt: skip
        for preset, out in checkpoints.items():
            variants.append(
                ({"variant": "codes", "preset": preset},
                 {**base, "kind": "codes", "path": str(out), "dtype": "float32"})
            )  # fmt: skip
        variants.append(
            ({"variant": "decode", "preset": first},
             {**base, "kind": "decode", "path": str(checkpoints[first]), "dtype": "float32",
              "new_tokens": options.decode_tokens, "batches": [1], "prefill": 0})
        )  # fmt: skip
        report.load.append(_uptime())
        for i, (label, spec) in enumerate(variants):
            report_progress(i, len(variants), f"{label['variant']} {label['preset']}")
            row = {**label, **_child(spec)}
            if label["variant"] in ("codes", "decode"):
                row.update(_sizes(Path(spec["path"])))
                row["quantize_s"] = quantize_s.get(label["preset"])
            report.rows.append(row)
            if on_row is not None:
                report.targets = compute_targets(report.rows)
                report.seconds = time.perf_counter() - start
                on_row(report)
        report.load.append(_uptime())
        report_progress(len(variants), len(variants), "done")
    report.targets = compute_targets(report.rows)
    report.seconds = time.perf_counter() - start
    return report


# --- targets ---------------------------------------------------------------------------------


def _find(rows: Sequence[Mapping[str, Any]], variant: str, preset: str = "-") -> Mapping[str, Any]:
    return next((r for r in rows if r["variant"] == variant and r["preset"] == preset), {})


def compute_targets(rows: Sequence[Mapping[str, Any]]) -> list[Target]:
    """Targets of issue 21, computed from the rows."""
    targets: list[Target] = []
    fp32 = _find(rows, "original fp32").get("b1_tok_s")
    bf16 = _find(rows, "original bf16").get("b1_tok_s")
    for row in rows:
        if row["variant"] != "codes" or "4bit" not in row["preset"] or fp32 is None:
            continue
        ratio = row["b1_tok_s"] / fp32
        note = f"{row['b1_tok_s']:.1f} vs {fp32:.1f} tok/s"
        if bf16 is not None:
            note += f"; {row['b1_tok_s'] / bf16:.2f}x bf16 ({bf16:.1f} tok/s)"
        targets.append(
            Target(
                id=f"speed:{row['preset']}",
                name=f"batch-1 decoding, {row['preset']} from codes / float32 original",
                measured=round(ratio, 3),
                target=f">= {SPEED_GOAL:.1f}",
                met=ratio >= SPEED_GOAL,
                note=note,
            )
        )
    for row in rows:
        if row["variant"] != "codes":
            continue
        ratio = row["model_rss_gen"] / row["reference_bytes"]
        targets.append(
            Target(
                id=f"rss:{row['preset']}",
                name=f"{row['preset']}: peak model RSS in generation / (quantized + float layers)",
                measured=round(ratio, 3),
                target=f"<= {RSS_GOAL}",
                met=ratio <= RSS_GOAL and bool(row.get("peak_reset")),
                note=(
                    f"{format_bytes(row['model_rss_gen'])} vs "
                    f"{format_bytes(row['reference_bytes'])}"
                ),
            )
        )
    return targets


# --- output ----------------------------------------------------------------------------------

_COLUMNS = (
    "variant", "preset", "bits/w", "b1 tok/s", "b8 tok/s", "prefill tok/s", "x fp32 b1",
    "model RSS loaded", "model RSS gen", "model RSS prefill", "checkpoint",
)  # fmt: skip
_ALIGN = "llrrrrrrrrr"


def _cells(row: Mapping[str, Any], fp32: float | None) -> list[str]:
    b1 = row.get("b1_tok_s")
    return [
        row["variant"],
        row["preset"] + (f" ({row['method']})" if row.get("method") else ""),
        format_value(row.get("bits_per_weight"), ".2f"),
        format_value(b1, ".2f"),
        format_value(row.get("b8_tok_s"), ".1f"),
        format_value(row.get("prefill_tok_s"), ".0f"),
        format_value(None if b1 is None or not fp32 else b1 / fp32, ".2f"),
        format_bytes(row.get("model_rss_loaded")),
        format_bytes(row.get("model_rss_gen")),
        format_bytes(row.get("model_rss_prefill")) if row.get("prefill_tok_s") else "-",
        format_bytes(row["checkpoint_bytes"]) if row.get("checkpoint_bytes") else "-",
    ]


def _all_cells(report: InferReport) -> list[list[str]]:
    fp32 = _find(report.rows, "original fp32").get("b1_tok_s")
    return [_cells(r, fp32) for r in report.rows]


def render_report(console: Console, report: InferReport) -> None:
    """Print the results and the targets."""
    footer = "model RSS = resident memory minus the process's before loading; " + " / ".join(
        report.load
    )
    print_rows(console, "Inference benchmark", report, _COLUMNS, _ALIGN, _all_cells(report), footer)


def _about(report: InferReport) -> str:
    load = "; ".join(f"`{line}`" for line in report.load) or "not recorded"
    return (
        "SmolLM2-135M, each variant in its own process, one after the other in one run. "
        f"Greedy generation of the new tokens after {PROMPT_TOKENS}-token prompts of WordNet "
        "glosses at batch 1 and 8 (tokens/s over the whole `generate` call, prompt pass "
        "included), one forward of a 512-token window (prefill). codes: `dist_pgkm.load` "
        "(lookup tables up to 8 tokens, decoded tiles above); decode: the decoding forward "
        "(batch 1, few tokens: it decodes every weight for every token). Model RSS: resident "
        "memory minus the process's before loading (Python, torch, transformers and the "
        "kernels loaded, freed heap given back to the OS); loaded, then the peak during the "
        "two generations and during the prefill (VmHWM reset in between). Checkpoint: the "
        "file's bytes. "
        f"Machine load (`uptime`) before and after the timings: {load}. The machine is shared: "
        "absolute figures move with its load, the ratios within one run are what counts."
    )


def markdown_section(report: InferReport) -> str:
    return rows_section(
        "Inference from codes", _about(report), report, _COLUMNS, _ALIGN, _all_cells(report)
    )


def write_markdown(path: Path, report: InferReport) -> None:
    """Rewrite the ``infer`` section of the markdown file ``path``."""
    replace_marker_section(path, "infer", markdown_section(report), intro=MARKDOWN_INTRO)


if __name__ == "__main__":  # a child process of run_benchmark: one variant, JSON on stdout
    logging.disable(logging.WARNING)
    sys.stdout.write(json.dumps(measure(json.loads(sys.argv[1]))) + "\n")
