"""Calibration on 1 and 2 Ray workers against one process: time, memory, the same ``H`` bytes.

``python -m dist_pgkm.bench.calib [--samples 128] [--json PATH] [--md docs/benchmarks.md]``

SmolLM2-135M, every Linear layer (210) and the tied embedding (through ``lm_head``) at block
size 8, i.e. ``H`` in 24 x 24 blocks, on WordNet windows of 512 tokens. Each case runs in a
child process: the calibration in this process on one thread, and on an embedded Ray with 1
and 2 workers of one CPU each. Every case must produce the same ``H`` bytes (one sha256 over
all layers); the speed-up is 1 worker's time over 2 workers', both for the whole call (Ray
start included) and for the calibration stages alone (the blocks, from the first stage to
the last). The machine's load average is recorded before and after each case.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dist_pgkm.bench.common import (  # type: ignore[import-not-found, unused-ignore]
    git_commit,
    machine_info,
    machine_line,
    replace_marker_section,
    utc_now,
)

__all__ = ["CASES", "main", "markdown_section", "run_case"]

CASES: tuple[tuple[str, int], ...] = (
    ("in-process, 1 thread", 0),
    ("Ray, 1 worker x 1 CPU", 1),
    ("Ray, 2 workers x 1 CPU", 2),
)
SPEEDUP_GOAL = 1.7
RSS_GOAL = 3e9
COMMAND = (
    "python -m dist_pgkm.bench.calib --json benchmarks/results/calib.json --md docs/benchmarks.md"
)


def run_case(workers: int, samples: int, seq_len: int) -> dict[str, Any]:
    """One calibration of SmolLM2 in this process (0 workers) or on an embedded Ray."""
    import torch
    import transformers

    from dist_pgkm.distributed.coordinator import calibration_batch
    from dist_pgkm.eval.text import calibration_windows, load_text
    from dist_pgkm.models.calibrate import (
        BlockResult,
        HessianRequest,
        block_result,
        collect_hessians,
    )
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.offline import smollm2_dir
    from dist_pgkm.models.source import open_source
    from dist_pgkm.utils.memory import peak_rss_bytes
    from dist_pgkm.utils.optional import set_threads

    set_threads(1)
    model = smollm2_dir()
    source = open_source(model)
    requests = [
        HessianRequest(layer.name, 8, layer.tied)
        for layer in find_layers(source)
        if layer.kind == "linear" or layer.tied
    ]
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(str(model))
    windows = calibration_windows(tokenizer, load_text(["wordnet"]), samples, seq_len)
    batch = calibration_batch(seq_len)
    hessians: dict[str, torch.Tensor] = {}
    stage_times: list[float] = []

    def on_block(result: BlockResult) -> None:
        stage_times.append(time.perf_counter())
        hessians.update(result.hessians)

    worker_rss: list[int] = []
    load_before = os.getloadavg()
    start = time.perf_counter()
    if workers == 0:
        collect_hessians(source, requests, windows, on_block, batch_size=batch)
    else:
        from dist_pgkm.distributed.ray_executor import RayOptions, calibrate_on_ray

        worker_rss = calibrate_on_ray(
            str(model),
            requests,
            windows,
            batch,
            RayOptions(workers=workers),
            lambda stage: on_block(block_result(stage)),
        )
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name in sorted(hessians):
        digest.update(name.encode())
        digest.update(hessians[name].numpy().tobytes())
    return {
        "workers": workers,
        "samples": samples,
        "seq_len": seq_len,
        "chunks": -(-samples // batch),
        "layers": len(hessians),
        "seconds": seconds,
        # From the first stage's end (the inputs of block 0 captured) to the last's.
        "stage_seconds": stage_times[-1] - stage_times[0],
        "digest": digest.hexdigest(),
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "worker_peak_rss_bytes": worker_rss,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def memory_formula(shape: dict[str, int], samples: int, seq_len: int) -> dict[str, int]:
    """Calibration's largest memory terms for a Llama shape, in bytes (float32 everywhere).

    The hidden states of all windows, the weights outside the blocks, one block's weights,
    and one micro-batch (~4096 tokens) through the MLP (gate, up, their product) and the
    attention scores of one micro-batch (eager attention: batch x heads x seq_len^2).
    """
    h, inter, heads, kv = shape["hidden"], shape["inter"], shape["heads"], shape["kv"]
    batch = max(1, 4096 // seq_len)
    tokens = batch * seq_len
    block = 2 * h * h + 2 * h * (h // heads * kv) + 3 * h * inter
    return {
        "hidden_states": samples * seq_len * h * 4,
        "outside_blocks": 2 * shape["vocab"] * h * 4,  # untied embedding and lm_head
        "one_block": block * 4,
        "micro_batch_mlp": 3 * tokens * inter * 4,
        "micro_batch_attention": batch * heads * seq_len * seq_len * 4,
    }


def run_big(samples: int, seq_len: int, work: Path) -> dict[str, Any]:
    """Calibrate a 1.1B Llama-shaped checkpoint (bench scaling's) in this process: peak RSS."""
    import torch
    from dist_pgkm.bench.scaling import (  # type: ignore[import-not-found, unused-ignore]
        LLAMA_SHAPES,
        write_llama_checkpoint,
    )

    from dist_pgkm.distributed.coordinator import calibration_batch
    from dist_pgkm.models.calibrate import HessianRequest, collect_hessians
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.source import open_source
    from dist_pgkm.utils.memory import peak_rss_bytes
    from dist_pgkm.utils.optional import set_threads

    set_threads(1)
    shape = LLAMA_SHAPES["TinyLlama-1.1B"]
    src = work / "llama-1.1b"
    if not (src / "config.json").exists():
        write_llama_checkpoint(src, shape)
    source = open_source(src)
    requests = [
        HessianRequest(layer.name, 8) for layer in find_layers(source) if layer.kind == "linear"
    ]
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, shape["vocab"], (samples, seq_len), generator=g)
    before = peak_rss_bytes()
    start = time.perf_counter()
    summary = collect_hessians(source, requests, windows, batch_size=calibration_batch(seq_len))
    return {
        "model": "TinyLlama-1.1B shape, random bf16 weights",
        "samples": samples,
        "seq_len": seq_len,
        "layers": len(requests),
        "blocks_run": summary.blocks_run,
        "seconds": time.perf_counter() - start,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak_rss_bytes(),
        "formula_bytes": memory_formula(shape, samples, seq_len),
        "formula_128x512_bytes": memory_formula(shape, 128, 512),
        "load_before": os.getloadavg(),
    }


