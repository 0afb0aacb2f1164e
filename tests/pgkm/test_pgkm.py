"""PG k-means end to end on data built to produce empty clusters."""

from __future__ import annotations

import pytest
import torch

import dist_pgkm
from dist_pgkm.kmeans.assign import TorchAssigner
from dist_pgkm.kmeans.lloyd import RepairInput
from dist_pgkm.kmeans.metrics import cluster_weights
from dist_pgkm.pgkm.repair import split_repair
from dist_pgkm.utils.optional import faiss_available

from ..conftest import gaussian_mixture, sse_reference, with_duplicates, with_zero_blocks

BACKENDS = [
    "torch",
    pytest.param(
        "faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_empty_cluster_and_no_distance_pass_spent_on_repairs(backend: str) -> None:
    x = with_zero_blocks(with_duplicates(gaussian_mixture(20_000, 8, 50, 0), 0.3, 1), 0.5, 2)
    r = dist_pgkm.cluster(x, 256, backend=backend)
    s = r.stats
    assert s.empty_after_init == 0
    assert s.empty_final == 0
    assert s.distance_passes == s.iterations  # one per iteration, none for repairs or init
    assert s.k_used == 256
    assert s.n_distinct == torch.unique(x, dim=0).shape[0]
    assert s.sse == pytest.approx(sse_reference(x, r.centroids, r.codes), rel=1e-6)
    # The zero blocks (half of all points) share one centroid, which is exactly zero.
    zero_codes = r.codes[(x == 0).all(1)].unique()
    assert zero_codes.numel() == 1
    assert float(r.centroids[zero_codes[0]].abs().max()) == 0.0


def test_recovers_well_separated_centres() -> None:
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(64, 4, generator=g) * 10
    labels = torch.arange(64).repeat_interleave(100)
    x = centres[labels] + torch.randn(6400, 4, generator=g) * 0.1
    r = dist_pgkm.cluster(x, 64)
    truth = sse_reference(x, centres, labels)
    assert r.stats.sse <= truth  # the optimum for these clusters is their means
    assert r.stats.sse >= 0.95 * truth


def test_split_repair_fills_every_empty_cluster_in_one_pass() -> None:
    x = gaussian_mixture(5000, 8, 20, seed=3)
    k = 64
    centroids = x[:k].clone()
    centroids[40:] = 1e3  # 24 centroids far away from everything: all empty
    codes, dist = TorchAssigner(x).assign(centroids)
    counts = cluster_weights(codes, None, k)
    empty = (counts == 0).nonzero().flatten()
    assert empty.numel() >= 24
    new = split_repair(
        RepairInput(x, None, codes, dist, counts, empty, torch.Generator(), centroids)
    )
    assert int((torch.bincount(new, minlength=k) == 0).sum()) == 0
    moved = new != codes
    assert set(new[moved].unique().tolist()) <= set(empty.tolist())  # only into empty ones


def test_fewer_distinct_points_than_k_finishes_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 8, generator=g)
    x = base[torch.randint(0, 10, (5000,), generator=g)]
    r = dist_pgkm.cluster(x, 64)
    s = r.stats
    assert s.k_used == 10
    assert s.empty_final == 54
    assert s.iterations == 0
    assert s.sse == 0.0
    assert torch.equal(r.decode(), x)
    c = dist_pgkm.cluster(x, 64, compact=True)
    assert c.centroids.shape == (10, 8)
    assert int(c.codes.max()) == 9


def test_all_zero_blocks_do_not_loop() -> None:
    r = dist_pgkm.cluster(torch.zeros(1000, 4), 16)
    assert r.stats.k_used == 1
    assert r.stats.sse == 0.0


def test_n_barely_above_k_uses_every_codeword() -> None:
    x = gaussian_mixture(259, 8, 259, seed=4)  # 259 distinct points, k = 256
    r = dist_pgkm.cluster(x, 256)
    assert r.stats.empty_final == 0
    assert r.stats.k_used == 256
    # Optimal: merge the 3 cheapest disjoint pairs; anything using all codewords is close to it.
    pair = torch.cdist(x.double(), x.double()) ** 2 / 2
    pair.fill_diagonal_(float("inf"))
    assert r.stats.sse <= 3 * float(pair.min()) * 20


def test_fp16_and_bf16_inputs_compute_in_fp32() -> None:
    x = gaussian_mixture(8000, 8, 30, seed=5)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        r = dist_pgkm.cluster(xh, 128)
        assert r.centroids.dtype == torch.float32
        assert r.stats.empty_final == 0
        assert r.stats.sse == pytest.approx(
            sse_reference(xh.float(), r.centroids, r.codes), rel=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_bytes(backend: str) -> None:
    x = with_zero_blocks(gaussian_mixture(10_000, 8, 30, 6), 0.2, 7)
    for method in ("pgkm", "fairseq-em", "kmeans++"):
        a = dist_pgkm.cluster(x, 128, method=method, seed=3, backend=backend)
        b = dist_pgkm.cluster(x, 128, method=method, seed=3, backend=backend)
        assert torch.equal(a.codes, b.codes), method
        assert torch.equal(a.centroids, b.centroids), method


def test_weights_pull_centroids() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    w = torch.tensor([1.0, 3.0, 1.0, 1.0])
    r = dist_pgkm.cluster(x, 2, weights=w, backend="torch")
    assert sorted(r.centroids.flatten().tolist()) == pytest.approx([0.75, 10.5])


@pytest.mark.parametrize("switch", ["consolidate", "preassign", "repair"])
def test_each_component_can_be_switched_off(switch: str) -> None:
    x = with_zero_blocks(gaussian_mixture(8000, 8, 30, 8), 0.5, 9)
    r = dist_pgkm.cluster(x, 128, **{switch: False})
    assert r.stats.sse == pytest.approx(sse_reference(x, r.centroids, r.codes), rel=1e-6)
    if switch == "repair":
        assert r.stats.repair_passes == 0
    if switch == "consolidate":
        assert r.stats.n_distinct == 8000
