"""``dist-pgkm generate``: greedy text from a checkpoint or an original causal LM."""

from __future__ import annotations

import argparse
from typing import Any

from dist_pgkm.cli._common import Subparsers, positive_int, stdout_console
from dist_pgkm.models.offline import resolve_model


def _run(args: argparse.Namespace) -> int:
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
    console = stdout_console()
    console.print(args.prompt + tokenizer.decode(new, skip_special_tokens=True), markup=False)
    console.print(
        f"[dim]{new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s), "
        f"greedy, forward={args.forward}[/dim]"
    )
    return 0


def register(subparsers: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=parents,
        help="greedy text from a checkpoint (or an original causal LM), for a quick look",
    )
    p.add_argument("model", help="quantized DIR, HF model dir, or a packaged model name")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    p.add_argument(
        "--forward",
        choices=("codes", "decode"),
        default="codes",
        help="PQ layers compute from their codes (default) or decode their weight every call",
    )
    p.set_defaults(handler=_run)
