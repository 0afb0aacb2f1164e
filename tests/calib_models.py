"""Real models cut to their first blocks, and ``H`` collected the plain way, for calibration tests.

A truncated model is the real model directory with its weight and tokenizer files symlinked and
a ``config.json`` asking for fewer blocks: the blocks it keeps are the real ones, and nothing is
copied (the later blocks' tensors stay in the file, unused).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from dist_pgkm.models.calibrate import HessianRequest


def truncated(src: Path, dst: Path, layers: int, **changes: Any) -> Path:
    """``src`` with only its first ``layers`` blocks (``num_hidden_layers``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.name != "config.json" and not (dst / file.name).exists():
            (dst / file.name).symlink_to(file)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.update(num_hidden_layers=layers, **changes)
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def load_whole(model_dir: Path) -> nn.Module:
    """The whole model in float32, built by its class and filled with ``load_state_dict``."""
    import transformers

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cls: Any = getattr(transformers, config["architectures"][0])
    model: nn.Module = cls(cls.config_class.from_dict(config))
    state = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in model.state_dict():
            if name in keys:
                state[name] = f.get_tensor(name).float()
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def reference_hessians(
    model: nn.Module, requests: Sequence[HessianRequest], windows: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """``X^T X`` blocks of every request, float64 per token, with hooks on the whole model."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for request in requests:
        names = (request.name, *request.tied)
        linear = next(m for n in names if isinstance(m := model.get_submodule(n), nn.Linear))
        assert isinstance(linear, nn.Linear)
        groups, bs = linear.in_features // request.block_size, request.block_size

        def hook(
            module: nn.Module,
            args: tuple[Any, ...],
            key: str = request.name,
            shape: tuple[int, int] = (groups, bs),
        ) -> None:
            x = args[0].reshape(-1, *shape).double()  # (tokens, G, bs)
            sums[key] = sums.get(key, 0) + torch.einsum("tgi,tgj->gij", x, x)

        handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            model(input_ids=windows[start : start + batch])
    for handle in handles:
        handle.remove()
    return sums
