"""Differentiable clusterers trained inside fine-tuning: DKM, IDKM, IDKM-JFB and LR²VQ.

See :mod:`dist_pgkm.dkm.functional` and DESIGN.md §5.
"""

from dist_pgkm.dkm.functional import (
    Method,
    SolverStats,
    centroid_step,
    centroid_step_chunked,
    hard_assign,
    soft_assignment,
    soft_kmeans,
    soft_weight,
    sq_distances,
)

__all__ = [
    "Method",
    "SolverStats",
    "centroid_step",
    "centroid_step_chunked",
    "hard_assign",
    "soft_assignment",
    "soft_kmeans",
    "soft_weight",
    "sq_distances",
]
