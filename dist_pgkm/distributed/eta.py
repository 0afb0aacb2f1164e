"""Remaining time of a quantize run from the remaining work, not from the first layer.

A layer's time is predicted by a cost model ``seconds = a * macs + c`` (``macs`` = the plan's
``est_cost``, ``n_blocks * K * bs * n_iter`` multiply-adds of its distance passes; ``a`` and
``c`` as ``bench scaling`` fits them, or ``a = 1, c = 0`` without a fit). The machine's
actual speed is the *median* over finished layers of measured / predicted time, so one slow
layer (the first one, which also pays warm-up; a layer run beside a busy neighbour) moves the
estimate little, where extrapolating the first layer's time to the rest of the run said
"10 h" for a run of ~1 h (issue 17). Pure: no Ray, no clock.
:class:`~dist_pgkm.distributed.progress.RunTracker` shows it while a run quantizes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PLAIN_FIT", "CostModel", "remaining_seconds"]


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one layer: ``seconds_per_mac * macs + seconds_per_job``.

    Attributes:
        seconds_per_mac: Time per multiply-add of the distance passes (``bench scaling``'s
            ``seconds_per_mac``); only its ratio to ``seconds_per_job`` matters here.
        seconds_per_job: Fixed time per layer (read, write, compaction).
    """

    seconds_per_mac: float = 1.0
    seconds_per_job: float = 0.0

    def predict(self, macs: float) -> float:
        """Predicted seconds of a layer of ``macs`` multiply-adds."""
        return self.seconds_per_mac * macs + self.seconds_per_job


PLAIN_FIT = CostModel(seconds_per_mac=1.59e-10, seconds_per_job=0.407)
"""``bench scaling``'s fit (docs/scaling.md: SmolLM2-135M, ptq-4bit, one thread, R^2 0.967).

A run's ETA uses its shape only (how much a small layer costs beside a large one: the fixed
``seconds_per_job`` weighs on small layers); the scale comes from the run's own finished
layers, so another machine, preset or load changes the figures, not the estimate's honesty.
"""


def remaining_seconds(
    done: Sequence[tuple[float, float]],
    remaining: Sequence[float],
    workers: int = 1,
    model: CostModel | None = None,
) -> float | None:
    """Estimated seconds until every remaining layer is done.

    Args:
        done: ``(macs, seconds)`` of every finished layer (seconds a worker spent on it).
        remaining: ``macs`` of every layer not finished yet (running ones included).
        workers: Layers run at once.
        model: The cost model; None predicts by multiply-adds alone.

    Returns:
        ``median(measured / predicted) * sum(predicted remaining) / workers``; with a fitted
        model and no finished layer yet, the model's own prediction; None when nothing
        finished and no fitted model is given (there is no honest number to show).
    """
    cost = model or CostModel()
    predicted = sum(cost.predict(m) for m in remaining)
    if not remaining:
        return 0.0
    ratios = [s / cost.predict(m) for m, s in done if cost.predict(m) > 0]
    if not ratios:
        return None if model is None else predicted / max(1, workers)
    return statistics.median(ratios) * predicted / max(1, workers)
