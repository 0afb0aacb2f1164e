"""``dist-pgkm eval``: perplexity or retrieval of a checkpoint or an original model.

(Named ``eval_cmd`` so as not to shadow the builtin ``eval``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_pgkm.cli._common import (
    Subparsers,
    add_no_verify,
    int_at_least,
    positive_int,
    progress_bar_from_first_update,
    stdout_console,
    write_json_file,
)
from dist_pgkm.models.offline import resolve_model


def _run(args: argparse.Namespace) -> int:
    from dist_pgkm.eval.evaluation import evaluate

    # The bar appears when the perplexity starts, not while the model loads.
    with progress_bar_from_first_update() as update:
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
    console = stdout_console()
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


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "eval",
        parents=parents,
        help="held-out perplexity (causal LMs) or retrieval top-1 (encoders) of a model",
        description=(
            "Evaluate a quantized checkpoint or an original model the same way: perplexity on "
            "held-out windows of real text, or WordNet gloss-to-lemma retrieval for encoders."
        ),
    )
    p.add_argument(
        "model",
        help="quantized DIR, HF model dir, GGUF file (or a dir holding one), .safetensors file "
        "beside its config.json, or a packaged model name",
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="PATH",
        help="text file or corpus name (wordnet, debian-reference, wikitext-2); repeatable; "
        "default wordnet",
    )
    p.add_argument("--task", choices=("ppl", "retrieval"), default=None, help="default: by model")
    p.add_argument("--tokens", type=positive_int, default=8192, help="tokens to evaluate")
    p.add_argument("--window", type=int_at_least(2), default=512, help="tokens per window")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")
    p.add_argument("--pairs", type=positive_int, default=1000, help="retrieval queries")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON")
    add_no_verify(p)
    p.set_defaults(handler=_run)
