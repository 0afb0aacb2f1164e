"""PQ modules reproduce the decoded float layer exactly; centroid gradients sum members'."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq import (
    PQConv2d,
    PQEmbedding,
    PQLinear,
    bits_per_weight,
    quantize_weight,
    to_subvectors,
)
from dist_pgkm.pq.modules import pq_module_for


def test_subvector_layout_is_rows_of_contiguous_inputs() -> None:
    w = torch.arange(24.0).reshape(2, 12)  # Linear (out 2, in 12)
    blocks = to_subvectors(w, 4)
    assert blocks.tolist()[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    conv = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)  # (out, in, kh, kw)
    assert torch.equal(to_subvectors(conv, 4)[3], conv.reshape(2, 12)[1, :4])
    with pytest.raises(InvalidInputError, match=r"width 12 is not a multiple of block size 8"):
        to_subvectors(w, 8, name="layers.0.mlp")


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(64, 32),
        nn.Linear(64, 32, bias=False),
        nn.Embedding(100, 16, padding_idx=3),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
    ],
    ids=["linear", "linear-nobias", "embedding", "conv2d"],
)
def test_pq_module_matches_the_decoded_float_module(module: nn.Module) -> None:
    torch.manual_seed(0)
    q = quantize_weight(module.weight, block_size=4, k=32, backend="torch")
    pq = pq_module_for(module).from_float(module, q.centroids, q.codes)
    dense = type(module).__new__(type(module))
    dense.__dict__ = dict(module.__dict__)
    dense._parameters = dict(module._parameters)
    dense.weight = nn.Parameter(q.dense())
    x = (
        torch.randint(0, 100, (5, 7))
        if isinstance(module, nn.Embedding)
        else (torch.randn(3, 4, 9, 9) if isinstance(module, nn.Conv2d) else torch.randn(5, 64))
    )
    assert torch.equal(pq(x), dense(x))
    assert q.stats.empty_final == 0


def test_centroid_gradient_is_the_sum_of_member_gradients() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    q = quantize_weight(linear.weight, block_size=4, k=8, backend="torch")
    pq = PQLinear.from_float(linear, q.centroids, q.codes)
    x = torch.randn(10, 16)
    pq(x).pow(2).sum().backward()
    # Reference: gradient w.r.t. the dense weight, summed over each centroid's blocks.
    w = q.dense().requires_grad_(True)
    torch.nn.functional.linear(x, w, linear.bias).pow(2).sum().backward()
    assert w.grad is not None
    block_grads = to_subvectors(w.grad, 4)  # (32, 4)
    ref = torch.zeros_like(q.centroids).index_add_(0, q.codes, block_grads)
    assert pq.centroids.grad is not None
    assert torch.allclose(pq.centroids.grad, ref, atol=1e-5)
    assert pq.codes.grad is None  # a buffer


def test_bad_codes_are_refused() -> None:
    with pytest.raises(
        InvalidInputError, match=r"codes range over \[0, 9\] but the codebook has 4"
    ):
        PQEmbedding(torch.zeros(4, 2), torch.tensor([0, 9, 1, 1]), (2, 4))
    with pytest.raises(InvalidInputError, match="cannot fill a weight of shape"):
        PQConv2d(torch.zeros(4, 2), torch.zeros(3).long(), (2, 4), None, {})
    with pytest.raises(InvalidInputError, match="no PQ version of LayerNorm"):
        pq_module_for(nn.LayerNorm(4))


def test_bits_per_weight_counts_the_codebook() -> None:
    # 576 x 1536 at bs 8, K 256: 8 bits per 8 weights + 256 * 8 fp16 values
    n_blocks = 576 * 1536 // 8
    expected = (n_blocks * 8 + 256 * 8 * 16) / (576 * 1536)
    assert bits_per_weight(n_blocks, 256, 8) == pytest.approx(expected)
    assert bits_per_weight(n_blocks, 4096, 4) > 3.0  # 12 bits / 4 + codebook


def test_embedding_decodes_only_its_rows_with_the_same_values_and_gradients() -> None:
    torch.manual_seed(2)
    table = nn.Embedding(50, 8, padding_idx=3)
    q = quantize_weight(table.weight, block_size=2, k=16, backend="torch")
    pq = PQEmbedding.from_float(table, q.centroids, q.codes)
    ids = torch.tensor([[3, 7, 7, 49], [0, 3, 12, 1]])
    out = pq(ids)
    w = q.dense().requires_grad_(True)
    ref = torch.nn.functional.embedding(ids, w, padding_idx=3)
    assert torch.equal(out, ref)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert w.grad is not None
    assert pq.centroids.grad is not None
    expected = torch.zeros_like(q.centroids).index_add_(0, q.codes, to_subvectors(w.grad, 2))
    assert torch.allclose(pq.centroids.grad, expected, atol=1e-6)  # padding row: no gradient
