"""dist-pgkm: iterative product quantization with Partitioning-Guided k-means.

``import dist_pgkm`` is light: it imports torch and pydantic, never ray, deepspeed or faiss,
and never initialises CUDA.
"""

from dist_pgkm.errors import DistPGKMError
from dist_pgkm.kmeans.types import KMeansResult, KMeansStats
from dist_pgkm.pgkm.api import cluster

__version__ = "0.1.0"

__all__ = ["DistPGKMError", "KMeansResult", "KMeansStats", "__version__", "cluster"]
