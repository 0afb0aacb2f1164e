"""`bench scaling`'s pure parts: Llama shapes, the written checkpoint, the cost model, LPT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dist_pgkm.bench import scaling  # type: ignore[import-not-found, unused-ignore]

from dist_pgkm.distributed.plan import LayerJob

# Published parameter counts (Hugging Face model cards / safetensors index totals / 2 bytes).
PUBLISHED = {
    "TinyLlama-1.1B": 1_100_048_384,
    "Llama-2-7B": 6_738_415_616,
    "Llama-2-70B": 68_976_648_192,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_llama_layers_add_up_to_the_published_parameter_counts(name: str) -> None:
    shape = scaling.LLAMA_SHAPES[name]
    layers = scaling.llama_layers(shape)
    norms = (2 * shape["layers"] + 1) * shape["hidden"]  # RMSNorm weights are not quantized
    assert sum(math.prod(layer.shape) for layer in layers) + norms == PUBLISHED[name]
    assert len(layers) == 7 * shape["layers"] + 2


def test_written_checkpoint_is_what_find_layers_sees(tmp_path: Path) -> None:
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.source import open_source

    shape = dict(hidden=64, inter=96, layers=3, heads=4, kv=2, vocab=200)
    params = scaling.write_llama_checkpoint(tmp_path, shape, shard_bytes=40_000)
    source = open_source(tmp_path)
    assert len(source.files) > 1  # sharded, with an index
    found = [(x.name, x.kind, x.shape) for x in find_layers(source)]
    expected = [(x.name, x.kind, x.shape) for x in scaling.llama_layers(shape)]
    assert sorted(found) == sorted(expected)
    assert params == sum(math.prod(s) for _, _, s in expected) + (2 * 3 + 1) * 64
    w = source.read("model.layers.1.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16
    assert float(w.float().std()) == pytest.approx(0.02, rel=0.05)


def _job(name: str, cost: float, n: int) -> LayerJob:
    return LayerJob(name, "linear", name, (n,), 1, 2, 0, (), cost)


def test_cost_model_recovers_both_terms() -> None:
    jobs = [
        _job(f"l{i}", cost, n) for i, (cost, n) in enumerate([(1e9, 1e5), (4e9, 1e6), (2e8, 3e6)])
    ]
    seconds = {j.name: 2e-9 * j.est_cost + 5e-7 * j.n_weights for j in jobs}
    fit = scaling.fit_cost_model(jobs, seconds)
    assert fit["seconds_per_mac"] == pytest.approx(2e-9, rel=1e-9)
    assert fit["seconds_per_weight"] == pytest.approx(5e-7, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["macs_per_second"] == pytest.approx(5e8)


def test_cost_model_never_goes_negative() -> None:
    # Time falls as weights grow at equal cost: the two-term fit would give b < 0.
    jobs = [_job("a", 1e9, 10), _job("b", 2e9, 1_000_000), _job("c", 3e9, 5)]
    seconds = {"a": 1.0, "b": 1.9, "c": 3.0}
    fit = scaling.fit_cost_model(jobs, seconds)
    assert fit["seconds_per_mac"] > 0
    assert fit["seconds_per_weight"] == 0.0


def test_lpt_makespan() -> None:
    assert scaling.lpt_makespan([3, 3, 2, 2, 2], 2) == 7  # LPT's known 7/6 case
    assert scaling.lpt_makespan([5, 1, 1], 3) == 5  # the longest job bounds it
    assert scaling.lpt_makespan([1] * 8, 4) == 2


def test_projection_counts_the_distance_work_of_every_weight() -> None:
    fit = {"seconds_per_weight": 0.0}
    rows = scaling.project(fit, n_iter=15)
    row = next(
        r
        for r in rows
        if r["model"] == "Llama-2-7B" and r["preset"].startswith("ptq-4bit") and "64" in r["gpus"]
    )
    quantized = PUBLISHED["Llama-2-7B"] - (2 * 32 + 1) * 4096
    # blocks x K x bs x n_iter = weights x K x n_iter
    assert row["tera_macs"] == pytest.approx(quantized * 256 * 15 / 1e12, rel=1e-12)
    rate = scaling.GPU_PEAK_FP32_FLOPS["A100"] / 2 * scaling.GPU_EFFICIENCY
    lm_head = 32000 * 4096
    assert row["longest_job_seconds"] == pytest.approx(
        lm_head * 256 * 15 / rate + lm_head * 2 / scaling.READ_BYTES_PER_S
    )
    assert row["wall_seconds"] >= row["tera_macs"] * 1e12 / rate / 64
