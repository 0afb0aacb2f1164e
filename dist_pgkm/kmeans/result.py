"""Result and statistics types shared by every clustering method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dist_pgkm.kmeans.block_metric import BlockMetric

__all__ = ["ClusterInput", "KMeansResult", "KMeansStats"]


@dataclass
class KMeansStats:
    """What one clustering run did, per the definitions in docs/kmeans.md.

    Attributes:
        method: Clustering method name (``pgkm``, ``fairseq-em``, ``faiss``, ``kmeans++``).
        backend: Assignment backend that ran the distance passes.
        n: Number of input points.
        d: Dimension of a point (the block size).
        k: Requested number of centroids.
        n_distinct: Points the loop actually iterated over (after consolidation), else ``n``.
        empty_after_init: Empty clusters at the first assignment, i.e. left by the init.
        empty_per_iter: Empty clusters found by each iteration's assignment, before repair.
        empty_final: Clusters without any member in the returned codes.
        repair_passes: Repair operations run (pgkm/kmeans++: one per iteration whose assignment
            left clusters empty; fairseq-em: one per split tentative; faiss: one per iteration
            with splits).
        moves: pgkm's merge/split moves (a cluster merged into its neighbour, the freed
            codeword re-split from a costly cluster); not counted as empty clusters.
        distance_passes: Full point-to-codebook assignment passes (n x k distances).
        iterations: Lloyd iterations run (an iteration = assignment + centroid update).
        sse: Sum over points of ``weight * ||x - centroids[code]||^2`` for the returned result.
        seconds: Wall time of the whole call, init included.
        init_seconds: Wall time spent before the first iteration (consolidation, init).
        objective: SSE of each iteration's assignment, before its update.
        elapsed: Seconds since the start of the call at the end of each iteration.
        k_used: Distinct codewords the returned codes really use.
        aborted: The method gave up (fairseq-em: too many split tentatives).
        metric_sse: With a metric (activation-aware clustering): the error of the result
            under it, ``sum_i w_i (x_i - c)^T M_gi (x_i - c)``; ``sse`` stays Euclidean.
    """

    method: str
    backend: str
    n: int
    d: int
    k: int
    n_distinct: int = 0
    empty_after_init: int = 0
    empty_per_iter: list[int] = field(default_factory=list)
    empty_final: int = 0
    repair_passes: int = 0
    moves: int = 0
    distance_passes: int = 0
    iterations: int = 0
    sse: float = 0.0
    seconds: float = 0.0
    init_seconds: float = 0.0
    objective: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    k_used: int = 0
    aborted: bool = False
    metric_sse: float | None = None

    @property
    def empty_total(self) -> int:
        """Empty clusters met over all iterations (sum of ``empty_per_iter``)."""
        return sum(self.empty_per_iter)

    @property
    def seconds_per_iter(self) -> float:
        """Loop time per iteration, init excluded (0 when no iteration ran)."""
        if self.iterations == 0:
            return 0.0
        return (self.seconds - self.init_seconds) / self.iterations

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict, derived fields included."""
        out = asdict(self)
        out["empty_total"] = self.empty_total
        out["seconds_per_iter"] = self.seconds_per_iter
        return out


@dataclass
class KMeansResult:
    """Codebook and codes of one clustering run.

    Attributes:
        centroids: ``(k, d)`` float32 codebook, or ``(k_used, d)`` after compaction.
        codes: ``(n,)`` int64 index of each point's centroid.
        stats: What the run did.
    """

    centroids: torch.Tensor
    codes: torch.Tensor
    stats: KMeansStats

    def decode(self) -> torch.Tensor:
        """Reconstructed points ``centroids[codes]``, shape ``(n, d)``."""
        return self.centroids[self.codes]


@dataclass
class ClusterInput:
    """A validated clustering problem, as every method receives it.

    Attributes:
        x: ``(n, d)`` points in the caller's dtype (fairseq-em runs in it).
        x32: The same points as contiguous float32 (what every other method uses).
        weights: ``(n,)`` float32 weights or None.
        k: Number of centroids.
        n_iter: Maximum Lloyd iterations.
        seed: Seed of the run's ``torch.Generator``.
        backend: Assignment backend name (``auto`` resolved by the method).
        t0: ``time.perf_counter()`` when the call started.
        metric: A per-group metric (activation-aware clustering), or None for Euclidean.
    """

    x: torch.Tensor
    x32: torch.Tensor
    weights: torch.Tensor | None
    k: int
    n_iter: int
    seed: int
    backend: str
    t0: float
    metric: BlockMetric | None = None

    def generator(self) -> torch.Generator:
        """A fresh generator seeded with the run's seed (CPU; draws are moved as needed)."""
        return torch.Generator().manual_seed(self.seed)

    def new_stats(self, method: str, backend: str) -> KMeansStats:
        """Empty stats for this problem."""
        n, d = self.x32.shape
        return KMeansStats(method=method, backend=backend, n=n, d=d, k=self.k, n_distinct=n)