def big_markdown(big: dict[str, Any]) -> str:
    """The docs/benchmarks.md section of the 1.1B memory run, with the 128 x 512 estimate."""
    measured = big["formula_bytes"]
    full = big["formula_128x512_bytes"]
    at_128 = big["peak_rss_bytes"] + full["hidden_states"] - measured["hidden_states"]
    terms = ", ".join(
        f"{name.replace('_', ' ')} {value / 1e6:.0f} MB" for name, value in full.items()
    )
    load = big["load_before"][0]
    return (
        "\n".join(
            [
                "### Calibration memory, 1.1B Llama shape",
                "",
                "`python -m dist_pgkm.bench.calib --big WORK --samples 8 --seq-len 512 > "
                "benchmarks/results/calib-1.1b.json`",
                "",
                f"{big['model']} (bench scaling's checkpoint), {big['layers']} Linear layers at "
                f"bs 8, {big['samples']} x {big['seq_len']} random tokens, in one process on one "
                f"thread: peak RSS **{big['peak_rss_bytes'] / 1e9:.2f} GB** "
                f"({big['rss_before_bytes'] / 1e6:.0f} MB before the calibration), "
                f"{big['blocks_run']} blocks in {big['seconds']:.0f} s at load average {load:.1f}.",
                "",
                "Only the hidden states grow with the windows; at 128 x 512 they add "
                f"{(full['hidden_states'] - measured['hidden_states']) / 1e6:.0f} MB: "
                f"**{at_128 / 1e9:.2f} GB** estimated (goal < 3 GB; a Ray worker holds its share "
                f"of the hidden states only). Formula terms at 128 x 512: {terms}.",
            ]
        )
        + "\n"
    )


