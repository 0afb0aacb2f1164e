"""Seeds derived from names, so that per-layer randomness does not depend on the order of work."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(run_seed: int, name: str) -> int:
    """A seed for ``name`` within a run: 63 bits of ``sha256(f"{run_seed}:{name}")``.

    The same (run seed, name) always gives the same seed, whatever else the run does; it is the
    formula of the per-layer clustering seeds (``dist_pgkm.distributed.plan.layer_seed``).
    """
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
