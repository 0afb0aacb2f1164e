"""Perplexity of a causal language model on fixed token windows."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dist_pgkm.errors import InvalidInputError

__all__ = ["PerplexityResult", "ProgressCallback", "perplexity"]

logger = logging.getLogger(__name__)

_MAX_EXP_ARG = 709.0

ProgressCallback = Callable[[int, int, str], None]
"""Called as ``progress(done, total, what)`` after each batch; the CLI draws the bar."""


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a set of windows.

    Attributes:
        ppl: ``exp(nll)`` (``inf`` when that overflows a float).
        nll: Mean negative log-likelihood per predicted token, in nats.
        n_tokens: Tokens predicted: ``n_windows * (window - 1)``, since the first token of a
            window has no context.
        n_windows: Windows evaluated.
        seconds: Wall time of the evaluation.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Evaluate a causal LM's perplexity on token windows, each an independent sequence.

    In every window, token ``t+1`` is predicted from tokens ``0..t``. Per-token cross entropies
    are computed from the logits (upcast to at least float32) and summed in float64, so the
    result does not depend on the batch size beyond float32 rounding of the logits. The model
    runs in eval mode under :func:`torch.inference_mode`; its previous training mode is restored
    afterwards.

    Args:
        model: Any module whose ``forward(input_ids)`` returns an object with ``.logits`` of
            shape ``(batch, seq, vocab)`` (e.g. a Hugging Face ``*ForCausalLM``).
        windows: Token ids, shape ``(n_windows, window)``, integer dtype (see
            :func:`dist_pgkm.eval.text.token_windows`). They are moved to the model's device.
        batch_size: Windows per forward pass.
        progress: Optional callback, see :data:`ProgressCallback`.

    Returns:
        The perplexity, mean NLL and counts.

    Raises:
        InvalidInputError: If ``windows`` is not a 2-D integer tensor with at least one window
            of at least 2 tokens, or ``batch_size < 1``.
    """
    if windows.dim() != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise InvalidInputError(
            f"windows must be a 2-D tensor of token ids (n_windows, window); got shape "
            f"{tuple(windows.shape)} and dtype {windows.dtype}. Build it with token_windows()."
        )
    n_windows, window = windows.shape
    if n_windows < 1 or window < 2:
        raise InvalidInputError(
            f"windows has shape {tuple(windows.shape)}: perplexity needs at least one window "
            "of at least 2 tokens."
        )
    if batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size}: use a positive batch size.")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    start = time.perf_counter()
    total = 0.0  # a Python float: float64
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, n_windows, batch_size):
                batch = windows[first : first + batch_size].to(device=device, dtype=torch.long)
                total += float(_batch_nll_sum(model, batch))
                done = min(first + batch_size, n_windows)
                if progress is not None:
                    progress(done, n_windows, "perplexity")
    finally:
        model.train(was_training)

    n_tokens = n_windows * (window - 1)
    nll = total / n_tokens
    result = PerplexityResult(
        # A mean NLL above ~709 nats would overflow exp(); such a model's perplexity is inf.
        ppl=math.exp(nll) if nll < _MAX_EXP_ARG else math.inf,
        nll=nll,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "Perplexity %.3f (NLL %.4f) on %d tokens in %d windows, %.1f s",
        result.ppl,
        result.nll,
        result.n_tokens,
        result.n_windows,
        result.seconds,
    )
    return result


def _batch_nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Sum over a batch of the cross entropy of tokens ``1..`` given their prefixes (float64)."""
    logits = model(batch).logits  # (b, window, vocab)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    vocab = logits.shape[-1]
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab),  # (b * (window - 1), vocab)
        batch[:, 1:].reshape(-1),
        reduction="none",
    )
    return losses.to(torch.float64).sum()
