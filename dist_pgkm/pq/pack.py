"""Codes stored at ceil(log2 K_used) bits each, so the bytes on disk match the reported bits.

Layout: code ``i`` occupies bits ``[i * b, (i + 1) * b)`` of the little-endian bit stream, bit
``j`` of the stream being bit ``j % 8`` of byte ``j // 8``; the last byte is zero-padded.
"""

from __future__ import annotations

import math

import torch

from dist_pgkm.errors import InvalidInputError

__all__ = ["bits_for", "codes_at", "pack_codes", "packed_nbytes", "unpack_codes"]

_MAX_BITS = 16  # K up to 65536
_CHUNK = 1 << 20  # codes per chunk (a multiple of 8, so chunks start on byte boundaries)


def bits_for(k_used: int) -> int:
    """Bits per code for ``k_used`` distinct codewords (at least 1)."""
    if k_used < 1 or k_used > 1 << _MAX_BITS:
        raise InvalidInputError(f"a codebook must have 1..65536 codewords, got {k_used}.")
    return max(1, math.ceil(math.log2(k_used)))


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(n,)`` integer codes in ``[0, 2**bits)`` into a ``uint8`` tensor.

    Raises:
        InvalidInputError: ``bits`` outside 1..16, or a code that does not fit in it.
    """
    if not 1 <= bits <= _MAX_BITS:
        raise InvalidInputError(f"bits per code must be in 1..16, got {bits}.")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise InvalidInputError(
            f"codes range over [{int(flat.min())}, {int(flat.max())}], which {bits} bits cannot "
            f"hold ([0, {(1 << bits) - 1}]); pack with bits_for(k_used)."
        )
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int64)
    chunk = _CHUNK  # multiple of 8 codes -> a whole number of bytes per chunk
    parts = []
    for s in range(0, flat.numel(), chunk):
        stream = ((flat[s : s + chunk, None] >> shifts) & 1).reshape(-1)  # (m * bits,) bits
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        parts.append((stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(n,)`` int64 codes.

    Raises:
        InvalidInputError: ``packed`` does not hold exactly ``packed_nbytes(n, bits)`` bytes.
    """
    if not 1 <= bits <= _MAX_BITS:
        raise InvalidInputError(f"bits per code must be in 1..16, got {bits}.")
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(n, bits):
        raise InvalidInputError(
            f"packed codes hold {packed.numel()} {packed.dtype} values; {n} codes of {bits} "
            f"bits need {packed_nbytes(n, bits)} uint8 bytes. The file is truncated or corrupt."
        )
    shifts = torch.arange(8, dtype=torch.int64)
    values = torch.pow(2, torch.arange(bits, dtype=torch.int64))
    out = torch.empty(n, dtype=torch.int64)
    chunk = _CHUNK
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        first, last = s * bits // 8, packed_nbytes(s + m, bits)
        stream = ((packed[first:last].to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)
        out[s : s + m] = (stream[: m * bits].view(m, bits) * values).sum(dim=1)
    return out


def codes_at(packed: torch.Tensor, positions: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes at ``positions`` of a packed stream, without unpacking the rest.

    The same values as ``unpack_codes(packed, n, bits)[positions]``: code ``i`` is read from
    the (at most three) bytes holding bits ``[i * b, (i + 1) * b)``, so reading a tile of a
    weight costs that tile only.

    Args:
        packed: ``uint8`` stream of :func:`pack_codes`.
        positions: Integer tensor of any shape, each below the number of packed codes.
        bits: Bits per code (1..16).

    Returns:
        ``int64`` codes, of ``positions``' shape.
    """
    if bits == 8:  # one byte per code
        return packed[positions.to(torch.int64)].to(torch.int64)
    first = positions.to(torch.int64) * bits  # bit offsets
    byte, shift = first >> 3, first & 7
    last = packed.numel() - 1
    word = packed[byte].to(torch.int64)
    if bits + 7 > 8:  # the code may reach into the next bytes (past the end: zero padding)
        for extra in (1, 2):
            nxt = packed[(byte + extra).clamp_(max=last)].to(torch.int64)
            word |= torch.where(byte + extra <= last, nxt, 0) << (8 * extra)
    return (word >> shift) & ((1 << bits) - 1)
