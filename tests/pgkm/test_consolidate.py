"""Dense-weight consolidation: duplicates become one weighted point, nothing else moves."""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.pgkm import consolidate as consolidate_mod
from dist_pgkm.pgkm.consolidate import consolidate

from ..conftest import gaussian_mixture, with_duplicates, with_zero_blocks


def test_exact_duplicates_are_merged_and_weights_summed() -> None:
    x = with_zero_blocks(with_duplicates(gaussian_mixture(5000, 8, 30, seed=0), 0.3, 1), 0.2, 2)
    w = torch.rand(5000, generator=torch.Generator().manual_seed(3))
    c = consolidate(x, w)
    ref, ref_inv = torch.unique(x, dim=0, return_inverse=True)
    assert c.n_distinct == ref.shape[0]
    assert torch.equal(c.points[c.inverse], x)  # lossless: every input is its point
    expected = torch.zeros(ref.shape[0], dtype=torch.float64).index_add_(0, ref_inv, w.double())
    got = torch.zeros(ref.shape[0], dtype=torch.float64)
    got[ref_inv] = c.weights.double()[c.inverse]
    assert torch.allclose(got, expected, rtol=1e-6)
    zero = c.inverse[(x == 0).all(1).nonzero()[0, 0]]
    assert c.weights[zero] == pytest.approx(float(w[(x == 0).all(1)].sum()), rel=1e-5)


def test_order_is_first_occurrence_and_signed_zero_folds() -> None:
    x = torch.tensor([[1.0, 2.0], [0.0, -0.0], [1.0, 2.0], [-0.0, 0.0], [3.0, 3.0]])
    c = consolidate(x)
    assert c.points.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]
    assert c.inverse.tolist() == [0, 1, 0, 1, 2]
    assert c.weights.tolist() == [2.0, 2.0, 1.0]


def test_hash_collisions_fall_back_to_exact_grouping(monkeypatch: pytest.MonkeyPatch) -> None:
    x = with_duplicates(torch.randn(2000, 4), 0.5, 0)
    monkeypatch.setattr(
        consolidate_mod, "_hash_rows", lambda x, radius, tags: torch.zeros(x.shape[0]).long()
    )
    c = consolidate(x)
    assert c.n_distinct == torch.unique(x, dim=0).shape[0]
    assert torch.equal(c.points[c.inverse], x)
    tags = torch.arange(x.shape[0]) % 3  # duplicates with other tags stay apart
    t = consolidate(x, tags=tags)
    assert t.n_distinct == torch.unique(torch.cat([tags[:, None], x], 1), dim=0).shape[0]
    assert torch.equal(t.points[t.inverse], x)


def test_tags_keep_equal_points_apart() -> None:
    x = torch.zeros(12, 4)  # one zero block, in 3 groups
    tags = torch.arange(12) % 3
    c = consolidate(x, tags=tags)
    assert c.n_distinct == 3
    assert torch.equal(tags[c.inverse[:3]], torch.arange(3))
    assert torch.equal(c.weights, torch.full((3,), 4.0))


def test_radius_merges_cells_and_moves_points_less_than_radius() -> None:
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    c = consolidate(x, radius=0.25)
    assert c.n_distinct < 1000  # ~(8 / 0.25)^2 cells can be occupied in 2-D
    assert float((c.points[c.inverse] - x).abs().max()) < 0.25
    assert float(c.weights.sum()) == pytest.approx(20_000)
