"""dist-pgkm: iterative product quantization with Partitioning-Guided k-means.

``import dist_pgkm`` is light: it imports torch and pydantic, never ray, deepspeed, faiss or
transformers, and never initialises CUDA. It does make transformers able to load dist-pgkm
checkpoints (``AutoModel*.from_pretrained(DIR)``), through an import hook that registers the
``pgkm`` quantizer when transformers first needs it (:mod:`dist_pgkm.checkpoint.hf_hook`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Before anything imports torch: idle OpenMP threads must sleep, not spin (utils/threads.py).
from dist_pgkm.utils.threads import passive_wait

passive_wait()

from dist_pgkm.checkpoint.hf_hook import install as _install_transformers_hook  # noqa: E402
from dist_pgkm.errors import DistPGKMError  # noqa: E402
from dist_pgkm.kmeans.result import KMeansResult, KMeansStats  # noqa: E402
from dist_pgkm.pgkm.api import cluster  # noqa: E402

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from dist_pgkm.pq.infer import Forward

__version__ = "0.1.0"

__all__ = ["DistPGKMError", "KMeansResult", "KMeansStats", "__version__", "cluster", "load"]


def load(
    path: str | os.PathLike[str],
    dense: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool | None = None,
    forward: Forward = "codes",
) -> PreTrainedModel:
    """Load a dist-pgkm checkpoint directory as its transformers model.

    See :func:`dist_pgkm.checkpoint.hf.load` (imported on first call: it needs transformers).
    ``verify`` (default on, ``DIST_PGKM_VERIFY=0`` turns it off) checks the model files'
    sha256 against the run's record first.
    """
    from dist_pgkm.checkpoint.hf import load as load_checkpoint

    return load_checkpoint(
        path, dense=dense, dtype=dtype, device=device, verify=verify, forward=forward
    )


_install_transformers_hook()
