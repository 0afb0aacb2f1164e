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
    sizes = [(1e9, 100_000), (4e9, 1_000_000), (2e8, 3_000_000)]
    jobs = [_job(f"l{i}", cost, n) for i, (cost, n) in enumerate(sizes)]
    seconds = {j.name: 2e-9 * j.est_cost + 0.3 for j in jobs}
    fit = scaling.fit_cost_model(jobs, seconds)
    assert fit["seconds_per_mac"] == pytest.approx(2e-9, rel=1e-9)
    assert fit["seconds_per_job"] == pytest.approx(0.3, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["total_relative_error"] == pytest.approx(0.0, abs=1e-12)
    # Distance passes at 1e9 multiply-adds/s: half of a; the other half per weight (K 256, 15 it).
    split = scaling.split_cost_model(fit, 1e9, k=256, n_iter=15)
    assert split["distance_share"] == pytest.approx(0.5)
    assert split["seconds_per_weight"] == pytest.approx(1e-9 * 256 * 15)


def test_cost_model_never_goes_negative() -> None:
    # Time falls as cost grows: the two-term fit would give a < 0.
    jobs = [_job("a", 1e9, 10), _job("b", 2e9, 10), _job("c", 3e9, 10)]
    seconds = {"a": 3.0, "b": 2.0, "c": 1.0}
    fit = scaling.fit_cost_model(jobs, seconds)
    assert fit["seconds_per_mac"] == 0.0
    assert fit["seconds_per_job"] == pytest.approx(2.0)


def test_distance_pass_rate_is_measured() -> None:
    rate = scaling.distance_pass_rate(2, 256, n=1 << 16)
    assert 1e7 < rate < 1e12  # multiply-adds per second on one core, a plausible range


def test_lpt_makespan() -> None:
    assert scaling.lpt_makespan([3, 3, 2, 2, 2], 2) == 7  # LPT's known 7/6 case
    assert scaling.lpt_makespan([5, 1, 1], 3) == 5  # the longest job bounds it
    assert scaling.lpt_makespan([1] * 8, 4) == 2


def test_projection_counts_the_distance_work_of_every_weight() -> None:
    fit = {"seconds_per_weight": 0.0, "seconds_per_job": 0.0}
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


def test_big_run_and_report_on_a_small_llama(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1.1B step end to end (real CLI, 2 Ray workers) on a small shape, then the report."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")

    shape = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=512)
    monkeypatch.setitem(scaling.LLAMA_SHAPES, "TinyLlama-1.1B", shape)
    preset = scaling._CONFIGS / "ptq-4bit.yaml"
    big = scaling._big_run(tmp_path, preset)
    assert big["params"] == sum(math.prod(x.shape) for x in scaling.llama_layers(shape)) + 5 * 64
    assert big["layers"] == 7 * 2 + 2
    assert len(big["worker_peak_rss_bytes"]) == 2
    assert 0 < big["driver_peak_rss_bytes"] < 3e9
    assert 4.0 < big["bits_per_weight"] < 6.0  # 8-bit codes per 2 weights + fp16 codebooks
    assert not (tmp_path / "llama-1.1b").exists()  # the 2 GB source is not left behind

    big["predicted_quantize_seconds"] = 1.0
    report = scaling.ScalingReport("full", "cmd", {}, None, "today", "ptq-4bit", big=big)
    report.runs = [
        {**big, "case": case, "seconds": s, "layer_seconds": {}}
        for case, s in (("in-process, 1 thread", 10.0), ("Ray, 1 worker x 1 CPU", 10.5),
                        ("Ray, 2 workers x 1 CPU", 6.0))
    ]  # fmt: skip
    targets = {t.id: t for t in scaling.compute_targets(report)}
    assert (targets["1"].measured, targets["1"].met) == (1.05, True)
    assert (targets["2"].measured, targets["2"].met) == (1.75, True)
    assert targets["3"].met is True
    assert targets["4"].met is True
    text = scaling.markdown_section(report)
    assert "1.1B-parameter Llama-shaped checkpoint" in text
