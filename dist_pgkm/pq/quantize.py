"""Quantize one weight tensor with product quantization, and what it costs in bits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.kmeans.block_metric import BlockMetric
from dist_pgkm.kmeans.result import KMeansResult, KMeansStats
from dist_pgkm.pgkm.api import cluster
from dist_pgkm.pq.aware import fit_scales, hessian_metric, refit_scales, select_outliers
from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.layout import apply_outliers, apply_scales, book_index
from dist_pgkm.pq.pack import bits_for

__all__ = ["QuantizedWeight", "bits_per_weight", "decode_weight", "quantize_weight"]


@dataclass
class QuantizedWeight:
    """A weight as a codebook and codes, with the optional scales and outliers.

    The decoded weight (:meth:`dense`), with ``W`` flattened to ``(out, width)``:

    1. ``W[i] = centroids[codes[i]]`` for every block ``i`` (iPQ layout), or with one codebook
       per ``codebook_rows`` output rows: ``W[i] = centroids[book(i), codes[i]]``, ``book(i)``
       being the block's output row ``// codebook_rows``;
    2. with ``scales`` (``(out, width / scale_group)``): every weight times the scale of its
       row and group of ``scale_group`` input features;
    3. with outliers: ``W.view(-1)[outlier_idx] = outlier_val``.

    Attributes:
        centroids: ``(k_used, block_size)`` float32 codebook (compacted: every row is used), or
            ``(n_books, k_store, block_size)`` with ``codebook_rows``: each book compacted, then
            padded with zero rows to the largest ``k_used`` of the books.
        codes: ``(n_blocks,)`` int64 codeword of every block (in its own book).
        shape: Shape of the dense weight.
        stats: The clustering run's statistics (of the first book with ``codebook_rows``; the
            SSE and empty-cluster counts are summed over all books); None for a codebook no
            clustering run produced as such (trained by fine-tuning, exported by DKM).
        weight_sq: ``||W||²`` of the original weight (float64), so that ``stats.sse /
            weight_sq`` is the relative error.
        scales: ``(out, width / scale_group)`` float32 holding fp16-exact values, or None.
        scale_group: Input features per scale (``width`` for one scale per row; 0 without
            scales).
        codebook_rows: Output rows per codebook (0: one codebook for the layer).
        outlier_idx: ``(n_outliers,)`` int64 sorted indices into the flattened weight, or None.
        outlier_val: ``(n_outliers,)`` float32 holding fp16-exact values, or None.
        metric: The k-means metric the codebook was fitted with (``weight``, ``hessian``,
            ``hessian-diag``), as recorded in the shard.
    """

    centroids: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, ...]
    stats: KMeansStats | None = None
    weight_sq: float = 0.0
    scales: torch.Tensor | None = None
    scale_group: int = 0
    codebook_rows: int = 0
    outlier_idx: torch.Tensor | None = None
    outlier_val: torch.Tensor | None = None
    metric: str = "weight"

    @property
    def block_size(self) -> int:
        return int(self.centroids.shape[-1])

    @property
    def k_used(self) -> int:
        """Codewords per book (stored rows: ``k_store`` with ``codebook_rows``)."""
        return int(self.centroids.shape[-2])

    @property
    def n_books(self) -> int:
        return 1 if self.centroids.dim() == 2 else int(self.centroids.shape[0])

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    def dense(self) -> torch.Tensor:
        """The decoded float32 weight."""
        return decode_weight(
            self.centroids,
            self.codes,
            self.shape,
            scales=self.scales,
            codebook_rows=self.codebook_rows,
            outlier_idx=self.outlier_idx,
            outlier_val=self.outlier_val,
        )

    def bits_per_weight(self, centroid_bits: int = 16) -> float:
        """Bits per weight, codebooks, scales and outliers included (:func:`bits_per_weight`)."""
        n_scales = 0 if self.scales is None else int(self.scales.numel())
        return bits_per_weight(
            self.codes.numel(),
            self.k_used,
            self.block_size,
            centroid_bits,
            n_books=self.n_books,
            n_scales=n_scales,
            n_outliers=self.n_outliers,
        )


SCALE_BITS = 16  # fp16 scales
OUTLIER_BITS = 32 + 16  # int32 flat index + fp16 value


def decode_weight(
    centroids: torch.Tensor,
    codes: torch.Tensor,
    shape: tuple[int, ...],
    *,
    scales: torch.Tensor | None = None,
    codebook_rows: int = 0,
    outlier_idx: torch.Tensor | None = None,
    outlier_val: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a weight from its codebook(s), codes, scales and outliers (float32).

    See :class:`QuantizedWeight` for the layout and :mod:`dist_pgkm.pq.layout` for the steps
    (the PQ modules decode with the same functions). Differentiable in ``centroids``,
    ``scales`` and ``outlier_val``, with a deterministic backward. ``codebook_rows`` is implied
    by the shape of ``centroids`` (one book per ``out / n_books`` rows).
    """
    c = centroids.to(torch.float32)
    block_size = int(c.shape[-1])
    n_books = 1 if c.dim() == 2 else int(c.shape[0])
    index = book_index(codes, n_books, int(c.shape[-2]))  # (n_blocks,)
    blocks = F.embedding(index, c.reshape(-1, block_size))  # (n_blocks, bs)
    w = apply_scales(blocks.reshape(shape[0], -1), scales)  # (out, width)
    w = apply_outliers(w, outlier_idx, outlier_val)
    return from_subvectors(w.reshape(-1, block_size), shape)


