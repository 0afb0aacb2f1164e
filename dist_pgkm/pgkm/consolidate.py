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


def _column_key(x: torch.Tensor, j: int, radius: float) -> torch.Tensor:
    """``(n,)`` int64 key of column ``j``: equal exactly when the values are to be merged."""
    col = x[:, j]
    if radius > 0:
        return torch.floor(col / radius).to(torch.int64)
    return (col + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into 0.0


def _hash_rows(x: torch.Tensor, radius: float, tags: torch.Tensor | None) -> torch.Tensor:
    """One int64 per row (polynomial hash with wrap-around), built a column at a time so no
    ``(n, d)`` int64 key matrix is ever materialised; collisions are checked later."""
    h = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if tags is not None:
        h.add_(tags).mul_(_MIX).bitwise_xor_(h >> 29)
    for j in range(x.shape[1]):
        h.mul_(_MIX).add_(_column_key(x, j, radius))
        h.bitwise_xor_(h >> 29)
    return h


def _same_rows(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, radius: float, tags: torch.Tensor | None
) -> bool:
    """Whether rows ``a`` and ``b`` of ``x`` are to be merged, pairwise, for all pairs."""
    if tags is not None and not torch.equal(tags[a], tags[b]):
        return False
    xa, xb = x[a], x[b]
    if radius > 0:
        return torch.equal(torch.floor(xa / radius), torch.floor(xb / radius))
    return bool((xa == xb).all())  # == treats -0.0 and 0.0 as equal, like the key


def _group(x: torch.Tensor, radius: float, tags: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Group index of every row, equal rows (or cells) sharing one; and the number of groups."""
    inverse: torch.Tensor
    _, inverse = torch.unique(_hash_rows(x, radius, tags), return_inverse=True)
    m = int(inverse.max()) + 1
    if m == x.shape[0]:
        return inverse, m  # all hashes distinct, so all rows distinct: nothing to verify
    # Verify: every row must equal the first row of its group (a hash collision would not).
    first = torch.full((m,), x.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(x.shape[0]), reduce="amin")
    for s in range(0, x.shape[0], _CHUNK):
        rows = torch.arange(s, min(s + _CHUNK, x.shape[0]))
        if not _same_rows(x, rows, first[inverse[rows]], radius, tags):
            keys = torch.stack([_column_key(x, j, radius) for j in range(x.shape[1])], 1)
            if tags is not None:
                keys = torch.cat([tags[:, None], keys], dim=1)
            _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # hash collision
            return inverse, int(inverse.max()) + 1
    return inverse, m


def consolidate(
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    radius: float = 0.0,
    tags: torch.Tensor | None = None,
) -> Consolidated:
    """Merge duplicate points (or points sharing a grid cell) into weighted points.

    Args:
        x: ``(n, d)`` float32 points.
        weights: ``(n,)`` float32 weights or None for ones.
        radius: 0 merges exact duplicates only; ``> 0`` merges each cell of a grid of that
            pitch into its weighted mean (lossy: every point moves by less than ``radius``
            per coordinate).
        tags: ``(n,)`` int64 labels; points with different tags are never merged (the
            metric groups of activation-aware clustering: equal weights in blocks of other
            input features have other errors).

    Returns:
        The distinct points, their summed weights and the map back to the inputs. Distinct
        points are ordered by first occurrence, so the result does not depend on the hash.
    """
    n, d = x.shape
    inverse, m = _group(x, radius, tags)
    w = torch.ones(n, dtype=torch.float32) if weights is None else weights
    if m == n and radius == 0:  # nothing to merge
        return Consolidated(x, w, torch.arange(n))
    # Renumber groups by first occurrence: deterministic, independent of hash values.
    first = torch.full((m,), n, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty(m, dtype=torch.int64)
    rank[order] = torch.arange(m)
    inverse = rank[inverse]
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
