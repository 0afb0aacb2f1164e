"""``dist-pgkm quantize``: a model's layers into one checkpoint (resumable)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_pgkm.cli._common import (
    Subparsers,
    byte_size,
    fmt_bytes,
    non_negative_int,
    positive_int,
    stdout_console,
    write_json_file,
)
from dist_pgkm.cli._ray import add_ray_options, ray_options
from dist_pgkm.models.offline import PACKAGED_MODELS, resolve_model

if TYPE_CHECKING:
    from dist_pgkm.config.quantize import QuantizeConfig

CALIB_CACHE_ENV = "DIST_PGKM_CALIB_CACHE"
"""Environment variable: the default of ``quantize --calib-cache``."""


def _run(args: argparse.Namespace) -> int:
    from dist_pgkm.checkpoint.summary import describe
    from dist_pgkm.config.quantize import load_config
    from dist_pgkm.console import quantize_progress, worker_summary_lines
    from dist_pgkm.distributed.coordinator import quantize_model
    from dist_pgkm.eval.text import calibration_ids
    from dist_pgkm.utils.threads import set_threads

    # The in-process path clusters here: one thread per core this process really gets.
    set_threads()
    config = load_config(
        args.config, method=args.method, seed=args.seed, convention=args.convention
    )
    config = _with_calibration(config, args.calib, args.calib_samples)
    model = resolve_model(args.model)
    calib_ids = None
    if config.needs_calibration and config.calibration.text is not None:
        calib_ids = calibration_ids(model, config.calibration)
    with quantize_progress() as update:
        summary = quantize_model(
            model,
            config,
            args.out,
            calib_ids=calib_ids,
            calib_cache=args.calib_cache or os.environ.get(CALIB_CACHE_ENV) or None,
            resume=args.resume,
            max_shard_bytes=args.max_shard_size,
            progress=update,
            **ray_options(args),
        )
    info = describe(args.out)
    console = stdout_console()
    plan = summary.plan
    console.print(
        f"[bold]{args.out}[/]: {len(plan.jobs)} layers quantized with {config.method} "
        f"({summary.done_before} resumed, {len(summary.redone)} redone), "
        f"{len(plan.skipped)} skipped, {plan.n_float} kept in float"
    )
    for skipped in plan.skipped:
        console.print(f"  skipped {skipped.name} {skipped.shape}: {skipped.reason}")
    console.print(
        f"  {info.bits_per_weight:.3f} bits/weight (codebooks included) over "
        f"{info.quantized_params / 1e6:.1f}M quantized weights; checkpoint "
        f"{fmt_bytes(info.checkpoint_bytes)} for {info.params / 1e6:.1f}M parameters "
        f"({info.compression_vs_fp16:.2f}x smaller than fp16)"
    )
    console.print(
        f"  {summary.seconds:.1f} s (quantize {summary.quantize_seconds:.1f} s, merge "
        f"{summary.merge_seconds:.1f} s), peak RSS {fmt_bytes(summary.peak_rss_bytes)}"
    )
    if summary.calibration is not None:
        console.print(_calibration_line(summary.calibration, summary.metrics), highlight=False)
    for line in worker_summary_lines(summary.timing):
        console.print(line, highlight=False)
    from dist_pgkm.eval.report import write_report

    write_report(args.out, info, summary.as_dict())
    console.print(f"  report: {args.out / 'report.json'} and {args.out / 'report'}/*.png")
    if args.json is not None:
        write_json_file(args.json, {**summary.as_dict(), "checkpoint": info.as_dict()})
    return 0


def _with_calibration(
    config: QuantizeConfig, text: str | None, samples: int | None
) -> QuantizeConfig:
    """The config with ``--calib`` / ``--calib-samples`` in its ``calibration`` section.

    They are dropped (with a warning) when no rule asks for ``metric: hessian``, so that they
    do not change the run's fingerprint for nothing.
    """
    from dist_pgkm.config.quantize import load_config

    if text is None and samples is None:
        return config
    if not config.needs_calibration:
        logging.getLogger(__name__).warning(
            "--calib/--calib-samples given, but no rule asks for `metric: hessian`: ignored"
        )
        return config
    data = config.model_dump(mode="json")
    data["calibration"].update(
        {key: value for key, value in (("text", text), ("samples", samples)) if value}
    )
    return load_config(data)


def _calibration_line(calibration: dict[str, Any], metrics: dict[str, str]) -> str:
    aware = sum(1 for metric in metrics.values() if metric != "weight")
    if calibration.get("blocks_run"):
        what = (
            f"calibration: {calibration['samples']} x {calibration['seq_len']} tokens through "
            f"{calibration['blocks_run']} blocks in {calibration['seconds']:.1f} s "
            f"({calibration['tokens_per_second']:,.0f} tokens/s per block), "
            f"peak RSS {fmt_bytes(calibration['peak_rss_bytes'])}"
        )
        if calibration.get("worker_peak_rss_bytes"):  # on Ray workers
            rss = ", ".join(fmt_bytes(r) for r in calibration["worker_peak_rss_bytes"])
            what += f" on {calibration['workers']} Ray workers (peak RSS {rss})"
    else:
        what = f"calibration: reused for {calibration['reused']} layers ({calibration['store']})"
    return f"  {what}; {aware} of {len(metrics)} layers quantized activation-aware"


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from dist_pgkm.config.kmeans import METHOD_OPTIONS

    p = subparsers.add_parser(
        "quantize",
        parents=parents,
        help="quantize a model's layers into one checkpoint (resumable)",
        description=(
            "Product-quantize the layers of MODEL selected by the config into one checkpoint "
            "in DIR. Running the same command again on the same DIR resumes the run."
        ),
    )
    p.add_argument(
        "model",
        help="HF model dir, .safetensors file, GGUF file/dir, or a packaged model: "
        + ", ".join(PACKAGED_MODELS),
    )
    p.add_argument("--config", required=True, type=Path, metavar="CFG", help="YAML config")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--resume", action="store_true", help="require an existing run in DIR to continue"
    )
    p.add_argument(
        "--method", choices=tuple(METHOD_OPTIONS), default=None, help="override the config's"
    )
    p.add_argument("--seed", type=non_negative_int, default=None, help="override the config's")
    p.add_argument(
        "--convention",
        choices=("ipq", "llm"),
        default=None,
        help=(
            "override the config's: ipq quantizes every layer the rules select, llm only the "
            "layers inside the model's repeated blocks (embeddings and LM head kept)"
        ),
    )
    p.add_argument(
        "--max-shard-size",
        type=byte_size,
        default=5 * 10**9,
        metavar="SIZE",
        help="split the checkpoint into files of at most SIZE (default 5GB)",
    )
    add_ray_options(p)
    p.add_argument(
        "--calib",
        default=None,
        metavar="TEXT",
        help="calibration text for rules with `metric: hessian`: a corpus name (wordnet, "
        "debian-reference, wikitext-2) or a text file; overrides calibration.text",
    )
    p.add_argument(
        "--calib-samples",
        type=positive_int,
        default=None,
        metavar="N",
        help="calibration windows of calibration.seq_len tokens (default: the config's, 128)",
    )
    p.add_argument(
        "--calib-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the calibration in DIR/<key> (key: model files, windows, samples, seq_len) "
        "so that later runs on the same model and text reuse it, whatever their block sizes "
        f"(default: ${CALIB_CACHE_ENV}, else OUT/calib for this run only)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the run summary as JSON")
    p.set_defaults(handler=_run)
