"""Kill -9 at random points of a quantize run, rerun the same command, compare the bytes.

A reference checkpoint of MiniLM (the twelve layers of ``tests/distributed``'s job: two
blocks at bs 4 / K 64, the word embeddings at bs 8 / K 256) is written in this process. Then,
``points`` times, ``dist-pgkm quantize`` runs as a user runs it and is killed with SIGKILL:
``merge_points`` of them while the merged file is being written (its temp file exists), the
others after a random number of finished layers plus a random delay. The same command with
``--resume`` then finishes the run, and its checkpoint files (``model.safetensors``,
``config.json``) must equal the reference's byte for byte. The goal: every point identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_pgkm.bench.common import (  # type: ignore[import-not-found, unused-ignore]
    Target,
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

__all__ = ["CONFIG", "KillOptions", "KillReport", "render_report", "run_benchmark"]

CONFIG: dict[str, Any] = {
    "n_iter": 4,
    "rules": [
        {"match": "encoder.layer.1.attention.self.query", "skip": True},
        {"match": "re:encoder\\.layer\\.[01]\\..*", "block_size": 4, "k": 64},
        {"match": "re:embeddings\\.(word|token_type)_embeddings", "block_size": 8, "k": 256},
    ],
}
N_JOBS = 12
CHECKPOINT_FILES = ("model.safetensors", "config.json")


@dataclass(frozen=True)
class KillOptions:
    """Attributes: points (kills), merge_points (of them during the merge), seed, work_dir,
    command (recorded)."""

    points: int = 20
    merge_points: int = 4
    seed: int = 0
    work_dir: Path | None = None
    command: str = ""


@dataclass
class KillReport:
    options: dict[str, Any]
    machine: dict[str, Any]
    commit: str | None
    date: str
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "kill",
            "date": self.date,
            "commit": self.commit,
            "machine": self.machine,
            "options": self.options,
            "seconds": self.seconds,
            "rows": self.rows,
            "targets": [t.as_dict() for t in compute_targets(self)],
        }


def _command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dist_pgkm.cli", "quantize", "minilm-l6",
            "--config", str(config), "--out", str(out)]  # fmt: skip


def _done(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text(encoding="utf-8"))["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _merging(out: Path) -> bool:
    return any(out.glob(".model.safetensors.*.tmp"))


def _kill_point(config: Path, out: Path, merge: bool, rng: random.Random) -> dict[str, Any]:
    """Start a run, kill it at the chosen point; what was on disk when it died."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # slower layers: time to kill in between
    proc = subprocess.Popen(
        _command(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    after = rng.randint(0, N_JOBS - 1)
    delay = rng.uniform(0.0, 0.02 if merge else 0.5)
    deadline = time.monotonic() + 600
    reached = False
    while proc.poll() is None and time.monotonic() < deadline:
        if (merge and _merging(out)) or (not merge and _done(out) >= after):
            reached = True
            break
        time.sleep(0.002 if merge else 0.01)
    if reached:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return {
        "mode": "merge" if merge else "layers",
        "killed": proc.returncode == -signal.SIGKILL,
        "layers_done": _done(out),
        "in_merge": _merging(out),
        "delay_s": round(delay, 4),
    }


def run_benchmark(
    options: KillOptions, progress: Callable[[int, int, str], None] | None = None
) -> KillReport:
    """Write the reference, kill ``options.points`` runs, resume each and compare."""
    from dist_pgkm.config import load_config
    from dist_pgkm.distributed.coordinator import quantize_model
    from dist_pgkm.models.offline import minilm_dir

    report = KillReport(
        options={
            "points": options.points,
            "merge_points": options.merge_points,
            "seed": options.seed,
            "command": options.command,
        },
        machine=machine_info(),
        commit=git_commit(),
        date=utc_now(),
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-kill-") as tmp:
        work = options.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = work / "kill-config.json"  # YAML is a superset of JSON
        config.write_text(json.dumps(CONFIG), encoding="utf-8")
        reference = work / "reference"
        if not (reference / "model.safetensors").is_file():
            quantize_model(minilm_dir(), load_config(CONFIG), reference)
        expected = {name: (reference / name).read_bytes() for name in CHECKPOINT_FILES}
        rng = random.Random(options.seed)
        point = attempts = 0
        while point < options.points and attempts < 3 * options.points:
            attempts += 1
            merge = point < options.merge_points
            out = work / f"run-{attempts:03d}"
            row = _kill_point(config, out, merge, rng)
            if not row["killed"] or (merge and not row["in_merge"]):
                continue  # the run ended (or left the merge) before the kill: not a point
            began = time.perf_counter()
            rerun = subprocess.run(
                [*_command(config, out), "--resume"], capture_output=True, text=True, timeout=900
            )
            row["resume_s"] = round(time.perf_counter() - began, 2)
            row["resume_rc"] = rerun.returncode
            row["identical"] = rerun.returncode == 0 and all(
                (out / name).read_bytes() == data for name, data in expected.items()
            )
            row["point"] = point
            report.rows.append(row)
            point += 1
            if progress is not None:
                progress(point, options.points, f"kill points ({row['mode']})")
        report.options["attempts"] = attempts
    report.seconds = time.perf_counter() - start
    return report


def compute_targets(report: KillReport) -> list[Target]:
    rows = report.rows
    identical = sum(r["identical"] for r in rows)
    merge = sum(r["mode"] == "merge" for r in rows)
    want, want_merge = report.options["points"], report.options["merge_points"]
    return [
        Target(
            "1",
            "kill -9 points resumed to identical bytes",
            f"{identical} of {len(rows)}",
            f"{want} of {want}",
            identical == len(rows) == want,
            "model.safetensors, config.json",
        ),
        Target(
            "2",
            "points during the merge",
            merge,
            f">= {want_merge}",
            merge >= want_merge,
            "the merged file's temp file existed at the kill",
        ),
    ]


def render_report(console: Console, report: KillReport) -> None:
    console.print(targets_rich_table(compute_targets(report), title="kill -9 points"))


def markdown_section(report: KillReport) -> str:
    rows = [
        [r["point"], r["mode"], r["layers_done"], "yes" if r["in_merge"] else "no",
         r["resume_s"], "yes" if r["identical"] else "NO"]
        for r in report.rows
    ]  # fmt: skip
    return "\n".join(
        [
            "## Kill -9 points: quantize resumes to the same bytes",
            "",
            machine_line(report.machine, report.commit, report.date),
            f"`{report.options.get('command') or 'dist-pgkm bench kill'}`: MiniLM, 12 layers; "
            f"{len(report.rows)} kills in {report.options.get('attempts')} attempts, "
            f"{report.seconds:.0f} s.",
            "",
            targets_markdown(compute_targets(report)),
            "",
            markdown_table(
                ["point", "killed", "layers done", "in merge", "resume s", "identical"], rows
            ),
            "",
        ]
    )


def write_markdown(path: Path, report: KillReport) -> None:
    replace_marker_section(path, "kill", markdown_section(report))
