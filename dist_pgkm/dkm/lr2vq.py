"""LR²VQ: cluster sub-vectors in a learned low-rank space (after Zhu et al., arXiv 2211.11397).

The paper's abstract fixes the design pattern: sub-vectors of size ``m`` (which set the
compression ratio), a clustering dimensionality ``d < m`` (which sets the accuracy, a trade-off
between low-rank approximation error and clustering error), ``k`` clusters, trained end to end.
Its method section was not available to us, so the construction below is ours, documented as
such (docs/dkm.md):

* The layer's ``(n, m)`` sub-vectors ``X`` are represented as ``R P``: ``R`` ``(n, d)`` a
  low-rank representation, ``P`` ``(d, m)`` a learned up-projection shared by the layer. Both
  start from the truncated SVD of ``X`` (``R = U_d Σ_d``, ``P = V_dᵀ``), the best rank-``d``
  approximation.
* ``R``'s rows are clustered in ``d`` dimensions with ``k`` centroids ``C`` (``(k, d)``), by the
  soft k-means of :mod:`dist_pgkm.dkm.functional` during training (any of its methods).
* The weight is ``A(C, R) C P`` in training and ``C[codes] P`` at export, so the exported
  codebook is ``C P`` (``(k, m)``) and the checkpoint is the ordinary PQ format with block size
  ``m``: ``log2(k) / m`` bits per weight for the codes, the same as PQ with block ``m``;
  ``P`` is folded into the codebook and costs nothing at inference.

:func:`choose_rank` is the rule for ``d`` before fine-tuning: for each candidate it adds the
low-rank error (the discarded singular values) and the error of PG k-means in the
``d``-dimensional space, and takes the smallest ``d`` whose sum is within 2% of the best.
:func:`layer_rank` applies it to one layer's weight (``dist-pgkm lr2vq-rank`` prints one row
per layer the quantize config selects).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.codec import to_subvectors

__all__ = [
    "LayerRank",
    "LowRank",
    "RankChoice",
    "choose_rank",
    "kmeans_error",
    "layer_rank",
    "low_rank",
    "lr2vq_bits",
]


@dataclass
class LowRank:
    """``X ≈ R P`` with ``R`` ``(n, d)`` and ``P`` ``(d, m)``; ``error`` = ``‖X − R P‖²``."""

    r: torch.Tensor
    p: torch.Tensor
    error: float


def low_rank(x: torch.Tensor, d: int) -> LowRank:
    """The best rank-``d`` factorisation of the ``(n, m)`` sub-vectors (truncated SVD).

    Raises:
        InvalidInputError: ``d`` not in ``1..m``.
    """
    m = x.shape[1]
    if not 1 <= d <= m:
        raise InvalidInputError(f"rank d={d} must be between 1 and the sub-vector size m={m}.")
    x = x.float()
    # The SVD of the small (m, m) Gram matrix: X = U S Vᵀ, XᵀX = V S² Vᵀ; R = X V_d = U_d S_d.
    gram = x.T @ x
    eigvals, eigvecs = torch.linalg.eigh(gram.double())
    order = torch.argsort(eigvals, descending=True)
    v = eigvecs[:, order[:d]].to(x.dtype)  # (m, d)
    r = x @ v
    discarded = float(eigvals[order[d:]].clamp_min(0).sum()) if d < m else 0.0
    return LowRank(r=r, p=v.T.contiguous(), error=discarded)


def kmeans_error(z: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> float:
    """``‖z − C[codes]‖²`` of PG k-means with ``k`` centroids (``iters`` Lloyd iterations)."""
    from dist_pgkm.pgkm import cluster

    k = min(k, z.shape[0])
    if k < 2:
        return float((z - z.mean(0)).pow(2).sum())
    result = cluster(z.float(), k, method="pgkm", n_iter=iters, seed=seed, backend="torch")
    return float((z.float() - result.centroids[result.codes]).pow(2).sum())


def lr2vq_bits(k: int, m: int, n_weights: int, d: int, codebook_bits: int = 16) -> float:
    """Bits per weight of an exported LR²VQ layer: codes plus the ``(k, m)`` codebook ``C P``.

    The same as PQ with block size ``m``: ``d`` does not enter once ``P`` is folded into the
    codebook (it is part of the signature so callers state what they compare).
    """
    del d
    n_blocks = n_weights // m
    code_bits = max(1, (k - 1).bit_length())
    return (n_blocks * code_bits + k * m * codebook_bits) / n_weights


@dataclass(frozen=True)
class RankChoice:
    """:func:`choose_rank`'s result: the chosen ``d`` and every candidate's errors."""

    d: int
    low_rank_error: dict[int, float]
    clustering_error: dict[int, float]

    def total(self, d: int) -> float:
        return self.low_rank_error[d] + self.clustering_error[d]


def choose_rank(
    x: torch.Tensor,
    k: int,
    candidates: Sequence[int] | None = None,
    *,
    sample: int = 16384,
    iters: int = 15,
    seed: int = 0,
    rel_tol: float = 0.02,
) -> RankChoice:
    """Pick the clustering dimensionality ``d`` for ``(n, m)`` sub-vectors and ``k`` clusters.

    For each candidate ``d``: low-rank error ``Σ_{i>d} σ_i²`` of the sub-vectors plus the error
    of ``k``-means on their rank-``d`` coordinates (both on a random sample of at most
    ``sample`` sub-vectors, scaled to all ``n``). The two are orthogonal, so their sum is the
    error of the rank-``d`` clustering in the full space. Above the data's effective rank the
    sum stops falling (the extra directions hold little energy; measured on sub-vectors near a
    rank-3 subspace of R^8, k = 16: totals 2.23x, 1.40x the best at d = 1, 2 and within 0.5%
    of it for every d >= 3), so the smallest ``d`` whose sum is within ``rel_tol`` of the best
    is chosen: the same error, clustered in the fewest dimensions.

    Clustering in the full space can always do at least as well as clustering a projection
    and lifting it, so the sum never rises with ``d`` by much; on real LLM weights, whose
    8-dimensional sub-vectors have no low-rank structure, it keeps falling and the rule picks
    ``d = m`` (SmolLM2's ``layers.0.mlp.up_proj``, m = 8, k = 256: totals 0.87, 0.74, 0.63,
    0.53, 0.46, 0.39, 0.34, 0.30 of ``‖X‖²`` at d = 1..8). ``candidates=None`` tries the powers
    of two below ``m`` and ``m`` itself (one k-means each, a few seconds per candidate at the
    default sample).
    """
    n, m = x.shape
    powers = [2**i for i in range(m.bit_length()) if 2**i < m]
    cands = sorted(set(candidates or [*powers, m]))
    if not cands or cands[0] < 1 or cands[-1] > m:
        raise InvalidInputError(f"candidate ranks {cands} must lie in 1..{m}.")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[:sample] if n > sample else torch.arange(n)
    xs = x[rows].float()
    scale = n / xs.shape[0]
    low: dict[int, float] = {}
    clus: dict[int, float] = {}
    for d in cands:
        factor = low_rank(xs, d)
        low[d] = factor.error * scale
        clus[d] = kmeans_error(factor.r, k, iters, seed) * scale
    best = min(low[d] + clus[d] for d in cands)
    chosen = next(d for d in cands if low[d] + clus[d] <= (1 + rel_tol) * best)
    return RankChoice(chosen, low, clus)


@dataclass(frozen=True)
class LayerRank:
    """:func:`layer_rank`'s result for one layer.

    Attributes:
        layer: The layer's name.
        block_size: ``m``, the sub-vector size.
        k: Clusters.
        rank: The chosen ``d``.
        relative_error: Per candidate ``d``: low-rank plus clustering error, as a fraction of
            the sub-vectors' ``‖X‖²``.
    """

    layer: str
    block_size: int
    k: int
    rank: int
    relative_error: dict[int, float]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready values (``dist-pgkm lr2vq-rank --json``)."""
        return {
            "layer": self.layer,
            "block_size": self.block_size,
            "k": self.k,
            "rank": self.rank,
            "relative_error": dict(self.relative_error),
        }


def layer_rank(
    name: str, weight: torch.Tensor, block_size: int, k: int, *, sample: int = 16384, seed: int = 0
) -> LayerRank:
    """:func:`choose_rank` on a layer's weight, cut into sub-vectors of ``block_size``.

    Args:
        name: The layer's name (in errors and the result).
        weight: Its weight, in any float dtype (clustered in float32).
        block_size: Sub-vector size ``m`` (the iPQ layout of :mod:`dist_pgkm.pq.codec`).
        k: Clusters.
        sample: Sub-vectors sampled (see :func:`choose_rank`).
        seed: Seed of the sample and of the k-means runs.

    Raises:
        InvalidInputError: The weight's width is not a multiple of ``block_size``.
    """
    sub = to_subvectors(weight.float(), block_size, name)
    choice = choose_rank(sub, k, sample=sample, seed=seed)
    norm = float(sub.pow(2).sum()) or 1.0
    errors = {d: choice.total(d) / norm for d in choice.low_rank_error}
    return LayerRank(name, block_size, k, choice.d, errors)
