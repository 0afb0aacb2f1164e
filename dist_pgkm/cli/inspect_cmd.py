"""``dist-pgkm inspect``: per-layer sizes, bits/weight, errors and empty clusters.

(Named ``inspect_cmd`` so as not to shadow the standard library's ``inspect``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_pgkm.cli._common import (
    Subparsers,
    add_no_verify,
    fmt_bytes,
    stdout_console,
    write_json_file,
)


def _run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dist_pgkm.checkpoint.summary import describe
    from dist_pgkm.checkpoint.verify import verify_enabled

    info = describe(args.dir, verify=verify_enabled(False if args.no_verify else None))
    table = Table(title=str(args.dir))
    columns = ("layer", "shape", "bs", "K", "used", "extras", "bits/w", "rel SSE", "empty", "s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "extras") else "right")
    for layer in info.layers:
        table.add_row(
            layer.name + (f" (+{', '.join(layer.tied)})" if layer.tied else ""),
            "x".join(map(str, layer.shape)),
            str(layer.block_size),
            str(layer.k),
            f"{layer.codeword_use:.0%}",
            layer.extras,
            f"{layer.bits_per_weight:.3f}",
            "-" if layer.rel_sse is None else f"{layer.rel_sse:.4f}",
            "-" if layer.empty_final is None else f"{layer.empty_final}/{layer.empty_total}",
            "-" if layer.seconds is None else f"{layer.seconds:.1f}",
        )
    console = stdout_console()
    console.print(table)
    console.print(
        f"{len(info.layers)} quantized layers, {info.quantized_params / 1e6:.2f}M weights at "
        f"{info.bits_per_weight:.3f} bits/weight (codebooks, scales and outliers included); "
        f"{info.float_params / 1e6:.2f}M float parameters ({fmt_bytes(info.float_bytes)}); "
        f"checkpoint {fmt_bytes(info.checkpoint_bytes)}, {info.model_bits_per_param:.3f} "
        f"bits/parameter, {info.compression_vs_fp16:.2f}x smaller than fp16. "
        "empty = clusters empty at the end / met over all iterations."
    )
    if info.verified:
        console.print("model files: sha256 verified against the run's record")
    elif info.verified is False:
        console.print("model files: not verified (no manifest.json records their sha256)")
    if args.json is not None:
        write_json_file(args.json, info.as_dict())
    return 0


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect",
        parents=parents,
        help="per-layer sizes, bits/weight, errors and empty clusters of a checkpoint",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="output directory of quantize")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON")
    add_no_verify(p)
    p.set_defaults(handler=_run)
