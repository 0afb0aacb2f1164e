"""DKM, IDKM and IDKM-JFB: same forward, gradients against each other and finite differences.

Float64, on sub-vectors drawn from 8 overlapping Gaussian clusters of different spreads (so the
soft assignment is far from one-hot and the fixed point is not trivial), started from 8
sub-vectors picked at random.
"""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.dkm import (
    SolverStats,
    centroid_step,
    hard_assign,
    soft_assignment,
    soft_kmeans,
    soft_weight,
)
from dist_pgkm.errors import InvalidInputError

N, M, K, TAU = 400, 4, 8, 1.0
# Tolerances, from measurements on this data (float64):
IMPLICIT_VS_UNROLLED = 1e-5  # measured 5.6e-7 (solver stops at 1e-6 relative)
FINITE_DIFFERENCE = 5e-5  # measured 7.9e-6 (central difference, h = 1e-5)
JFB_COSINE = 0.98  # measured 0.9898: JFB points the right way...
JFB_REL_ERROR = (0.05, 0.3)  # ...and is off by 0.166 relative: an approximation, not exact


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(K, M, generator=g, dtype=torch.float64) * 2
    spread = torch.rand(K, generator=g, dtype=torch.float64) * 1.5 + 0.2
    label = torch.randint(0, K, (N,), generator=g)
    x = centers[label] + torch.randn(N, M, generator=g, dtype=torch.float64) * spread[label, None]
    c0 = x[torch.randperm(N, generator=g)[:K]].clone()
    probe = torch.randn(N, M, generator=g, dtype=torch.float64)
    direction = torch.randn(N, M, generator=g, dtype=torch.float64)
    return {"x": x, "c0": c0, "probe": probe, "direction": direction}


