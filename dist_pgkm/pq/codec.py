"""The iPQ sub-vector layout (DESIGN.md §2) and its exact inverse.

A Linear weight ``W[out, in]`` is cut into blocks of ``bs`` contiguous input-feature weights of
one output row; an Embedding the same along the embedding dim; a Conv2d weight
``W[out, in, kh, kw]`` after flattening ``in * kh * kw`` per output channel.
"""

from __future__ import annotations

import torch

from dist_pgkm.errors import InvalidInputError

__all__ = ["from_subvectors", "to_subvectors"]


def to_subvectors(weight: torch.Tensor, block_size: int, name: str = "weight") -> torch.Tensor:
    """Cut a weight into ``(out * in_flat / bs, bs)`` sub-vectors (a view when possible).

    Args:
        weight: ``(out, in)`` Linear/Embedding or ``(out, in, kh, kw)`` Conv2d weight.
        block_size: Sub-vector length ``bs``; must divide the flattened input width.
        name: Layer name for error messages.

    Raises:
        InvalidInputError: Unsupported rank, or a width that ``block_size`` does not divide.
    """
    if weight.dim() not in (2, 4):
        raise InvalidInputError(
            f"{name}: cannot cut a {weight.dim()}-D tensor {tuple(weight.shape)} into sub-vectors; "
            "only 2-D (Linear, Embedding) and 4-D (Conv2d) weights are supported."
        )
    if block_size < 1:
        raise InvalidInputError(f"{name}: block size must be >= 1, got {block_size}.")
    flat = weight.reshape(weight.shape[0], -1)  # (out, in * kh * kw)
    width = flat.shape[1]
    if width % block_size:
        divisors = [b for b in (1, 2, 4, 8, 16, 32) if width % b == 0]
        raise InvalidInputError(
            f"{name}: input width {width} is not a multiple of block size {block_size}, so its "
            f"rows cannot be cut into whole blocks. Use a block size in {divisors} for this "
            "layer, or skip it (on_unsupported: skip)."
        )
    return flat.reshape(-1, block_size)  # (out * width / bs, bs)


def from_subvectors(subvectors: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Exact inverse of :func:`to_subvectors`: reassemble a weight of ``shape``."""
    return subvectors.reshape(shape)
