"""LR²VQ's pieces: the low-rank factorisation, the bits it costs, and the rule for d."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dist_pgkm.dkm.lr2vq import choose_rank, kmeans_error, low_rank, lr2vq_bits
from dist_pgkm.errors import InvalidInputError


def _subvectors(n: int = 4000, m: int = 8, rank: int = 3, noise: float = 0.05) -> torch.Tensor:
    """Sub-vectors near a rank-``rank`` subspace of R^m, heavy-tailed along it."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(m, m, generator=g))[0][:, :rank]
    coords = torch.randn(n, rank, generator=g) * torch.rand(n, 1, generator=g) ** 2 * 3
    return coords @ basis.T + noise * torch.randn(n, m, generator=g)


def test_low_rank_error_falls_with_d_to_zero() -> None:
    x = _subvectors()
    errors = [low_rank(x, d).error for d in range(1, 9)]
    assert all(a >= b for a, b in itertools.pairwise(errors))
    assert errors[-1] == 0.0
    for d in (1, 3, 8):  # error is exactly what R P misses
        f = low_rank(x, d)
        assert f.r.shape == (x.shape[0], d)
        assert f.p.shape == (d, 8)
        direct = float((x - f.r @ f.p).pow(2).sum())
        assert direct == pytest.approx(f.error, rel=1e-3, abs=1e-3)


def test_bits_per_weight_follow_m() -> None:
    n = 576 * 1536
    for m in (4, 8, 16):
        bits = lr2vq_bits(256, m, n, d=2)
        assert bits == pytest.approx(8 / m + 256 * m * 16 / n)
    assert lr2vq_bits(256, 8, n, d=2) == lr2vq_bits(256, 8, n, d=6)  # d does not cost bits


def test_choose_rank_finds_the_subspace() -> None:
    x = _subvectors(rank=3)
    choice = choose_rank(x, k=16, candidates=range(1, 9))
    assert choice.d == 3
    totals = {d: choice.total(d) for d in choice.low_rank_error}
    assert choice.low_rank_error[2] > 10 * choice.low_rank_error[3]  # below 3: signal is lost
    assert totals[3] <= 1.02 * min(totals.values())  # above 3 nothing is gained
    # The default candidates (powers of two below m, and m) give the first one above the rank.
    default = choose_rank(x, k=16)
    assert sorted(default.low_rank_error) == [1, 2, 4, 8]
    assert default.d == 4


def test_kmeans_error_is_below_the_variance() -> None:
    x = _subvectors()
    total = float((x - x.mean(0)).pow(2).sum())
    assert kmeans_error(x, 16) < 0.5 * total
    assert math.isclose(kmeans_error(x, 1), total, rel_tol=1e-4)


def test_bad_rank_is_named() -> None:
    with pytest.raises(InvalidInputError, match="between 1 and the sub-vector size m=8"):
        low_rank(torch.randn(10, 8), 9)
    with pytest.raises(InvalidInputError, match=r"must lie in 1\.\.8"):
        choose_rank(torch.randn(10, 8), 4, candidates=[0, 2])


def test_layer_rank_is_choose_rank_on_the_layers_subvectors() -> None:
    from dist_pgkm.dkm.lr2vq import layer_rank

    x = _subvectors(n=2000)  # (2000, 8) sub-vectors = a (250, 64) weight, block size 8
    weight = x.reshape(250, 64).half()
    row = layer_rank("layer", weight, 8, 16, sample=1000, seed=3)
    choice = choose_rank(weight.float().reshape(-1, 8), 16, sample=1000, seed=3)
    norm = float(weight.float().pow(2).sum())
    assert row.rank == choice.d
    assert list(row.relative_error) == [1, 2, 4, 8]
    for d, error in row.relative_error.items():
        assert error == pytest.approx(choice.total(d) / norm, rel=1e-6)
    assert row.as_dict() == {
        "layer": "layer",
        "block_size": 8,
        "k": 16,
        "rank": row.rank,
        "relative_error": row.relative_error,
    }
    with pytest.raises(InvalidInputError, match="layer"):
        layer_rank("layer", torch.randn(4, 12), 8, 16)
