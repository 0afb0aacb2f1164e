"""Product quantization of weights: the sub-vector layout (and, later, PQ modules)."""

from dist_pgkm.pq.codec import from_subvectors, to_subvectors

__all__ = ["from_subvectors", "to_subvectors"]