def bits_per_weight(
    n_blocks: int,
    k_used: int,
    block_size: int,
    centroid_bits: int = 16,
    *,
    n_books: int = 1,
    n_scales: int = 0,
    n_outliers: int = 0,
) -> float:
    """Storage cost per weight: packed codes, codebooks, scales and outliers.

    ``(n_blocks * ceil(log2 k_used) + n_books * k_used * block_size * centroid_bits + n_scales
    * 16 + n_outliers * 48) / (n_blocks * block_size)``; centroids are stored in fp16 (16 bits)
    unless configured otherwise, scales in fp16, an outlier as an int32 index and an fp16
    value. ``k_used`` is the codewords stored per book.
    """
    code_bits = n_blocks * bits_for(k_used)
    book_bits = n_books * k_used * block_size * centroid_bits
    side_bits = n_scales * SCALE_BITS + n_outliers * OUTLIER_BITS
    return (code_bits + book_bits + side_bits) / (n_blocks * block_size)


def quantize_weight(
    weight: torch.Tensor,
    block_size: int,
    k: int,
    method: str = "pgkm",
    seed: int = 0,
    name: str = "weight",
    *,
    options: LayerQuantOptions | None = None,
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
    **cluster_options: Any,
) -> QuantizedWeight:
    """Product-quantize a Linear / Embedding / Conv2d weight in the iPQ layout.

    With the defaults this is plain product quantization: one codebook fitted to the weight's
    sub-vectors. ``options`` adds the activation-aware levers (docs/quantize.md): the metric
    ``(w - c)^T H_b (w - c)`` from ``hessian``, per-row or per-group scales (the points are
    divided by their fp16 scale, weighted by its square, and the scales refitted once the codes
    are known), one codebook per ``codebook_rows`` output rows, and outliers kept exactly.

    Args:
        weight: ``(out, in)`` or ``(out, in, kh, kw)`` tensor, any float dtype.
        block_size: Sub-vector length; must divide the flattened input width.
        k: Codebook size (at most the number of blocks of a book).
        method: Clustering method of :func:`dist_pgkm.cluster`.
        seed: Seed of the clustering run (every book uses it).
        name: Layer name for error messages.
        options: The rule's levers (None: plain).
        hessian: ``(width / bs, bs, bs)`` diagonal blocks of the layer's input second moment
            ``X^T X``; used when ``options.metric`` is not ``weight`` (without it the layer
            falls back to the weight metric, recorded in ``metric``).
        damp: Relative damping of ``hessian`` (:func:`~dist_pgkm.pq.aware.hessian_metric`).
        **cluster_options: Passed to :func:`dist_pgkm.cluster` (backend, n_iter, method
            options).

    Returns:
        The codebook(s), codes, scales, outliers and statistics. ``stats.sse`` is the squared
        error of the decoded weight; ``stats.metric_sse`` its error under the metric.

    Raises:
        InvalidInputError: The weight cannot be cut as asked, or ``hessian`` is malformed.
    """
    opts = options or LayerQuantOptions()
    shape = tuple(weight.shape)
    x = to_subvectors(weight.detach(), block_size, name)  # (out * width / bs, bs)
    w = w_orig = x.reshape(shape[0], -1).to(torch.float32)  # (out, width)
    out, width = w.shape
    # ||W||^2 in float64, a million blocks at a time (a float64 copy of a whole embedding of a
    # large model would not fit).
    weight_sq = 0.0
    for start in range(0, x.shape[0], 1 << 20):
        weight_sq += float(x[start : start + (1 << 20)].double().pow(2).sum())

    metric = None
    if opts.needs_hessian and hessian is not None:
        diagonal = opts.metric == "hessian-diag"
        metric = hessian_metric(hessian, block_size, damp, diagonal, name)
    metric_name = opts.metric if metric is not None else "weight"

    outlier_idx = outlier_val = None
    if opts.outliers > 0:
        input_weight = None
        if metric is not None and hessian is not None:
            input_weight = hessian_diagonal(hessian)
        outlier_idx, outlier_val = select_outliers(w, opts.outliers, input_weight)
        w = w.clone()
        w.view(-1)[outlier_idx] = 0.0  # clustered as zeros; the decode overwrites them

    scales = None
    scale_group = 0
    points, point_weights = w, None
    if opts.scale != "none":
        scale_group = width if opts.scale == "row" else opts.scale_group
        scales = fit_scales(w, scale_group)  # (out, width / scale_group)
        expanded = scales.repeat_interleave(scale_group, dim=1)  # (out, width)
        points = w / expanded
        point_weights = expanded[:, ::block_size].reshape(-1).square()  # (n_blocks,)
    points = points.reshape(-1, block_size)  # (n_blocks, bs)

    n_groups = width // block_size  # blocks per row: block i uses metric[i % n_groups]
    rows_per_book = opts.codebook_rows or out
    per_book = rows_per_book * n_groups
    books = []
    for b in range(out // rows_per_book):
        part = slice(b * per_book, (b + 1) * per_book)
        block_metric = None
        if metric is not None:
            groups = torch.arange(per_book) % n_groups
            block_metric = BlockMetric(metric, groups)
        weights = None if point_weights is None else point_weights[part]
        books.append(
            cluster(
                points[part],
                k,
                method=method,
                seed=seed,
                weights=weights,
                metric=block_metric,
                compact=True,
                **cluster_options,
            )
        )
    centroids, codes, stats = _join_books(books, opts.codebook_rows > 0)

    unscaled = decode_weight(centroids, codes, shape, codebook_rows=opts.codebook_rows)
    if scales is not None:
        target = w.reshape(out, width)
        scales = refit_scales(target, unscaled.reshape(out, width), scales, metric, block_size)
    q = QuantizedWeight(
        centroids,
        codes,
        shape,
        stats,
        weight_sq,
        scales=scales,
        scale_group=scale_group,
        codebook_rows=opts.codebook_rows,
        outlier_idx=outlier_idx,
        outlier_val=outlier_val,
        metric=metric_name,
    )
    if not opts.plain:  # the clustering's SSE is of the scaled points, before the refit
        stats.sse, stats.metric_sse = _errors(q, w_orig, metric)
    return q


def _errors(
    q: QuantizedWeight, w: torch.Tensor, metric: torch.Tensor | None
) -> tuple[float, float | None]:
    """Squared error of ``q``'s decode against ``w`` (``(out, width)``), plain and under the
    per-block metric, in float64 and a few rows at a time."""
    out, width = w.shape
    dense = q.dense().reshape(out, width)
    rows = max(1, (1 << 20) // width)
    sse, msse = 0.0, 0.0
    for s in range(0, out, rows):
        e = (dense[s : s + rows] - w[s : s + rows]).double()  # (rows, width)
        sse += float(e.square().sum())
        if metric is not None:
            msse += metric_error(e, metric, q.block_size)
    return sse, (msse if metric is not None else None)


def hessian_diagonal(hessian: torch.Tensor) -> torch.Tensor:
    """``(width,)`` diagonal of ``H`` from its ``(width / bs, bs, bs)`` diagonal blocks."""
    return hessian.diagonal(dim1=1, dim2=2).reshape(-1)


def metric_error(error: torch.Tensor, metric: torch.Tensor, block_size: int) -> float:
    """``sum_i e_i^T M_(i mod G) e_i`` of an ``(out, width)`` error under a per-block metric."""
    out = error.shape[0]
    e = error.reshape(out, -1, block_size)  # (out, G, bs)
    me = torch.einsum("ogi,gij->ogj", e, metric.to(e.dtype))
    return float((me * e).sum())


def _join_books(
    books: list[KMeansResult], grouped: bool
) -> tuple[torch.Tensor, torch.Tensor, KMeansStats]:
    """One layer's centroids, codes and stats from its books' results."""
    if not grouped:
        (result,) = books
        return result.centroids, result.codes, result.stats
    k_store = max(int(r.centroids.shape[0]) for r in books)
    d = int(books[0].centroids.shape[1])
    centroids = torch.zeros(len(books), k_store, d)  # (n_books, k_store, bs), zero padded
    for i, r in enumerate(books):
        centroids[i, : r.centroids.shape[0]] = r.centroids
    codes = torch.cat([r.codes for r in books])
    stats = dataclasses.replace(books[0].stats)
    stats.n = sum(r.stats.n for r in books)
    stats.n_distinct = sum(r.stats.n_distinct for r in books)
    stats.empty_after_init = sum(r.stats.empty_after_init for r in books)
    stats.empty_final = sum(r.stats.empty_final for r in books)
    stats.repair_passes = sum(r.stats.repair_passes for r in books)
    stats.moves = sum(r.stats.moves for r in books)
    stats.distance_passes = sum(r.stats.distance_passes for r in books)
    stats.seconds = sum(r.stats.seconds for r in books)
    stats.init_seconds = sum(r.stats.init_seconds for r in books)
    stats.k_used = sum(r.stats.k_used for r in books)
    stats.aborted = any(r.stats.aborted for r in books)
    return centroids, codes, stats
