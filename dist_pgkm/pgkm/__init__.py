"""Partitioning-Guided k-means and the ``cluster()`` entry point."""

from dist_pgkm.pgkm.api import METHODS, cluster
from dist_pgkm.pgkm.pgkm import pg_kmeans

__all__ = ["METHODS", "cluster", "pg_kmeans"]
