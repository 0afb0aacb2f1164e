"""Quantized layers in training: centroids learn from their members' gradients (DESIGN.md §4).

A centroid's gradient must be the sum (Linear, Embedding) or the mean (Conv2d) of the gradients
of the weight blocks it stands for. The reference is computed in float64 by autograd on the
decoded dense weight, then summed per codeword with ``index_add``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.pq import (
    PQConv2d,
    PQEmbedding,
    PQLinear,
    PQModule,
    from_subvectors,
    quantize_weight,
    to_subvectors,
)
from tests.conftest import with_duplicates, with_zero_blocks

QUERY = "encoder.layer.0.attention.self.query.weight"  # (384, 384)
POSITIONS = "embeddings.position_embeddings.weight"  # (512, 384)
# float32 forward/backward against a float64 reference: |g - ref| <= RTOL * max |ref|.
RTOL = 1e-5


def hard(weight: torch.Tensor, bs: int) -> torch.Tensor:
    """``weight`` with 25% zero blocks and 25% duplicated blocks (crowded codewords)."""
    blocks = with_duplicates(with_zero_blocks(to_subvectors(weight, bs), 0.25, 0), 0.25, 1)
    return from_subvectors(blocks, tuple(weight.shape))


def member_gradients(
    pq: PQModule, dense_loss: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 sum of member block gradients per codeword, and the member counts."""
    weight = pq.weight.detach().double().requires_grad_()
    dense_loss(weight).backward()
    assert weight.grad is not None
    blocks = to_subvectors(weight.grad, pq.block_size)  # (n_blocks, bs)
    index = pq.index.long()
    total = torch.zeros(pq.k, pq.block_size, dtype=torch.float64).index_add_(0, index, blocks)
    counts = torch.bincount(index, minlength=pq.k).to(torch.float64)
    return total, counts


def assert_close(grad: torch.Tensor | None, ref: torch.Tensor) -> None:
    assert grad is not None
    error = float((grad.double() - ref).abs().max())
    assert error <= RTOL * float(ref.abs().max()), f"max error {error:.3g}"


def test_pq_state_is_trainable_centroids_and_frozen_codes() -> None:
    q = quantize_weight(torch.randn(8, 16), block_size=4, k=4)
    pq = PQLinear.from_float(nn.Linear(16, 8), q.centroids, q.codes)
    assert isinstance(pq.centroids, nn.Parameter)
    assert pq.centroids.requires_grad
    assert {name for name, _ in pq.named_parameters()} == {"centroids", "bias"}
    assert {name for name, _ in pq.named_buffers()} == {"codes", "index"}
    assert not pq.codes.requires_grad
    assert not pq.codes.is_floating_point()
    codes = pq.codes.clone()
    opt = torch.optim.SGD(pq.parameters(), lr=0.1)
    pq(torch.randn(3, 16)).sum().backward()
    opt.step()
    assert torch.equal(pq.codes, codes)


def test_pq_linear_centroid_gradient_is_the_sum_of_members(
    minilm: dict[str, torch.Tensor],
) -> None:
    weight = hard(minilm[QUERY], 4)
    bias = torch.randn(384)
    linear = nn.Linear(384, 384)
    linear.weight.data, linear.bias.data = weight, bias
    q = quantize_weight(weight, block_size=4, k=64, backend="torch", n_iter=6)
    pq = PQLinear.from_float(linear, q.centroids, q.codes)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 384, generator=g), torch.randn(16, 384, generator=g)
    (pq(x) * t).sum().backward()
    total, counts = member_gradients(
        pq, lambda w: (F.linear(x.double(), w, bias.double()) * t.double()).sum()
    )
    assert float(counts.max()) > 5 * float(counts.mean())  # the zero-block codeword is crowded
    assert_close(pq.centroids.grad, total)


def test_pq_embedding_centroid_gradient_is_the_sum_of_looked_up_members(
    minilm: dict[str, torch.Tensor],
) -> None:
    weight = hard(minilm[POSITIONS], 8)
    q = quantize_weight(weight, block_size=8, k=64, backend="torch", n_iter=6)
    pq = PQEmbedding.from_float(nn.Embedding(512, 384, padding_idx=0), q.centroids, q.codes)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 32), generator=g)  # repeated rows and the padding row
    t = torch.randn(8, 32, 384, generator=g)
    (pq(ids) * t).sum().backward()
    total, _ = member_gradients(pq, lambda w: (F.embedding(ids, w, 0) * t.double()).sum())
    assert int((ids == 0).sum()) > 0
    assert_close(pq.centroids.grad, total)


def test_pq_conv2d_centroid_gradient_is_the_mean_of_members() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    conv.weight.data = hard(conv.weight.data, 4)  # rows of 72 = 8 * 3 * 3, blocks of 4
    q = quantize_weight(conv.weight, block_size=4, k=16, backend="torch", n_iter=6)
    pq = PQConv2d.from_float(conv, q.centroids, q.codes)
    x, t = torch.randn(2, 8, 9, 9), torch.randn(2, 16, 9, 9)
    (pq(x) * t).sum().backward()
    total, counts = member_gradients(
        pq, lambda w: (F.conv2d(x.double(), w, conv.bias.double(), padding=1) * t.double()).sum()
    )
    assert float(counts.max()) > 1  # the sum and the mean differ
    assert_close(pq.centroids.grad, total / counts.clamp(min=1)[:, None])
    with torch.no_grad():  # the forward value is the plain decode
        plain = F.conv2d(x, pq.weight, conv.bias, padding=1)
        assert torch.equal(pq(x), plain)