def markdown_section(report: dict[str, Any]) -> str:
    """The docs/benchmarks.md section."""
    rows = report["cases"]
    lines = [
        "### Calibration on Ray workers",
        "",
        f"`{report['command']}`",
        "",
        machine_line(report["machine"], report["commit"], report["date"]),
        "",
        f"SmolLM2-135M, {report['layers']} layers at bs 8 (H in 24 x 24 blocks), "
        f"{report['samples']} x {report['seq_len']} WordNet tokens "
        f"({report['chunks']} chunks of one micro-batch).",
        "",
        "| case | seconds | blocks only | driver peak RSS | workers' peak RSS | load before/after"
        " |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        rss = ", ".join(f"{r / 1e6:.0f} MB" for r in row["worker_peak_rss_bytes"]) or "-"
        lines.append(
            f"| {row['case']} | {row['seconds']:.1f} | {row['stage_seconds']:.1f} | "
            f"{row['driver_peak_rss_bytes'] / 1e6:.0f} MB | {rss} | "
            f"{row['load_before'][0]:.1f} / {row['load_after'][0]:.1f} |"
        )
    same = "yes" if report["same_bytes"] else "**no**"
    lines += [
        "",
        "The driver's peak RSS is the benchmark process's: it tokenizes all of WordNet to cut "
        "the windows (the calibration itself keeps only the products of one block there).",
        "",
        f"Same H bytes in every case: {same}. 2 workers vs 1: {report['speedup']:.2f}x "
        f"({report['speedup_blocks']:.2f}x on the blocks alone; goal {SPEEDUP_GOAL}x: "
        f"{'met' if report['speedup'] >= SPEEDUP_GOAL else 'missed'}).",
    ]
    if max(row["load_before"][0] for row in rows) > 1.5:
        lines.append(
            "Measured while other work ran on the machine (load average above): the "
            "times and the speed-up are not those of a quiet machine."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every case in a child process; write the JSON and the markdown section."""
    parser = argparse.ArgumentParser(prog="python -m dist_pgkm.bench.calib")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument(
        "--big",
        type=Path,
        default=None,
        metavar="WORK",
        help="only calibrate the 1.1B Llama-shaped checkpoint (written under WORK) in this "
        "process and print its peak RSS as JSON",
    )
    parser.add_argument(
        "--big-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="render a --big result (JSON) as markdown (into --md)",
    )
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case is not None:  # the child
        json.dump(run_case(args.case, args.samples, args.seq_len), sys.stdout)
        return 0
    if args.big is not None:
        json.dump(run_big(args.samples, args.seq_len, args.big), sys.stdout, indent=2)
        return 0
    if args.big_json is not None:
        big = json.loads(args.big_json.read_text(encoding="utf-8"))
        if args.md is not None:
            replace_marker_section(args.md, "calib-1.1b", big_markdown(big))
        sys.stdout.write(big_markdown(big))
        return 0
    cases = []
    for label, workers in CASES:
        command = [
            sys.executable, "-m", "dist_pgkm.bench.calib", "--case", str(workers),
            "--samples", str(args.samples), "--seq-len", str(args.seq_len),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
        row = {"case": label, **json.loads(proc.stdout.strip().splitlines()[-1])}
        cases.append(row)
        sys.stderr.write(f"{label}: {row['seconds']:.1f} s, load {row['load_before'][0]:.1f}\n")
    one, two = cases[1], cases[2]
    report = {
        "benchmark": "calib",
        "command": COMMAND + (f" --samples {args.samples}" if args.samples != 128 else ""),
        "machine": machine_info({"load_average": os.getloadavg()}),
        "commit": git_commit(),
        "date": utc_now(),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "chunks": one["chunks"],
        "layers": one["layers"],
        "cases": cases,
        "same_bytes": len({row["digest"] for row in cases}) == 1,
        "speedup": one["seconds"] / two["seconds"],
        "speedup_blocks": one["stage_seconds"] / two["stage_seconds"],
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.md is not None:
        replace_marker_section(args.md, "calib", markdown_section(report))
    sys.stdout.write(markdown_section(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
