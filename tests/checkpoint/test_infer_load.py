"""``dist_pgkm.load`` computes from the codes by default, and equals the decoding forward.

Real checkpoints of both models and both format versions: format 1 (SmolLM2-135M with its
tied, quantized embedding; all-MiniLM-L6-v2) built as in test_hf.py, and format 2 (SmolLM2's
layer 0 with row and group scales, row-group codebooks and outliers, one layer written by the
format-1 writer) built as in test_format_v2.py. Logits and hidden states of the code forward
are within float32 round-off of the decoding forward's: ``atol = 1e-5 * max|reference|``
(every layer sums ~600-1500 products in another order, and the model adds them up); greedy
tokens are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import dist_pgkm
from dist_pgkm.pq import PQModule, infer
from dist_pgkm.pq.modules import PQEmbedding

from ..conftest import run_cli
from .test_format_v2 import IDS, Built, built  # noqa: F401 (fixture)
from .test_hf import BERT_IDS, PROMPT, bert, smol  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)


def _modes(path: Path) -> tuple[Any, Any]:
    codes, decoding = dist_pgkm.load(path), dist_pgkm.load(path, forward="decode")
    pq = [m for m in codes.modules() if isinstance(m, PQModule)]
    assert pq
    assert all(m.forward_mode == "codes" and m.index.numel() == 0 for m in pq)
    assert all(
        m.forward_mode == "decode" and m.index.numel() == m.n_blocks
        for m in decoding.modules()
        if isinstance(m, PQModule)
    )
    return codes, decoding


def test_format_2_logits_and_greedy_tokens(built: Built) -> None:  # noqa: F811
    codes, decoding = _modes(built.out)
    with torch.no_grad():
        _close(codes(IDS).logits, decoding(IDS).logits)  # 10 tokens: decoded tiles
        _close(codes(IDS[:, :3]).logits, decoding(IDS[:, :3]).logits)  # 3: lookup tables
    new = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(codes.generate(IDS, **new), decoding.generate(IDS, **new))


def test_format_1_smollm2_logits_and_greedy_tokens(
    smol: tuple[Path, dict[str, torch.Tensor]],  # noqa: F811
) -> None:
    codes, decoding = _modes(smol[0])
    assert isinstance(codes.model.embed_tokens, PQEmbedding)
    with torch.no_grad():
        _close(codes(PROMPT).logits, decoding(PROMPT).logits)
    new = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(codes.generate(PROMPT, **new), decoding.generate(PROMPT, **new))


def test_format_1_minilm_hidden_states(bert: tuple[Path, dict[str, torch.Tensor]]) -> None:  # noqa: F811
    codes, decoding = _modes(bert[0])
    with torch.no_grad():
        _close(codes(BERT_IDS).last_hidden_state, decoding(BERT_IDS).last_hidden_state)
        one = BERT_IDS[:, :4]  # 4 tokens: lookup tables
        _close(codes(one).last_hidden_state, decoding(one).last_hidden_state)


def test_use_forward_switches_a_loaded_model(built: Built) -> None:  # noqa: F811
    model = dist_pgkm.load(built.out)
    with torch.no_grad():
        before = model(IDS).logits
        infer.use_forward(model, "decode")
        after = model(IDS).logits
    _close(before, after)
    assert model.lm_head.index is model.model.embed_tokens.index  # still tied


def test_generate_command_prints_a_continuation(
    smol: tuple[Path, dict[str, torch.Tensor]],  # noqa: F811
) -> None:
    result = run_cli("generate", str(smol[0]), "--prompt", "The capital", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital")
    assert "4 tokens in" in result.stdout
    assert "forward=codes" in result.stdout
    bad = run_cli("generate", str(smol[0]), "--prompt", "x", "--forward", "lut")
    assert bad.returncode == 2
    assert "invalid choice: 'lut'" in bad.stderr
