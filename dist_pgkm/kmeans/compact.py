"""Compaction: drop unused codewords, merge duplicate ones, renumber the codes."""

from __future__ import annotations

import dataclasses

import torch

from dist_pgkm.kmeans.metrics import codeword_groups, sse_of
from dist_pgkm.kmeans.result import KMeansResult

__all__ = ["compact"]


def compact(
    result: KMeansResult,
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    tol: float = 0.0,
) -> KMeansResult:
    """Merge unused and duplicate codewords so the codebook has exactly ``k_used`` rows.

    Codewords are equal when they match exactly (``tol == 0``) or fall in the same cell of a
    grid of pitch ``tol``. With ``tol > 0`` a merged codeword is the member-weighted mean of the
    codewords it replaces (the decode moves by about ``tol`` per coordinate at most); with
    ``tol == 0`` the decode is unchanged bit for bit.

    Args:
        result: Any method's result.
        x: The clustered points (needed to recompute the SSE after an inexact merge).
        weights: Their weights, or None.
        tol: Grid pitch for "equal"; 0 means bitwise equal values.

    Returns:
        A new result with ``centroids`` of shape ``(k_used, d)``, codes renumbered in
        ``[0, k_used)`` (ordered by codeword value), the SSE recomputed and ``k_used`` set.
    """
    centroids, codes = result.centroids, result.codes
    used, group = codeword_groups(centroids, codes, tol)
    k_used = int(group.max()) + 1
    c = centroids[used].to(torch.float32)
    if tol > 0:
        members = torch.bincount(codes, minlength=centroids.shape[0])[used].to(torch.float32)
        sums = torch.zeros(k_used, c.shape[1]).index_add_(0, group, c * members[:, None])
        mass = torch.zeros(k_used).index_add_(0, group, members)
        new_centroids = sums / mass[:, None]
    else:  # members of a group are bitwise equal: any one of them is the codeword
        new_centroids = torch.empty(k_used, c.shape[1])
        new_centroids[group] = c
    remap = torch.full((centroids.shape[0],), -1, dtype=torch.int64)
    remap[used] = group
    new_codes = remap[codes]
    # Exact merges leave every decoded point unchanged, so only an inexact one changes the SSE.
    sse = sse_of(x, weights, new_centroids, new_codes) if tol > 0 else result.stats.sse
    stats = dataclasses.replace(result.stats, k_used=k_used, empty_final=0, sse=sse)
    return KMeansResult(new_centroids, new_codes, stats)
