"""Tests for dist_pgkm.eval.perplexity: against a float64 reference, and on the real SmolLM2.

The real-model pass (8,176 predicted tokens, ~20 s on 2 cores) runs once per session.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.eval import PerplexityResult, perplexity

# SmolLM2-135M-Instruct on the default eval windows of WordNet (16 x 512 tokens, 8,176
# predicted), measured with torch 2.13 CPU and transformers 5.24: 17.197 (NLL 2.8447).
SMOLLM2_WORDNET_PPL = 17.197
SMOLLM2_PPL_RTOL = 0.02
# Every Linear weight rounded to 8 levels per row (min-max): ppl 2.5e6 on all 16 windows,
# ~1.5e5 times the original's. The metric must react by orders of magnitude.
DEGRADED_MIN_RATIO = 1_000.0


class ToyLM(nn.Module):
    """A causal LM small enough to check by hand: logits of token t depend on tokens 0..t."""

    def __init__(self, vocab: int, dim: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        prefix = torch.cumsum(self.embed(input_ids), dim=1)  # (b, seq, dim)
        # Scaled up so that the softmax is peaked: float32 rounding would show.
        return SimpleNamespace(logits=8.0 * self.head(torch.tanh(prefix)))


def reference_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean over predicted tokens of logsumexp(logits) - logit[target]), in float64."""
    with torch.no_grad():
        logits = model(windows).logits.double()[:, :-1]  # (n, window-1, vocab)
    targets = windows[:, 1:]
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_token = torch.logsumexp(logits, dim=-1) - target_logit  # (n, window-1)
    return math.exp(float(per_token.mean()))


@pytest.fixture
def toy() -> tuple[ToyLM, torch.Tensor]:
    vocab = 5000
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, vocab, (5, 33), generator=g)
    windows[1] = 7  # a run of one token
    windows[2, ::2] = vocab - 1  # the last id of the vocabulary
    return ToyLM(vocab, 16, seed=0), windows


def test_matches_float64_reference(toy: tuple[ToyLM, torch.Tensor]) -> None:
    model, windows = toy
    reference = reference_ppl(model, windows)
    result = perplexity(model, windows, batch_size=2)
    assert result.ppl == pytest.approx(reference, rel=1e-6)
    assert result.nll == pytest.approx(math.log(reference), rel=1e-6)
    assert (result.n_tokens, result.n_windows) == (5 * 32, 5)
    assert result.seconds > 0
    # The batch size only changes float32 rounding of the logits.
    assert perplexity(model, windows, batch_size=5).ppl == pytest.approx(result.ppl, rel=1e-6)
    assert result.as_dict() == {
        "ppl": result.ppl,
        "nll": result.nll,
        "n_tokens": 160,
        "n_windows": 5,
        "seconds": result.seconds,
    }


def test_reports_progress_and_restores_training_mode(toy: tuple[ToyLM, torch.Tensor]) -> None:
    model, windows = toy
    model.train()
    calls: list[tuple[int, int, str]] = []
    perplexity(model, windows, batch_size=2, progress=lambda *a: calls.append(a))
    assert calls == [(2, 5, "perplexity"), (4, 5, "perplexity"), (5, 5, "perplexity")]
    assert model.training


class ConfidentlyWrong(nn.Module):
    """Puts 1000 nats more on token 0 than on any other: every other token costs ~1000 nats."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = self.bias.expand(*input_ids.shape, 8).clone()  # (b, seq, 8)
        logits[..., 0] = 1000.0
        return SimpleNamespace(logits=logits)


def test_overflowing_perplexity_is_inf() -> None:
    result = perplexity(ConfidentlyWrong(), torch.ones(2, 4, dtype=torch.long))
    assert result.nll == pytest.approx(1000.0)
    assert result.ppl == math.inf


@pytest.mark.parametrize(
    ("windows", "batch_size", "match"),
    [
        (torch.zeros(4, 8), 4, "2-D tensor of token ids"),
        (torch.zeros(32, dtype=torch.long), 4, "2-D tensor of token ids"),
        (torch.zeros(4, 1, dtype=torch.long), 4, "at least 2 tokens"),
        (torch.zeros(0, 8, dtype=torch.long), 4, "at least one window"),
        (torch.zeros(4, 8, dtype=torch.long), 0, "positive batch size"),
    ],
)
def test_bad_input_raises(windows: torch.Tensor, batch_size: int, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        perplexity(ToyLM(10, 4, seed=0), windows, batch_size=batch_size)


@pytest.fixture(scope="session")
def smollm2_ppl(
    smollm2: tuple[Any, Any], wordnet_windows: dict[str, torch.Tensor]
) -> PerplexityResult:
    return perplexity(smollm2[0], wordnet_windows["eval"])


def test_smollm2_on_wordnet(smollm2_ppl: PerplexityResult) -> None:
    assert (smollm2_ppl.n_windows, smollm2_ppl.n_tokens) == (16, 16 * 511)
    assert smollm2_ppl.ppl == pytest.approx(SMOLLM2_WORDNET_PPL, rel=SMOLLM2_PPL_RTOL)
    assert math.exp(smollm2_ppl.nll) == pytest.approx(smollm2_ppl.ppl, rel=1e-12)


def test_crudely_rounded_smollm2_is_far_worse(
    smollm2_ppl: PerplexityResult, wordnet_windows: dict[str, torch.Tensor]
) -> None:
    import transformers

    from dist_pgkm.models.offline import smollm2_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight  # (out, in): 8 levels between each row's min and max
                low = w.amin(dim=1, keepdim=True)
                step = (w.amax(dim=1, keepdim=True) - low).clamp(min=1e-12) / 7
                w.copy_(torch.round((w - low) / step) * step + low)
    # A quarter of the windows suffices for a gap of orders of magnitude.
    degraded = perplexity(model, wordnet_windows["eval"][:4])
    assert degraded.ppl / smollm2_ppl.ppl > DEGRADED_MIN_RATIO
