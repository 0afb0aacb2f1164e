"""``dist-pgkm export-dense``: a checkpoint decoded into a plain Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_pgkm.cli._common import Subparsers, stdout_console


def _run(args: argparse.Namespace) -> int:
    from dist_pgkm.checkpoint.hf import export_dense

    export_dense(args.dir, args.out)
    stdout_console().print(f"{args.out}: plain Hugging Face model (decoded weights)")
    return 0


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "export-dense",
        parents=parents,
        help="decode a checkpoint into a plain Hugging Face model dir any runtime can load",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="output directory of quantize")
    p.add_argument("out", type=Path, metavar="OUT", help="new model directory")
    p.set_defaults(handler=_run)
