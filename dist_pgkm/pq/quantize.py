"""Quantize one weight tensor with product quantization, and what it costs in bits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_pgkm.kmeans.types import KMeansStats
from dist_pgkm.pgkm.api import cluster
from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.pack import bits_for

__all__ = ["QuantizedWeight", "bits_per_weight", "quantize_weight"]


@dataclass
class QuantizedWeight:
    """A weight as a codebook and codes.

    Attributes:
        centroids: ``(k_used, block_size)`` float32 codebook (compacted: every row is used).
        codes: ``(n_blocks,)`` int64 codeword of every block.
        shape: Shape of the dense weight.
        stats: The clustering run's statistics.
        weight_sq: ``||W||²`` of the original weight (float64), so that ``stats.sse /
            weight_sq`` is the relative error.
    """

    centroids: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, ...]
    stats: KMeansStats
    weight_sq: float = 0.0

    @property
    def block_size(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def k_used(self) -> int:
        return int(self.centroids.shape[0])

    def dense(self) -> torch.Tensor:
        """The decoded float32 weight."""
        return from_subvectors(self.centroids[self.codes], self.shape)

    def bits_per_weight(self, centroid_bits: int = 16) -> float:
        """Bits per weight including the codebook (see :func:`bits_per_weight`)."""
        return bits_per_weight(self.codes.numel(), self.k_used, self.block_size, centroid_bits)


def bits_per_weight(n_blocks: int, k_used: int, block_size: int, centroid_bits: int = 16) -> float:
    """Storage cost per weight: packed codes plus the codebook.

    ``(n_blocks * ceil(log2 k_used) + k_used * block_size * centroid_bits) / (n_blocks *
    block_size)``; centroids are stored in fp16 (16 bits) unless configured otherwise.
    """
    code_bits = n_blocks * bits_for(k_used)
    book_bits = k_used * block_size * centroid_bits
    return (code_bits + book_bits) / (n_blocks * block_size)


def quantize_weight(
    weight: torch.Tensor,
    block_size: int,
    k: int,
    method: str = "pgkm",
    seed: int = 0,
    name: str = "weight",
    **options: Any,
) -> QuantizedWeight:
    """Product-quantize a Linear / Embedding / Conv2d weight in the iPQ layout.

    Args:
        weight: ``(out, in)`` or ``(out, in, kh, kw)`` tensor, any float dtype.
        block_size: Sub-vector length; must divide the flattened input width.
        k: Codebook size (at most the number of blocks).
        method: Clustering method of :func:`dist_pgkm.cluster`.
        seed: Seed of the clustering run.
        name: Layer name for error messages.
        **options: Passed to :func:`dist_pgkm.cluster` (backend, n_iter, method options).

    Returns:
        The compacted codebook, the codes and the statistics.
    """
    x = to_subvectors(weight.detach(), block_size, name)  # (out * in / bs, bs)
    result = cluster(x, k, method=method, seed=seed, compact=True, **options)
    # ||W||^2 in float64, a million blocks at a time (a float64 copy of a whole embedding of a
    # large model would not fit).
    weight_sq = 0.0
    for start in range(0, x.shape[0], 1 << 20):
        weight_sq += float(x[start : start + (1 << 20)].double().pow(2).sum())
    return QuantizedWeight(
        result.centroids, result.codes, tuple(weight.shape), result.stats, weight_sq
    )
