"""The PTQ benchmark's own arithmetic: the RTN baseline and the targets computed from rows."""

from __future__ import annotations

import pytest
import torch
from dist_pgkm.bench.ptq import (  # type: ignore[import-not-found, unused-ignore]
    PPL_NOISE,
    compute_targets,
    rtn_dequantize,
)


def test_rtn_matches_its_definition_and_its_bits() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=g)
    w[0, :64] = 3.0  # a constant group: scale 0 must not divide by zero
    for bits in (2, 3, 4):
        q = rtn_dequantize(w, bits)
        groups, qg = w.reshape(-1, 64), q.reshape(-1, 64)
        for row, qrow in zip(groups, qg, strict=True):
            low = row.min().half().float()
            scale = ((row.max() - low) / (2**bits - 1)).half().float()
            codes = ((row - low) / scale).round().clamp(0, 2**bits - 1) if scale > 0 else 0 * row
            ref = codes * scale + low
            assert torch.equal(qrow, ref)
            assert qrow.unique().numel() <= 2**bits  # at most 2^bits levels per group
        assert torch.allclose(q[0, :64], w[0, :64], atol=1e-3)
    errors = [float((rtn_dequantize(w, b) - w).pow(2).mean()) for b in (2, 3, 4)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # ~4x less error per extra bit
    with pytest.raises(ValueError, match="not a multiple of the group size 64"):
        rtn_dequantize(torch.zeros(4, 96), 4)


def _row(method: str, ppl: float, preset: str = "ptq-4bit", **extra: object) -> dict[str, object]:
    return {"model": "smollm2-135m", "preset": preset, "method": method, "ppl": ppl, **extra}


def test_targets_follow_the_rows() -> None:
    rows = [
        _row("pgkm", 100.0, quantize_s=150.0, peak_rss_bytes=1.2e9),
        _row("faiss", 100.0 * (1 + PPL_NOISE / 2), peak_rss_bytes=1.0e9),
        _row("fairseq-em", 300.0),
        _row("pgkm", 52.0, preset="ptq-3bit", peak_rss_bytes=2.5e9),
        _row("kmeans++", 50.0, preset="ptq-3bit"),
        {"model": "minilm-l6", "preset": "ptq-4bit", "method": "pgkm", "top1": 0.20},
        {"model": "minilm-l6", "preset": "ptq-4bit", "method": "faiss", "top1": 0.215},
    ]
    targets = {t.id: t for t in compute_targets(rows)}
    four = targets["ppl:smollm2-135m:ptq-4bit"]
    assert four.met is True  # a tie within the noise band counts
    assert four.measured == pytest.approx(1 / (1 + PPL_NOISE / 2), abs=1e-4)
    assert targets["ppl:smollm2-135m:ptq-3bit"].met is False  # 52 > 50 * 1.02
    assert targets["ppl:minilm-l6:ptq-4bit"].met is False  # 1.5 points of top-1 behind
    assert targets["time"].met is True
    assert targets["time"].measured == 150.0
    assert targets["rss"].met is False  # the worst run counts
