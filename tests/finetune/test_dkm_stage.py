"""`dist-pgkm finetune` stages trained with IDKM, IDKM-JFB (on the embedding tied to the LM
head) and LR²VQ instead of iPQ: re-clustered, exported, loaded, killed in the LR²VQ stage and
resumed to the same bytes. Real SmolLM2 (two blocks and the embedding quantized), real text,
DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip(
    "deepspeed", reason="DeepSpeed is not installed: pip install 'dist-pgkm[finetune]'"
)

from dist_pgkm.checkpoint.shard import read_shard

from ._runs import kill_at

# ~440 s on 2 quiet cores: a four-stage DKM-family fine-tuning run, then a kill and resume
pytestmark = pytest.mark.slow

CONFIG: dict[str, Any] = {
    "seed": 0,
    "quantize": {
        "n_iter": 3,
        "rules": [
            {"match": r"re:model\.layers\.[01]\.mlp\..*", "block_size": 8, "k": 64},
            {"match": r"re:model\.layers\.[01]\.self_attn\..*", "block_size": 4, "k": 64},
            # 1.8M sub-vectors: a light k and few steps keep the stage to seconds.
            {"match": "model.embed_tokens", "block_size": 16, "k": 16},
        ],
    },
    "stages": [
        {
            "name": "mlp",
            "match": r"re:.*\.mlp\..*",
            "steps": 4,
            "method": "idkm",
            "dkm": {"tau": 1.0, "iters": 3, "chunk": 4096},
        },
        {
            "name": "embeddings",
            "match": "model.embed_tokens",
            "steps": 2,
            "method": "idkm-jfb",
            "dkm": {"tau": 1.0, "iters": 2, "chunk": 65536},
        },
        {
            "name": "attention",
            "match": r"re:.*\.self_attn\..*",
            "steps": 4,
            "method": "lr2vq",
            "dkm": {"tau": 1.0, "iters": 2, "chunk": 4096, "rank": "auto", "clusterer": "idkm"},
        },
    ],
    "train": {"batch_size": 2, "seq_len": 32, "lr": 1e-3, "centroid_lr": 1e-3},
    "noise": {"p": 0.1, "mode": "drop"},
    "deepspeed": {"zero_stage": 0, "dtype": "fp32", "checkpoint_every": 2},
}
LAYER = "model.layers.0.mlp.up_proj"
ATTENTION = "model.layers.1.self_attn.q_proj"
EMBED = "model.embed_tokens"  # tied to lm_head


def _env() -> dict[str, str]:
    from dist_pgkm.finetune.engine import _LAUNCHER_ENV

    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}


def _cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dist_pgkm.cli", "finetune", "smollm2-135m", "--config",
            str(config), "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dkmcfg") / "finetune.yaml"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, config_file: Path) -> Path:
    out = tmp_path_factory.mktemp("dkm") / "out"
    run = subprocess.run(
        [*_cmd(config_file, out), "--json", str(out.parent / "summary.json")],
        capture_output=True, text=True, timeout=900, env=_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_idkm_stage_reclusters_and_exports(reference: Path) -> None:
    import dist_pgkm
    from dist_pgkm.checkpoint.shard import decode_layer
    from dist_pgkm.pq.modules import PQModule

    summary = json.loads((reference.parent / "summary.json").read_text())
    assert [s["method"] for s in summary["stages"]] == ["idkm", "idkm-jfb", "lr2vq"]
    ranks = summary["stages"][2]["lr2vq_rank"]  # chosen per layer by the rule (block size 4)
    assert len(ranks) == 8
    assert set(ranks.values()) <= {1, 2, 4}, ranks
    for layer, stage in ((LAYER, "0-mlp"), (EMBED, "1-embeddings"), (ATTENTION, "2-attention")):
        shard = f"shards/{layer}.safetensors"
        start, start_meta = read_shard(reference / "stages" / stage / "quantize" / shard)
        final, final_meta = read_shard(reference / shard)
        _, q0 = decode_layer(start, start_meta, where="start")
        _, q1 = decode_layer(final, final_meta, where="final")
        assert q0.centroids.shape == q1.centroids.shape  # LR²VQ too exports (k, m): C P
        # The weight (or R P) trained and was clustered again: codes moved (iPQ's never do).
        changed = float((q0.codes != q1.codes).float().mean())
        assert changed > 0.01, (layer, changed)
    assert not (reference / "shards/lm_head.safetensors").exists()  # the tied head: no copy
    model = dist_pgkm.load(reference)
    assert isinstance(model.get_submodule(LAYER), PQModule)
    assert isinstance(model.get_submodule(ATTENTION), PQModule)
    assert model.lm_head.centroids is model.model.embed_tokens.centroids  # still tied
    ids = torch.tensor([[1, 504, 3287, 28, 253, 2137, 30]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_killed_lr2vq_stage_resumes_to_the_same_bytes(
    tmp_path: Path, config_file: Path, reference: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cmd(config_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    # The LR²VQ stage has a checkpoint (R, P, centroids) at step 2 of 4; its ranks are in the
    # state. (The IDKM and IDKM-JFB stages, finished by then, are rebuilt from their files.)
    kill_at(proc, out, stage=2, step=2)
    rerun = subprocess.run(
        [*_cmd(config_file, out), "--resume"], capture_output=True, text=True, timeout=900,
        env=_env(),
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in (
        "model.safetensors",
        f"shards/{LAYER}.safetensors",
        f"shards/{ATTENTION}.safetensors",
        f"shards/{EMBED}.safetensors",
    ):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
