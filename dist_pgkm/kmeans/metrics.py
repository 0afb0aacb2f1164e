"""Quantities computed from a clustering: cluster weights, SSE, codewords really used."""

from __future__ import annotations

import torch

__all__ = [
    "cluster_weights",
    "codeword_groups",
    "columns",
    "count_used_codewords",
    "segment_sum",
    "sse_of",
]

_CHUNK = 1 << 20  # rows per chunk for n x d temporaries


def cluster_weights(codes: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    """``(k,)`` float32 total weight (or member count) of every cluster."""
    return torch.bincount(codes, weights=weights, minlength=k).to(torch.float32)


_CACHED_COLUMNS_MAX = 16 << 20  # values (64 MB of float32): cache the column layout below this


def columns(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """``(d, n)`` float32 copy of ``x`` (times ``weights``) for repeated :func:`segment_sum`
    calls, or None when it would exceed 64 MB (the sums then transpose chunk by chunk)."""
    if x.numel() > _CACHED_COLUMNS_MAX:
        return None
    xw = x.to(torch.float32) if weights is None else x * weights[:, None]
    return xw.t().contiguous()


def segment_sum(
    ids: torch.Tensor,
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(k, d)`` float32 sums of the rows of ``x`` (times ``weights``) grouped by ``ids``.

    The rows are summed in a ``(d, rows)`` layout with ``scatter_add_`` along the last dim, the
    fastest grouped sum on the CPU for k-means shapes (300k x 8 into 256 groups: 0.8 ms, against
    4.3 ms for one weighted ``bincount`` per column and 13.9 ms for ``index_add_`` on rows). The
    layout is ``cols`` when given (see :func:`columns`), else built 1M rows at a time (2.7 ms
    per 300k rows; at most 32 MB).
    """
    d = x.shape[1]
    sums = torch.zeros(d, k, dtype=torch.float32, device=x.device)
    if cols is not None:
        return sums.scatter_add_(1, ids.expand(d, -1), cols).t()
    for s in range(0, x.shape[0], _CHUNK):
        rows = x[s : s + _CHUNK].to(torch.float32)
        if weights is not None:
            rows = rows * weights[s : s + _CHUNK, None]
        cols = rows.t().contiguous()  # (d, rows)
        sums.scatter_add_(1, ids[s : s + _CHUNK].expand(d, -1), cols)
    return sums.t()


def sse_of(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    centroids: torch.Tensor,
    codes: torch.Tensor,
) -> float:
    """``sum_i w_i ||x_i - centroids[codes_i]||^2`` in float64, chunked."""
    total = 0.0
    c = centroids.to(torch.float32)
    for s in range(0, x.shape[0], _CHUNK):
        e = s + _CHUNK
        diff = x[s:e].to(torch.float32) - c[codes[s:e]]  # (chunk, d)
        per = (diff * diff).sum(dim=1, dtype=torch.float64)
        if weights is not None:
            per = per * weights[s:e].to(torch.float64)
        total += float(per.sum())
    return total


def codeword_groups(
    centroids: torch.Tensor, codes: torch.Tensor, tol: float
) -> tuple[torch.Tensor, ...]:
    """Ids of used codewords and, for each, the index of its group of equal codewords."""
    k = centroids.shape[0]
    used = (torch.bincount(codes, minlength=k) > 0).nonzero().flatten()  # (u,)
    c = centroids[used].to(torch.float32) + 0.0  # + 0.0 folds -0.0 into 0.0
    keys = torch.round(c / tol) if tol > 0 else c
    _, group = torch.unique(keys, dim=0, return_inverse=True)  # (u,) group of each used id
    return used, group


def count_used_codewords(centroids: torch.Tensor, codes: torch.Tensor, tol: float = 0.0) -> int:
    """Distinct codewords that ``codes`` really reference (equal within ``tol`` count once)."""
    _, group = codeword_groups(centroids, codes, tol)
    return int(group.max()) + 1 if group.numel() else 0
