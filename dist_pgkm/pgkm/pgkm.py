"""PG k-means: consolidation, partitioning pre-assignment, one-pass empty repair (DESIGN §3)."""

from __future__ import annotations

import time
from functools import partial

import torch

from dist_pgkm.kmeans.assign import Assigner, make_assigner
from dist_pgkm.kmeans.block_metric import (
    BlockMetric,
    MetricAssigner,
    apply_metric,
    metric_distances,
    metric_update,
)
from dist_pgkm.kmeans.lloyd import UpdateFn, finish, lloyd, update_centroids
from dist_pgkm.kmeans.metrics import columns
from dist_pgkm.kmeans.result import ClusterInput, KMeansResult
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

    With a per-group metric (``inp.metric``, activation-aware clustering) the same components
    run under it: duplicates merge only within a group, the pre-assignment and the repair
    bisect the whitened points ``x_i L_g`` (where the metric is Euclidean), the search and the
    M-step are those of :mod:`dist_pgkm.kmeans.block_metric`. The merge/split moves rank pairs by
    their Euclidean Ward cost, an approximation under the metric (the repair that follows
    bisects by the metric's SSE).

    Returns:
        The result. When there are no more distinct points than ``k``, every distinct point is
        its own centroid (SSE 0 for ``radius == 0``) and the surplus codewords stay unused.
    """
    gen = inp.generator()
    x, w, k = inp.x32, inp.weights, inp.k
    metric = inp.metric
    points, pw, inverse = x, w, None
    if consolidate:
        tags = None if metric is None else metric.groups
        cons = consolidate_points(x, w, radius, tags)
        if cons.n_distinct < x.shape[0] or radius > 0 or w is not None:
            points, pw, inverse = cons.points, cons.weights, cons.inverse
    point_metric = None
    if metric is not None:
        points, pw, inverse, point_metric = _sort_by_group(points, pw, inverse, metric)
    m, d = points.shape
    assigner: Assigner
    if point_metric is None:
        assigner = make_assigner(points, inp.backend)
    else:
        mx = apply_metric(points, point_metric.groups, point_metric.matrices)  # once per run
        assigner = MetricAssigner(points, point_metric, backend=inp.backend, mx=mx)
    stats = inp.new_stats("pgkm", assigner.name)
    stats.n_distinct = m
    if consolidate and m <= k:
        centroids = torch.cat([points, points[:1].expand(k - m, d)])
        codes = torch.arange(m) if inverse is None else inverse
        stats.init_seconds = time.perf_counter() - inp.t0
        return finish(x, w, centroids, codes, stats, inp.t0)
    weights = torch.ones(m) if pw is None else pw
    # Where the metric is Euclidean: the points themselves, or whitened per group.
    space = points if not isinstance(assigner, MetricAssigner) else assigner.whitened
    update: UpdateFn | None = None
    if point_metric is not None:
        mx_cols = columns(mx, pw)  # the M-step's layout of the rows w_i M x_i, once per run

        def update(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
            assert point_metric is not None
            return metric_update(points, pw, codes, centroids, point_metric, mx, mx_cols)

    if preassign:
        sample = init_sample_per_centroid * k
        labels, _ = partition(space, weights, k, split_by, cut, sample, gen)
        start = torch.zeros(k, d)
        init = (
            update_centroids(points, pw, labels, start) if update is None else update(labels, start)
        )
    else:
        init = points[torch.randperm(m, generator=gen)[:k]].clone()
    stats.init_seconds = time.perf_counter() - inp.t0
    fix = partial(split_repair, cut=cut) if repair else None
    move = None
    if repair and moves > 0:
        move = partial(merge_cheapest_pairs, fraction=moves, backend=inp.backend)
    centroids, codes = lloyd(
        space, pw, init, assigner, inp.n_iter, stats, gen, fix, inp.t0, moves=move, update=update
    )
    if inverse is not None:
        codes = codes[inverse]
    result = finish(x, w, centroids, codes, stats, inp.t0)
    if metric is not None:
        dist = metric_distances(x, metric.groups, metric.matrices, centroids[codes])
        result.stats.metric_sse = float(
            dist.sum(dtype=torch.float64) if w is None else (dist.double() * w.double()).sum()
        )
    return result


def _sort_by_group(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    inverse: torch.Tensor | None,
    metric: BlockMetric,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, BlockMetric]:
    """The (consolidated) points sorted by metric group, for one search per group.

    Returns the sorted points and weights, the map from every input point to its sorted
    point, and the sorted points' metric.
    """
    m = points.shape[0]
    if inverse is None:
        groups = metric.groups
        inverse = torch.arange(m)
    else:  # merged points share their group (consolidation never merges across groups)
        groups = torch.zeros(m, dtype=torch.int64).scatter_(0, inverse, metric.groups)
    order = torch.argsort(groups, stable=True)
    rank = torch.empty(m, dtype=torch.int64)
    rank[order] = torch.arange(m)
    sorted_weights = None if weights is None else weights[order]
    return points[order], sorted_weights, rank[inverse], BlockMetric(metric.matrices, groups[order])
