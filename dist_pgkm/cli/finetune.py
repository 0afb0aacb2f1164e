"""``dist-pgkm finetune``: staged iPQ with fine-tuning in between (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dist_pgkm.cli._common import (
    Subparsers,
    fmt_bytes,
    non_negative_int,
    positive_int,
    stdout_console,
    write_json_file,
)
from dist_pgkm.cli._ray import add_ray_options, ray_options
from dist_pgkm.models.offline import resolve_model


def _run(args: argparse.Namespace) -> int:
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
    ray = ray_options(args)
    with finetune_progress() as update:
        summary = finetune_model(
            model_dir,
            config,
            args.out,
            ids,
            resume=args.resume,
            workers=ray["workers"],
            address=ray["address"],
            progress=update,
            ray_ranks=args.ranks,
            cpus_per_rank=args.cpus_per_rank,
            gpus_per_rank=args.gpus_per_rank,
        )
    info = describe(args.out)
    console = stdout_console()
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
        f"tokens/s, peak RSS {fmt_bytes(summary.peak_rss_bytes)}",
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


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
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
    add_ray_options(
        p,
        placement=False,
        workers_help="Ray workers for the quantize phases (0: in this process)",
        address_help="the Ray cluster at HOST:PORT (or 'auto') for --workers or --ranks",
    )
    p.add_argument(
        "--ranks", type=non_negative_int, default=0, metavar="N",
        help="train on N Ray Train workers (0: this process, or torchrun's ranks)",
    )  # fmt: skip
    p.add_argument(
        "--cpus-per-rank", type=positive_int, default=1, metavar="N",
        help="CPUs (threads) of each Ray Train worker (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-rank", type=float, default=0.0, metavar="F",
        help="GPUs of each Ray Train worker (default 0: CPU training)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="write the run summary as JSON")
    p.set_defaults(handler=_run)
