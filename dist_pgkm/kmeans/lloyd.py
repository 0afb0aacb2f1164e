"""The Lloyd loop shared by the methods, and the pieces it is built from.

One iteration = an assignment (E) by the :class:`~dist_pgkm.kmeans.assign.Assigner`, an optional
repair of empty clusters that may move points between clusters (no extra distance pass), and a
centroid update (M) that is one ``index_add_``. The loop stops early at a fixed point (codes equal
to the previous iteration's), which does not change the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_pgkm.kmeans.assign import Assigner
from dist_pgkm.kmeans.metrics import (
    cluster_weights,
    columns,
    count_used_codewords,
    segment_sum,
    sse_of,
)
from dist_pgkm.kmeans.result import KMeansResult, KMeansStats

__all__ = [
    "MoveFn",
    "RepairFn",
    "RepairInput",
    "UpdateFn",
    "finish",
    "lloyd",
    "update_centroids",
]


@dataclass
class RepairInput:
    """What an empty-cluster repair sees after an assignment.

    Attributes:
        x: ``(n, d)`` float32 points.
        weights: ``(n,)`` float32 weights or None (all ones).
        codes: ``(n,)`` int64 current assignment (may be modified only by returning a new one).
        dist: ``(n,)`` squared distance of each point to its centroid.
        counts: ``(k,)`` float32 weight of each cluster.
        empty: ``(e,)`` int64 ids of the empty clusters.
        generator: The run's random generator.
        centroids: ``(k, d)`` the centroids the assignment was made against.
    """

    x: torch.Tensor
    weights: torch.Tensor | None
    codes: torch.Tensor
    dist: torch.Tensor
    counts: torch.Tensor
    empty: torch.Tensor
    generator: torch.Generator
    centroids: torch.Tensor


RepairFn = Callable[[RepairInput], torch.Tensor]
MoveFn = Callable[[RepairInput], torch.Tensor]
UpdateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``update(codes, centroids) -> new centroids``: an M-step other than the weighted mean."""


def update_centroids(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """M-step: every non-empty centroid becomes the weighted mean of its members.

    Args:
        x: ``(n, d)`` points.
        weights: ``(n,)`` weights (None for ones), for the cluster masses.
        codes: ``(n,)`` cluster of every point.
        centroids: ``(k, d)`` current centroids; empty clusters keep theirs.
        cols: ``columns(x, weights)``, cached by a caller that updates many times.

    Returns:
        A new ``(k, d)`` float32 tensor.
    """
    k = centroids.shape[0]
    sums = segment_sum(codes, x, k, weights, cols)
    counts = cluster_weights(codes, weights, k)
    out = centroids.to(torch.float32).clone()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def lloyd(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    centroids: torch.Tensor,
    assigner: Assigner,
    n_iter: int,
    stats: KMeansStats,
    generator: torch.Generator,
    repair: RepairFn | None = None,
    t0: float | None = None,
    moves: MoveFn | None = None,
    settle: int = 3,
    update: UpdateFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run up to ``n_iter`` Lloyd iterations from ``centroids``.

    Args:
        x: ``(n, d)`` float32 points (the ones ``assigner`` is bound to).
        weights: ``(n,)`` float32 weights, or None for unit weights.
        centroids: ``(k, d)`` initial codebook.
        assigner: Nearest-centroid search bound to ``x``.
        n_iter: Maximum number of iterations.
        stats: Updated in place (passes, empties, objective, timings).
        generator: Random state handed to ``repair``.
        repair: Called when clusters are empty (after the assignment, or after ``moves``);
            returns new codes.
        t0: ``time.perf_counter()`` at the start of the whole call, for ``stats.elapsed``.
        moves: Called after each assignment except in the last ``settle`` iterations; may
            empty clusters on purpose (``repair`` then refills them in the same pass) and
            returns new codes. The clusters it empties are counted in ``stats.moves``.
        settle: Iterations at the end without ``moves``, so the loop ends on plain Lloyd.
        update: The M-step (default: the weighted mean of the members, as
            :func:`update_centroids`); the metric-aware loop passes its own.

    Returns:
        ``(centroids, codes)``: the last update's centroids and the codes it was computed from.
    """
    t0 = time.perf_counter() if t0 is None else t0
    k = centroids.shape[0]
    if update is None:
        cols = columns(x, weights)  # the M-step's layout, once per run when it is small

        def update(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
            return update_centroids(x, weights, codes, centroids, cols)

    codes = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    previous: torch.Tensor | None = None
    for it in range(n_iter):
        codes, dist = assigner.assign(centroids)
        stats.distance_passes += 1
        counts = cluster_weights(codes, weights, k)
        objective = dist.sum(dtype=torch.float64) if weights is None else (dist * weights).sum()
        stats.objective.append(float(objective))
        empty = (counts == 0).nonzero().flatten()
        stats.empty_per_iter.append(int(empty.numel()))
        if empty.numel() and repair is not None:
            stats.repair_passes += 1
        if moves is not None and it < n_iter - settle:
            moved = moves(RepairInput(x, weights, codes, dist, counts, empty, generator, centroids))
            changed = (moved != codes).nonzero().flatten()
            if changed.numel():
                codes = moved  # dist is this iteration's own tensor: update it in place
                dist[changed] = assigner.distances(changed, centroids, codes)
                counts = cluster_weights(codes, weights, k)
                freed = (counts == 0).nonzero().flatten()
                stats.moves += int(freed.numel() - empty.numel())
                empty = freed
        if empty.numel() and repair is not None:
            codes = repair(
                RepairInput(x, weights, codes, dist, counts, empty, generator, centroids)
            )
        stats.iterations += 1
        converged = previous is not None and torch.equal(codes, previous)
        if not converged:  # at a fixed point the update would give the same centroids
            centroids = update(codes, centroids)
        stats.elapsed.append(time.perf_counter() - t0)
        if converged:
            break
        previous = codes
    return centroids, codes


def finish(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    stats: KMeansStats,
    t0: float,
) -> KMeansResult:
    """Fill the end-of-run stats (SSE, empties, codewords used, time) and build the result."""
    centroids = centroids.to(torch.float32)
    stats.sse = sse_of(x, weights, centroids, codes)
    stats.empty_final = int((torch.bincount(codes, minlength=centroids.shape[0]) == 0).sum())
    stats.k_used = count_used_codewords(centroids, codes)
    stats.empty_after_init = stats.empty_per_iter[0] if stats.empty_per_iter else stats.empty_final
    stats.seconds = time.perf_counter() - t0
    return KMeansResult(centroids, codes, stats)
