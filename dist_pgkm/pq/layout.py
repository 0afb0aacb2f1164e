"""A quantized weight beyond its blocks: codebooks per row group, scales, outliers.

The decode of a weight (docs/format.md, "Decoding") is, with ``W`` flattened to ``(out, width)``:

1. gather every block's codeword, from its own book when there are several
   (:func:`book_index` turns per-book codes into indices of the stacked books);
2. multiply by the scales (:func:`apply_scales`);
3. overwrite the outliers (:func:`apply_outliers`).

:func:`dist_pgkm.pq.quantize.decode_weight` and the PQ modules both use these functions, so a
module's weight and the reference decode are the same floats. :func:`side_problems` checks the
optional tensors (for the checkpoint reader and the modules alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MAX_OUTLIER_WEIGHTS",
    "SideTensors",
    "apply_outliers",
    "apply_scales",
    "block_scales",
    "book_index",
    "book_index_at",
    "outlier_mask_at",
    "side_problems",
]

MAX_OUTLIER_WEIGHTS = 1 << 31
"""Outlier indices are stored as int32: a weight with outliers has at most this many values."""


@dataclass(frozen=True)
class SideTensors:
    """The optional tensors of a quantized weight besides its codebook(s) and codes.

    Attributes:
        scales: ``(out, width / scale_group)`` scales, or None.
        outlier_idx: ``(n,)`` sorted flat indices into the ``(out, width)`` weight, or None.
        outlier_val: ``(n,)`` values of those weights, or None.
    """

    scales: torch.Tensor | None = None
    outlier_idx: torch.Tensor | None = None
    outlier_val: torch.Tensor | None = None


def book_index(codes: torch.Tensor, n_books: int, k_store: int) -> torch.Tensor:
    """Indices into ``centroids.reshape(n_books * k_store, bs)`` of per-book ``codes``.

    Book ``b`` holds the blocks ``[b * n / n_books, (b + 1) * n / n_books)`` (``codebook_rows``
    whole output rows each, in the iPQ block order), so its codes are offset by ``b * k_store``.

    Args:
        codes: ``(n_blocks,)`` integer codes, each below ``k_store``.
        n_books: Number of codebooks (1: the codes are returned as they are).
        k_store: Rows of every book.

    Returns:
        ``(n_blocks,)`` indices, of ``codes``' dtype.
    """
    if n_books == 1:
        return codes
    blocks = torch.arange(codes.numel(), device=codes.device)  # (n_blocks,)
    return book_index_at(codes, blocks, codes.numel(), n_books, k_store)


def book_index_at(
    codes: torch.Tensor, blocks: torch.Tensor, n_blocks: int, n_books: int, k_store: int
) -> torch.Tensor:
    """:func:`book_index` for some blocks of a weight only (a tile, looked-up rows).

    Args:
        codes: Integer codes of the blocks ``blocks``, any shape.
        blocks: Positions of those blocks among the weight's ``n_blocks``, ``codes``' shape.
        n_blocks: Blocks of the whole weight.
        n_books: Number of codebooks.
        k_store: Rows of every book.

    Returns:
        Indices into the stacked books, of ``codes``' shape and dtype.
    """
    if n_books == 1:
        return codes
    book = blocks // (n_blocks // n_books)  # each book holds n_blocks / n_books blocks
    return codes + (book * k_store).to(codes.dtype)


def apply_scales(w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """``w`` times its scales: every weight times the scale of its row and input group.

    Args:
        w: ``(..., width)`` weights (rows of the weight, or rows looked up by an embedding).
        scales: ``(..., width / scale_group)`` scales of the same rows, or None.

    Returns:
        A new ``(..., width)`` tensor (``w`` itself without scales). The product is one float
        multiplication per weight, so any subset of rows gives the same values as the whole
        weight; its backward is a sum over each group (deterministic).
    """
    if scales is None:
        return w
    n_groups = scales.shape[-1]
    grouped = w.reshape(*w.shape[:-1], n_groups, -1)  # (..., n_groups, scale_group)
    return (grouped * scales.to(w.dtype).unsqueeze(-1)).reshape(w.shape)


def block_scales(
    scales: torch.Tensor, blocks: torch.Tensor, width: int, block_size: int
) -> torch.Tensor:
    """The scale of each of some blocks of a weight (a scale group holds whole blocks).

    Args:
        scales: ``(out, width / scale_group)`` scales.
        blocks: ``(m,)`` int64 positions of the blocks among the weight's blocks (iPQ order:
            ``width / block_size`` blocks per output row).
        width: Input features of the weight (``prod(shape[1:])``).
        block_size: Weights per block.

    Returns:
        ``(m, 1)`` scales, of ``scales``' dtype: dividing a block by its scale gives the point
        the codebook saw, multiplying a codeword by it gives the decoded block.
    """
    per_row, group = width // block_size, width // scales.shape[1]
    return scales[blocks // per_row, (blocks % per_row) * block_size // group][:, None]


def outlier_mask_at(
    blocks: torch.Tensor, block_size: int, outlier_idx: torch.Tensor | None
) -> torch.Tensor | None:
    """Which weights of some blocks are outliers (kept as they are, never decoded).

    Args:
        blocks: ``(m,)`` int64 positions of the blocks among the weight's blocks.
        block_size: Weights per block.
        outlier_idx: ``(n,)`` flat indices into the ``(out, width)`` weight, or None.

    Returns:
        ``(m, block_size)`` bool, True at an outlier; None when the weight has no outliers.
    """
    if outlier_idx is None or outlier_idx.numel() == 0:
        return None
    positions = blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)
    return torch.isin(positions, outlier_idx.to(blocks.device))


def apply_outliers(
    w: torch.Tensor, outlier_idx: torch.Tensor | None, outlier_val: torch.Tensor | None
) -> torch.Tensor:
    """``w`` with ``w.view(-1)[outlier_idx] = outlier_val``, as a new tensor.

    Args:
        w: ``(out, width)`` weight.
        outlier_idx: ``(n,)`` int32/int64 sorted flat indices, or None.
        outlier_val: ``(n,)`` values, or None.

    Returns:
        The overwritten weight (``w`` itself without outliers). No gradient reaches ``w`` at
        the overwritten positions: the codebook does not decide those weights.
    """
    if outlier_idx is None or outlier_val is None or outlier_idx.numel() == 0:
        return w
    flat = w.reshape(-1).index_put((outlier_idx,), outlier_val.to(w.dtype))
    return flat.reshape(w.shape)


def side_problems(
    shape: tuple[int, ...],
    scales: torch.Tensor | None,
    outlier_idx: torch.Tensor | None,
    outlier_val: torch.Tensor | None,
) -> list[str]:
    """What is wrong with a weight's scales and outliers (empty: nothing).

    Checks that the scales are ``(out, width / g)`` for a ``g`` dividing ``width`` and finite,
    and that the outliers are 1-D, of equal length, integer indices strictly increasing (sorted,
    no duplicate) inside the weight, with finite values.

    Args:
        shape: Shape of the dense weight.
        scales: The scales, or None.
        outlier_idx: The outlier indices, or None.
        outlier_val: The outlier values, or None.
    """
    problems: list[str] = []
    out = shape[0]
    width = 1
    for size in shape[1:]:
        width *= size
    if scales is not None:
        groups = int(scales.shape[-1]) if scales.dim() == 2 else 0
        if scales.dim() != 2 or scales.shape[0] != out or groups == 0 or width % groups:
            problems.append(
                f"scales {tuple(scales.shape)} are not (out={out}, width / scale_group) for a "
                f"scale_group dividing the width {width}"
            )
        elif not scales.is_floating_point():
            problems.append(f"scales are {scales.dtype}, not floating point")
        elif not scales.is_meta and not bool(torch.isfinite(scales).all()):
            problems.append("scales hold NaN or infinity")
    if (outlier_idx is None) != (outlier_val is None):
        problems.append("outlier indices without values, or values without indices")
        return problems
    if outlier_idx is None or outlier_val is None:
        return problems
    if outlier_idx.dim() != 1 or outlier_val.dim() != 1 or outlier_idx.shape != outlier_val.shape:
        problems.append(
            f"outlier indices {tuple(outlier_idx.shape)} and values {tuple(outlier_val.shape)} "
            "are not two 1-D tensors of the same length"
        )
        return problems
    if outlier_idx.dtype not in (torch.int32, torch.int64):
        problems.append(f"outlier indices are {outlier_idx.dtype}, not int32 or int64")
    if not outlier_val.is_floating_point():
        problems.append(f"outlier values are {outlier_val.dtype}, not floating point")
    if problems or outlier_idx.is_meta or outlier_val.is_meta or outlier_idx.numel() == 0:
        return problems
    n_weights = out * width
    if n_weights > MAX_OUTLIER_WEIGHTS:
        problems.append(f"a weight of {n_weights} values cannot have int32 outlier indices")
    idx = outlier_idx.to(torch.int64)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= n_weights:
        problems.append(
            f"outlier indices range over [{low}, {high}], outside the weight's [0, {n_weights - 1}]"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        problems.append("outlier indices are not strictly increasing (unsorted or repeated)")
    if not bool(torch.isfinite(outlier_val).all()):
        problems.append("outlier values hold NaN or infinity")
    return problems
