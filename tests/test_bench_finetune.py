"""`bench finetune`'s pure parts: the gap measure, the targets, the markdown section."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from dist_pgkm.bench import finetune  # type: ignore[import-not-found, unused-ignore]

from dist_pgkm.config.finetune import load_finetune_config
from dist_pgkm.config.quantize import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _row(method: str, preset: str, ppl: float, **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m", "method": method, "preset": preset, "ppl": ppl, **extra}


def test_gap_closed_is_the_share_of_the_log_gap() -> None:
    # original 10, one-shot 10_000: staged at 100 is half-way on a log scale.
    assert finetune.gap_closed(10.0, 10_000.0, 100.0) == pytest.approx(2 / 3)
    assert finetune.gap_closed(10.0, 1000.0, 100.0) == pytest.approx(0.5)
    assert finetune.gap_closed(10.0, 1000.0, 10.0) == pytest.approx(1.0)
    assert finetune.gap_closed(10.0, 1000.0, 2000.0) < 0  # worse than one-shot
    assert finetune.gap_closed(10.0, 10.0, 9.0) == math.inf  # no gap to close


def test_targets_follow_the_rows() -> None:
    staged = {"seconds": 1700.0, "train_steps": 260, "tokens_per_second": 250.0}
    rows = [
        _row("original", "-", 17.2),
        _row("one-shot", "ipq", 1.0e6),
        _row("staged", "ipq", 4000.0, **staged),
        _row("one-shot", "3bit", 89.0),
        _row("staged", "3bit", 26.0, **{**staged, "seconds": 1900.0}),
    ]
    targets = {t.id: t for t in finetune.compute_targets(rows)}
    gap = (math.log(1e6) - math.log(4000)) / (math.log(1e6) - math.log(17.2))
    assert targets["gap"].measured == pytest.approx(gap, abs=1e-3)
    assert targets["gap"].met is True  # 0.50 of the gap: sqrt(1e6 * 17.2) = 4147 > 4000
    assert targets["3bit"].measured == pytest.approx(26.0 / 17.2, abs=1e-3)
    assert targets["3bit"].met is False  # 1.512 > 1.5
    assert targets["budget:ipq"].met is True
    assert targets["budget:3bit"].met is False
    quick = finetune.compute_targets(rows, quick=True)
    assert all(t.met is None for t in quick)  # a smoke run judges nothing


def test_presets_pair_up_at_the_same_bits() -> None:
    for pair in finetune.PAIRS.values():
        staged = load_finetune_config(CONFIGS / pair.finetune)
        assert staged.quantize == load_config(CONFIGS / pair.quantize), pair.name


def test_markdown_section_has_every_row() -> None:
    report = finetune.FinetuneBenchReport(
        mode="full", command="dist-pgkm bench finetune", machine={}, commit="abc", date="now"
    )
    report.rows = [_row("original", "-", 17.2, bits_per_weight=32.0), _row("one-shot", "ipq", 1e6)]
    report.targets = finetune.compute_targets(report.rows)
    text = finetune.markdown_section(report)
    assert "| ipq | one-shot |" in text
    assert "1,000,000.0" in text
