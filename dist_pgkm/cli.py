"""The ``dist-pgkm`` command line.

Each command is one ``_register_*`` function that adds its parser and sets ``handler`` to the
function running it; :data:`_COMMANDS` (top level) and :data:`_BENCHMARKS` (under ``bench``) list
them. Adding a command is a small handler plus one entry there. The CLI owns what library code
never does: logging handlers, progress display and printing. A
:class:`~dist_pgkm.errors.DistPGKMError` ends the program with ``error: <message>`` and exit
status 2, without a traceback; any other exception is a bug and propagates.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_pgkm import __version__
from dist_pgkm.errors import DistPGKMError, InvalidInputError
from dist_pgkm.models.offline import PACKAGED_MODELS, resolve_model
from dist_pgkm.pgkm.api import METHODS

if TYPE_CHECKING:
    from dist_pgkm.config.quantize import QuantizeConfig

__all__ = ["build_parser", "main"]

# Subparsers of one level; argparse keeps the class private.
Subparsers = Any
Handler = Callable[[argparse.Namespace], int]

_EXIT_USER_ERROR = 2
CALIB_CACHE_ENV = "DIST_PGKM_CALIB_CACHE"
"""Environment variable: the default of ``quantize --calib-cache``."""
_EXIT_INTERRUPTED = 130


# --- argument types ----------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
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


def _add_choice_list(p: argparse.ArgumentParser, flag: str, choices: tuple[str, ...]) -> None:
    """``FLAG a,b,...``: a comma-separated subset of ``choices``, all of them by default."""
    p.add_argument(
        flag,
        type=_name_list(choices),
        default=choices,
        metavar="LIST",
        help=f"comma-separated {flag.lstrip('-')} (default {','.join(choices)})",
    )


def _pattern_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


# --- logging and progress ----------------------------------------------------------------------


def _setup_logging(verbosity: int) -> None:
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
def _progress() -> Iterator[Callable[[int, int, str], None]]:
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


def _stdout_console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output would be cut at 80 columns; the tables are wider.
    return console if console.is_terminal else Console(width=200)


# --- bench -------------------------------------------------------------------------------------


def _run_bench_kmeans(args: argparse.Namespace) -> int:
    # mypy checks benchmarks/ as the package `benchmarks`; it cannot follow setuptools'
    # package-dir mapping that installs it as `dist_pgkm.bench` (pyproject.toml).
    from dist_pgkm.bench import kmeans  # type: ignore[import-not-found, unused-ignore]
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    if args.hog:
        doc = kmeans.run_hog()
        _stdout_console().print(kmeans.hog_markdown(doc), markup=False, highlight=False)
        if args.json is not None:
            write_json(args.json, doc)
        if args.md is not None:
            kmeans.write_hog_markdown(args.md, doc)
        return 0
    if args.aware:
        aware = kmeans.AwareOptions(
            threads=args.threads, command=shlex.join(["dist-pgkm", *args.argv])
        )
        with _progress() as update:
            doc = kmeans.run_aware(aware, progress=update)
        _stdout_console().print(kmeans.aware_markdown(doc), markup=False, highlight=False)
        if args.json is not None:
            write_json(args.json, doc)
        if args.md is not None:
            kmeans.write_aware_markdown(args.md, doc)
        return 0
    options = kmeans.BenchOptions(
        quick=args.quick,
        n_iter=args.n_iter,
        seed=args.seed,
        methods=args.methods,
        memory=not args.no_memory,
        threads=args.threads,
        datasets=args.datasets,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    with _progress() as update:
        report = kmeans.run_benchmark(options, progress=update)
    kmeans.render_report(_stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        kmeans.write_markdown(args.md, report)
    return 0


def _register_bench_kmeans(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    methods = tuple(METHODS)
    p = subparsers.add_parser(
        "kmeans",
        parents=parents,
        help="compare pgkm, fairseq-em, faiss and k-means++ on real weights",
        description=(
            "Cluster sub-vectors of real SmolLM2-135M and MiniLM layers (clean, zero blocks, "
            "fp16, large K) and a 300k speed set with every method; print the results and the "
            "targets computed from them."
        ),
    )
    p.add_argument("--quick", action="store_true", help="the short selection (< 2 min, 2 cores)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md",
        type=Path,
        metavar="PATH",
        help="rewrite the kmeans section (between its markers) of this markdown file",
    )
    p.add_argument(
        "--n-iter", type=_positive_int, default=15, metavar="N", help="iterations (default 15)"
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every run")
    _add_choice_list(p, "--methods", methods)
    p.add_argument(
        "--no-memory", action="store_true", help="skip the 10M x 8 peak-memory measurement"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch and faiss threads (default: the cores this process may use)",
    )
    p.add_argument(
        "--aware",
        action="store_true",
        help=(
            "instead: time quantize with metric: hessian against metric: weight per SmolLM2 "
            "layer shape at the llm-4bit/3bit/2bit settings (section kmeans-aware of --md)"
        ),
    )
    p.add_argument(
        "--hog",
        action="store_true",
        help=(
            "instead: quantize MiniLM in-process and on 2 Ray workers, each beside a CPU hog "
            "(section kmeans-hog of --md; run it under flock when Ray is shared)"
        ),
    )
    # Hidden: restrict to some data sets by name or shell pattern (tests, investigations).
    p.add_argument("--datasets", type=_pattern_list, default=(), help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_bench_kmeans)


# --- quantize / inspect / export-dense / eval ----------------------------------------------

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


def _byte_size(text: str) -> int:
    """Parser of a size such as ``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _fmt_bytes(n: float) -> str:
    from dist_pgkm.utils.memory import format_bytes

    return format_bytes(n, digits=1)


