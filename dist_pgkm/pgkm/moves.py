"""Merge/split moves: cautious re-partitioning while the Lloyd loop runs (ours, see docs).

Lloyd's iterations only move centroids locally; with many centroids per layer they settle in a
basin where some codewords sit almost on top of each other while other clusters stay large.
A move merges a cheap pair -- the Ward cost ``W_a W_b / (W_a + W_b) |c_a - c_b|^2`` is exactly
what the SSE grows by -- which frees a codeword; the one-pass split repair of PG k-means
(component 3) then spends it on the cluster with the largest SSE, bisected along its principal
axis. No distance pass over the points is spent: only candidate centroids are compared with
the codebook.
"""

from __future__ import annotations

import torch

from dist_pgkm.kmeans.lloyd import RepairInput

__all__ = ["merge_cheapest_pairs"]

_BLOCK_BYTES = 64 << 20


def _nearest_other(
    queries: torch.Tensor, centroids: torch.Tensor, alive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest live centroid (other than itself) of each query id, and its squared distance."""
    k = centroids.shape[0]
    rows = max(1, _BLOCK_BYTES // (4 * k))
    near = torch.empty(queries.numel(), dtype=torch.int64)
    d2 = torch.empty(queries.numel(), dtype=torch.float32)
    for a in range(0, queries.numel(), rows):
        q = queries[a : a + rows]
        block = torch.cdist(centroids[q], centroids).pow_(2)  # (rows, k)
        block[:, ~alive] = torch.inf
        block[torch.arange(q.numel()), q] = torch.inf
        d2[a : a + rows], near[a : a + rows] = block.min(dim=1)
    return near, d2


def merge_cheapest_pairs(r: RepairInput, fraction: float = 0.1) -> torch.Tensor:
    """Merge up to ``fraction * k`` disjoint cheap pairs of clusters; return the new codes.

    Candidates are the lightest live clusters (4 per wanted move); each is paired with its
    nearest live centroid and the cheapest disjoint pairs are merged (the lighter cluster's
    members join its neighbour). The emptied clusters are left for the split repair.
    """
    k = r.counts.shape[0]
    n_moves = int(fraction * k)
    alive = r.counts > 0
    if n_moves == 0 or int(alive.sum()) < 2 * n_moves + 2:
        return r.codes
    live = alive.nonzero().flatten()
    cand = live[torch.argsort(r.counts[live], stable=True)[: 4 * n_moves]]
    near, d2 = _nearest_other(cand, r.centroids, alive)
    wa, wb = r.counts[cand], r.counts[near]
    cost = wa * wb / (wa + wb) * d2
    taken = torch.zeros(k, dtype=torch.bool)
    remap = torch.arange(k)
    done = 0
    for i in torch.argsort(cost, stable=True).tolist():  # greedy: cheapest disjoint pairs
        a, b = int(cand[i]), int(near[i])
        if taken[a] or taken[b]:
            continue
        taken[a] = taken[b] = True
        remap[a] = b
        done += 1
        if done == n_moves:
            break
    return remap[r.codes]
