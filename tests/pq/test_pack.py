"""Bit-packed codes: exact round trips, exact sizes, a known byte pattern, clear errors."""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.pack import bits_for, pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("k_used", [1, 2, 3, 255, 256, 257, 4096, 4097, 65536])
def test_bits_for(k_used: int) -> None:
    expected = {1: 1, 2: 1, 3: 2, 255: 8, 256: 8, 257: 9, 4096: 12, 4097: 13, 65536: 16}
    assert bits_for(k_used) == expected[k_used]


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_round_trip_and_size(bits: int, n: int) -> None:
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits + n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, n, bits), codes)


def test_round_trip_across_chunks() -> None:
    codes = torch.randint(0, 4096, ((1 << 20) + 13,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(codes, 12), codes.numel(), 12), codes)


def test_known_layout() -> None:
    # 12-bit codes 0xABC, 0x123 -> stream little-endian: bytes 0xBC, 0x3A, 0x12
    packed = pack_codes(torch.tensor([0xABC, 0x123]), 12)
    assert packed.tolist() == [0xBC, 0x3A, 0x12]
    assert pack_codes(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]


def test_errors_say_what_and_how() -> None:
    with pytest.raises(InvalidInputError, match=r"\[0, 255\]\); pack with bits_for"):
        pack_codes(torch.tensor([256]), 8)
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(InvalidInputError, match=r"1\.\.65536"):
        bits_for(70000)
