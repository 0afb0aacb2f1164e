"""The remaining-time estimate: from remaining work, robust to a slow first layer."""

from __future__ import annotations

import pytest

from dist_pgkm.distributed.eta import CostModel, remaining_seconds


def test_a_slow_first_layer_does_not_set_the_estimate() -> None:
    # Layers cost 1, 2, 4 units at 10 s per unit; the first one took 30x longer (warm-up).
    done = [(4.0, 1200.0), (2.0, 20.0), (1.0, 10.0), (2.0, 21.0)]
    remaining = [4.0, 4.0, 1.0]
    eta = remaining_seconds(done, remaining)
    assert eta == pytest.approx(10.25 * 9.0, rel=0.05)  # median ratio ~10 s per unit
    # Extrapolating the first layer would say 1200 s per 4 units -> 2700 s.
    assert eta is not None
    assert eta < 0.05 * (1200.0 / 4.0 * 9.0)


def test_workers_cost_model_and_nothing_done() -> None:
    model = CostModel(seconds_per_mac=2.0, seconds_per_job=1.0)
    assert remaining_seconds([], [3.0, 5.0], workers=2, model=model) == pytest.approx(9.0)
    assert remaining_seconds([], [3.0, 5.0]) is None  # no fit and nothing measured
    assert remaining_seconds([(3.0, 14.0)], [], model=model) == 0.0
    # Measured twice as slow as the model predicts: the estimate doubles.
    assert remaining_seconds([(3.0, 14.0)], [5.0], model=model) == pytest.approx(22.0)
