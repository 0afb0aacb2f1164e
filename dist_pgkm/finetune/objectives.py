"""What a stage trains for: one loss per micro-batch.

- ``causal-lm``: next-token cross-entropy, plus, with ``distill > 0``, the KL divergence of the
  model's logits to the original model's at temperature ``t`` (scaled by ``t**2`` and divided
  by the sequence length).
- ``embedding-distill`` (sentence encoders): ``1 - cos`` between the mean-pooled sentence
  embeddings of the model and of the original, padding masked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.config.finetune import TrainOptions
from dist_pgkm.errors import ConfigError

__all__ = ["Objective", "causal_lm_loss", "embedding_loss", "objective", "pad_token_id"]

Objective = Callable[[Any, torch.Tensor], torch.Tensor]
"""``(engine, micro-batch of token ids) -> loss``."""


def objective(train: TrainOptions, teacher: nn.Module | None, pad_id: int) -> Objective:
    """The loss of ``train.objective`` (``teacher``: the original model, when one is needed)."""
    if train.objective == "embedding-distill":
        assert teacher is not None
        return lambda engine, micro: embedding_loss(engine, teacher, micro, pad_id)
    return lambda engine, micro: causal_lm_loss(engine, teacher, micro, train)


def causal_lm_loss(
    engine: Any, teacher: nn.Module | None, micro: torch.Tensor, train: TrainOptions
) -> torch.Tensor:
    """Next-token cross-entropy of ``micro`` ``(b, seq)``, plus the distillation term."""
    logits = engine(input_ids=micro).logits  # (b, seq, vocab)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), micro[:, 1:].reshape(-1)
    )
    if teacher is not None:
        with torch.no_grad():
            target = teacher(input_ids=micro).logits
        t = train.temperature
        kl = (
            F.kl_div(
                F.log_softmax(logits.float() / t, -1),
                F.log_softmax(target.float() / t, -1),
                log_target=True,
                reduction="batchmean",
            )
            * (t * t)
            / micro.shape[1]
        )
        loss = loss + train.distill * kl
    return loss


def embedding_loss(
    engine: Any, teacher: nn.Module, micro: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """1 - cosine similarity of the mean-pooled sentence embeddings to the original's."""
    mask = (micro != pad_id).long()  # (b, seq)
    student = _mean_pool(engine(input_ids=micro, attention_mask=mask).last_hidden_state, mask)
    with torch.no_grad():
        target = _mean_pool(teacher(input_ids=micro, attention_mask=mask).last_hidden_state, mask)
    return 1.0 - F.cosine_similarity(student, target, dim=-1).mean()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(b, seq, h)`` over the tokens ``mask`` ``(b, seq)`` keeps, float32."""
    weights = mask.unsqueeze(-1).to(torch.float32)  # (b, seq, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (b, h)


def pad_token_id(model: nn.Module) -> int:
    """The padding token of a sentence encoder, from its config (embedding-distill masks it)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None:
        raise ConfigError(
            "objective embedding-distill pads sentences, and this model's config.json has no "
            "pad_token_id. Add one (the tokenizer's padding token id) or use objective causal-lm."
        )
    return int(pad)
