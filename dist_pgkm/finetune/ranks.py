"""This process's rank in the training group, and what only rank 0 does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dist_pgkm.errors import DistPGKMError, DistributedError

__all__ = ["Ranks"]


class Ranks:
    """This process's rank in the training group, and what only rank 0 does.

    Rank 0 alone writes to the output directory (state, quantize phases, stage weights, the
    merged checkpoint); the other ranks wait for it and share its result, or its error, so that
    a failure on rank 0 stops every rank at once instead of leaving them in a collective.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def on_leader(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; every rank returns its result or raises its error."""
        result: Any = None
        error: BaseException | None = None
        if self.leader:
            try:
                result = fn()
            except Exception as exc:  # shared with the other ranks, then re-raised here
                error = exc
        if self.world > 1:
            import torch.distributed as dist

            shared = [(result, _shareable(error))]
            dist.broadcast_object_list(shared, src=0)
            result, other_error = shared[0]
            if not self.leader:
                error = other_error
        if error is not None:
            raise error
        return result

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks."""
        return self._reduce(value, "sum") / self.world

    def max(self, value: float) -> float:
        """The largest ``value`` of any rank."""
        return self._reduce(value, "max")

    def _reduce(self, value: float, op: str) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(t.item())


def _shareable(error: BaseException | None) -> BaseException | None:
    """``error`` itself when it is one of ours (they pickle), else a DistributedError naming it."""
    if error is None or isinstance(error, DistPGKMError):
        return error
    return DistributedError(f"rank 0 failed: {type(error).__name__}: {error}")
