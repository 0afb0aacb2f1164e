"""A calibrated run end to end: ``H`` collected once, then every layer is an independent job.

MiniLM (6 BERT blocks) on real WordNet text: the attention output projections of blocks 2 and
4 and the pooler (after the blocks) are quantized with ``metric: hessian``, one attention layer
with the weight metric. Interrupting the calibration (an exception, or SIGKILL) and running
again gives the same ``H`` files and the same checkpoint bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_pgkm.config import load_config
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.coordinator import RunSummary, quantize_model
from dist_pgkm.distributed.progress import ProgressSnapshot
from dist_pgkm.errors import CheckpointError, ConfigError, InvalidInputError
from dist_pgkm.eval.text import calibration_windows, load_text
from dist_pgkm.models.offline import minilm_dir
from dist_pgkm.utils.optional import set_threads

from .conftest import checkpoint_bytes

SAMPLES, SEQ_LEN = 6, 32
AWARE = [f"encoder.layer.{i}.attention.output.dense" for i in (2, 4)] + ["pooler.dense"]
PLAIN = "encoder.layer.0.attention.self.query"
CONFIG = {
    "n_iter": 2,
    "calibration": {"samples": SAMPLES, "seq_len": SEQ_LEN},
    "rules": [
        {
            "match": ["re:encoder\\.layer\\.[24]\\.attention\\.output\\.dense", "pooler.dense"],
            "block_size": 8,
            "k": 16,
            "metric": "hessian",
        },
        {"match": PLAIN, "block_size": 8, "k": 16},
    ],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One thread for torch and faiss: activation-aware k-means makes many small calls per
    group, which threads on a busy 2-core machine slow down tenfold (0.3 s -> 5 s a layer)."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def config() -> QuantizeConfig:
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    return calibration_windows(tokenizer, load_text(["wordnet"])[:40_000], SAMPLES, SEQ_LEN)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, config: QuantizeConfig, windows: torch.Tensor
) -> tuple[Path, RunSummary]:
    out = tmp_path_factory.mktemp("calibrated")
    return out, quantize_model(minilm_dir(), config, out, calib_ids=windows)


def _calib_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "calib").glob("*.safetensors"))}


def test_aware_layers_record_their_metric(reference: tuple[Path, RunSummary]) -> None:
    out, summary = reference
    assert summary.metrics == {
        **dict.fromkeys(AWARE, "hessian"),
        PLAIN: "weight",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n: r["metric"] for n, r in manifest["layers"].items()} == summary.metrics
    assert manifest["fingerprint"]["calibration"]["samples"] == SAMPLES
    with safe_open(str(out / "shards" / "pooler.dense.safetensors"), framework="pt") as f:
        assert (f.metadata() or {})["metric"] == "hessian"
    calibration = summary.calibration
    assert calibration is not None
    assert calibration["blocks_run"] == 6  # the pooler needs the output of the last block
    assert calibration["block_list"] == "encoder.layer"
    assert calibration["layers"] == len(AWARE)
    assert calibration["tokens_per_second"] > 0
    assert sorted(_calib_bytes(out)) == sorted(f"{n}.safetensors" for n in AWARE)
    assert not (out / "calib" / "hidden.safetensors").exists()  # removed once complete
    assert summary.as_dict()["metrics"] == summary.metrics


class _InterruptError(Exception):
    pass


def test_interrupted_calibration_resumes_to_the_same_bytes(
    reference: tuple[Path, RunSummary],
    config: QuantizeConfig,
    windows: torch.Tensor,
    tmp_path: Path,
) -> None:
    def stop_after_block_3(snap: ProgressSnapshot) -> None:
        if snap.calibration is not None and snap.calibration.blocks_done == 3:
            raise _InterruptError

    out = tmp_path / "run"
    with pytest.raises(_InterruptError):
        quantize_model(
            minilm_dir(),
            config,
            out,
            calib_ids=windows,
            progress=stop_after_block_3,
            calib_checkpoint_every=0.0,
        )
    assert len(_calib_bytes(out)) == 1 + 1  # H of block 2 and the hidden states entering 3
    summary = quantize_model(minilm_dir(), config, out, calib_ids=windows, resume=True)
    calibration = summary.calibration
    assert calibration is not None
    assert (calibration["start_block"], calibration["blocks_run"]) == (3, 3)
    assert calibration["reused"] == 1
    assert _calib_bytes(out) == _calib_bytes(reference[0])
    assert checkpoint_bytes(out) == checkpoint_bytes(reference[0])


_KILL_SCRIPT = """
import os, signal, sys, torch
from dist_pgkm.config import load_config
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.models.offline import minilm_dir
from dist_pgkm.utils.optional import set_threads

