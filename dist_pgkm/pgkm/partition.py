"""Principal-axis bisection, batched over many partitions at once.

Used twice by PG k-means: to build the initial partition (component 2) and to repair empty
clusters (component 3). A partition is split at the weighted median of its points' projections
on its principal axis (power iteration on the weighted covariance), so both halves carry about
half of the weight and both are non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dist_pgkm.kmeans.metrics import segment_sum

__all__ = [
    "Cut",
    "Split",
    "SplitBy",
    "apply_split",
    "bisect",
    "bisect_sampled",
    "partition",
    "partition_scores",
    "principal_axes",
    "route",
]

SplitBy = Literal["weight", "sse"]
Cut = Literal["median", "sse"]
_TINY = torch.finfo(torch.float32).tiny


def principal_axes(cov: torch.Tensor, n_squarings: int = 8) -> torch.Tensor:
    """Unit principal axis of each ``(d, d)`` matrix of ``cov`` (``(c, d, d)`` -> ``(c, d)``).

    Power iteration accelerated by repeated squaring: ``n_squarings`` batched products give
    ``cov^(2^n)``, i.e. 256 power steps for the default 8, enough for small eigengaps. It is
    applied to the column of the largest diagonal entry, which lies in the range of the matrix,
    so no random start is needed. A zero matrix gets the first unit axis.
    """
    c, _d, _ = cov.shape
    m = cov.double()
    for _ in range(n_squarings):
        m = m / m.diagonal(dim1=1, dim2=2).sum(1).clamp(min=1e-300)[:, None, None]  # trace 1
        m = torch.bmm(m, m)
    v = m[torch.arange(c), :, m.diagonal(dim1=1, dim2=2).argmax(dim=1)]  # (c, d)
    norm = v.norm(dim=1, keepdim=True)
    v = torch.where(norm > 0, v / norm.clamp(min=1e-300), torch.zeros_like(v))
    v[norm.squeeze(1) == 0, 0] = 1.0
    return v.float()


@dataclass
class Split:
    """How a batch of partitions was bisected, so more points can follow the same cuts.

    Attributes:
        parts: ``(c,)`` ids of the partitions that were split.
        new_ids: ``(c,)`` id given to each upper half.
        mean: ``(c, d)`` weighted mean each projection is centred on.
        axis: ``(c, d)`` unit principal axis.
        threshold: ``(c,)`` float64; a point whose projection exceeds it goes to the upper half.
    """

    parts: torch.Tensor
    new_ids: torch.Tensor
    mean: torch.Tensor
    axis: torch.Tensor
    threshold: torch.Tensor


def _slots(labels: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label is in ``parts`` and the position of that label in ``parts``."""
    slot_of = torch.full((int(max(labels.max(), parts.max())) + 1,), -1, dtype=torch.int64)
    slot_of[parts] = torch.arange(parts.numel())
    member = (slot_of[labels] >= 0).nonzero().flatten()  # (q,)
    return member, slot_of[labels[member]]