def _run_quantize(args: argparse.Namespace) -> int:
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
            workers=args.workers,
            address=args.address,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            min_workers=args.min_workers,
            min_workers_timeout=args.min_workers_timeout,
        )
    info = describe(args.out)
    console = _stdout_console()
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
        f"{_fmt_bytes(info.checkpoint_bytes)} for {info.params / 1e6:.1f}M parameters "
        f"({info.compression_vs_fp16:.2f}x smaller than fp16)"
    )
    console.print(
        f"  {summary.seconds:.1f} s (quantize {summary.quantize_seconds:.1f} s, merge "
        f"{summary.merge_seconds:.1f} s), peak RSS {_fmt_bytes(summary.peak_rss_bytes)}"
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
            f"peak RSS {_fmt_bytes(calibration['peak_rss_bytes'])}"
        )
        if calibration.get("worker_peak_rss_bytes"):  # on Ray workers
            rss = ", ".join(_fmt_bytes(r) for r in calibration["worker_peak_rss_bytes"])
            what += f" on {calibration['workers']} Ray workers (peak RSS {rss})"
    else:
        what = f"calibration: reused for {calibration['reused']} layers ({calibration['store']})"
    return f"  {what}; {aware} of {len(metrics)} layers quantized activation-aware"


def _register_quantize(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    p.add_argument("--seed", type=_non_negative_int, default=None, help="override the config's")
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
        type=_byte_size,
        default=5 * 10**9,
        metavar="SIZE",
        help="split the checkpoint into files of at most SIZE (default 5GB)",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="Ray workers: N on an embedded Ray on this machine (or on --address); "
        "0 (default) runs in this process, or one per slot of the --address cluster",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="join the Ray cluster whose head is at HOST:PORT, or 'auto' for $RAY_ADDRESS "
        "(inside `ray job submit`; see docs/distributed.md)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="F",
        help="GPUs each Ray worker reserves (default 0: CPU workers)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=_positive_int,
        default=1,
        metavar="N",
        help="CPUs each CPU Ray worker reserves and uses as threads (default 1)",
    )
    p.add_argument(
        "--min-workers",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="with --address: wait until the cluster has slots for N workers before starting "
        "(nodes that join later get workers too)",
    )
    p.add_argument(
        "--min-workers-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long --min-workers waits before failing (default 600)",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="TEXT",
        help="calibration text for rules with `metric: hessian`: a corpus name (wordnet, "
        "debian-reference, wikitext-2) or a text file; overrides calibration.text",
    )
    p.add_argument(
        "--calib-samples",
        type=_positive_int,
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
    p.set_defaults(handler=_run_quantize)


def _run_finetune(args: argparse.Namespace) -> int:
    import transformers

    from dist_pgkm.checkpoint.summary import describe
    from dist_pgkm.config.finetune import load_finetune_config
    from dist_pgkm.console import finetune_progress
    from dist_pgkm.eval.report import write_report
    from dist_pgkm.eval.text import load_text, tokenize
    from dist_pgkm.finetune.pipeline import finetune_model

    config = load_finetune_config(args.config)
    model_dir = resolve_model(args.model)
    auto: Any = transformers.AutoTokenizer
    tokenizer = auto.from_pretrained(str(model_dir))
    text = config.train.text
    if config.train.objective == "causal-lm":
        ids = tokenize(tokenizer, load_text([] if text == "wordnet" else [text]))
    else:
        ids = _training_sentences(tokenizer, text, config.train.seq_len)
    with finetune_progress() as update:
        summary = finetune_model(
            model_dir,
            config,
            args.out,
            ids,
            resume=args.resume,
            workers=args.workers,
            address=args.address,
            progress=update,
            ray_ranks=args.ranks,
            cpus_per_rank=args.cpus_per_rank,
            gpus_per_rank=args.gpus_per_rank,
        )
    info = describe(args.out)
    console = _stdout_console()
    resumed = summary.resumed_from
    console.print(
        f"[bold]{args.out}[/]: {len(summary.stages)} stages"
        + (f" (resumed at stage {resumed['stage']}, {resumed['phase']})" if resumed else ""),
        highlight=False,
    )
    for stage in summary.stages:
        first, last = stage["loss_first"], stage["loss_last"]
        losses = f"loss {first:.3f} -> {last:.3f}" if first is not None else "no step this call"
        console.print(
            f"  {stage['name']}: {stage['layers']} layers, {stage['steps']} steps, {losses}",
            highlight=False,
        )
    console.print(
        f"  {info.bits_per_weight:.3f} bits/weight over {info.quantized_params / 1e6:.1f}M "
        f"quantized weights; {summary.seconds:.0f} s, {summary.tokens_per_second:,.0f} "
        f"tokens/s, peak RSS {_fmt_bytes(summary.peak_rss_bytes)}",
        highlight=False,
    )
    write_report(args.out, info, summary.as_dict())
    console.print(f"  report: {args.out / 'report.json'} and {args.out / 'report'}/loss.png")
    if args.json is not None:
        write_json_file(args.json, {**summary.as_dict(), "checkpoint": info.as_dict()})
    return 0


def _training_sentences(tokenizer: Any, text: str, seq_len: int) -> Any:
    """Sentences for ``objective: embedding-distill``, tokenized and padded to ``seq_len``.

    ``wordnet``: the glosses and lemmas no retrieval evaluation can use
    (:func:`dist_pgkm.eval.retrieval.training_texts`); a file: its non-empty lines.
    """
    from dist_pgkm.eval.retrieval import training_texts
    from dist_pgkm.eval.text import load_text

    if text == "wordnet":
        sentences = training_texts()
    else:
        sentences = [line.strip() for line in load_text([text]).splitlines() if line.strip()]
    encoded = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    return encoded["input_ids"]


def _register_finetune(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "finetune",
        parents=parents,
        help="staged iPQ: quantize layer groups in turn, fine-tune in between (resumable)",
        description=(
            "Quantize the stages of the config one after the other and fine-tune the model "
            "under DeepSpeed after each, with Quant-Noise on the layers still in float; merge "
            "into the checkpoint format of `quantize`. Running it again resumes."
        ),
    )
    p.add_argument(
        "model",
        help="HF causal-LM directory, or smollm2-135m; a sentence encoder (minilm-l6) with "
        "train.objective embedding-distill",
    )
    p.add_argument("--config", type=Path, required=True, help="finetune config (YAML)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="require an existing run in DIR")
    p.add_argument(
        "--workers", type=_non_negative_int, default=0, metavar="N",
        help="Ray workers for the quantize phases (0: in this process)",
    )  # fmt: skip
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT",
        help="the Ray cluster at HOST:PORT (or 'auto') for --workers or --ranks",
    )  # fmt: skip
    p.add_argument(
        "--ranks", type=_non_negative_int, default=0, metavar="N",
        help="train on N Ray Train workers (0: this process, or torchrun's ranks)",
    )  # fmt: skip
    p.add_argument(
        "--cpus-per-rank", type=_positive_int, default=1, metavar="N",
        help="CPUs (threads) of each Ray Train worker (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-rank", type=float, default=0.0, metavar="F",
        help="GPUs of each Ray Train worker (default 0: CPU training)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="write the run summary as JSON")
    p.set_defaults(handler=_run_finetune)


def _run_lr2vq_rank(args: argparse.Namespace) -> int:
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
    with _progress() as update:
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
    console = _stdout_console()
    console.print(table)
    chosen = sorted({row.rank for row in rows})
    console.print(
        f"{len(rows)} layers; ranks chosen: {', '.join(map(str, chosen))}. Put one in a stage as "
        "`dkm: {rank: D}`, or `rank: auto` to apply this rule when the stage starts."
    )
    if args.json is not None:
        write_json_file(args.json, [row.as_dict() for row in rows])
    return 0


def _register_lr2vq_rank(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
        "--sample", type=_positive_int, default=16384, metavar="N",
        help="sub-vectors sampled per layer (default 16384)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    p.set_defaults(handler=_run_lr2vq_rank)


def _run_inspect(args: argparse.Namespace) -> int:
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
    console = _stdout_console()
    console.print(table)
    console.print(
        f"{len(info.layers)} quantized layers, {info.quantized_params / 1e6:.2f}M weights at "
        f"{info.bits_per_weight:.3f} bits/weight (codebooks, scales and outliers included); "
        f"{info.float_params / 1e6:.2f}M float parameters ({_fmt_bytes(info.float_bytes)}); "
        f"checkpoint {_fmt_bytes(info.checkpoint_bytes)}, {info.model_bits_per_param:.3f} "
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


def write_json_file(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _register_inspect(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect",
        parents=parents,
        help="per-layer sizes, bits/weight, errors and empty clusters of a checkpoint",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="output directory of quantize")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON")
    _add_no_verify(p)
    p.set_defaults(handler=_run_inspect)


def _add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the model files' sha256 against manifest.json (reads every byte "
        "once, see docs/format.md; also DIST_PGKM_VERIFY=0)",
    )


def _run_bench_ptq(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import aware, ptq  # type: ignore[import-not-found, unused-ignore]

    command = shlex.join(["dist-pgkm", *args.argv])
    if args.aware:
        resumed = _resumed_run(args.json, "ptq-aware") if args.resume else {}
        options: Any = aware.AwareOptions(
            quick=args.quick,
            models=args.models,
            work_dir=args.work_dir,
            command=command,
            done=tuple(resumed.get("rows", ())),
            done_seconds=float(resumed.get("seconds", 0.0)),
            done_date=resumed.get("date"),
        )
        _run_rows_benchmark(aware, options, args)
        return 0
    options = ptq.PTQOptions(
        quick=args.quick,
        models=args.models,
        methods=args.methods,
        presets=args.presets,
        work_dir=args.work_dir,
        command=command,
    )

    def plots(report: Any) -> None:  # the plots show the full comparison only
        if not args.quick and args.md is not None:
            ptq.write_plots(args.md.parent / "img", report)

    _run_rows_benchmark(ptq, options, args, plots)
    return 0


def _resumed_run(path: Path | None, benchmark: str) -> dict[str, Any]:
    """The report an interrupted run saved in ``path`` (``--resume``), checked to be of this
    benchmark and of the current commit (rows of other code would be mixed in otherwise)."""
    import json

    from dist_pgkm.bench.common import git_commit  # type: ignore[import-not-found, unused-ignore]

    if path is None or not path.is_file():
        raise InvalidInputError(
            f"--resume continues the run saved in --json PATH; {path} does not exist. Run "
            "without --resume to start one."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    commit = git_commit()
    if data.get("benchmark") != benchmark or data.get("commit") != commit:
        raise InvalidInputError(
            f"{path} holds a {data.get('benchmark')!r} run of commit {data.get('commit')}; "
            f"--resume continues a {benchmark!r} run of this commit ({commit}). Run without "
            "--resume (or with another --json PATH) to start a new one."
        )
    return dict(data)


def _run_rows_benchmark(
    module: Any,
    options: Any,
    args: argparse.Namespace,
    also: Callable[[Any], None] | None = None,
    **run: Any,
) -> Any:
    """Run a benchmark module whose report is rows: live progress, and the JSON and markdown
    rewritten after every case, so a long run stopped midway keeps its rows. ``run`` goes to
    ``module.run_benchmark``; returns the report."""
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    def save(report: Any) -> None:
        if args.json is not None:
            write_json(args.json, report.as_dict())
        if args.md is not None:
            module.write_markdown(args.md, report)
        if also is not None:
            also(report)

    with _progress() as update:
        report = module.run_benchmark(options, progress=update, on_row=save, **run)
    module.render_report(_stdout_console(), report)
    save(report)
    return report


def _run_bench_scaling(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import scaling  # type: ignore[import-not-found, unused-ignore]
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    options = scaling.ScalingOptions(
        quick=args.quick,
        preset=args.preset,
        big=not args.no_big,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    if args.from_json is not None:
        report = scaling.reanalyse(args.from_json)
    else:
        with _progress() as update:
            report = scaling.run_benchmark(options, progress=update)
    scaling.render_report(_stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        scaling.write_markdown(args.md, report, args.md.parent / "scaling.md")
    return 0


def _run_bench_fuzz(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import fuzz  # type: ignore[import-not-found, unused-ignore]
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    options = fuzz.FuzzOptions(
        count=args.count,
        seed=args.seed,
        timeout=args.timeout,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    with _progress() as update:
        report = fuzz.run_benchmark(options, progress=update)
    fuzz.render_report(_stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        fuzz.write_markdown(args.md, report)
    return 0


def _register_bench_fuzz(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "fuzz",
        parents=parents,
        help="damage checkpoint files at random; count untyped errors, crashes, wrong weights",
        description=(
            "Damage a small real checkpoint's merged file and shards COUNT times (header bytes, "
            "header entries, body bytes, truncation, extension) and run every reader on each: "
            "load (verified and not), from_pretrained, inspect, shard reads. Goals: 0 untyped "
            "exceptions, 0 crashes or hangs, 0 verified loads returning another weight."
        ),
    )
    p.add_argument("--count", type=_positive_int, default=1000, help="damaged files to try")
    p.add_argument("--seed", type=int, default=0, help="seed of the damage")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds without progress that make a hang"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the fuzz section of this markdown file"
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where the checkpoint goes"
    )
    p.set_defaults(handler=_run_bench_fuzz)


def _run_bench_kill(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import killpoints  # type: ignore[import-not-found, unused-ignore]
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    options = killpoints.KillOptions(
        points=args.points,
        merge_points=args.merge_points,
        seed=args.seed,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    with _progress() as update:
        report = killpoints.run_benchmark(options, progress=update)
    killpoints.render_report(_stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        killpoints.write_markdown(args.md, report)
    return 0


def _register_bench_kill(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "kill",
        parents=parents,
        help="kill -9 quantize runs at random points (some in the merge); resume; same bytes?",
    )
    p.add_argument("--points", type=_positive_int, default=20, help="kills")
    p.add_argument("--merge-points", type=int, default=4, help="of them during the merge")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the kill section of this markdown file"
    )
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR", help="where runs go")
    p.set_defaults(handler=_run_bench_kill)


def _run_bench_finetune(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import finetune  # type: ignore[import-not-found, unused-ignore]

    options = finetune.FinetuneBenchOptions(
        quick=args.quick,
        pairs=args.pairs,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    _run_rows_benchmark(finetune, options, args)
    return 0


def _register_bench_finetune(
    subparsers: Subparsers, parents: list[argparse.ArgumentParser]
) -> None:
    from dist_pgkm.bench.finetune import PAIRS  # type: ignore[import-not-found, unused-ignore]

    p = subparsers.add_parser(
        "finetune",
        parents=parents,
        help="one-shot PTQ vs staged iPQ + Quant-Noise on SmolLM2 at the same bits",
        description=(
            "SmolLM2-135M at the iPQ preset (~1.2 bits/weight) and the ~3-bit preset: one-shot "
            "`quantize` against staged `finetune` with the same quantize config; held-out "
            "perplexity, tokens/s, wall time and peak RSS of each (~80 min on 2 cores)."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the iPQ pair only, 3 steps per stage: a smoke run (~10 min), targets not judged",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the finetune section of this markdown file"
    )
    _add_choice_list(p, "--pairs", tuple(PAIRS))
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where checkpoints go"
    )
    p.set_defaults(handler=_run_bench_finetune)


def _run_bench_infer(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import infer  # type: ignore[import-not-found, unused-ignore]

    options = infer.InferOptions(
        presets=args.presets,
        calib=args.calib,
        new_tokens=args.new_tokens,
        prefill=args.prefill,
        threads=args.threads,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    _run_rows_benchmark(infer, options, args)
    return 0


def _register_bench_infer(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from dist_pgkm.bench.infer import PRESETS  # type: ignore[import-not-found, unused-ignore]

    p = subparsers.add_parser(
        "infer",
        parents=parents,
        help="SmolLM2 run from its codes vs the original (fp32, bf16) and export-dense",
        description=(
            "Quantize SmolLM2-135M at each preset (or reuse --work-dir), then in one run: greedy "
            "generation at batch 1 and 8, a 512-token prefill, and the resident memory of each "
            "variant, each in its own process."
        ),
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the infer section of this markdown file"
    )
    p.add_argument(
        "--presets",
        type=_name_list(PRESETS),
        default=PRESETS,
        metavar="LIST",
        help=f"comma-separated presets; the first is also exported dense ({','.join(PRESETS)})",
    )
    p.add_argument("--calib", default="wordnet", help="calibration text of the llm-* presets")
    p.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens per generation")
    p.add_argument("--prefill", type=_positive_int, default=512, help="tokens of the prefill")
    p.add_argument("--threads", type=_positive_int, default=2, help="threads of every variant")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where checkpoints go; existing ones are reused",
    )
    p.set_defaults(handler=_run_bench_infer)


def _run_bench_dkm(args: argparse.Namespace) -> int:
    import json

    from dist_pgkm.bench import dkm  # type: ignore[import-not-found, unused-ignore]

    options = dkm.DKMBenchOptions(
        quick=args.quick,
        parts=args.parts,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
        chunk=args.chunk,
        repeats=args.repeats,
        models=args.models,
        methods=args.methods,
    )
    previous = None
    if args.json is not None and args.json.is_file() and not args.fresh:
        previous = dkm.DKMBenchReport.from_dict(json.loads(args.json.read_text(encoding="utf-8")))
        if previous.mode != options.mode:
            raise InvalidInputError(
                f"{args.json} holds a {previous.mode}-mode report; this {options.mode}-mode run "
                "would mix with it. Write to another --json file, or pass --fresh to replace it."
            )

    report = _run_rows_benchmark(dkm, options, args, previous=previous)
    failed = [f"{r['model']} {r['method']}" for r in report.quality_rows if "error" in r]
    if failed:
        sys.stderr.write(
            f"error: these runs failed (see the log and --json): {', '.join(failed)}\n"
        )
        return 1
    return 0


def _register_bench_dkm(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from dist_pgkm.bench.dkm import (  # type: ignore[import-not-found, unused-ignore]
        BLOCK_SIZE,
        ITERS,
        LAYER,
        PARTS,
        QUALITY,
        QUALITY_METHODS,
        QUALITY_QUICK_STEPS,
        QUICK_ITERS,
        QUICK_REPEATS,
        REPEATS,
        K,
    )

    p = subparsers.add_parser(
        "dkm",
        parents=parents,
        help="DKM, IDKM, IDKM-JFB, LR²VQ: memory and time against t; quality vs staged iPQ",
        description=(
            f"Part memory: soft k-means on SmolLM2-135M's {LAYER} (block size {BLOCK_SIZE}, k "
            f"{K}) with each method at t = {', '.join(map(str, ITERS))} steps, each case in its "
            "own process: bytes autograd saves, peak RSS of forward + backward, forward and "
            "backward seconds, IDKM's solver iterations. Part quality: `dist-pgkm finetune` "
            "of SmolLM2-135M (perplexity) and MiniLM (retrieval top-1) with each method in the "
            "MLP stage against staged iPQ, same bits and steps (hours on 2 cores). An existing "
            "--json report is continued: parts, models and methods not run are kept."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"memory: t = {', '.join(map(str, QUICK_ITERS))} on a slice of the layer; quality: "
        f"{QUALITY_QUICK_STEPS} step per stage; a smoke run, memory targets not judged",
    )
    p.add_argument(
        "--json", type=Path, metavar="PATH", help="write the report as JSON (continued if present)"
    )
    p.add_argument("--fresh", action="store_true", help="start a new report even if --json exists")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the dkm section of this markdown file"
    )
    _add_choice_list(p, "--parts", PARTS)
    _add_choice_list(p, "--models", tuple(QUALITY))
    _add_choice_list(p, "--methods", QUALITY_METHODS)
    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=None,
        metavar="N",
        help="sub-vectors per attention piece, checkpointed (default: the whole attention)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"runs per case, median reported (default {REPEATS}, quick {QUICK_REPEATS})",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where the inputs are written"
    )
    p.set_defaults(handler=_run_bench_dkm)


def _register_bench_scaling(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "scaling",
        parents=parents,
        help="in-process vs Ray workers on SmolLM2, a cost model and projection, a 1.1B run",
        description=(
            "Quantize SmolLM2-135M in this process (2 threads, 1 thread) and on an embedded Ray "
            "(1 and 2 workers); fit a per-layer cost model and project 7B/70B wall times on "
            "GPUs; quantize a 1.1B-parameter Llama-shaped random checkpoint with 2 workers."
        ),
    )
    p.add_argument("--quick", action="store_true", help="4 SmolLM2 cases, no 1.1B run (~6-8 min)")
    p.add_argument("--preset", default="ptq-4bit.yaml", metavar="FILE", help="a file in configs/")
    p.add_argument("--no-big", action="store_true", help="skip the 1.1B-parameter run")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="run nothing: redo the cost model, projection and targets of a saved report",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md",
        type=Path,
        metavar="PATH",
        help="rewrite the scaling section of this markdown file, and the projection in "
        "scaling.md beside it",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where checkpoints go"
    )
    p.set_defaults(handler=_run_bench_scaling)


def _register_bench_ptq(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from dist_pgkm.bench.ptq import MODELS  # type: ignore[import-not-found, unused-ignore]

    methods = tuple(METHODS)
    p = subparsers.add_parser(
        "ptq",
        parents=parents,
        help="quantize whole real models with every preset and method, evaluate them",
        description=(
            "One-shot quantization of SmolLM2-135M (held-out perplexity) and MiniLM (retrieval "
            "top-1) with each preset and clustering method, against per-group round-to-nearest: "
            "quality, bits/weight, empty clusters, time and peak memory."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="SmolLM2 at ptq-4bit with pgkm, 4-bit RTN and the original (~3-4 min)",
    )
    p.add_argument(
        "--aware",
        action="store_true",
        help=(
            "activation-aware PG k-means and each of its levers (calibration, scales, "
            "row-group codebooks, outliers) at ~4/3/2 bits/weight in the LLM and iPQ "
            "conventions, against plain PG k-means, faiss, fairseq-em and RTN"
        ),
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --aware: keep the rows the --json file of an interrupted run holds",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md",
        type=Path,
        metavar="PATH",
        help="rewrite the ptq section of this markdown file (plots go to its img/ folder)",
    )
    _add_choice_list(p, "--models", tuple(MODELS))
    _add_choice_list(p, "--methods", methods)
    p.add_argument(
        "--presets",
        type=_pattern_list,
        default=(),
        metavar="LIST",
        help="comma-separated preset names (default: all of each model's)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where checkpoints go"
    )
    p.set_defaults(handler=_run_bench_ptq)


def _run_eval(args: argparse.Namespace) -> int:
    from dist_pgkm.eval.evaluation import evaluate

    with _progress() as update:
        result = evaluate(
            resolve_model(args.model),
            args.task,
            text=args.text,
            tokens=args.tokens,
            window=args.window,
            batch_size=args.batch_size,
            pairs=args.pairs,
            verify=False if args.no_verify else None,
            progress=update,
        )
    console = _stdout_console()
    if result.perplexity is not None:
        ppl = result.perplexity
        console.print(
            f"{result.model}: perplexity {ppl.ppl:,.2f} on {ppl.n_tokens} predicted tokens "
            f"({ppl.n_windows} windows of {args.window}) in {ppl.seconds:.1f} s"
        )
    if result.retrieval is not None:
        retrieval = result.retrieval
        console.print(
            f"{result.model}: retrieval top-1 {retrieval.top1:.3f} over {retrieval.n} WordNet "
            f"glosses against {retrieval.n_candidates} lemmas in {retrieval.seconds:.1f} s"
        )
    if args.json is not None:
        write_json_file(args.json, result.as_dict())
    return 0


def _register_eval(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "eval",
        parents=parents,
        help="held-out perplexity (causal LMs) or retrieval top-1 (encoders) of a model",
        description=(
            "Evaluate a quantized checkpoint or an original model the same way: perplexity on "
            "held-out windows of real text, or WordNet gloss-to-lemma retrieval for encoders."
        ),
    )
    p.add_argument("model", help="quantized DIR, HF model dir, or a packaged model name")
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="PATH",
        help="text file or corpus name (wordnet, debian-reference, wikitext-2); repeatable; "
        "default wordnet",
    )
    p.add_argument("--task", choices=("ppl", "retrieval"), default=None, help="default: by model")
    p.add_argument("--tokens", type=_positive_int, default=8192, help="tokens to evaluate")
    p.add_argument("--window", type=_int_at_least(2), default=512, help="tokens per window")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward")
    p.add_argument("--pairs", type=_positive_int, default=1000, help="retrieval queries")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON")
    _add_no_verify(p)
    p.set_defaults(handler=_run_eval)


def _run_export_dense(args: argparse.Namespace) -> int:
    from dist_pgkm.checkpoint.hf import export_dense

    export_dense(args.dir, args.out)
    _stdout_console().print(f"{args.out}: plain Hugging Face model (decoded weights)")
    return 0


def _register_export_dense(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "export-dense",
        parents=parents,
        help="decode a checkpoint into a plain Hugging Face model dir any runtime can load",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="output directory of quantize")
    p.add_argument("out", type=Path, metavar="OUT", help="new model directory")
    p.set_defaults(handler=_run_export_dense)


def _run_generate(args: argparse.Namespace) -> int:
    import json
    import time

    import torch
    import transformers

    import dist_pgkm
    from dist_pgkm.errors import ModelSourceError
    from dist_pgkm.eval.evaluation import is_causal_lm

    model_dir = resolve_model(args.model)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"{model_dir}: no readable config.json; `generate` needs the --out directory of "
            "`dist-pgkm quantize` or a Hugging Face causal LM directory."
        ) from exc
    if not is_causal_lm(model_dir):
        raise ModelSourceError(
            f"{model_dir}: {config.get('architectures')} is not a causal LM; `generate` needs "
            "one (*ForCausalLM)."
        )
    auto: Any = transformers.AutoTokenizer
    tokenizer = auto.from_pretrained(str(model_dir))
    if config.get("quantization_config", {}).get("quant_method") == "pgkm":
        model: Any = dist_pgkm.load(model_dir, forward=args.forward)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = tokenizer(args.prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1] :]
    console = _stdout_console()
    console.print(args.prompt + tokenizer.decode(new, skip_special_tokens=True), markup=False)
    console.print(
        f"[dim]{new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s), "
        f"greedy, forward={args.forward}[/dim]"
    )
    return 0


def _register_generate(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=parents,
        help="greedy text from a checkpoint (or an original causal LM), for a quick look",
    )
    p.add_argument("model", help="quantized DIR, HF model dir, or a packaged model name")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate")
    p.add_argument(
        "--forward",
        choices=("codes", "decode"),
        default="codes",
        help="PQ layers compute from their codes (default) or decode their weight every call",
    )
    p.set_defaults(handler=_run_generate)


# Benchmarks under `dist-pgkm bench`.
_BENCHMARKS: tuple[Callable[[Subparsers, list[argparse.ArgumentParser]], None], ...] = (
    _register_bench_kmeans,
    _register_bench_ptq,
    _register_bench_scaling,
    _register_bench_finetune,
    _register_bench_dkm,
    _register_bench_fuzz,
    _register_bench_kill,
    _register_bench_infer,
)


def _register_bench(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", parents=parents, help="run a benchmark")
    benches = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for register in _BENCHMARKS:
        register(benches, parents)


# Top-level commands; add quantize, eval, inspect, merge, finetune here.
_COMMANDS: tuple[Callable[[Subparsers, list[argparse.ArgumentParser]], None], ...] = (
    _register_quantize,
    _register_finetune,
    _register_eval,
    _register_inspect,
    _register_export_dense,
    _register_generate,
    _register_lr2vq_rank,
    _register_bench,
)


# --- entry point -------------------------------------------------------------------------------


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
    for register in _COMMANDS:
        register(commands, [common])
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
    _setup_logging(getattr(args, "verbose", 0))
    handler: Handler = args.handler
    try:
        return handler(args)
    except DistPGKMError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return _EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
