"""Partitioning-guided empty-cluster resolution (PG k-means component 3)."""

from __future__ import annotations

import torch

from dist_pgkm.kmeans.lloyd import RepairInput
from dist_pgkm.pgkm.partition import Cut, bisect_sampled

__all__ = ["split_repair"]


def split_repair(r: RepairInput, cut: Cut = "sse") -> torch.Tensor:
    """Repair every empty cluster in one pass, without a distance pass.

    Each empty cluster takes one half of a donor bisected along its principal axis (at the
    ``cut`` rule of :func:`~dist_pgkm.pgkm.partition.bisect`; the cut is learnt on at most 128
    of the donor's points and applied to all of them).
    Donors are the clusters with the largest SSE that have at least two (distinct) members,
    each used at most once per round; if there are fewer donors than empty clusters, the halves
    just made are donors in a further round of the same pass, until no empty cluster is left
    or nothing can be split (fewer distinct points than clusters).

    Returns:
        The new codes (the input codes are not modified).
    """
    k = r.counts.shape[0]
    w = torch.ones_like(r.dist) if r.weights is None else r.weights
    codes, empty = r.codes, r.empty
    sse = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, (r.dist * w).double())
    while empty.numel():
        members = torch.bincount(codes, minlength=k)
        donors = (members >= 2).nonzero().flatten()
        if donors.numel() == 0:
            break
        donors = donors[torch.argsort(sse[donors], descending=True, stable=True)][: empty.numel()]
        targets = empty[: donors.numel()]
        codes = bisect_sampled(r.x, w, codes, donors, targets, cut)
        # Each half takes about half of the donor's SSE; good enough to rank a further round.
        sse[targets] = sse[donors] / 2
        sse[donors] /= 2
        empty = empty[donors.numel() :]
    return codes
