"""The whole-model job on one machine: real model in, one checkpoint out, resumable to the byte.

MiniLM (all-MiniLM-L6-v2, 22.7M parameters) is the real model: small enough that quantizing a
selection of its layers takes seconds. SmolLM2 end to end is covered by the ptq benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_pgkm.checkpoint.summary import describe
from dist_pgkm.config import load_config
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.errors import CheckpointError, ConfigError, ModelSourceError
from dist_pgkm.pq import unpack_codes

from .conftest import CONFIG, N_JOBS, checkpoint_bytes


def test_checkpoint_holds_what_the_format_says(reference: Path, model: Path) -> None:
    qconfig = json.loads((reference / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "pgkm"
    assert len(qconfig["layers"]) == N_JOBS
    assert "encoder.layer.1.attention.self.query" not in qconfig["layers"]
    spec = qconfig["layers"]["encoder.layer.0.intermediate.dense"]
    assert spec == {
        "kind": "linear",
        "shape": [1536, 384],
        "block_size": 4,
        "k": 64,
        "k_used": 64,
        "bits": 6,
        "codebook_rows": 0,
        "scale_group": 0,
        "n_outliers": 0,
        "metric": "weight",
    }
    assert qconfig["format_version"] == 2
    assert qconfig["layers"]["embeddings.word_embeddings"]["kind"] == "embedding"
    with safe_open(str(reference / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt", "quant_method": "pgkm", "dist_pgkm_format": "2"}
        codes = f.get_tensor("encoder.layer.0.intermediate.dense.codes")
        centroids = f.get_tensor("encoder.layer.0.intermediate.dense.centroids")
        bias = f.get_tensor("encoder.layer.0.intermediate.dense.bias")
        query = f.get_tensor("encoder.layer.1.attention.self.query.weight")
    assert "encoder.layer.0.intermediate.dense.weight" not in keys
    # 1536 * 384 / 4 blocks at 6 bits, exactly.
    assert codes.dtype == torch.uint8
    assert codes.numel() == 1536 * 384 // 4 * 6 // 8
    assert centroids.dtype == torch.float16
    assert tuple(centroids.shape) == (64, 4)
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        original_bias = f.get_tensor("encoder.layer.0.intermediate.dense.bias")
        original_query = f.get_tensor("encoder.layer.1.attention.self.query.weight")
        original = f.get_tensor("encoder.layer.0.intermediate.dense.weight")
    assert torch.equal(bias, original_bias)  # float tensors are copied unchanged
    assert torch.equal(query, original_query)
    # Decoding gives a weight close to the original (relative SSE of 6-bit codes per 4 weights).
    decoded = centroids.float()[unpack_codes(codes, 1536 * 96, 6)].reshape(1536, 384)
    rel = float((decoded - original).pow(2).sum() / original.pow(2).sum())
    assert 0.01 < rel < 0.25


def test_inspect_counts_every_byte(reference: Path) -> None:
    info = describe(reference)
    assert len(info.layers) == N_JOBS
    assert info.params == 22_713_216  # all-MiniLM-L6-v2's parameters (position ids excluded)
    layer = next(x for x in info.layers if x.name == "encoder.layer.0.intermediate.dense")
    assert layer.bits_per_weight == pytest.approx((1536 * 96 * 6 + 64 * 4 * 16) / (1536 * 384))
    assert layer.empty_final == 0
    assert layer.rel_sse is not None
    assert 0.01 < layer.rel_sse < 0.25
    # The file is the quantized layers, the float tensors and the header: nothing else.
    header = int.from_bytes((reference / "model.safetensors").read_bytes()[:8], "little")
    assert info.checkpoint_bytes == info.quantized_bytes + info.float_bytes + header + 8


def test_second_run_is_a_no_op_and_same_bytes(
    reference: Path, model: Path, config: QuantizeConfig, tmp_path: Path
) -> None:
    before = checkpoint_bytes(reference)
    summary = quantize_model(model, config, reference, resume=True)
    assert summary.done_before == N_JOBS
    assert checkpoint_bytes(reference) == before


def test_corrupt_shard_is_redone_to_the_same_bytes(
    reference: Path, model: Path, config: QuantizeConfig, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shard = out / "shards" / "encoder.layer.0.output.dense.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    (out / "shards" / "embeddings.word_embeddings.safetensors").unlink()
    summary = quantize_model(model, config, out)
    assert sorted(summary.redone) == ["embeddings.word_embeddings", "encoder.layer.0.output.dense"]
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_kill_9_then_same_command_gives_the_same_bytes(
    reference: Path, model: Path, tmp_path: Path
) -> None:
    config_path = tmp_path / "config.json"  # YAML is a superset of JSON
    config_path.write_text(json.dumps(CONFIG))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "dist_pgkm.cli",
        "quantize",
        str(model),
        "--config",
        str(config_path),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # slower layers: time to kill in between
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads(manifest.read_text())["layers"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 3 <= done < N_JOBS
    assert not (out / "model.safetensors").exists()
    result = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{N_JOBS} layers quantized" in result.stdout
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_changed_config_or_foreign_dir_is_refused(
    reference: Path, model: Path, tmp_path: Path
) -> None:
    other = load_config({**CONFIG, "seed": 7})
    before = (reference / "manifest.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"holds another run.*config `seed` was 0, now 7"):
        quantize_model(model, other, reference)
    assert (reference / "manifest.json").read_bytes() == before


def test_bad_inputs_name_the_problem(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError):
        quantize_model(tmp_path / "nope", load_config(CONFIG), tmp_path / "out")
    nothing = load_config({"rules": [{"match": "re:decoder.*", "block_size": 4, "k": 16}]})
    with pytest.raises(ConfigError, match="selects no layer"):
        quantize_model(model, nothing, tmp_path / "out")
    strict = load_config({**CONFIG, "on_unsupported": "error"})
    with pytest.raises(
        ConfigError, match=r"embeddings.token_type_embeddings \(2, 384\): 96 blocks"
    ):
        quantize_model(model, strict, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_modified_merged_file_is_merged_again(
    reference: Path, model: Path, config: QuantizeConfig, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    (out / "model.safetensors").write_bytes(bytes(data))
    quantize_model(model, config, out)
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_config_records_the_source_dtype(reference: Path) -> None:
    # MiniLM's own config has no dtype; without one transformers would take the first float
    # tensor's dtype, an fp16 codebook, for the whole model.
    assert json.loads((reference / "config.json").read_text())["dtype"] == "float32"


def test_one_writer_per_directory_and_debris_is_cleaned(
    reference: Path, model: Path, config: QuantizeConfig, tmp_path: Path
) -> None:
    import fcntl

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.safetensors").unlink()  # killed during the merge...
    debris = [out / ".model.safetensors.abc123.tmp", out / "shards" / ".x.safetensors.q.tmp"]
    for path in debris:
        path.write_bytes(b"half a file")  # ...and before that, during a shard write
    with (out / ".lock").open("a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another process runs there
        with pytest.raises(CheckpointError, match="in use by another dist-pgkm process"):
            quantize_model(model, config, out)
    quantize_model(model, config, out)
    assert not [p for p in debris if p.exists()]
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