def progress(snap):
    if snap.calibration is not None and snap.calibration.blocks_done == 2:
        os.kill(os.getpid(), signal.SIGKILL)

config = load_config(sys.argv[1])
windows = torch.load(sys.argv[2])
quantize_model(minilm_dir(), config, sys.argv[3], calib_ids=windows, progress=progress,
               calib_checkpoint_every=0.0)
"""


@pytest.mark.slow  # ~20-40 s: a second Python process imports torch and transformers
def test_kill_9_during_calibration_then_same_call_gives_the_same_bytes(
    reference: tuple[Path, RunSummary],
    config: QuantizeConfig,
    windows: torch.Tensor,
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(CONFIG))
    torch.save(windows, tmp_path / "windows.pt")  # test-only handover to the child
    out = tmp_path / "run"
    # The child runs on one thread as this process does (_one_thread): float32 sums in the
    # forward pass depend on how a matrix product is split between threads, so H's last
    # bits do too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(config_path), str(tmp_path / "windows.pt"), str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, *args], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "calib" / "hidden.safetensors").exists()
    summary = quantize_model(minilm_dir(), config, out, calib_ids=windows)
    assert summary.calibration is not None
    assert summary.calibration["start_block"] == 2
    assert _calib_bytes(out) == _calib_bytes(reference[0])
    assert checkpoint_bytes(out) == checkpoint_bytes(reference[0])


def test_corrupt_hessian_file_is_redone(
    reference: tuple[Path, RunSummary],
    config: QuantizeConfig,
    windows: torch.Tensor,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    name = "encoder.layer.2.attention.output.dense"
    h = out / "calib" / f"{name}.safetensors"
    h.write_bytes(h.read_bytes()[:-16] + bytes(16))  # same size, other values
    (out / "shards" / f"{name}.safetensors").unlink()  # the layer must be quantized again
    summary = quantize_model(minilm_dir(), config, out, calib_ids=windows)
    assert summary.redone == [name]
    assert summary.calibration is not None
    assert summary.calibration["blocks_run"] == 3  # blocks 0-2: block 2's inputs again
    assert summary.calibration["reused"] == 0  # the other layers are quantized already
    assert _calib_bytes(out) == _calib_bytes(reference[0])
    assert checkpoint_bytes(out) == checkpoint_bytes(reference[0])


def test_changed_calibration_is_refused(
    reference: tuple[Path, RunSummary], config: QuantizeConfig, windows: torch.Tensor
) -> None:
    other = windows.roll(1, dims=0)
    with pytest.raises(CheckpointError, match=r"calibration differs \(windows_sha256"):
        quantize_model(minilm_dir(), config, reference[0], calib_ids=other)


def test_hessian_rules_without_calibration_say_how_to_add_it(
    config: QuantizeConfig, windows: torch.Tensor, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"3 layer\(s\) .* `metric: hessian`.*--calib wordnet"):
        quantize_model(minilm_dir(), config, tmp_path / "a")
    with pytest.raises(InvalidInputError, match=r"shape \(5, 32\).*6 samples of 32 tokens"):
        quantize_model(minilm_dir(), config, tmp_path / "b", calib_ids=windows[:5])
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # ~20 s, mostly starting an embedded Ray
def test_ray_workers_read_hessians_by_path_to_the_same_bytes(
    reference: tuple[Path, RunSummary],
    config: QuantizeConfig,
    windows: torch.Tensor,
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")
    out = tmp_path / "run"  # the embedded Ray's workers read OUT/calib/* by path
    summary = quantize_model(minilm_dir(), config, out, calib_ids=windows, workers=1)
    assert summary.metrics == reference[1].metrics
    assert [w["worker"] for w in summary.timing["workers"]] == ["w0"]
    assert _calib_bytes(out) == _calib_bytes(reference[0])
    assert checkpoint_bytes(out) == checkpoint_bytes(reference[0])
