"""Failures that explain themselves, without Ray (issue 18 items 3, 5, 6 and 7).

The model is a bare ``.safetensors`` file of four real MiniLM weights (4.1 MB), so that a
tensor lies wholly between the file's first and last MiB, where the run's fingerprint does not
look.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_pgkm.checkpoint.atomic import exclusive_run
from dist_pgkm.config import load_config
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.distributed.plan import plan_run, unused_rules
from dist_pgkm.errors import CheckpointError, ConfigError, InvalidInputError
from dist_pgkm.models.source import open_source

from .test_plan import LAYERS

PREFIX = "encoder.layer.0."
NAMES = [
    "attention.self.key.weight",
    "attention.self.query.weight",
    "attention.self.value.weight",  # bytes 1.18-1.77 MB of 4.1 MB: outside first and last MiB
    "intermediate.dense.weight",
]
MIDDLE = PREFIX + "attention.self.value.weight"
CONFIG = {"n_iter": 2, "rules": [{"match": "re:.*", "block_size": 4, "k": 16}]}


@pytest.fixture
def small_model(tmp_path: Path, model: Path) -> Path:
    """Four real MiniLM weights in one bare safetensors file."""
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        tensors = {PREFIX + name: f.get_tensor(PREFIX + name) for name in NAMES}
    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    return path


def _data_range(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of ``key``'s data in a safetensors file."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    begin, end = header[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _overwrite(path: Path, key: str, values: torch.Tensor) -> None:
    """Write ``values`` over ``key``'s data in place: same size, same header."""
    begin, end = _data_range(path, key)
    data = values.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(data) == end - begin
    with path.open("r+b") as fh:
        fh.seek(begin)
        fh.write(data)


def _checkpoint(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


# --- 3: an edit in the middle of a source file ---------------------------------------------------


def test_source_edited_in_the_middle_is_requantized(small_model: Path, tmp_path: Path) -> None:
    config = load_config(CONFIG)
    out = tmp_path / "out"
    quantize_model(small_model, config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(len(rec["source_sha256"]) == 64 for rec in manifest["layers"].values())

    begin, end = _data_range(small_model, MIDDLE)
    size = small_model.stat().st_size
    # Where the fingerprint does not look: past the first MiB, before the last.
    assert begin > 2**20
    assert end < size - 2**20
    before = open_source(small_model).fingerprint()
    with safe_open(str(small_model), framework="pt") as f:
        weight = f.get_tensor(MIDDLE)
    _overwrite(small_model, MIDDLE, weight.flip(0))  # another weight of the same shape
    # The old failure: the run's fingerprint cannot see this edit, so the run "resumed" and
    # returned the old layer.
    assert open_source(small_model).fingerprint() == before

    summary = quantize_model(small_model, config, out)
    assert summary.redone == [MIDDLE.removesuffix(".weight")]
    assert summary.done_before == 3
    fresh = tmp_path / "fresh"
    quantize_model(small_model, config, fresh)
    assert _checkpoint(out) == _checkpoint(fresh)


# --- 5: an output directory that cannot be written -------------------------------------------


def test_unwritable_out_is_a_typed_error_naming_it() -> None:
    # sysfs refuses new directories, even to root: EPERM (EACCES or EROFS elsewhere).
    target = Path("/sys/dpgkm-test-out")
    with (
        pytest.raises(CheckpointError, match=r"Cannot write the output directory /sys/dpgkm"),
        exclusive_run(target),
    ):
        pass


def test_read_only_file_system_out_via_the_cli(tmp_path: Path) -> None:
    """A real read-only mount (a private mount namespace): exit 2 and the directory named."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    mount = tmp_path / "ro"
    mount.mkdir()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {mount}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs in a private mount namespace here")
    cli = f"{sys.executable} -m dist_pgkm.cli quantize minilm-l6 --config {cfg} --out {mount}/out"
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {mount} && exec {cli}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert f"Cannot write the output directory {mount}/out" in run.stderr
    assert "read-only file system" in run.stderr
    assert "Traceback" not in run.stderr


# --- 6: NaN or infinity in an input weight -----------------------------------------------------


def test_non_finite_weight_names_the_layer_and_position(small_model: Path, tmp_path: Path) -> None:
    with safe_open(str(small_model), framework="pt") as f:
        weight = f.get_tensor(MIDDLE)
    weight[7, 5] = float("nan")
    weight[300, 1] = float("inf")
    _overwrite(small_model, MIDDLE, weight)
    with pytest.raises(
        InvalidInputError,
        match=r"encoder\.layer\.0\.attention\.self\.value: .*\(384, 384\) holds 2 NaN or "
        r"infinite value\(s\); the first is nan at \[7, 5\] \(row 7\).*`skip: true`",
    ):
        quantize_model(small_model, load_config(CONFIG), tmp_path / "out")


# --- 7: rules that select nothing, and why ---------------------------------------------------


def test_no_layer_left_says_why_each_was_skipped() -> None:
    # bs 7 divides none of the widths: every selected layer is skipped as unsupported.
    config = load_config({"rules": [{"match": "re:blocks\\..*", "block_size": 7, "k": 4}]})
    with pytest.raises(
        ConfigError,
        match=r"the rules select 3 layer\(s\), and every one is skipped.*blocks\.0\.attn "
        r"\(64, 64\): input width 64 is not a multiple of block size 7",
    ):
        plan_run(LAYERS, config)


def test_a_rule_matching_nothing_beside_one_that_does_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = load_config(
        {
            "rules": [
                {"match": "re:blocks\\..*", "block_size": 4, "k": 16},
                {"match": "re:model\\.layers\\..*", "block_size": 4, "k": 16},  # a typo
                {"match": "blocks.0.mlp", "block_size": 8, "k": 16},  # shadowed by rule 1
            ]
        }
    )
    with caplog.at_level(logging.WARNING, logger="dist_pgkm.distributed.plan"):
        plan = plan_run(LAYERS, config)
    assert len(plan.jobs) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith("rule 2 (match: re:model\\.layers\\..*) matches none of")
    assert "rule 3 (match: blocks.0.mlp) decides no layer" in warnings[1]
    assert "taken by an earlier rule" in warnings[1]
    one = load_config({"rules": [{"match": "re:blocks\\..*", "block_size": 4, "k": 16}]})
    assert unused_rules(LAYERS, one) == []
