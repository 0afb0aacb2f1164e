"""Compaction merges unused and duplicate codewords without changing the decode."""

from __future__ import annotations

import pytest
import torch

import dist_pgkm
from dist_pgkm.kmeans.compact import compact
from dist_pgkm.kmeans.metrics import count_used_codewords

from ..conftest import gaussian_mixture, sse_reference, with_zero_blocks


def test_exact_compaction_keeps_the_decode_bit_for_bit() -> None:
    x = with_zero_blocks(gaussian_mixture(4000, 8, 30, seed=1), 0.5, 2).half()
    full = dist_pgkm.cluster(x, 64, method="fairseq-em", backend="torch")
    assert full.stats.aborted  # leaves duplicate (split-copied) and unused codewords
    small = dist_pgkm.cluster(x, 64, method="fairseq-em", backend="torch", compact=True)
    k_used = small.stats.k_used
    assert k_used == full.stats.k_used < 64
    assert small.centroids.shape == (k_used, 8)
    assert int(small.codes.max()) == k_used - 1
    assert torch.bincount(small.codes, minlength=k_used).min() > 0
    assert torch.equal(small.decode(), full.decode())
    assert small.stats.sse == full.stats.sse
    assert small.stats.empty_final == 0


def test_tolerance_merges_near_duplicates_and_recomputes_the_sse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 4, generator=g)
    centroids = torch.randn(10, 4, generator=g)
    centroids[7] = centroids[3] + 1e-4  # what a +-eps split leaves behind
    codes = torch.cdist(x, centroids).argmin(1)
    stats = dist_pgkm.KMeansStats("x", "torch", 1000, 4, 10)
    result = dist_pgkm.KMeansResult(centroids, codes, stats)
    assert count_used_codewords(centroids, codes) == 10
    merged = compact(result, x, tol=1e-2)
    assert merged.stats.k_used == 9
    assert merged.stats.sse == pytest.approx(sse_reference(x, merged.centroids, merged.codes))
    exact = compact(result, x, tol=0.0)
    assert exact.stats.k_used == 10
