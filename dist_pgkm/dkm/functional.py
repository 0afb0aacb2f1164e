"""Differentiable k-means as functions of the sub-vectors: DKM, IDKM and IDKM-JFB.

All three compute the same thing in the forward pass. Given sub-vectors ``x`` (``(n, m)``, the
weight cut as in PQ) and centroids ``c`` (``(k, m)``), one soft k-means step is

    A = softmax(-‖x_i − c_j‖² / τ)  over j            (n, k) attention of each sub-vector
    F(c, x) = diag(1 / Σ_i A_ij) · Aᵀ x               (k, m) the attention-weighted means

and the clusterer iterates ``c ← F(c, x)`` ``t`` times from a warm start (the previous step's
centroids). The layer then uses the soft weight ``A(c*, x) c*``; at export every sub-vector
takes its nearest centroid (hard assignment, the PQ format).

They differ in how the gradient reaches ``x``:

* **DKM** (Cho et al. 2021, arXiv 2108.12659): autograd through all ``t`` steps; memory grows
  linearly with ``t`` (each step keeps its ``(n, k)`` attention).
* **IDKM** (arXiv 2312.07759): the forward iterations run without autograd; at the fixed point
  ``c* = F(c*, x)`` the implicit function theorem gives ``dc*/dx = (I − ∂F/∂c)⁻¹ ∂F/∂x``. The
  backward pass solves ``v = g + (∂F/∂c)ᵀ v`` by fixed-point iteration (vector-Jacobian products
  through one step's graph) and sends ``(∂F/∂x)ᵀ v`` on. Memory is one step's graph, whatever
  ``t``.
* **IDKM-JFB** (Jacobian-free backpropagation, Fung et al. 2022): ``v = g``, i.e. the backward
  of a single step: memory and backward time are both independent of ``t``; the gradient is an
  approximation whose deviation the tests measure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import torch

from dist_pgkm.errors import InvalidInputError

__all__ = [
    "Method",
    "SolverStats",
    "centroid_step",
    "centroid_step_chunked",
    "hard_assign",
    "soft_assignment",
    "soft_kmeans",
    "soft_weight",
    "sq_distances",
]

Method = Literal["dkm", "idkm", "idkm-jfb"]
_EPS = 1e-12
_DIVERGED = 1e3  # residual (relative to |g|) taken as a diverging Neumann series
_T = TypeVar("_T")


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``‖x_i − c_j‖²`` for every pair, ``(n, k)``, clamped at 0 against rounding."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)
    return d.clamp_min(0.0)


def soft_assignment(x: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """DKM's attention ``softmax(−‖x − c‖² / τ)`` over the centroids, ``(n, k)``."""
    return torch.softmax(-sq_distances(x, c) / tau, dim=1)


