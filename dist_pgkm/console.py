"""How a quantize run shows its progress: a live view on a terminal, plain lines in a log.

On a terminal (stderr), a bar with layers done / total, throughput and ETA, and one line per
worker with the layer it runs and for how long. Anywhere else (a SLURM log, a Ray job's
log, CI) one line per finished layer, so a scheduled job's log says how far it got.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from dist_pgkm.distributed.progress import ProgressSnapshot
from dist_pgkm.utils.memory import format_bytes

if TYPE_CHECKING:
    from dist_pgkm.finetune.pipeline import StepReport

__all__ = ["finetune_progress", "format_duration", "quantize_progress", "worker_summary_lines"]


def format_duration(seconds: float | None) -> str:
    """``1:02:03``, ``2:03``, or ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _rate(weights_per_second: float) -> str:
    return f"{weights_per_second / 1e6:.2f} M weights/s"


def _headline(snap: ProgressSnapshot, elapsed: float, eta: float | None) -> str:
    c = snap.calibration
    if c is not None:
        return (
            f"calibrating {c.blocks_done}/{c.blocks_total} blocks · "
            f"{c.tokens_per_second:,.0f} tokens/s · {format_duration(elapsed)} elapsed · "
            f"eta {format_duration(eta)}"
        )
    return (
        f"{snap.description} {snap.done}/{snap.total} layers · {_rate(snap.weights_per_second)}"
        f" · {format_duration(elapsed)} elapsed · eta {format_duration(eta)}"
    )


class _LiveView:
    """The latest snapshot, aged by the time since it arrived, as a rich renderable."""

    def __init__(self) -> None:
        self._snap: ProgressSnapshot | None = None
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def update(self, snap: ProgressSnapshot) -> None:
        with self._lock:
            self._snap, self._at = snap, time.monotonic()

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            snap, age = self._snap, time.monotonic() - self._at
        if snap is None:
            return Text("starting")
        c = snap.calibration
        left = snap.eta_seconds if c is None else c.eta_seconds
        eta = None if left is None else max(0.0, left - age)
        done, total = (snap.done, snap.total) if c is None else (c.blocks_done, c.blocks_total)
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=max(total, 1), completed=done, width=30),
            Text(_headline(snap, snap.elapsed + age, eta)),
        )
        rows = Table.grid(padding=(0, 2))
        for w in snap.workers:
            doing = f"{w.job} {w.job_seconds + age:.0f} s" if w.job is not None else "idle"
            rows.add_row(f"  {w.label}", w.node, doing, f"{w.jobs_done} done")
        return Group(head, rows)


@contextmanager
def quantize_progress(stream: TextIO | None = None) -> Iterator[Callable[[ProgressSnapshot], None]]:
    """A listener for :class:`~dist_pgkm.distributed.progress.RunTracker` snapshots."""
    from rich.console import Console

    console = Console(file=stream or sys.stderr)
    if not console.is_terminal:
        yield _log_lines(stream or sys.stderr)
        return
    from rich.live import Live

    view = _LiveView()
    with Live(view, console=console, refresh_per_second=4, transient=True):
        yield view.update


def _log_lines(out: TextIO) -> Callable[[ProgressSnapshot], None]:
    seen = {"done": -1, "blocks": 0}

    def write(snap: ProgressSnapshot) -> None:
        c = snap.calibration
        if c is not None:
            if c.blocks_done > seen["blocks"]:
                seen["blocks"] = c.blocks_done
                print(
                    f"[calibration {c.blocks_done}/{c.blocks_total} blocks] "
                    f"{c.tokens_per_second:,.0f} tokens/s · eta {format_duration(c.eta_seconds)}",
                    file=out,
                    flush=True,
                )
            return
        last = snap.last_finished
        if snap.done == seen["done"] or last is None:
            return
        seen["done"] = snap.done
        print(
            f"[{snap.done}/{snap.total}] {last.name} {last.seconds:.1f} s on {last.worker} · "
            f"{_rate(snap.weights_per_second)} · eta {format_duration(snap.eta_seconds)}",
            file=out,
            flush=True,
        )

    return write


def worker_summary_lines(timing: dict[str, Any], slowest: int = 3) -> list[str]:
    """The end-of-run summary: one line per worker, the overall idle share, the slowest layers."""
    lines = []
    for w in timing.get("workers", []):
        lost = " (lost)" if w["lost"] else ""
        rss = f", peak RSS {format_bytes(w['peak_rss_bytes'], 1)}" if w["peak_rss_bytes"] else ""
        lost_work = w.get("lost_seconds", 0.0)
        redone = f" + {lost_work:.1f} s on a job lost with it" if lost_work else ""
        lines.append(
            f"  {w['worker']} on {w['node']}{lost}: {w['jobs']} layers, busy "
            f"{w['busy_seconds']:.1f} s{redone} of {w['alive_seconds']:.1f} s, idle "
            f"{100 * w['idle_share']:.0f}%{rss}"
        )
    if timing.get("workers"):
        lines.append(f"  idle share over all workers: {100 * timing['idle_share']:.0f}%")
    if layers := timing.get("slowest_layers", [])[:slowest]:
        listed = ", ".join(f"{t['name']} {t['seconds']:.1f} s" for t in layers)
        lines.append(f"  slowest layers: {listed}")
    check = timing.get("eta_check")
    if check and check["estimate_seconds"] is not None:
        lines.append(
            f"  eta at mid-run: {format_duration(check['estimate_seconds'])}, the rest took "
            f"{format_duration(check['actual_seconds'])}"
        )
    return lines


@contextmanager
def finetune_progress(stream: TextIO | None = None) -> Iterator[Callable[[StepReport], None]]:
    """A listener for the fine-tuning loop: stage, step, loss, tokens/s, ETA."""
    from rich.console import Console

    console = Console(file=stream or sys.stderr)
    out = stream or sys.stderr

    def line(r: StepReport) -> str:
        return (
            f"stage {r.stage} ({r.stage_index + 1}/{r.n_stages}) step {r.step}/{r.steps} · "
            f"loss {r.loss:.4f} · {r.tokens_per_second:,.0f} tokens/s · "
            f"{r.done_steps}/{r.total_steps} steps · eta {format_duration(r.eta_seconds)}"
        )

    if not console.is_terminal:

        def log(r: StepReport) -> None:
            every = max(1, r.total_steps // 100)
            if r.done_steps % every == 0 or r.step == r.steps:
                print(line(r), file=out, flush=True)

        yield log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
        transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("fine-tuning", total=None)

        def update(r: StepReport) -> None:
            bar.update(task, completed=r.done_steps, total=r.total_steps, description=line(r))

        yield update
