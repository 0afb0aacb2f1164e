"""What every benchmark shares: machine, commit, JSON output, markdown sections, targets.

A benchmark report is computed, never typed: the functions here describe where it ran
(:func:`machine_info`, :func:`git_commit`, :func:`utc_now`), write it (:func:`write_json`,
:func:`replace_marker_section`) and render its tables (:func:`markdown_table`,
:func:`targets_markdown`, :func:`targets_rich_table`) from the measured values.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.utils.memory import format_bytes

__all__ = [
    "MARKDOWN_INTRO",
    "RowsReport",
    "Target",
    "atomic_write_text",
    "format_bytes",
    "format_value",
    "git_commit",
    "machine_info",
    "machine_line",
    "markdown_table",
    "print_rows",
    "replace_marker_section",
    "rows_section",
    "section_markers",
    "targets_markdown",
    "targets_rich_table",
    "utc_now",
    "write_json",
]

logger = logging.getLogger(__name__)

MARKDOWN_INTRO = (
    "# Benchmarks\n\n"
    "Each section between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` is written by\n"
    "`dist-pgkm bench NAME --md docs/benchmarks.md` from measured values; do not edit it by hand.\n"
    "Everything outside the markers is left as it is.\n"
)
"""How a markdown report file starts when a benchmark creates it."""

# Root of the source checkout when installed in editable mode (benchmarks/ sits at the top).
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One goal of a benchmark, checked against measured values.

    Attributes:
        id: Short identifier (``"1"``, ``"5a"``).
        name: What is measured, in words.
        measured: The measured value (a number, ``"inf"``, or a short text when not measurable).
        target: The goal as text (``"<= 1.005"``).
        met: Whether the goal is met; None when it could not be measured in this run.
        note: One line of context shown next to the value (where, which sums, ...).
        detail: Supporting numbers (sums, worst data set, ...), JSON-ready.
    """

    id: str
    name: str
    measured: float | int | str | None
    target: str
    met: bool | None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @property
    def status(self) -> str:
        """``met``, ``MISSED`` or ``not measured``."""
        if self.met is None:
            return "not measured"
        return "met" if self.met else "MISSED"


_R = TypeVar("_R", bound="RowsReport")


@dataclass
class RowsReport:
    """A benchmark run whose results are rows and targets; :meth:`as_dict` is the JSON file.

    Subclasses name their benchmark (``benchmark``) and may add fields, which
    :meth:`as_dict` includes after the common ones.
    """

    benchmark: ClassVar[str] = "rows"

    mode: str
    command: str
    machine: dict[str, Any]
    commit: str | None
    date: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def start(cls: type[_R], mode: str, command: str) -> _R:
        """An empty report of a run starting now, on this machine, at this commit."""
        return cls(mode=mode, command=command, machine=machine_info(), commit=git_commit(),
                   date=utc_now())  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "mode": self.mode,
            "command": self.command,
            "machine": self.machine,
            "commit": self.commit,
            "date": self.date,
            "seconds": self.seconds,
            "rows": self.rows,
            "targets": [t.as_dict() for t in self.targets],
        }
        common = set(RowsReport.__dataclass_fields__)
        for name in self.__dataclass_fields__:
            if name not in common:
                out[name] = getattr(self, name)
        return out


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # reported in KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _version(*distributions: str) -> str | None:
    """Installed version of the first of ``distributions`` found (metadata only, no import)."""
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe the machine and software a benchmark runs on.

    Versions are read from package metadata, so nothing heavy is imported here.

    Args:
        extra: Benchmark-specific entries (e.g. thread counts) merged into the result.

    Returns:
        ``cpu``, ``cores`` (``os.cpu_count()``), ``ram_bytes``, ``platform``, ``python`` and the
        versions of ``torch``, ``faiss`` (cpu or gpu build) and ``dist_pgkm``, plus ``extra``.
    """
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "dist_pgkm": _version("dist-pgkm"),
    }
    info.update(extra or {})
    return info


def machine_line(machine: Mapping[str, Any], commit: str | None, date: str) -> str:
    """One line saying where and when a benchmark ran (for markdown reports)."""
    versions = ", ".join(
        f"{name} {machine[name]}" for name in ("python", "torch", "faiss") if machine.get(name)
    )
    threads = machine.get("torch_threads")
    parts = [
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{format_bytes(machine.get('ram_bytes'))} RAM",
        versions,
    ]
    if threads is not None:
        parts.append(f"{threads} threads")
    parts.append(f"commit `{commit or 'unknown'}`")
    parts.append(date)
    return " · ".join(p for p in parts if p)


BENCH_OUTPUTS = ("benchmarks/results", "docs/benchmarks.md", "docs/img")
"""What the benchmarks themselves write: changes there do not make a checkout dirty (a run
continued over several invocations rewrites them between its parts)."""


def git_commit(repo: Path | None = None) -> str | None:
    """Short commit hash of ``repo``, with ``-dirty`` when the work tree has changes other than
    the benchmarks' own outputs (:data:`BENCH_OUTPUTS`).

    Args:
        repo: Directory inside a git work tree; defaults to the checkout this package runs from.

    Returns:
        e.g. ``"213740d"`` or ``"213740d-dirty"``; None when ``repo`` is not a git checkout or
        git is not installed.
    """
    cwd = _REPO_ROOT if repo is None else repo

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout

    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return None
    outside = [f":(top,exclude){path}" for path in BENCH_OUTPUTS]
    status = git("status", "--porcelain", "--", ":(top)", *outside)
    dirty = "-dirty" if status is None or status.strip() else ""
    return head.strip() + dirty


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace`` (parents created).

    The text is written as is: no newline translation, so unchanged bytes stay unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write a report as indented JSON, atomically, creating parent directories.

    Raises:
        ValueError: ``payload`` holds NaN or infinity (JSON has no such numbers; report
            ``"inf"`` as a string instead).
    """
    text = json.dumps(payload, indent=2, allow_nan=False, sort_keys=False) + "\n"
    atomic_write_text(path, text)
    logger.info("Wrote %s", path)


