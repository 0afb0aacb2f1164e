"""The ``dist-pgkm`` command line.

One module per command (or family of commands), each with a ``register(subparsers, parents)``
that adds its parser and sets ``handler`` to the function running it; :data:`_COMMANDS` lists
them (and ``bench`` lists its benchmarks). Adding a command is a module with a small handler
plus one entry there. Shared pieces live in ``_common`` (argument types, exit codes, logging,
progress, output) and ``_ray`` (the Ray options, defined once). The CLI owns what library code
never does: logging handlers, progress display and printing; anything a Python user could want
(evaluation, calibration windows, model names, LR²VQ ranks) is a library function the handler
calls. Heavy libraries are imported inside the handlers.

A :class:`~dist_pgkm.errors.DistPGKMError` ends the program with ``error: <message>`` and exit
status 2, without a traceback; any other exception is a bug and propagates.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dist_pgkm import __version__
from dist_pgkm.cli import (
    bench,
    eval_cmd,
    export_dense,
    finetune,
    generate,
    inspect_cmd,
    lr2vq_rank,
    quantize,
)
from dist_pgkm.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    Handler,
    Register,
    setup_logging,
)
from dist_pgkm.errors import DistPGKMError

__all__ = ["build_parser", "main"]


# Top-level commands, in the order `dist-pgkm --help` lists them.
_COMMANDS: tuple[Register, ...] = (
    quantize.register,
    finetune.register,
    eval_cmd.register,
    inspect_cmd.register,
    export_dense.register,
    generate.register,
    lr2vq_rank.register,
    bench.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``dist-pgkm`` argument parser with every registered command."""
    # -v is accepted before and after the command. Its default is SUPPRESS so that a subcommand
    # parser does not reset a count given before the command (argparse shares the action).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output on stderr (-v: info, -vv: debug)",
    )
    parser = argparse.ArgumentParser(
        prog="dist-pgkm",
        description="Product quantization of pretrained models with Partitioning-Guided k-means.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dist-pgkm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dist-pgkm`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a usage or user error (``error: ...`` on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers draws a progress bar for every model it loads; the CLI draws its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Absent when -v was not given (its default is SUPPRESS, see build_parser).
    setup_logging(getattr(args, "verbose", 0))
    handler: Handler = args.handler
    try:
        return handler(args)
    except DistPGKMError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
