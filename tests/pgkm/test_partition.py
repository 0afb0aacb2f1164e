"""Principal-axis bisection and the partitioning pre-assignment."""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.pgkm.partition import bisect, partition, partition_scores, principal_axes, route

from ..conftest import gaussian_mixture


def test_principal_axes_match_eigh() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, 8, generator=g)
    cov = a @ a.transpose(1, 2)
    vals, vecs = torch.linalg.eigh(cov.double())
    top = vecs[:, :, -1]
    gap_ok = vals[:, -2] / vals[:, -1] < 0.95  # 256 power steps: 0.95^256 ~ 2e-6
    cos = (principal_axes(cov).double() * top).sum(1).abs()
    assert float(cos[gap_ok].min()) > 0.9999
    assert int(gap_ok.sum()) > 450


def test_bisect_splits_at_the_weighted_median_along_the_axis() -> None:
    g = torch.Generator().manual_seed(1)
    # Elongated along (1, 1, 0, 0): the split must separate low from high projections.
    t = torch.randn(4001, generator=g)
    x = torch.stack([t, t, 0.01 * torch.randn(4001, generator=g), torch.zeros(4001)], 1)
    w = torch.rand(4001, generator=g)
    labels, _ = bisect(
        x, w, torch.zeros(4001, dtype=torch.long), torch.tensor([0]), torch.tensor([1])
    )
    lo, hi = t[labels == 0], t[labels == 1]
    assert lo.numel() > 0
    assert hi.numel() > 0
    assert float(lo.max()) <= float(hi.min()) or float(hi.max()) <= float(lo.min())
    half = float(w.sum()) / 2
    assert abs(float(w[labels == 0].sum()) - half) <= float(w.max())


def test_bisect_never_leaves_a_half_empty() -> None:
    x = torch.tensor([[0.0], [1.0]])
    for w in ([100.0, 1.0], [1.0, 100.0], [1.0, 1.0]):
        labels, _ = bisect(
            x,
            torch.tensor(w),
            torch.zeros(2, dtype=torch.long),
            torch.tensor([0]),
            torch.tensor([5]),
        )
        assert sorted(labels.tolist()) == [0, 5]


@pytest.mark.parametrize(("split_by", "cut"), [("weight", "median"), ("sse", "sse")])
def test_partition_gives_k_non_empty_balanced_parts(split_by: str, cut: str) -> None:
    x = gaussian_mixture(32_768, 8, 100, seed=2)
    labels, p = partition(x, torch.ones(32_768), 256, split_by, cut)  # type: ignore[arg-type]
    sizes = torch.bincount(labels, minlength=256)
    assert p == 256
    assert int(sizes.min()) >= 1
    if split_by == "weight":  # 2^15 points into 2^8 parts by weighted medians: exactly 128 each
        assert int(sizes.min()) == int(sizes.max()) == 128


def test_partition_stops_at_the_number_of_distinct_points() -> None:
    x = torch.randn(10, 3)
    labels, p = partition(x, torch.ones(10), 64)
    assert p == 10
    assert sorted(labels.tolist()) == list(range(10))


def test_route_sends_the_split_points_where_bisect_put_them() -> None:
    x = gaussian_mixture(5000, 8, 20, seed=3)
    w = torch.rand(5000, generator=torch.Generator().manual_seed(4)) + 0.1
    for cut in ("median", "sse"):
        root = torch.zeros(5000, dtype=torch.int64)
        one, first = bisect(x, w, root, torch.tensor([0]), torch.tensor([1]), cut)
        two, second = bisect(x, w, one, torch.tensor([0, 1]), torch.tensor([2, 3]), cut)
        assert torch.equal(route(x, [first, second], chunk=777), two)


def test_sampled_partition_is_close_to_the_exact_one() -> None:
    x = gaussian_mixture(60_000, 8, 300, seed=6)
    w = torch.ones(60_000)

    def sse(labels: torch.Tensor) -> float:
        return float(partition_scores(x, w, labels, 256, "sse").sum())

    exact, p = partition(x, w, 256)
    sampled, q = partition(x, w, 256, sample=64 * 256, generator=torch.Generator())
    assert p == q == 256
    assert int(torch.bincount(sampled, minlength=256).min()) >= 1  # no part starts empty
    assert sse(sampled) <= 1.05 * sse(exact)