def section_markers(name: str) -> tuple[str, str]:
    """The start and end markers of section ``name`` in a markdown file."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_marker_section(path: Path, name: str, body: str, intro: str = "") -> None:
    """Replace what lies between section ``name``'s markers in ``path``; nothing else changes.

    Everything outside the markers, the markers themselves included, is kept byte for byte.
    Without markers, they are appended with the section at the end of the file (a new file
    starts with ``intro``).

    Args:
        path: Markdown file.
        name: Section name; markers are ``<!-- bench:NAME:start -->`` / ``...:end -->``.
        body: New content of the section (a trailing newline is added when missing).
        intro: Text a new file starts with.

    Raises:
        InvalidInputError: The file holds one marker without the other, a marker twice, or the
            end marker before the start marker.
    """
    start, end = section_markers(name)
    body = body if body.endswith("\n") else body + "\n"
    if path.exists():
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    else:
        text = intro
    n_start, n_end = text.count(start), text.count(end)
    if n_start == 0 and n_end == 0:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        new = f"{text}{sep}{start}\n{body}{end}\n"
    elif n_start == 1 and n_end == 1 and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        new = f"{head}{start}\n{body}{end}{tail}"
    else:
        raise InvalidInputError(
            f"{path}: the section {name!r} must be delimited by exactly one {start} followed by "
            f"one {end}; found {n_start} start and {n_end} end marker(s) in that order. Fix the "
            "markers by hand (or delete both) and run again; nothing was written."
        )
    atomic_write_text(path, new)
    logger.info("Updated section %r of %s", name, path)


def format_value(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for a missing (None) or NaN value, for table cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: str | None = None,
    group_first_column: bool = False,
) -> str:
    """Render a GitHub-flavoured markdown table.

    Args:
        headers: Column titles.
        rows: Cell values (rendered with ``str``; ``|`` is escaped).
        align: One character per column, ``l`` or ``r`` (default: all left).
        group_first_column: Leave the first cell empty when it repeats the row above, so rows
            read as groups.

    Returns:
        The table, one line per row, ending with a newline.
    """
    align = align or "l" * len(headers)
    assert len(align) == len(headers), "one alignment character per column"
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "| " + " | ".join(rule) + " |",
    ]
    previous: object = object()
    for row in rows:
        assert len(row) == len(headers), "one cell per column"
        cells = [_md_cell(c) for c in row]
        if group_first_column:
            if row[0] == previous:
                cells[0] = ""
            previous = row[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _measured_text(target: Target) -> str:
    m = target.measured
    if isinstance(m, float):
        return f"{m:.4g}"
    return "—" if m is None else str(m)


_TARGET_COLUMNS = ("#", "target", "measured", "goal", "status", "note")


def targets_markdown(targets: Sequence[Target]) -> str:
    """Markdown table of targets: id, what, measured value, goal, met/MISSED, note."""
    rows = [(t.id, t.name, _measured_text(t), t.target, t.status, t.note) for t in targets]
    return markdown_table(_TARGET_COLUMNS, rows, align="llrlll")


def targets_rich_table(targets: Sequence[Target], title: str = "Targets") -> Table:
    """Rich table of targets, the status coloured."""
    table = Table(title=title, title_justify="left")
    for col in _TARGET_COLUMNS:
        table.add_column(col, overflow="fold", justify="right" if col == "measured" else "left")
    colours = {"met": "green", "MISSED": "bold red", "not measured": "yellow"}
    for t in targets:
        status = f"[{colours[t.status]}]{t.status}[/]"
        table.add_row(
            escape(t.id),
            escape(t.name),
            escape(_measured_text(t)),
            escape(t.target),
            status,
            escape(t.note),
        )
    return table


def print_rows(
    console: Console,
    title: str,
    report: RowsReport,
    columns: Sequence[str],
    align: str,
    cells: Sequence[Sequence[str]],
    footer: str = "",
) -> None:
    """Print a row report on the terminal: its table, its targets, mode, time and commit."""
    table = Table(title=f"{title} ({report.mode})", title_justify="left")
    for column, side in zip(columns, align, strict=True):
        table.add_column(column, justify="right" if side == "r" else "left")
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    if report.targets:
        console.print(targets_rich_table(report.targets))
    console.print(
        f"{report.mode} mode, {report.seconds:.0f} s, commit {report.commit or 'unknown'}"
        + (f"; {footer}" if footer else ""),
        markup=False,
        highlight=False,
    )


def rows_section(
    title: str,
    about: str,
    report: RowsReport,
    columns: Sequence[str],
    align: str,
    cells: Sequence[Sequence[str]],
) -> str:
    """A row report as a markdown section: title, what it measures, command, machine and commit,
    the table and the targets."""
    return "\n".join(
        [
            f"### {title} ({report.mode} mode)",
            "",
            about,
            "",
            f"Command: `{report.command}` ({report.seconds:.0f} s)",
            "",
            machine_line(report.machine, report.commit, report.date),
            "",
            markdown_table(columns, cells, align=align),
            targets_markdown(report.targets),
        ]
    )
