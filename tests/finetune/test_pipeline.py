"""Staged iPQ end to end on SmolLM2-135M: quantize, fine-tune, merge, load; killed and resumed.

Real model, real text (WordNet glosses), real DeepSpeed engine (ZeRO 0, fp32, gloo on CPU).
To keep it short, the quantize config selects the first two blocks only and each stage runs a
few steps on short sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "deepspeed", reason="DeepSpeed is not installed: pip install 'dist-pgkm[finetune]'"
)

from dist_pgkm.config.finetune import load_finetune_config
from dist_pgkm.errors import CheckpointError, ConfigError

from ._runs import kill_at

CONFIG = {
    "seed": 0,
    "quantize": {
        "n_iter": 3,
        "rules": [
            {"match": r"re:model\.layers\.[01]\.mlp\..*", "block_size": 8, "k": 64},
            {"match": r"re:model\.layers\.[01]\.self_attn\..*", "block_size": 4, "k": 64},
        ],
    },
    "stages": [
        {"name": "mlp", "match": r"re:.*\.mlp\..*", "steps": 4},
        {"name": "attention", "match": r"re:.*\.self_attn\..*", "steps": 4},
    ],
    "train": {"batch_size": 2, "seq_len": 32, "lr": 1e-4, "centroid_lr": 1e-3},
    "noise": {"p": 0.1, "mode": "drop"},
    "deepspeed": {"zero_stage": 0, "dtype": "fp32", "checkpoint_every": 2},
}
CHECKPOINT_FILES = ("model.safetensors", "config.json")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_pgkm.cli", "finetune", *args]


def _env() -> dict[str, str]:
    """This environment without the process-group variables other tests' engines set."""
    from dist_pgkm.finetune.engine import _LAUNCHER_ENV

    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "finetune.yaml"
    path.write_text(json.dumps(CONFIG))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, config_file: Path) -> Path:
    """An uninterrupted run through the CLI."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = out.parent / "summary.json"
    run = subprocess.run(
        _cli(
            "smollm2-135m", "--config", str(config_file), "--out", str(out), "--json", str(summary)
        ),
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_staged_run_trains_and_loads(reference: Path) -> None:
    import dist_pgkm
    from dist_pgkm.pq.modules import PQModule

    summary = json.loads((reference.parent / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["mlp"]["layers"] == 6
    assert stages["attention"]["layers"] == 8
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    assert (reference / "report" / "loss.png").is_file()
    assert not (reference / "deepspeed").exists()  # deleted once merged: nothing resumes from it
    model = dist_pgkm.load(reference)
    pq = {n for n, m in model.named_modules() if isinstance(m, PQModule)}
    assert len(pq) == 14
    assert "model.layers.1.self_attn.v_proj" in pq
    assert "model.layers.2.mlp.up_proj" not in pq
    ids = torch.tensor([[1, 504, 3287, 28, 253, 2137, 30]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # The fine-tuned codebooks are not the one-shot ones: training moved them.
    stage_shard = reference / "stages" / "0-mlp" / "quantize" / "shards"
    assert stage_shard.is_dir()
    from dist_pgkm.checkpoint.shard import read_shard

    one_shot, _ = read_shard(stage_shard / "model.layers.0.mlp.up_proj.safetensors")
    final, _ = read_shard(reference / "shards" / "model.layers.0.mlp.up_proj.safetensors")
    key = "model.layers.0.mlp.up_proj.centroids"
    assert not torch.equal(one_shot[key], final[key])


@pytest.mark.slow  # ~95 s on 2 quiet cores: a killed staged run and its resume
def test_killed_run_resumes_to_the_same_bytes(
    tmp_path: Path, config_file: Path, reference: Path
) -> None:
    out = tmp_path / "out"
    cmd = _cli("smollm2-135m", "--config", str(config_file), "--out", str(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    kill_at(proc, out, stage=1, step=2)  # stage 1 (attention) has a checkpoint at step 2
    assert not (out / "model.safetensors").exists()

    rerun = subprocess.run(
        [*cmd, "--resume", "--json", str(tmp_path / "summary.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == {"stage": 1, "phase": "train"}
    for name in CHECKPOINT_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_bad_input(tmp_path: Path, reference: Path) -> None:
    from dist_pgkm.finetune.pipeline import finetune_model
    from dist_pgkm.models.offline import smollm2_dir

    ids = torch.arange(20_000) % 1000
    config = load_finetune_config(CONFIG)
    with pytest.raises(CheckpointError, match="holds another fine-tuning run"):
        finetune_model(smollm2_dir(), config, reference, ids)
    with pytest.raises(CheckpointError, match="no fine-tuning run to resume"):
        finetune_model(smollm2_dir(), config, tmp_path / "new", ids, resume=True)
    bad = load_finetune_config(
        {**CONFIG, "stages": [*CONFIG["stages"], {"name": "x", "match": "nothing"}]}
    )  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="stage x matches no layer"):
        finetune_model(smollm2_dir(), bad, tmp_path / "x", ids)
