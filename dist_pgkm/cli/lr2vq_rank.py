"""``dist-pgkm lr2vq-rank``: LR²VQ's clustering dimension per layer, before fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_pgkm.cli._common import (
    Subparsers,
    positive_int,
    progress_bar,
    stdout_console,
    write_json_file,
)
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.models.offline import resolve_model


def _run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dist_pgkm.config.quantize import load_config, name_matches
    from dist_pgkm.distributed.plan import plan_run
    from dist_pgkm.dkm.lr2vq import LayerRank, layer_rank
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.source import open_source

    source = open_source(resolve_model(args.model))
    jobs = list(plan_run(find_layers(source), load_config(args.config)).jobs)
    if args.match:
        jobs = [job for job in jobs if name_matches(args.match, job.name)]
    if not jobs:
        raise InvalidInputError(
            f"--match {' '.join(args.match)} selects none of the layers {args.config} quantizes; "
            "patterns are exact names or full-match `re:` regexes."
        )
    rows: list[LayerRank] = []
    with progress_bar() as update:
        for i, job in enumerate(jobs):
            update(i, len(jobs), f"{job.name}: ranks")
            weight = source.read(job.tensor)
            rows.append(
                layer_rank(
                    job.name, weight, job.block_size, job.k, sample=args.sample, seed=job.seed
                )
            )
        update(len(jobs), len(jobs), "done")
    table = Table(title="LR²VQ rank per layer (smallest d within 2% of the best total error)")
    for column in ("layer", "m", "k", "d", "error at each candidate d (of ‖X‖²)"):
        table.add_column(
            column, justify="left" if column.startswith(("layer", "error")) else "right"
        )
    for row in rows:
        errors = ", ".join(f"{d}: {e:.3f}" for d, e in row.relative_error.items())
        table.add_row(row.layer, str(row.block_size), str(row.k), str(row.rank), errors)
    console = stdout_console()
    console.print(table)
    chosen = sorted({row.rank for row in rows})
    console.print(
        f"{len(rows)} layers; ranks chosen: {', '.join(map(str, chosen))}. Put one in a stage as "
        "`dkm: {rank: D}`, or `rank: auto` to apply this rule when the stage starts."
    )
    if args.json is not None:
        write_json_file(args.json, [row.as_dict() for row in rows])
    return 0


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "lr2vq-rank",
        parents=parents,
        help="choose LR²VQ's clustering dimension d for each layer before fine-tuning",
        description=(
            "For every layer the quantize config selects: low-rank error plus PG k-means error "
            "in d dimensions for each candidate d (powers of two below the block size, and the "
            "block size), and the smallest d within 2%% of the best (docs/dkm.md)."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model directory or a packaged model name")
    p.add_argument(
        "--config", required=True, metavar="CONFIG", help="quantize config (block sizes, k)"
    )
    p.add_argument(
        "--match", nargs="+", default=None, metavar="PATTERN",
        help="only these layers: exact names or `re:` full-match regexes",
    )  # fmt: skip
    p.add_argument(
        "--sample", type=positive_int, default=16384, metavar="N",
        help="sub-vectors sampled per layer (default 16384)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    p.set_defaults(handler=_run)
