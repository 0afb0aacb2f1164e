"""The baselines behave as the methods they stand for, with stats that can be predicted."""

from __future__ import annotations

import pytest
import torch

import dist_pgkm
from dist_pgkm.kmeans.assign import TorchAssigner
from dist_pgkm.utils.optional import faiss_available

from ..conftest import gaussian_mixture, sse_reference, with_zero_blocks

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def test_fairseq_em_init_with_replacement_leaves_exactly_the_duplicate_draws_empty() -> None:
    x = gaussian_mixture(3000, 8, 30, seed=0)  # distinct points
    k, seed = 512, 5
    drawn = torch.randint(0, 3000, (k,), generator=torch.Generator().manual_seed(seed))
    expected = k - drawn.unique().numel()
    assert expected > 20  # birthday problem: many duplicate draws at k/n = 0.17
    r = dist_pgkm.cluster(x, k, method="fairseq-em", seed=seed, n_iter=1, backend="torch")
    assert r.stats.empty_after_init == expected


def test_fairseq_em_split_vanishes_in_fp16_and_aborts_after_max_tentatives() -> None:
    # Half the blocks are exactly zero: many draws hit zero, and splitting the zero centroid by
    # +-1e-6 cannot separate identical points (and vanishes in fp16 rounding anyway).
    x = with_zero_blocks(gaussian_mixture(4000, 8, 30, seed=1), 0.5, 2).half()
    r = dist_pgkm.cluster(x, 64, method="fairseq-em", max_tentatives=20, backend="torch")
    s = r.stats
    assert s.aborted
    assert s.iterations == 1
    assert s.repair_passes == 21  # tentatives 0..20, the 21st re-assignment raises
    assert s.distance_passes == 1 + 21
    assert s.empty_final > 0
    assert r.centroids.dtype == torch.float32
    assert s.sse == pytest.approx(sse_reference(x.float(), r.centroids, r.codes), rel=1e-6)


def test_fairseq_em_resolves_empties_in_fp32_on_distinct_points() -> None:
    x = gaussian_mixture(3000, 8, 30, seed=3)
    r = dist_pgkm.cluster(x, 256, method="fairseq-em", seed=1, backend="torch")
    s = r.stats
    assert s.empty_after_init > 0
    assert not s.aborted
    assert s.empty_final == 0
    assert s.distance_passes == s.iterations + s.repair_passes  # each tentative re-assigns all


def test_pgkm_beats_fairseq_em_where_it_aborts() -> None:
    x = with_zero_blocks(gaussian_mixture(4000, 8, 30, seed=1), 0.5, 2).half()
    fair = dist_pgkm.cluster(x, 64, method="fairseq-em")
    pg = dist_pgkm.cluster(x, 64)
    assert fair.stats.aborted
    assert not pg.stats.aborted
    assert pg.stats.empty_total == 0
    assert pg.stats.sse < 0.8 * fair.stats.sse


@needs_faiss
def test_faiss_stats_are_mapped_and_codes_are_nearest() -> None:
    x = with_zero_blocks(gaussian_mixture(20_000, 8, 40, seed=4), 0.3, 5)
    r = dist_pgkm.cluster(x, 256, method="faiss", n_iter=10)
    s = r.stats
    assert s.iterations == 10
    assert len(s.objective) == 10
    assert len(s.empty_per_iter) == 10
    assert s.distance_passes == 11  # one search per iteration + the final codes
    assert s.empty_total > 0  # duplicate zero draws, split by faiss
    codes, _ = TorchAssigner(x).assign(r.centroids)
    chosen = ((x.double() - r.centroids.double()[r.codes]) ** 2).sum(1)
    best = ((x.double() - r.centroids.double()[codes]) ** 2).sum(1)
    assert torch.allclose(chosen, best, atol=1e-5)
    assert s.sse == pytest.approx(sse_reference(x, r.centroids, r.codes), rel=1e-6)


@needs_faiss
def test_faiss_method_refuses_the_torch_backend() -> None:
    with pytest.raises(dist_pgkm.DistPGKMError, match="method 'faiss' runs on faiss"):
        dist_pgkm.cluster(torch.randn(500, 4), 8, method="faiss", backend="torch")


def test_kmeanspp_relocates_empties_without_distance_passes() -> None:
    x = with_zero_blocks(gaussian_mixture(8000, 8, 30, seed=6), 0.5, 7)
    r = dist_pgkm.cluster(x, 128, method="kmeans++", backend="torch")
    s = r.stats
    assert s.empty_final == 0
    assert s.distance_passes == s.iterations
    assert s.sse == pytest.approx(sse_reference(x, r.centroids, r.codes), rel=1e-6)


@pytest.mark.parametrize("method", ["pgkm", "fairseq-em", "faiss", "kmeans++"])
def test_every_method_takes_a_63_bit_seed(method: str) -> None:
    # Per-layer seeds are 63-bit hashes (dist_pgkm.distributed.plan.layer_seed).
    if method == "faiss":
        pytest.importorskip("faiss")
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    a = dist_pgkm.cluster(x, 8, method=method, seed=2**62 + 5, n_iter=3)
    b = dist_pgkm.cluster(x, 8, method=method, seed=2**62 + 5, n_iter=3)
    assert torch.equal(a.codes, b.codes)
