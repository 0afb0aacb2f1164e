"""The kernels of the code forward, compiled by numba (an optional extra): table sums, tiles.

Imported only by :mod:`dist_pgkm.pq.infer`, lazily; without numba the same sums run in torch.
It reads the codes from the packed stream (docs/format.md: code ``i`` at bits
``[i * b, (i + 1) * b)``, little-endian), so no unpacked copy of them exists beyond one row.

No helper taking an array is called per code: numba counts references to an array passed to a
function with atomic increments and decrements, and one such call per table lookup (reading a
code) cost ~25 ns, twenty times the lookup itself. :func:`_row_codes` is called once per row.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["ROWS_PER_TASK", "decode_rows", "lut_sums", "lut_sums_parallel", "set_threads"]

ROWS_PER_TASK = 64
"""Output rows per task of the parallel kernel (each task unpacks one row at a time)."""


def set_threads(n: int) -> int:
    """Use up to ``n`` threads in :data:`lut_sums_parallel`; returns the number set."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


@numba.njit(cache=True, nogil=True)
def _row_codes(packed: np.ndarray, row: int, bits: int, codes: np.ndarray) -> None:
    """``codes[g]`` = code of block ``g`` of row ``row`` (``codes.size`` blocks per row)."""
    groups = codes.shape[0]
    if bits == 8:
        for g in range(groups):
            codes[g] = packed[row * groups + g]
        return
    mask = (1 << bits) - 1
    last = packed.shape[0] - 1
    first = row * groups * bits  # the row's first bit
    for g in range(groups):
        byte = first >> 3
        word = np.int64(packed[byte])
        if byte + 1 <= last:  # past the end: the zero padding of the stream
            word |= np.int64(packed[byte + 1]) << 8
        if byte + 2 <= last:
            word |= np.int64(packed[byte + 2]) << 16
        codes[g] = (word >> (first & 7)) & mask
        first += bits


def _lut_sums(
    table: np.ndarray,
    packed: np.ndarray,
    bits: int,
    rows_per_book: int,
    scales: np.ndarray,
    has_scales: bool,
    per_group: int,
    out: np.ndarray,
) -> None:
    """``out[o, n] = sum_s scale[o, s] * sum_{g in group s} table[book(o), g, code[o, g], n]``.

    Args:
        table: ``(n_books, G, K, N)`` float32 tables (:func:`dist_pgkm.pq.infer._tables`),
            C-contiguous.
        packed: ``uint8`` packed codes of the ``(out, G)`` blocks, row-major.
        bits: Bits per code.
        rows_per_book: Output rows per codebook.
        scales: ``(out, G / per_group)`` float32 scales (ignored without ``has_scales``).
        has_scales: Whether the layer has scales.
        per_group: Blocks per scale group (``G`` without scales).
        out: ``(out, N)`` float32 result.
    """
    groups, k, n = table.shape[1], table.shape[2], table.shape[3]
    flat = table.reshape(table.size)
    n_out = out.shape[0]
    n_groups = groups // per_group
    for task in numba.prange((n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        offsets = np.empty(groups, np.int64)  # this row's entries: offsets into `flat`
        acc = np.empty(n, np.float32)
        for o in range(task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK)):
            start = (o // rows_per_book) * groups * k * n  # this row's book
            if bits == 8 and n == 1:
                # Decoding at byte codes, the common case: the codes read in place (a pass
                # through `offsets` costs half as much again as the lookups).
                base = o * groups
                total = np.float32(0.0)
                for s in range(n_groups):
                    a0 = a1 = a2 = a3 = np.float32(0.0)  # four sums: the adds do not wait
                    g, g1 = s * per_group, (s + 1) * per_group
                    while g + 4 <= g1:
                        a0 += flat[start + g * k + np.int64(packed[base + g])]
                        a1 += flat[start + (g + 1) * k + np.int64(packed[base + g + 1])]
                        a2 += flat[start + (g + 2) * k + np.int64(packed[base + g + 2])]
                        a3 += flat[start + (g + 3) * k + np.int64(packed[base + g + 3])]
                        g += 4
                    while g < g1:
                        a0 += flat[start + g * k + np.int64(packed[base + g])]
                        g += 1
                    part = (a0 + a1) + (a2 + a3)
                    total += part * scales[o, s] if has_scales else part
                out[o, 0] = total
                continue
            _row_codes(packed, o, bits, offsets)
            for g in range(groups):
                offsets[g] = start + (g * k + offsets[g]) * n
            for j in range(n):
                out[o, j] = 0.0
            for s in range(n_groups):
                acc[:] = 0.0
                for g in range(s * per_group, (s + 1) * per_group):
                    at = offsets[g]
                    for j in range(n):
                        acc[j] += flat[at + j]
                scale = scales[o, s] if has_scales else np.float32(1.0)
                for j in range(n):
                    out[o, j] += acc[j] * scale


@numba.njit(cache=True, nogil=True)
def decode_rows(
    codebook: np.ndarray, packed: np.ndarray, bits: int, rows: np.ndarray, rows_per_book: int,
    out: np.ndarray,
) -> None:  # fmt: skip
    """``out[i]`` = row ``rows[i]`` of the weight as codewords (before scales and outliers).

    Args:
        codebook: ``(n_books, K, bs)`` float32 codebooks, C-contiguous.
        packed: ``uint8`` packed codes of the ``(out, G)`` blocks, row-major.
        bits: Bits per code.
        rows: ``(R,)`` int64 output rows.
        rows_per_book: Output rows per codebook.
        out: ``(R, G * bs)`` float32 result, C-contiguous.
    """
    k, bs = codebook.shape[1], codebook.shape[2]
    books = codebook.reshape(codebook.size)
    groups = out.shape[1] // bs
    flat = out.reshape(out.size)
    codes = np.empty(groups, np.int64)
    for i in range(rows.shape[0]):
        row = rows[i]
        _row_codes(packed, row, bits, codes)
        start = (row // rows_per_book) * k
        at = i * groups * bs
        for g in range(groups):
            src = (start + codes[g]) * bs
            for s in range(bs):
                flat[at + s] = books[src + s]
            at += bs


# One body, two compilations: threads help on an idle machine, and cost far more than they give
# when the cores are busy (OpenMP workers wait for a share of the CPU), so the caller picks.
lut_sums = numba.njit(cache=True, nogil=True)(_lut_sums)
lut_sums_parallel = numba.njit(parallel=True, cache=True, nogil=True)(_lut_sums)
