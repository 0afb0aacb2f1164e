"""``dist-pgkm bench BENCHMARK``: the benchmarks of ``benchmarks/`` (shipped as
``dist_pgkm.bench``), each one register / run pair listed in :data:`_BENCHMARKS`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_pgkm.cli._common import (
    Register,
    Subparsers,
    add_choice_list,
    name_list,
    non_negative_int,
    pattern_list,
    positive_int,
    progress_bar,
    stdout_console,
)
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pgkm.api import METHODS

# mypy checks benchmarks/ as the package `benchmarks`; it cannot follow setuptools'
# package-dir mapping that installs it as `dist_pgkm.bench` (pyproject.toml): hence the
# `type: ignore[import-not-found, unused-ignore]` on every import of dist_pgkm.bench.


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

    with progress_bar() as update:
        report = module.run_benchmark(options, progress=update, on_row=save, **run)
    module.render_report(stdout_console(), report)
    save(report)
    return report


def _run_report(module: Any, options: Any, args: argparse.Namespace) -> Any:
    """Run a benchmark module whose report is written once, at the end: live progress, the
    report printed, then ``--json`` and ``--md`` written. Returns the report."""
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    with progress_bar() as update:
        report = module.run_benchmark(options, progress=update)
    module.render_report(stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        module.write_markdown(args.md, report)
    return report


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


def _run_kmeans(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import kmeans  # type: ignore[import-not-found, unused-ignore]
    from dist_pgkm.bench.common import write_json  # type: ignore[import-not-found, unused-ignore]

    if args.hog:
        doc = kmeans.run_hog()
        stdout_console().print(kmeans.hog_markdown(doc), markup=False, highlight=False)
        if args.json is not None:
            write_json(args.json, doc)
        if args.md is not None:
            kmeans.write_hog_markdown(args.md, doc)
        return 0
    if args.aware:
        aware = kmeans.AwareOptions(
            threads=args.threads, command=shlex.join(["dist-pgkm", *args.argv])
        )
        with progress_bar() as update:
            doc = kmeans.run_aware(aware, progress=update)
        stdout_console().print(kmeans.aware_markdown(doc), markup=False, highlight=False)
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
    _run_report(kmeans, options, args)
    return 0


def _register_kmeans(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
        "--n-iter", type=positive_int, default=15, metavar="N", help="iterations (default 15)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every run")
    add_choice_list(p, "--methods", methods)
    p.add_argument(
        "--no-memory", action="store_true", help="skip the 10M x 8 peak-memory measurement"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
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
    p.add_argument("--datasets", type=pattern_list, default=(), help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_kmeans)


def _run_ptq(args: argparse.Namespace) -> int:
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


def _register_ptq(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    add_choice_list(p, "--models", tuple(MODELS))
    add_choice_list(p, "--methods", methods)
    p.add_argument(
        "--presets",
        type=pattern_list,
        default=(),
        metavar="LIST",
        help="comma-separated preset names (default: all of each model's)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where checkpoints go"
    )
    p.set_defaults(handler=_run_ptq)


def _run_scaling(args: argparse.Namespace) -> int:
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
        with progress_bar() as update:
            report = scaling.run_benchmark(options, progress=update)
    scaling.render_report(stdout_console(), report)
    if args.json is not None:
        write_json(args.json, report.as_dict())
    if args.md is not None:
        scaling.write_markdown(args.md, report, args.md.parent / "scaling.md")
    return 0


def _register_scaling(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(handler=_run_scaling)


def _run_finetune(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import finetune  # type: ignore[import-not-found, unused-ignore]

    options = finetune.FinetuneBenchOptions(
        quick=args.quick,
        pairs=args.pairs,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    _run_rows_benchmark(finetune, options, args)
    return 0


def _register_finetune(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    add_choice_list(p, "--pairs", tuple(PAIRS))
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where checkpoints go"
    )
    p.set_defaults(handler=_run_finetune)


def _run_dkm(args: argparse.Namespace) -> int:
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


def _register_dkm(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    add_choice_list(p, "--parts", PARTS)
    add_choice_list(p, "--models", tuple(QUALITY))
    add_choice_list(p, "--methods", QUALITY_METHODS)
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=None,
        metavar="N",
        help="sub-vectors per attention piece, checkpointed (default: the whole attention)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"runs per case, median reported (default {REPEATS}, quick {QUICK_REPEATS})",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, metavar="DIR", help="where the inputs are written"
    )
    p.set_defaults(handler=_run_dkm)


def _run_fuzz(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import fuzz  # type: ignore[import-not-found, unused-ignore]

    options = fuzz.FuzzOptions(
        count=args.count,
        seed=args.seed,
        timeout=args.timeout,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    _run_report(fuzz, options, args)
    return 0


def _register_fuzz(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    p.add_argument("--count", type=positive_int, default=1000, help="damaged files to try")
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
    p.set_defaults(handler=_run_fuzz)


def _run_kill(args: argparse.Namespace) -> int:
    from dist_pgkm.bench import killpoints  # type: ignore[import-not-found, unused-ignore]

    options = killpoints.KillOptions(
        points=args.points,
        merge_points=args.merge_points,
        seed=args.seed,
        work_dir=args.work_dir,
        command=shlex.join(["dist-pgkm", *args.argv]),
    )
    _run_report(killpoints, options, args)
    return 0


def _register_kill(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "kill",
        parents=parents,
        help="kill -9 quantize runs at random points (some in the merge); resume; same bytes?",
    )
    p.add_argument("--points", type=positive_int, default=20, help="kills")
    p.add_argument("--merge-points", type=int, default=4, help="of them during the merge")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--md", type=Path, metavar="PATH", help="rewrite the kill section of this markdown file"
    )
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR", help="where runs go")
    p.set_defaults(handler=_run_kill)


def _run_infer(args: argparse.Namespace) -> int:
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


def _register_infer(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
        type=name_list(PRESETS),
        default=PRESETS,
        metavar="LIST",
        help=f"comma-separated presets; the first is also exported dense ({','.join(PRESETS)})",
    )
    p.add_argument("--calib", default="wordnet", help="calibration text of the llm-* presets")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens per generation")
    p.add_argument("--prefill", type=positive_int, default=512, help="tokens of the prefill")
    p.add_argument("--threads", type=positive_int, default=2, help="threads of every variant")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where checkpoints go; existing ones are reused",
    )
    p.set_defaults(handler=_run_infer)


# Benchmarks under `dist-pgkm bench`.
_BENCHMARKS: tuple[Register, ...] = (
    _register_kmeans,
    _register_ptq,
    _register_scaling,
    _register_finetune,
    _register_dkm,
    _register_fuzz,
    _register_kill,
    _register_infer,
)


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", parents=parents, help="run a benchmark")
    benches = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in _BENCHMARKS:
        add(benches, parents)
