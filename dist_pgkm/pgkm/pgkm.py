"""PG k-means: consolidation, partitioning pre-assignment, one-pass empty repair (DESIGN §3)."""

from __future__ import annotations

import time
from functools import partial

import torch

from dist_pgkm.kmeans.assign import make_assigner
from dist_pgkm.kmeans.lloyd import finish, lloyd, update_centroids
from dist_pgkm.kmeans.types import ClusterInput, KMeansResult
from dist_pgkm.pgkm.consolidate import consolidate as consolidate_points
from dist_pgkm.pgkm.moves import merge_cheapest_pairs
from dist_pgkm.pgkm.partition import Cut, SplitBy, partition
from dist_pgkm.pgkm.repair import split_repair

__all__ = ["pg_kmeans"]


def pg_kmeans(
    inp: ClusterInput,
    consolidate: bool = True,
    radius: float = 0.0,
    preassign: bool = True,
    repair: bool = True,
    split_by: SplitBy = "sse",
    cut: Cut = "sse",
    init_sample_per_centroid: int = 64,
    moves: float = 0.1,
) -> KMeansResult:
    """Partitioning-Guided k-means; each component can be switched off for ablations.

    Args:
        inp: The problem.
        consolidate: Merge duplicate points into weighted points first (component 1).
        radius: With ``consolidate``, also merge points sharing a grid cell of this pitch.
        preassign: Initialise from a principal-axis partition (component 2); otherwise from
            ``k`` distinct random points.
        repair: Repair empty clusters after each assignment by bisecting donors (component 3);
            otherwise empty clusters keep their centroid.
        split_by: Which partition the pre-assignment bisects first: the heaviest (``weight``,
            as DESIGN §3 reads) or the one with the largest SSE (``sse``).
        cut: Where a partition (or a repair donor) is cut along its principal axis: at the
            weighted ``median`` (DESIGN §3) or where the two halves' SSE is smallest (``sse``).
        init_sample_per_centroid: Learn the pre-assignment's cuts on a weighted sample of this
            many points per centroid, then route every point (0: learn on all points).
        moves: Fraction of the codebook re-partitioned by merge/split moves in each iteration
            but the last three (0 disables them; see :mod:`dist_pgkm.pgkm.moves`).

    Returns:
        The result. When there are no more distinct points than ``k``, every distinct point is
        its own centroid (SSE 0 for ``radius == 0``) and the surplus codewords stay unused.
    """
    gen = inp.generator()
    x, w, k = inp.x32, inp.weights, inp.k
    points, pw, inverse = x, w, None
    if consolidate:
        cons = consolidate_points(x, w, radius)
        if cons.n_distinct < x.shape[0] or radius > 0 or w is not None:
            points, pw, inverse = cons.points, cons.weights, cons.inverse
    m, d = points.shape
    assigner = make_assigner(points, inp.backend)
    stats = inp.new_stats("pgkm", assigner.name)
    stats.n_distinct = m
    if consolidate and m <= k:
        centroids = torch.cat([points, points[:1].expand(k - m, d)])
        codes = torch.arange(m) if inverse is None else inverse
        stats.init_seconds = time.perf_counter() - inp.t0
        return finish(x, w, centroids, codes, stats, inp.t0)
    weights = torch.ones(m) if pw is None else pw
    if preassign:
        sample = init_sample_per_centroid * k
        labels, _ = partition(points, weights, k, split_by, cut, sample, gen)
        init = update_centroids(points, pw, labels, torch.zeros(k, d))
    else:
        init = points[torch.randperm(m, generator=gen)[:k]].clone()
    stats.init_seconds = time.perf_counter() - inp.t0
    fix = partial(split_repair, cut=cut) if repair else None
    move = None
    if repair and moves > 0:
        move = partial(merge_cheapest_pairs, fraction=moves, backend=inp.backend)
    centroids, codes = lloyd(
        points, pw, init, assigner, inp.n_iter, stats, gen, fix, inp.t0, moves=move
    )
    if inverse is not None:
        codes = codes[inverse]
    return finish(x, w, centroids, codes, stats, inp.t0)
