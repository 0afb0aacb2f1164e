"""What every command of the CLI shares: argument types, exit codes, logging, progress and output.

The CLI owns what library code never does: logging handlers, progress display and printing.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

# Subparsers of one level; argparse keeps the class private.
Subparsers = Any
Handler = Callable[[argparse.Namespace], int]
Register = Callable[[Subparsers, list[argparse.ArgumentParser]], None]
"""A command's ``register(subparsers, parents)``: adds its parser, sets ``handler``."""

EXIT_USER_ERROR = 2
"""Exit status of a usage error (argparse's) or a :class:`~dist_pgkm.errors.DistPGKMError`."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C."""


# --- argument types ----------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Parser of an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """Parser of a comma-separated list whose items must be among ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose a "
                f"comma-separated subset of {','.join(choices)}"
            )
        return items

    return parse


def add_choice_list(p: argparse.ArgumentParser, flag: str, choices: tuple[str, ...]) -> None:
    """``FLAG a,b,...``: a comma-separated subset of ``choices``, all of them by default."""
    p.add_argument(
        flag,
        type=name_list(choices),
        default=choices,
        metavar="LIST",
        help=f"comma-separated {flag.lstrip('-')} (default {','.join(choices)})",
    )


def pattern_list(text: str) -> tuple[str, ...]:
    """Parser of a comma-separated list of names or patterns, empty items dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def byte_size(text: str) -> int:
    """Parser of a size such as ``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def add_no_verify(p: argparse.ArgumentParser) -> None:
    """``--no-verify`` (commands that load or describe a checkpoint)."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the model files' sha256 against manifest.json (reads every byte "
        "once, see docs/format.md; also DIST_PGKM_VERIFY=0)",
    )


# --- logging, progress and output -------------------------------------------------------------


def setup_logging(verbosity: int) -> None:
    """Route log records to stderr through rich: WARNING, ``-v`` INFO, ``-vv`` DEBUG."""
    from rich.console import Console
    from rich.logging import RichHandler

    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    handler = RichHandler(console=Console(stderr=True), show_path=verbosity >= 2)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # third-party libraries stay quiet unless they warn
    logging.getLogger("dist_pgkm").setLevel(level)


def _no_progress(done: int, total: int, description: str) -> None:
    pass


@contextmanager
def progress_bar() -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr, fed by a ``(done, total, description)`` callback.

    Nothing is drawn when stderr is not a terminal (logs and CI output stay clean).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    if not console.is_terminal:
        yield _no_progress
        return
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        yield update


@contextmanager
def progress_bar_from_first_update() -> Iterator[Callable[[int, int, str], None]]:
    """:func:`progress_bar`, drawn from the first update on: a library call that loads a model
    before it reports progress shows no idle bar meanwhile."""
    with ExitStack() as stack:
        bar: Callable[[int, int, str], None] | None = None

        def update(done: int, total: int, description: str) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(progress_bar())
            bar(done, total, description)

        yield update


def stdout_console() -> Any:
    """A rich console on stdout; 200 columns wide when stdout is not a terminal."""
    from rich.console import Console

    console = Console()
    # Piped output would be cut at 80 columns; the tables are wider.
    return console if console.is_terminal else Console(width=200)


def fmt_bytes(n: float) -> str:
    """``n`` bytes for people (one decimal)."""
    from dist_pgkm.utils.memory import format_bytes

    return format_bytes(n, digits=1)


def write_json_file(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