def _project(x: torch.Tensor, mean: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """``(q,)`` float64 projection ``x.axis - mean.axis`` of rows on their own axis."""
    return (x * axis).sum(dim=1).double() - (mean * axis).sum(dim=1).double()


def route(points: torch.Tensor, splits: list[Split], chunk: int = 1 << 18) -> torch.Tensor:
    """Send every point from the root (label 0) down a sequence of splits.

    Per chunk of rows and per level, each row is projected on the axis of the split its label
    takes part in; labels not split at that level point to a dummy event (zero axis, infinite
    threshold), so a level is a handful of element-wise ops. (Projecting a chunk on all axes
    at once is a (rows, d) x (d, E) product that MKL runs memory-bound: 6x slower for d = 8.)
    Memory is O(chunk * d).
    """
    d = points.shape[1]
    axes = torch.cat([sp.axis for sp in splits] + [torch.zeros(1, d)])  # (E + 1, d)
    # x.axis - mean.axis > t  <=>  x.axis > t + mean.axis
    bound = torch.cat(
        [sp.threshold + (sp.mean * sp.axis).sum(1).double() for sp in splits]
        + [torch.tensor([torch.inf], dtype=torch.float64)]
    ).float()  # (E + 1,)
    new_ids = torch.cat([sp.new_ids for sp in splits] + [torch.zeros(1, dtype=torch.int64)])
    dummy = axes.shape[0] - 1
    events, first = [], 0
    for sp in splits:  # per level: the event of each label (dummy where it is not split)
        ev = torch.full((dummy + 1,), dummy, dtype=torch.int64)
        ev[sp.parts] = torch.arange(first, first + sp.parts.numel())
        events.append(ev)
        first += sp.parts.numel()
    labels = torch.zeros(points.shape[0], dtype=torch.int64)
    for a in range(0, points.shape[0], chunk):
        x = points[a : a + chunk]
        lab = labels[a : a + chunk]
        for ev in events:
            e = ev[lab]
            up = (x * axes[e]).sum(dim=1) > bound[e]
            lab = torch.where(up, new_ids[e], lab)
        labels[a : a + chunk] = lab
    return labels


def bisect(
    points: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    parts: torch.Tensor,
    new_ids: torch.Tensor,
    cut: Cut = "median",
) -> tuple[torch.Tensor, Split]:
    """Split every partition in ``parts`` in two along its weighted principal axis.

    Args:
        points: ``(m, d)`` float32 points.
        weights: ``(m,)`` float32 weights.
        labels: ``(m,)`` int64 partition of every point.
        parts: ``(c,)`` ids of the partitions to split; each must have at least 2 points.
        new_ids: ``(c,)`` label given to the upper half of the matching partition.
        cut: Where along the axis: the weighted ``median`` (halves of equal weight), or the
            position that minimises the summed SSE of the two halves (``sse``, computed exactly
            in all ``d`` dimensions from prefix sums; it cuts through gaps between groups).

    Returns:
        New labels (points of the lower halves keep theirs) and the split, which
        :func:`route` can apply to other points.
    """
    c, d = parts.numel(), points.shape[1]
    member, s = _slots(labels, parts)  # (q,) points being split, slot of each
    px, pw = points[member], weights[member]
    wsum = torch.bincount(s, weights=pw.double(), minlength=c)  # (c,)
    mean = segment_sum(s, px, c, pw) / wsum.clamp(min=_TINY).float()[:, None]  # (c, d)
    xc = px - mean[s]  # (q, d) centred
    # Weighted covariance: every upper-triangle entry's products (w x_i) x_j, summed by slot
    # in one scatter_add_ (the same float32 sums, in the same order, as a bincount per entry).
    iu = torch.triu_indices(d, d)  # (2, T)
    prods = ((xc[:, iu[0]] * pw[:, None]) * xc[:, iu[1]]).t().contiguous()  # (T, q)
    upper = torch.zeros(iu.shape[1], c).scatter_add_(1, s.expand(iu.shape[1], -1), prods)
    cov = torch.empty(c, d, d)
    cov[:, iu[0], iu[1]] = upper.t()
    cov[:, iu[1], iu[0]] = upper.t()
    axis = principal_axes(cov)  # (c, d)
    proj = _project(px, mean[s], axis[s])  # (q,)
    # One sort by (slot, projection): the projection is squeezed into [0, 0.5] within its slot.
    lo = torch.full((c,), torch.inf, dtype=torch.float64).scatter_reduce(0, s, proj, "amin")
    hi = torch.full((c,), -torch.inf, dtype=torch.float64).scatter_reduce(0, s, proj, "amax")
    span = (hi - lo).clamp(min=1e-300)
    order = torch.argsort(s + 0.5 * (proj - lo[s]) / span[s], stable=True)
    ss, sw = s[order], pw[order].double()
    count = torch.bincount(s, minlength=c)
    start = torch.cumsum(count, 0) - count
    cum = torch.cumsum(sw, 0)
    before = cum - sw - (cum - sw)[start][ss]  # weight before each point within its slot
    pos = torch.arange(ss.numel()) - start[ss]
    if cut == "median":
        upper = ((before + sw / 2 >= wsum[ss] / 2) & (pos > 0)) | (pos == count[ss] - 1)
    else:
        upper = _sse_cut(px[order], sw, ss, pos, count, start, c)
    out = labels.clone()
    out[member[order[upper]]] = new_ids[ss[upper]]
    # Threshold: halfway between the last lower and the first upper projection of each slot.
    sp = proj[order]
    top_lo = torch.full((c,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, ss[~upper], sp[~upper], "amax"
    )
    low_up = torch.full((c,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, ss[upper], sp[upper], "amin"
    )
    return out, Split(parts, new_ids, mean, axis, (top_lo + low_up) / 2)


def apply_split(
    points: torch.Tensor, labels: torch.Tensor, split: Split, chunk: int = 1 << 18
) -> torch.Tensor:
    """Apply one batch of cuts to every point whose label was split (same formula as bisect).

    Works in chunks of ``chunk`` members; returns new labels.
    """
    member, s = _slots(labels, split.parts)
    out = labels.clone()
    for a in range(0, member.numel(), chunk):
        m, sl = member[a : a + chunk], s[a : a + chunk]
        up = _project(points[m], split.mean[sl], split.axis[sl]) > split.threshold[sl]
        out[m[up]] = split.new_ids[sl[up]]
    return out


def bisect_sampled(
    points: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    parts: torch.Tensor,
    new_ids: torch.Tensor,
    cut: Cut = "sse",
    per_part: int = 128,
) -> torch.Tensor:
    """:func:`bisect` whose cuts are learnt on at most ``per_part`` points of each partition.

    Each partition's sample is every ``ceil(size / per_part)``-th of its points in index order
    (deterministic, at least two points); the cuts are then applied to all points. Partitions
    no larger than ``per_part`` are cut exactly as :func:`bisect` would.

    Returns:
        The new labels.
    """
    member, s = _slots(labels, parts)
    count = torch.bincount(s, minlength=parts.numel())
    if int(count.max()) <= per_part:
        return bisect(points, weights, labels, parts, new_ids, cut)[0]
    order = torch.argsort(s, stable=True)  # members grouped by partition, in index order
    start = torch.cumsum(count, 0) - count
    rank = torch.arange(order.numel()) - start[s[order]]
    step = (count + per_part - 1) // per_part  # (c,) >= 1
    rows = member[order[rank % step[s[order]] == 0]]
    _, split = bisect(points[rows], weights[rows], labels[rows], parts, new_ids, cut)
    return apply_split(points, labels, split)


def _exclusive(cum: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix from an inclusive one (row i holds the sum of rows < i)."""
    return torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])


def _sse_cut(
    x: torch.Tensor,
    w: torch.Tensor,
    ss: torch.Tensor,
    pos: torch.Tensor,
    count: torch.Tensor,
    start: torch.Tensor,
    c: int,
) -> torch.Tensor:
    """Upper-half mask of the SSE-minimising cut of each slot (rows sorted by slot, projection).

    Cutting before position ``i`` of a slot costs ``SSE(lower) + SSE(upper)``, each from prefix
    sums of ``w``, ``w x`` and ``w |x|^2`` (``SSE = S2 - |S1|^2 / W``), in float64.
    """
    xd = x.double()
    sums = []
    for cum in (
        torch.cumsum(w, 0),
        torch.cumsum(xd * w[:, None], 0),
        torch.cumsum((xd * xd).sum(1) * w, 0),
    ):
        excl = _exclusive(cum)
        lower = excl - excl[start][ss]  # rows of the slot before this one
        total = (cum[start + count - 1] - excl[start])[ss]  # the whole slot
        sums.append((lower, total - lower))
    (lw, uw), (l1, u1), (l2, u2) = sums
    cost = (
        l2 - (l1 * l1).sum(1) / lw.clamp(min=1e-300) + u2 - (u1 * u1).sum(1) / uw.clamp(min=1e-300)
    )
    cost = torch.where(pos > 0, cost, torch.full_like(cost, torch.inf))  # both halves non-empty
    best = torch.full((c,), torch.inf, dtype=torch.float64).scatter_reduce(0, ss, cost, "amin")
    never = torch.full_like(pos, 1 << 62)
    first_best = torch.where(cost == best[ss], pos, never)
    cut_at = torch.full((c,), 1 << 62, dtype=torch.int64).scatter_reduce(0, ss, first_best, "amin")
    return pos >= cut_at[ss]


def _score_terms(
    points: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per point, in float64: ``w``, ``w x`` and ``w |x|^2`` (what partition scores sum)."""
    w = weights.double()
    x = points.double()
    return w, x * w[:, None], (x * x).sum(1) * w


def partition_scores(
    points: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    p: int,
    split_by: SplitBy,
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(p,)`` float64 priority of each partition: its weight, or its weighted SSE.

    ``terms`` are :func:`_score_terms` of the points, computed once by a caller that scores
    the same points many times.
    """
    w, xw, x2w = _score_terms(points, weights) if terms is None else terms
    total = torch.zeros(p, dtype=torch.float64).index_add_(0, labels, w)
    if split_by == "weight":
        return total
    s1 = torch.zeros(p, points.shape[1], dtype=torch.float64).index_add_(0, labels, xw)
    s2 = torch.zeros(p, dtype=torch.float64).index_add_(0, labels, x2w)
    return (s2 - (s1 * s1).sum(1) / total.clamp(min=_TINY)).clamp(min=0)


def _weighted_sample(weights: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices, heavier points likelier (Efraimidis-Spirakis keys), sorted."""
    u = torch.rand(weights.numel(), generator=generator, dtype=torch.float64).clamp(min=1e-300)
    keys = torch.log(u) / weights.double()
    return torch.topk(keys, size).indices.sort().values


def partition(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    split_by: SplitBy = "sse",
    cut: Cut = "sse",
    sample: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Partitioning-based pre-assignment (PG k-means component 2).

    Repeatedly bisect the partition with the highest priority (weight, or SSE) until there are
    ``k``. Batched: each round splits, in priority order, every splittable partition whose
    priority is at least half of the highest, up to the number still missing. Priorities only
    shrink from a partition to its halves, so the leaves are those a one-at-a-time loop gets.

    With ``sample`` smaller than the number of points, the cuts are learnt on a weighted
    sample of that size and every point then follows them (O(n d) per level): each part keeps
    at least its sample points, so none starts empty.

    Args:
        points: ``(m, d)`` float32 distinct points.
        weights: ``(m,)`` float32 weights.
        k: Number of partitions wanted.
        split_by: Priority of a partition.
        cut: Where a partition is cut (see :func:`bisect`).
        sample: Learn the cuts on this many points (0: on all of them).
        generator: Random state for the sample.

    Returns:
        ``(labels, p)``: partition id of every point in ``[0, p)`` and ``p = min(k, m)``.
    """
    use_sample = 0 < sample < points.shape[0]
    if use_sample:
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        idx = _weighted_sample(weights, max(sample, k), gen)
        tree_points, tree_weights = points[idx], weights[idx]
    else:
        tree_points, tree_weights = points, weights
    labels = torch.zeros(tree_points.shape[0], dtype=torch.int64)
    splits: list[Split] = []
    terms = _score_terms(tree_points, tree_weights)  # once: every round sums the same terms
    p = 1
    while p < k:
        splittable = torch.bincount(labels, minlength=p) >= 2
        if not bool(splittable.any()):
            break
        score = partition_scores(tree_points, tree_weights, labels, p, split_by, terms)
        score = torch.where(splittable, score, torch.full_like(score, -1.0))
        top = float(score.max())
        chosen = ((score >= top / 2) & splittable).nonzero().flatten()
        chosen = chosen[torch.argsort(score[chosen], descending=True, stable=True)][: k - p]
        new_ids = torch.arange(p, p + chosen.numel())
        labels, split = bisect(tree_points, tree_weights, labels, chosen, new_ids, cut)
        splits.append(split)
        p += chosen.numel()
    return (route(points, splits) if use_sample else labels), p
