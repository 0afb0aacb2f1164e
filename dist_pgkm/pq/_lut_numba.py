"""The table-sum kernel of the code forward, compiled by numba (an optional extra).

Imported only by :mod:`dist_pgkm.pq.infer`, lazily; without numba the same sums run in torch.
It reads the codes from the packed stream (docs/format.md: code ``i`` at bits
``[i * b, (i + 1) * b)``, little-endian), so no unpacked copy of them exists.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["lut_sums", "lut_sums_parallel", "set_threads"]


def set_threads(n: int) -> int:
    """Use up to ``n`` threads in :data:`lut_sums_parallel`; returns the number set."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _code(packed: np.ndarray, block: int, bits: int, mask: int, last: int) -> int:
    if bits == 8:
        return int(packed[block])
    first = block * bits
    byte = first >> 3
    word = np.int64(packed[byte])
    if byte + 1 <= last:
        word |= np.int64(packed[byte + 1]) << 8
    if byte + 2 <= last:
        word |= np.int64(packed[byte + 2]) << 16
    return int((word >> (first & 7)) & mask)


def _lut_sums(
    table: np.ndarray,
    packed: np.ndarray,
    bits: int,
    rows_per_book: int,
    scales: np.ndarray,
    has_scales: bool,
    per_group: int,
    scratch: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[o, n] = sum_s scale[o, s] * sum_{g in group s} table[book(o), g, code[o, g], n]``.

    Args:
        table: ``(n_books, G, K, N)`` float32 tables (:func:`dist_pgkm.pq.infer._tables`).
        packed: ``uint8`` packed codes of the ``(out, G)`` blocks, row-major.
        bits: Bits per code.
        rows_per_book: Output rows per codebook.
        scales: ``(out, G / per_group)`` float32 scales (ignored without ``has_scales``).
        has_scales: Whether the layer has scales.
        per_group: Blocks per scale group (``G`` without scales).
        scratch: ``(out, N)`` float32 work space.
        out: ``(out, N)`` float32 result.
    """
    groups = table.shape[1]
    n = table.shape[3]
    n_out = out.shape[0]
    mask = (1 << bits) - 1
    last = packed.shape[0] - 1
    n_groups = groups // per_group
    for o in numba.prange(n_out):
        book = o // rows_per_book
        base = o * groups
        if n == 1:  # decoding: four sums, so that the adds do not wait on each other
            total = np.float32(0.0)
            for s in range(n_groups):
                a0 = a1 = a2 = a3 = np.float32(0.0)
                g0, g1 = s * per_group, (s + 1) * per_group
                g = g0
                while g + 4 <= g1:
                    a0 += table[book, g, _code(packed, base + g, bits, mask, last), 0]
                    a1 += table[book, g + 1, _code(packed, base + g + 1, bits, mask, last), 0]
                    a2 += table[book, g + 2, _code(packed, base + g + 2, bits, mask, last), 0]
                    a3 += table[book, g + 3, _code(packed, base + g + 3, bits, mask, last), 0]
                    g += 4
                while g < g1:
                    a0 += table[book, g, _code(packed, base + g, bits, mask, last), 0]
                    g += 1
                acc = (a0 + a1) + (a2 + a3)
                total += acc * scales[o, s] if has_scales else acc
            out[o, 0] = total
            continue
        for j in range(n):
            out[o, j] = 0.0
        for s in range(n_groups):
            for j in range(n):
                scratch[o, j] = 0.0
            for g in range(s * per_group, (s + 1) * per_group):
                code = _code(packed, base + g, bits, mask, last)
                for j in range(n):
                    scratch[o, j] += table[book, g, code, j]
            scale = scales[o, s] if has_scales else np.float32(1.0)
            for j in range(n):
                out[o, j] += scratch[o, j] * scale


# One body, two compilations: threads help on an idle machine, and cost far more than they give
# when the cores are busy (OpenMP workers wait for a share of the CPU), so the caller picks.
lut_sums = numba.njit(cache=True, nogil=True)(_lut_sums)
lut_sums_parallel = numba.njit(parallel=True, cache=True, nogil=True)(_lut_sums)
