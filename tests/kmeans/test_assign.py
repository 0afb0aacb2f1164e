"""Assignment backends against a float64 brute-force reference."""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.errors import BackendUnavailableError
from dist_pgkm.kmeans.assign import FaissAssigner, TorchAssigner, make_assigner, resolve_backend
from dist_pgkm.kmeans.lloyd import update_centroids
from dist_pgkm.kmeans.metrics import segment_sum
from dist_pgkm.utils.optional import faiss_available, faiss_num_gpus

from ..conftest import gaussian_mixture

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def reference(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(x.double(), c.double()) ** 2
    dist, codes = d.min(dim=1)
    return codes, dist


@pytest.mark.parametrize("cls", [TorchAssigner, pytest.param(FaissAssigner, marks=needs_faiss)])
def test_nearest_centroid_matches_float64_reference(cls: type) -> None:
    x = gaussian_mixture(20_000, 8, 50, seed=3)
    c = gaussian_mixture(300, 8, 50, seed=4)
    codes, dist = cls(x).assign(c)
    ref_codes, ref_dist = reference(x, c)
    # fp32 distances can only disagree on near-ties: the chosen centroid must be as close.
    chosen = ((x.double() - c.double()[codes]) ** 2).sum(1)
    assert torch.allclose(chosen, ref_dist, rtol=1e-5, atol=1e-5)
    assert (codes == ref_codes).float().mean() > 0.999
    assert torch.allclose(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)
    assert codes.dtype == torch.int64
    assert dist.dtype == torch.float32


@pytest.mark.parametrize("cls", [TorchAssigner, pytest.param(FaissAssigner, marks=needs_faiss)])
def test_duplicate_centroids_tie_to_the_lowest_index(cls: type) -> None:
    x = torch.randn(1000, 4)
    c = torch.randn(8, 4)
    c[5] = c[2]  # exact duplicate: index 5 must never win
    codes, _ = cls(x).assign(c)
    assert (codes == 5).sum() == 0
    assert (codes == 2).sum() > 0


def test_torch_blocks_do_not_change_the_result() -> None:
    x = gaussian_mixture(5000, 8, 20, seed=5)
    c = x[:64].clone()
    a, da = TorchAssigner(x, block_bytes=1 << 10).assign(c)
    b, db = TorchAssigner(x, block_bytes=1 << 26).assign(c)
    assert torch.equal(a, b)
    assert torch.equal(da, db)


def test_segment_sum_and_update_match_index_add_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, 8, generator=g)
    w = torch.rand(10_000, generator=g)
    codes = torch.randint(0, 100, (10_000,), generator=g)
    codes[codes == 7] = 8  # cluster 7 is empty
    ref = torch.zeros(100, 8, dtype=torch.float64).index_add_(0, codes, x.double() * w[:, None])
    assert torch.allclose(segment_sum(codes, x, 100, w).double(), ref, atol=1e-4)
    old = torch.full((100, 8), 42.0)
    new = update_centroids(x, w, codes, old)
    mass = torch.zeros(100, dtype=torch.float64).index_add_(0, codes, w.double())
    filled = mass > 0
    assert torch.allclose(new[filled].double(), ref[filled] / mass[filled, None], atol=1e-5)
    assert torch.equal(new[7], old[7])  # an empty cluster keeps its centroid


def test_auto_backend_prefers_faiss_on_cpu() -> None:
    expected = "faiss" if faiss_available() else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected
    assert make_assigner(torch.randn(10, 2)).name == expected


@pytest.mark.skipif(faiss_num_gpus() > 0, reason="this machine has a GPU for faiss")
def test_faiss_gpu_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match=r"faiss-gpu.*visible CUDA device"):
        make_assigner(torch.randn(10, 2), "faiss-gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_torch_cuda_backend_matches_cpu() -> None:  # pragma: no cover - needs a GPU
    x = gaussian_mixture(20_000, 8, 50, seed=3)
    c = x[:256].clone()
    a, _ = TorchAssigner(x).assign(c)
    b, _ = TorchAssigner(x.cuda()).assign(c.cuda())
    assert (a == b.cpu()).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(faiss_num_gpus() == 0, reason="faiss-gpu with a CUDA device is not available")
def test_faiss_gpu_backend_matches_cpu() -> None:  # pragma: no cover - needs a GPU
    x = gaussian_mixture(20_000, 8, 50, seed=3)
    c = x[:256].clone()
    a, _ = FaissAssigner(x).assign(c)
    b, _ = make_assigner(x, "faiss-gpu").assign(c)
    assert (a == b).float().mean() > 0.999


def test_segment_sum_chunked_and_cached_layouts_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import dist_pgkm.kmeans.metrics as metrics

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=g)
    w = torch.rand(5000, generator=g)
    ids = torch.randint(0, 50, (5000,), generator=g)
    cached = segment_sum(ids, x, 50, w, metrics.columns(x, w))
    monkeypatch.setattr(metrics, "_CHUNK", 1024)  # several chunks
    chunked = segment_sum(ids, x, 50, w)
    assert torch.allclose(cached, chunked, atol=1e-4)
    monkeypatch.setattr(metrics, "_CACHED_COLUMNS_MAX", 100)
    assert metrics.columns(x, w) is None  # too big to cache: sums go chunk by chunk
