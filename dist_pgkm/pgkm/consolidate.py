"""Dense-weight consolidation (PG k-means component 1).

Exact duplicate sub-vectors (zero blocks, pruned weights, repeated rows, the few distinct values
a 4-bit checkpoint expands to) become one weighted point, so no later step can split identical
weights across centroids and no centroid is spent on a duplicate. With ``radius > 0`` every
point of a grid cell of that pitch is merged into the cell's weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Consolidated", "consolidate"]

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant (golden ratio), as signed int64
_CHUNK = 1 << 20


@dataclass
class Consolidated:
    """Distinct points with their total weight.

    Attributes:
        points: ``(m, d)`` float32 distinct points (or cell means), ``m <= n``.
        weights: ``(m,)`` float32 total weight of each.
        inverse: ``(n,)`` int64 index into ``points`` of every input point.
    """

    points: torch.Tensor
    weights: torch.Tensor
    inverse: torch.Tensor

    @property
    def n_distinct(self) -> int:
        """Number of distinct points ``m``."""
        return int(self.points.shape[0])


def _row_keys(x: torch.Tensor, radius: float) -> torch.Tensor:
    """``(n, d)`` int64 keys equal exactly when two rows are to be merged."""
    if radius > 0:
        return torch.floor(x / radius).to(torch.int64)
    return (x + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into 0.0


def _hash_rows(keys: torch.Tensor) -> torch.Tensor:
    """One int64 per row (polynomial hash with wrap-around); collisions are checked later."""
    h = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
    for j in range(keys.shape[1]):
        h.mul_(_MIX).add_(keys[:, j])
        h.bitwise_xor_(h >> 29)
    return h


def _group(keys: torch.Tensor) -> torch.Tensor:
    """Group index of every row such that equal key rows share a group, by hashing."""
    inverse: torch.Tensor
    _, inverse = torch.unique(_hash_rows(keys), return_inverse=True)
    # Verify: all rows of a group must have the key of the group's first row.
    first = torch.full((int(inverse.max()) + 1,), keys.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(keys.shape[0]), reduce="amin")
    for s in range(0, keys.shape[0], _CHUNK):
        e = s + _CHUNK
        if not torch.equal(keys[s:e], keys[first[inverse[s:e]]]):
            _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # hash collision
            break
    return inverse


def consolidate(
    x: torch.Tensor, weights: torch.Tensor | None = None, radius: float = 0.0
) -> Consolidated:
    """Merge duplicate points (or points sharing a grid cell) into weighted points.

    Args:
        x: ``(n, d)`` float32 points.
        weights: ``(n,)`` float32 weights or None for ones.
        radius: 0 merges exact duplicates only; ``> 0`` merges each cell of a grid of that
            pitch into its weighted mean (lossy: every point moves by less than ``radius``
            per coordinate).

    Returns:
        The distinct points, their summed weights and the map back to the inputs. Distinct
        points are ordered by first occurrence, so the result does not depend on the hash.
    """
    n, d = x.shape
    inverse = _group(_row_keys(x, radius))
    m = int(inverse.max()) + 1
    # Renumber groups by first occurrence: deterministic, independent of hash values.
    first = torch.full((m,), n, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty(m, dtype=torch.int64)
    rank[order] = torch.arange(m)
    inverse = rank[inverse]
    w = torch.ones(n, dtype=torch.float32) if weights is None else weights
    total = torch.bincount(inverse, weights=w.double(), minlength=m).float()  # (m,)
    if radius > 0:
        sums = torch.zeros(m, d, dtype=torch.float32)
        for s in range(0, n, _CHUNK):
            e = s + _CHUNK
            sums.index_add_(0, inverse[s:e], x[s:e] * w[s:e, None])
        points = sums / total.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    else:
        points = x[first[order]]
    return Consolidated(points.contiguous(), total, inverse)
