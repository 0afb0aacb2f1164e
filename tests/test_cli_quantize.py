"""`dist-pgkm quantize / inspect / eval / export-dense` run as a user runs them, on real models.

SmolLM2-135M (tied embeddings) with its embedding and two layers quantized, so that the whole
path -- quantize, report, inspect, load with transformers, generate, evaluate, export -- runs
on the real model in well under a minute.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import dist_pgkm
from dist_pgkm.eval import load_text, perplexity, token_windows

from .conftest import run_cli

CONFIG = """\
version: 1
n_iter: 6
rules:
  - match: model.embed_tokens
    block_size: 8
    k: 256
  - match: ["model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    block_size: 4
    k: 512
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("cli")
    (work / "cfg.yaml").write_text(CONFIG)
    out = work / "out"
    result = run_cli(
        "quantize", "smollm2-135m", "--config", str(work / "cfg.yaml"), "--out", str(out),
        "--json", str(work / "summary.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result


def test_quantize_prints_and_reports_the_run(
    run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, result = run
    assert "3 layers quantized with pgkm (0 resumed, 0 redone), 0 skipped, 208 kept in float" in (
        result.stdout
    )
    report = json.loads((out / "report.json").read_text())
    layers = {x["name"]: x for x in report["checkpoint"]["layers"]}
    assert set(layers) == {
        "model.embed_tokens",
        "model.layers.3.mlp.down_proj",
        "model.layers.3.self_attn.q_proj",
    }
    embed = layers["model.embed_tokens"]
    assert embed["tied"] == ["lm_head"]
    # 49152 x 576 at bs 8, K 256: 8 bits per 8 weights plus a 256 x 8 fp16 codebook.
    assert embed["bits_per_weight"] == pytest.approx(
        (49152 * 72 * 8 + 256 * 8 * 16) / (49152 * 576)
    )
    assert embed["empty_final"] == 0
    assert 0.0 < embed["rel_sse"] < 0.5
    assert (out / "report" / "layer_error.png").stat().st_size > 10_000
    assert (out / "report" / "empty_clusters.png").stat().st_size > 10_000


def test_inspect_table_and_json(
    run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    out, _ = run
    result = run_cli("inspect", str(out), "--json", str(tmp_path / "i.json"))
    assert result.returncode == 0, result.stderr
    assert "model.embed_tokens (+lm_head)" in result.stdout
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["params"] == 134_515_008  # SmolLM2-135M, the tied head counted once
    assert info["quantized_params"] == 49152 * 576 + 576 * 1536 + 576 * 576


def test_loaded_model_is_tied_generates_and_matches_its_decoded_weights(
    run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run
    model = AutoModelForCausalLM.from_pretrained(out)  # through the registered quantizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    embed = model.model.embed_tokens
    assert type(embed).__name__ == "PQEmbedding"
    assert model.lm_head.centroids is embed.centroids
    dense = dist_pgkm.load(out, dense=True)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-4)
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, dense.generate(ids, max_new_tokens=4, do_sample=False))
    windows = token_windows(tokenizer, load_text(), n_tokens=1024)
    ppl = perplexity(model, windows).ppl
    assert ppl == pytest.approx(perplexity(dense, windows).ppl, rel=1e-4)
    # The tied embedding / LM head at 1 bit/weight is the most fragile matrix there is: the
    # perplexity rises from ~17 to ~25,000 here (issue 7 measured ~135,000 on another text).
    assert 1_000 < ppl < 1e6


def test_eval_and_export_dense(
    run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    out, _ = run
    result = run_cli("eval", str(out), "--tokens", "1024", "--json", str(tmp_path / "q.json"))
    assert result.returncode == 0, result.stderr
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["quantized"] is True
    assert q["n_tokens"] == 2 * 511
    dense = tmp_path / "dense"
    result = run_cli("export-dense", str(out), str(dense))
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", str(dense), "--tokens", "1024", "--json", str(tmp_path / "d.json"))
    assert result.returncode == 0, result.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["quantized"] is False
    assert d["ppl"] == pytest.approx(q["ppl"], rel=1e-4)


def test_user_errors_exit_2_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("rules:\n  - match: x\n    blocksize: 4\n    k: 16\n")
    result = run_cli(
        "quantize",
        "minilm-l6",
        "--config",
        str(tmp_path / "typo.yaml"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert "rules.0.blocksize: unknown key (a typo?)" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "quantize",
        str(tmp_path / "missing"),
        "--config",
        str(tmp_path / "typo.yaml"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert "not a dist-pgkm checkpoint" in result.stderr
    result = run_cli(
        "quantize", "minilm-l6", "--config", "x.yaml", "--out", "o", "--max-shard-size", "lots"
    )
    assert result.returncode == 2
    assert "expected a size such as 5GB" in result.stderr
