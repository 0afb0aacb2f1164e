"""Lazy imports of heavy optional dependencies, with an actionable error when missing."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from dist_pgkm.errors import BackendUnavailableError

__all__ = ["faiss_available", "faiss_num_gpus", "import_faiss", "set_threads"]


@cache
def import_faiss() -> ModuleType:
    """Import faiss on first use.

    Raises:
        BackendUnavailableError: faiss is not installed.
    """
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise BackendUnavailableError(
            "faiss is not installed, so the faiss backend and method='faiss' are unavailable. "
            "Install it with `pip install 'dist-pgkm[cpu]'` (or `[gpu]` on a CUDA machine; never "
            "both, they overwrite each other), or use backend='torch'."
        ) from exc


def faiss_available() -> bool:
    """Whether faiss can be imported (imports it on success)."""
    try:
        import_faiss()
    except BackendUnavailableError:
        return False
    return True


def faiss_num_gpus() -> int:
    """Number of GPUs faiss can use; 0 when faiss is absent or CPU-only."""
    if not faiss_available():
        return 0
    get = getattr(import_faiss(), "get_num_gpus", None)
    return int(get()) if get is not None else 0


def set_threads(n: int) -> None:
    """Use ``n`` threads for torch's CPU kernels and, when installed, faiss's OpenMP loops
    (see :func:`dist_pgkm.utils.threads.set_threads`, where the thread logic lives)."""
    from dist_pgkm.utils.threads import set_threads as size_pools

    size_pools(n)
