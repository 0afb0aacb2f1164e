"""Pure tensor math for k-means: assignment backends, the Lloyd loop, baselines, statistics."""

from dist_pgkm.kmeans.assign import Assigner, make_assigner
from dist_pgkm.kmeans.compact import compact
from dist_pgkm.kmeans.result import KMeansResult, KMeansStats

__all__ = ["Assigner", "KMeansResult", "KMeansStats", "compact", "make_assigner"]