def centroid_step(x: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """One soft k-means step ``F(c, x)``: each centroid becomes its attention-weighted mean.

    A centroid that no sub-vector attends to (all weights underflow) keeps its place.
    """
    a = soft_assignment(x, c, tau)
    mass = a.sum(0)
    means = (a.T @ x) / mass.clamp_min(_EPS).unsqueeze(1)
    return torch.where((mass > _EPS).unsqueeze(1), means, c)


def _chunk_sums(xs: torch.Tensor, c: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = soft_assignment(xs, c, tau)
    return a.T @ xs, a.sum(0)


def _chunk_weight(xs: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    return soft_assignment(xs, c, tau) @ c


def _pieces(x: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, ...]:
    return (x,) if chunk is None or chunk >= x.shape[0] else torch.split(x, chunk)


def _checkpointed(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)``, keeping only its inputs for the backward (recomputed there)."""
    from torch.utils.checkpoint import checkpoint

    return cast(_T, checkpoint(fn, *args, use_reentrant=False))


def centroid_step_chunked(
    x: torch.Tensor, c: torch.Tensor, tau: float, chunk: int | None
) -> torch.Tensor:
    """:func:`centroid_step` over row chunks of ``x``: the ``(n, k)`` attention never exists
    whole. With autograd each chunk is checkpointed (its attention is recomputed in the
    backward), so a step keeps only ``O(k m)`` of its own besides ``x``."""
    if chunk is None or chunk >= x.shape[0]:
        return centroid_step(x, c, tau)
    num = torch.zeros_like(c)
    mass = c.new_zeros(c.shape[0])
    grad = torch.is_grad_enabled() and (x.requires_grad or c.requires_grad)
    for xs in torch.split(x, chunk):
        part = _checkpointed(_chunk_sums, xs, c, tau) if grad else _chunk_sums(xs, c, tau)
        n_part, m_part = part
        num, mass = num + n_part, mass + m_part
    means = num / mass.clamp_min(_EPS).unsqueeze(1)
    return torch.where((mass > _EPS).unsqueeze(1), means, c)


def soft_weight(
    x: torch.Tensor, c: torch.Tensor, tau: float, chunk: int | None = None
) -> torch.Tensor:
    """The sub-vectors DKM trains with: ``A(c, x) c``, ``(n, m)``, chunked like the steps."""
    grad = torch.is_grad_enabled() and (x.requires_grad or c.requires_grad)
    parts = [
        _checkpointed(_chunk_weight, xs, c, tau) if grad and chunk else _chunk_weight(xs, c, tau)
        for xs in _pieces(x, chunk)
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def hard_assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every sub-vector (the export's codes), ``(n,)`` int64."""
    return sq_distances(x, c).argmin(1)


@dataclass
class SolverStats:
    """What IDKM's backward solve did (filled in when the backward runs).

    Attributes:
        iterations: Fixed-point iterations of ``v = g + Jᵀ v`` (last backward).
        residual: ``‖v_new − v‖ / ‖g‖`` at the last iteration (last backward).
        fallback: Whether the last backward diverged and used the Jacobian-free gradient.
        calls, fallbacks: Backward passes so far, and how many of them fell back.
        truncated: Backward passes that reached ``solver_iters`` without the tolerance: their
            gradient is the series cut there (on SmolLM2's up_proj, 4 of 5 passes at t < 16
            stopped at 50 iterations with residuals 9e-7 to 1.4e-4; docs/dkm.md).
    """

    iterations: int = 0
    residual: float = float("nan")
    fallback: bool = False
    calls: int = 0
    fallbacks: int = 0
    truncated: int = 0


def soft_kmeans(
    x: torch.Tensor,
    c0: torch.Tensor,
    tau: float,
    iters: int,
    method: Method = "dkm",
    *,
    solver_iters: int = 50,
    solver_tol: float = 1e-6,
    stats: SolverStats | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Centroids after ``iters`` soft k-means steps from ``c0``, differentiable w.r.t. ``x``.

    Args:
        x: ``(n, m)`` sub-vectors (requires grad when training).
        c0: ``(k, m)`` starting centroids (treated as a constant: warm start, no gradient).
        tau: Temperature of the attention (> 0); smaller is closer to hard k-means.
        iters: Number of steps ``t`` (>= 1).
        method: ``dkm`` (autograd through every step), ``idkm`` (implicit differentiation at
            the result) or ``idkm-jfb`` (backward through the last step only).
        solver_iters, solver_tol: IDKM's backward fixed-point solve: at most this many
            iterations, stopping when the update is below ``solver_tol`` relative to ``‖g‖``.
        stats: Filled with the solve's iterations and residual when the backward runs.
        chunk: Rows of ``x`` per piece (None: one piece). Bounds the attention's memory to
            ``chunk x k`` at a time; with autograd the pieces are checkpointed, so unrolled
            DKM then keeps only the inputs of each step (and recomputes the rest backward).

    Returns:
        ``(k, m)`` centroids. With ``idkm``/``idkm-jfb`` the value is one step past the
        no-grad iterations (``iters`` steps in all), so all three return the same value.

    Raises:
        InvalidInputError: Shapes that do not match, ``tau <= 0`` or ``iters < 1``.
    """
    if x.dim() != 2 or c0.dim() != 2 or x.shape[1] != c0.shape[1]:
        raise InvalidInputError(
            f"soft_kmeans needs (n, m) sub-vectors and (k, m) centroids; got {tuple(x.shape)} "
            f"and {tuple(c0.shape)}."
        )
    if tau <= 0 or iters < 1:
        raise InvalidInputError(f"tau must be > 0 and iters >= 1 (got tau={tau}, iters={iters}).")
    c = c0.detach().clone()  # the caller may overwrite c0 (a warm-start buffer) before backward
    if method == "dkm":
        for _ in range(iters):
            c = centroid_step_chunked(x, c, tau, chunk)
        return c
    if method not in ("idkm", "idkm-jfb"):
        raise InvalidInputError(f"method {method!r}: choose dkm, idkm or idkm-jfb.")
    with torch.no_grad():
        for _ in range(iters - 1):
            c = centroid_step_chunked(x, c, tau, chunk)
    c_star = c.detach()
    c_out = centroid_step_chunked(x, c_star, tau, chunk)  # the one step whose graph is kept
    if method == "idkm" and c_out.requires_grad:
        hook = _implicit_hook(x, c_star, tau, solver_iters, solver_tol, stats, chunk)
        c_out.register_hook(hook)  # type: ignore[no-untyped-call]
    return c_out


def _implicit_hook(
    x: torch.Tensor,
    c_star: torch.Tensor,
    tau: float,
    max_iters: int,
    tol: float,
    stats: SolverStats | None,
    chunk: int | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient hook of IDKM: ``g ↦ v`` with ``v = g + (∂F/∂c)ᵀ v`` at ``c*``.

    The Jacobian-vector products go through a separate one-step graph built when the backward
    runs (the forward keeps only the step that reaches ``x``), so the hook never re-enters
    itself and the forward's memory stays one step's.
    """

    def hook(g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            c0 = c_star.detach().requires_grad_()
            step = centroid_step_chunked(x.detach(), c0, tau, chunk)
        v = g
        scale = float(g.norm()) or 1.0
        residual = float("nan")
        done = 0
        fallback = False
        for done in range(1, max_iters + 1):  # noqa: B007 - `done` is reported below
            (jv,) = torch.autograd.grad(step, c0, v, retain_graph=True)
            v_next = g + jv
            residual = float((v_next - v).norm()) / scale
            if not math.isfinite(residual) or residual > _DIVERGED:
                # Far from a fixed point the series sum_i (J^T)^i g need not converge: use the
                # Jacobian-free gradient for this step rather than a blown-up one.
                v, fallback = g, True
                break
            v = v_next
            if residual <= tol:
                break
        if stats is not None:
            stats.iterations, stats.residual, stats.fallback = done, residual, fallback
            stats.calls += 1
            stats.fallbacks += int(fallback)
            stats.truncated += int(not fallback and not residual <= tol)
        return v

    return hook
