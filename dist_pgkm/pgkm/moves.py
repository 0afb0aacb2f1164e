"""Merge/split moves: cautious re-partitioning while the Lloyd loop runs (ours, see docs).

Lloyd's iterations only move centroids locally; with many centroids per layer they settle in a
basin where some codewords sit almost on top of each other while other clusters stay large.
A move merges a cheap pair -- the Ward cost ``W_a W_b / (W_a + W_b) |c_a - c_b|^2`` is exactly
what the SSE grows by -- which frees a codeword; the one-pass split repair of PG k-means
(component 3) then spends it on the cluster with the largest SSE, bisected along its principal
axis. No distance pass over the points is spent: only the candidate centroids are searched
against the codebook.
"""

from __future__ import annotations

import torch

from dist_pgkm.kmeans.assign import make_assigner
from dist_pgkm.kmeans.lloyd import RepairInput

__all__ = ["merge_cheapest_pairs"]


def merge_cheapest_pairs(
    r: RepairInput, fraction: float = 0.1, backend: str = "auto"
) -> torch.Tensor:
    """Merge ``fraction * k`` light clusters into their nearest neighbours; return new codes.

    Candidates are the ``2 * fraction * k`` lightest live clusters; each is paired with the
    nearest live centroid that is not itself a candidate (one nearest-centroid search through
    ``backend``, so no merge chain can form), and the pairs of lowest Ward cost are merged.
    The emptied clusters are left for the split repair.
    """
    k = r.counts.shape[0]
    n_moves = int(fraction * k)
    live = (r.counts > 0).nonzero().flatten()
    if n_moves == 0 or live.numel() < 3 * n_moves:
        return r.codes
    by_weight = live[torch.argsort(r.counts[live], stable=True)]
    cand, targets = by_weight[: 2 * n_moves], by_weight[2 * n_moves :]
    queries = r.centroids[cand].to(torch.float32).contiguous()
    nearest, d2 = make_assigner(queries, backend).assign(r.centroids[targets])
    near = targets[nearest]
    wa, wb = r.counts[cand], r.counts[near]
    cost = wa * wb / (wa + wb) * d2
    pick = torch.argsort(cost, stable=True)[:n_moves]
    remap = torch.arange(k)
    remap[cand[pick]] = near[pick]
    return remap[r.codes]
