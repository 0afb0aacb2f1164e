"""Merge/split moves: the cheapest pair is merged, the SSE goes down, nothing stays empty."""

from __future__ import annotations

import torch

import dist_pgkm
from dist_pgkm.kmeans.assign import TorchAssigner
from dist_pgkm.kmeans.lloyd import RepairInput
from dist_pgkm.kmeans.metrics import cluster_weights
from dist_pgkm.pgkm.moves import merge_cheapest_pairs

from ..conftest import gaussian_mixture


def test_the_cheapest_pair_is_merged_into_its_neighbour() -> None:
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(20, 4, generator=g) * 5
    centroids[11] = centroids[4] + 1e-3  # an almost duplicate codeword
    x = centroids.repeat_interleave(50, dim=0) + 0.01 * torch.randn(1000, 4, generator=g)
    codes, dist = TorchAssigner(x).assign(centroids)
    counts = cluster_weights(codes, None, 20)
    empty = torch.empty(0, dtype=torch.int64)
    r = RepairInput(x, None, codes, dist, counts, empty, g, centroids)
    new = merge_cheapest_pairs(r, fraction=0.05)  # one move for k = 20
    # The two coinciding codewords share their points; the lighter one joins the other.
    lighter, other = (4, 11) if counts[4] <= counts[11] else (11, 4)
    moved = new != codes
    assert int(moved.sum()) == int(counts[lighter]) > 0
    assert set(codes[moved].tolist()) == {lighter}
    assert set(new[moved].tolist()) == {other}
    assert (torch.bincount(new, minlength=20) == 0).nonzero().flatten().tolist() == [lighter]


def test_moves_lower_the_sse_and_leave_no_cluster_empty() -> None:
    x = gaussian_mixture(30_000, 8, 1500, seed=11, spread=1.0)  # many centroids per blob
    with_moves = dist_pgkm.cluster(x, 2048, backend="torch")
    without = dist_pgkm.cluster(x, 2048, backend="torch", moves=0.0)
    assert with_moves.stats.moves > 0
    assert without.stats.moves == 0
    assert with_moves.stats.empty_final == 0
    assert with_moves.stats.distance_passes == with_moves.stats.iterations
    assert with_moves.stats.sse < 0.995 * without.stats.sse
