"""The run report of ``dist-pgkm quantize``: ``report.json`` and PNG plots beside it.

Everything in it is computed from the checkpoint (:func:`dist_pgkm.checkpoint.summary.describe`)
and the run's own summary; nothing is typed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dist_pgkm.checkpoint.atomic import atomic_write_json
from dist_pgkm.checkpoint.summary import CheckpointSummary

__all__ = ["write_report"]


def write_report(
    out_dir: Path, checkpoint: CheckpointSummary, run: Mapping[str, Any], plots: bool = True
) -> list[Path]:
    """Write ``report.json`` and, when matplotlib is installed, ``report/*.png``.

    Args:
        out_dir: The run's output directory.
        checkpoint: What the checkpoint holds.
        run: The run summary (``RunSummary.as_dict()``).
        plots: Draw the plots (per-layer relative error and bits, empty clusters per layer).

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    atomic_write_json(
        out_dir / "report.json", {"run": dict(run), "checkpoint": checkpoint.as_dict()}
    )
    written = [out_dir / "report.json"]
    if plots and checkpoint.layers:
        # matplotlib is in the `models` extra; without it the JSON is the report.
        with contextlib.suppress(ImportError):
            written += _plots(out_dir / "report", checkpoint)
    if plots and run.get("history"):
        with contextlib.suppress(ImportError):
            written.append(_loss_curve(out_dir / "report", run["history"], run.get("stages", [])))
    return written


def _loss_curve(
    directory: Path, history: Sequence[Mapping[str, Any]], stages: Sequence[Mapping[str, Any]]
) -> Path:
    """The training loss over all steps, one colour per stage (a fine-tuning run's report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    offset = 0
    for i in sorted({int(h["stage"]) for h in history}):
        points = [h for h in history if h["stage"] == i]
        name = stages[i]["name"] if i < len(stages) else str(i)
        ax.plot([offset + h["step"] for h in points], [h["loss"] for h in points], label=name)
        offset += max(h["step"] for h in points)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss")
    ax.set_title("fine-tuning loss per stage")
    ax.legend()
    fig.tight_layout()
    path = directory / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(directory: Path, checkpoint: CheckpointSummary) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    layers = checkpoint.layers
    x = range(len(layers))
    labels = [layer.name for layer in layers]
    step = max(1, len(layers) // 24)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar(x, [layer.rel_sse or 0.0 for layer in layers], color="tab:blue")
    top.set_ylabel("relative error\n||W - Ŵ||² / ||W||²")
    top.set_title(
        f"{checkpoint.path.name}: {len(layers)} layers, {checkpoint.bits_per_weight:.3f} "
        f"bits/weight, {checkpoint.compression_vs_fp16:.2f}x smaller than fp16"
    )
    bottom.bar(x, [layer.bits_per_weight for layer in layers], color="tab:green")
    bottom.set_ylabel("bits / weight\n(codebooks, scales,\noutliers included)")
    bottom.set_xticks(list(x)[::step], labels[::step], rotation=90, fontsize=6)
    fig.tight_layout()
    error_png = directory / "layer_error.png"
    fig.savefig(error_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x, [layer.empty_total or 0 for layer in layers], label="met over all iterations")
    ax.bar(x, [layer.empty_final or 0 for layer in layers], label="left at the end", color="red")
    ax.set_ylabel("empty clusters")
    ax.set_title(f"{checkpoint.path.name}: empty clusters per layer ({checkpoint.method})")
    ax.set_xticks(list(x)[::step], labels[::step], rotation=90, fontsize=6)
    ax.legend()
    fig.tight_layout()
    empty_png = directory / "empty_clusters.png"
    fig.savefig(empty_png, dpi=110)
    plt.close(fig)
    return [error_png, empty_png]
