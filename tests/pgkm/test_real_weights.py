"""PG k-means on real SmolLM2-135M weights against the baselines (SSE and empty clusters)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import dist_pgkm
from dist_pgkm.models.offline import smollm2_dir
from dist_pgkm.pq import to_subvectors

from ..conftest import with_zero_blocks


@pytest.fixture(scope="module")
def k_proj() -> torch.Tensor:
    with safe_open(str(smollm2_dir() / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.k_proj.weight")  # (192, 576)
    return to_subvectors(weight, 8)  # (13824, 8)


@pytest.mark.parametrize("variant", ["clean", "fp16", "zero50"])
def test_pgkm_matches_the_best_baseline_without_empty_clusters(
    k_proj: torch.Tensor, variant: str
) -> None:
    x = {
        "clean": k_proj,
        "fp16": k_proj.half(),
        "zero50": with_zero_blocks(k_proj, 0.5, seed=0),
    }[variant]
    pg = dist_pgkm.cluster(x, 256, seed=1, backend="torch")
    baselines = {
        m: dist_pgkm.cluster(x, 256, method=m, seed=1, backend="torch")
        for m in ("fairseq-em", "kmeans++")
    }
    best = min(r.stats.sse for r in baselines.values())
    assert pg.stats.empty_total == 0
    assert pg.stats.empty_final == 0
    # Measured 0.989-0.999 of the best baseline on these sets; 1.005 is the bar.
    assert pg.stats.sse <= 1.005 * best
    if variant != "clean":  # where iPQ's k-means gives up (fp16 split vanishes, zero blocks)
        assert baselines["fairseq-em"].stats.aborted
        assert pg.stats.sse < 0.9 * baselines["fairseq-em"].stats.sse