def _loss(x: torch.Tensor, c: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """A linear functional of the soft weight A(c, x) c the layer uses."""
    return ((soft_assignment(x, c, TAU) @ c) * probe).sum()


def _grad(
    data: dict[str, torch.Tensor], method: str, iters: int
) -> tuple[torch.Tensor, SolverStats]:
    x = data["x"].clone().requires_grad_()
    stats = SolverStats()
    c = soft_kmeans(x, data["c0"], TAU, iters, method, stats=stats)  # type: ignore[arg-type]
    _loss(x, c, data["probe"]).backward()
    assert x.grad is not None
    return x.grad, stats


def test_all_methods_compute_the_same_centroids(data: dict[str, torch.Tensor]) -> None:
    ref = data["c0"]
    for _ in range(7):
        ref = centroid_step(data["x"], ref, TAU)
    for method in ("dkm", "idkm", "idkm-jfb"):
        c = soft_kmeans(data["x"], data["c0"], TAU, 7, method)  # type: ignore[arg-type]
        assert torch.equal(c, ref), method


def test_fixed_point_is_reached(data: dict[str, torch.Tensor]) -> None:
    c = soft_kmeans(data["x"], data["c0"], TAU, 200)
    assert (centroid_step(data["x"], c, TAU) - c).norm() < 1e-12
    assert (c - data["c0"]).norm() > 1.0  # the iterations did move the centroids


def test_idkm_gradient_matches_dkm_at_convergence(data: dict[str, torch.Tensor]) -> None:
    unrolled, _ = _grad(data, "dkm", 200)
    implicit, stats = _grad(data, "idkm", 200)
    assert 1 < stats.iterations < 50
    assert stats.residual <= 1e-6
    assert stats.truncated == 0
    rel = float((unrolled - implicit).norm() / implicit.norm())
    assert rel <= IMPLICIT_VS_UNROLLED, rel
    # Away from convergence the two differ: IDKM assumes a fixed point.
    early_unrolled, _ = _grad(data, "dkm", 3)
    early_implicit, _ = _grad(data, "idkm", 3)
    assert float((early_unrolled - early_implicit).norm() / early_implicit.norm()) > 1e-3


def test_idkm_gradient_matches_finite_differences(data: dict[str, torch.Tensor]) -> None:
    implicit, _ = _grad(data, "idkm", 300)
    u, h = data["direction"], 1e-5

    def converged_loss(x: torch.Tensor) -> float:
        with torch.no_grad():
            c = soft_kmeans(x, data["c0"], TAU, 300)
            return float(_loss(x, c, data["probe"]))

    numeric = (converged_loss(data["x"] + h * u) - converged_loss(data["x"] - h * u)) / (2 * h)
    analytic = float((implicit * u).sum())
    assert abs(numeric - analytic) <= FINITE_DIFFERENCE * abs(analytic), (numeric, analytic)


def test_jfb_deviation_is_measured(data: dict[str, torch.Tensor]) -> None:
    implicit, _ = _grad(data, "idkm", 200)
    jfb, _ = _grad(data, "idkm-jfb", 200)
    cosine = float(torch.nn.functional.cosine_similarity(jfb.flatten(), implicit.flatten(), 0))
    rel = float((jfb - implicit).norm() / implicit.norm())
    assert cosine >= JFB_COSINE, cosine
    assert JFB_REL_ERROR[0] <= rel <= JFB_REL_ERROR[1], rel


def _saved_bytes(data: dict[str, torch.Tensor], method: str, iters: int) -> int:
    """Bytes autograd keeps for the backward pass (tensors saved by the forward graph)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = data["x"].clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        c = soft_kmeans(x, data["c0"], TAU, iters, method)  # type: ignore[arg-type]
        _loss(x, c, data["probe"])
    return total


def test_autograd_memory_grows_with_t_for_dkm_only(data: dict[str, torch.Tensor]) -> None:
    dkm = {t: _saved_bytes(data, "dkm", t) for t in (1, 4, 16)}
    # DKM keeps every step: linear in t (same bytes per extra step).
    assert dkm[16] - dkm[4] == 4 * (dkm[4] - dkm[1])
    assert dkm[16] > 8 * dkm[1]
    for method in ("idkm", "idkm-jfb"):
        saved = {t: _saved_bytes(data, method, t) for t in (1, 4, 16)}
        assert saved[1] == saved[4] == saved[16], (method, saved)
        assert saved[16] == dkm[1]  # one step's graph


def test_hard_assignment_is_the_nearest_centroid(data: dict[str, torch.Tensor]) -> None:
    c = soft_kmeans(data["x"], data["c0"], TAU, 50)
    codes = hard_assign(data["x"], c)
    brute = torch.cdist(data["x"], c).argmin(1)
    assert torch.equal(codes, brute)


def test_bad_input_is_named() -> None:
    x, c = torch.randn(10, 4), torch.randn(3, 4)
    with pytest.raises(InvalidInputError, match="tau"):
        soft_kmeans(x, c, 0.0, 3)
    with pytest.raises(InvalidInputError, match=r"\(n, m\)"):
        soft_kmeans(x, torch.randn(3, 5), 1.0, 3)
    with pytest.raises(InvalidInputError, match="method"):
        soft_kmeans(x, c, 1.0, 3, "kmeans")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm-jfb"])
def test_chunks_give_the_same_centroids_and_gradients(
    data: dict[str, torch.Tensor], method: str
) -> None:
    grads, centroids = [], []
    for chunk in (None, 64, 37):  # 37 leaves a short last chunk
        x = data["x"].clone().requires_grad_()
        c = soft_kmeans(x, data["c0"], TAU, 8, method, chunk=chunk)  # type: ignore[arg-type]
        w = soft_weight(x, c, TAU, chunk=chunk)
        (w * data["probe"]).sum().backward()
        assert x.grad is not None
        grads.append(x.grad)
        centroids.append(c.detach())
    for c, g in zip(centroids[1:], grads[1:], strict=True):
        torch.testing.assert_close(c, centroids[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-12)


def test_chunks_bound_what_dkm_keeps(data: dict[str, torch.Tensor]) -> None:
    """Chunked (checkpointed) steps keep their inputs only: no (n, k) attention per step."""

    def saved(chunk: int | None) -> int:
        """Bytes of the distinct storages autograd keeps, other than x's own."""
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        x = data["x"].clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            soft_kmeans(x, data["c0"], TAU, 16, "dkm", chunk=chunk)
        storages.pop(x.untyped_storage().data_ptr(), None)
        return sum(storages.values())

    attention_bytes = N * K * 8
    assert saved(None) > 16 * attention_bytes  # every step keeps its (n, k) attention (and more)
    assert saved(50) < attention_bytes  # per step only the (k, m) centroids, and x's views


def test_idkm_far_from_a_fixed_point_falls_back_to_jfb(data: dict[str, torch.Tensor]) -> None:
    """One step from centroids picked among the data is no fixed point: the Neumann series of
    the implicit gradient diverges there (measured: residual > 1e3 within 2-29 iterations for
    every tau in 0.05..5), and IDKM uses the Jacobian-free gradient for that backward."""
    implicit, stats = _grad(data, "idkm", 1)
    jfb, _ = _grad(data, "idkm-jfb", 1)
    assert stats.fallback
    assert stats.calls == stats.fallbacks == 1
    assert torch.equal(implicit, jfb)
    _, converged = _grad(data, "idkm", 200)
    assert not converged.fallback


def test_a_solve_cut_at_its_cap_is_counted(data: dict[str, torch.Tensor]) -> None:
    x = data["x"].clone().requires_grad_()
    stats = SolverStats()
    c = soft_kmeans(x, data["c0"], TAU, 200, "idkm", solver_iters=2, stats=stats)
    _loss(x, c, data["probe"]).backward()
    assert stats.iterations == 2
    assert stats.residual > 1e-6
    assert (stats.calls, stats.truncated, stats.fallbacks) == (1, 1, 0)
