"""Centroid initialisations used by the baselines (PG k-means has its own, in ``pgkm``)."""

from __future__ import annotations

import torch

__all__ = ["kmeanspp_init", "random_init_with_replacement"]


def random_init_with_replacement(
    x: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """iPQ's init: ``k`` rows drawn uniformly *with* replacement (duplicates are possible).

    Returns:
        ``(k, d)`` copy of the drawn rows, in ``x``'s dtype.
    """
    idx = torch.randint(0, x.shape[0], (k,), generator=generator)
    return x[idx.to(x.device)].clone()


def _draw(prob: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn with probability proportional to ``prob`` (any length)."""
    cdf = torch.cumsum(prob.to(torch.float64), dim=0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u.to(cdf.device), right=True)), prob.numel() - 1)


def kmeanspp_init(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling, weighted by ``weights``).

    Cost is ``k`` passes of O(n d), no n x k distance matrix.

    Returns:
        ``(k, d)`` float32 initial centroids.
    """
    n, d = x.shape
    w = torch.ones(n, device=x.device) if weights is None else weights
    centroids = torch.empty(k, d, dtype=torch.float32, device=x.device)
    centroids[0] = x[_draw(w, generator)]
    best = ((x - centroids[0]) ** 2).sum(dim=1)  # (n,) squared distance to nearest chosen
    for j in range(1, k):
        prob = w * best
        # All remaining mass sits on chosen points (fewer distinct points than k): reuse one.
        i = _draw(prob if float(prob.sum()) > 0 else w, generator)
        centroids[j] = x[i]
        torch.minimum(best, ((x - centroids[j]) ** 2).sum(dim=1), out=best)
    return centroids
