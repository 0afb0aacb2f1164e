"""The run manifest: start, resume, refuse another run, detect bad shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_pgkm.checkpoint.manifest import LayerRecord, Manifest
from dist_pgkm.checkpoint.shard import file_sha256
from dist_pgkm.errors import CheckpointError


def _fingerprint(**changes: Any) -> dict[str, Any]:
    fp: dict[str, Any] = {
        "dist_pgkm_version": "0.1.0",
        "config": {"seed": 0, "method": "pgkm"},
        "source": [{"name": "model.safetensors", "size": 10, "sha256_head": "ab"}],
        "layers": [["l0", [4, 4], 2, 4]],
    }
    fp.update(changes)
    return fp


def _finish(manifest: Manifest, name: str, payload: bytes) -> None:
    shard = manifest.out_dir / "shards" / f"{name}.safetensors"
    shard.parent.mkdir(exist_ok=True)
    shard.write_bytes(payload)
    manifest.record(name, LayerRecord(f"shards/{name}.safetensors", file_sha256(shard), 0.5))


def test_start_then_resume_keeps_finished_layers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    m = Manifest.open(out, _fingerprint(), resume=False)
    _finish(m, "l0", b"zero")
    again = Manifest.open(out, _fingerprint(), resume=True)
    assert again.verify() == []
    assert again.layers == {"l0": LayerRecord("shards/l0.safetensors", m.layers["l0"].sha256, 0.5)}
    # The file on disk is the complete state: plain JSON, sorted keys.
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["layers"]["l0"]["seconds"] == 0.5
    assert next(iter(out.iterdir())).name in {"manifest.json", "shards"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_truncated_or_missing_shards_are_forgotten_and_redone(tmp_path: Path) -> None:
    m = Manifest.open(tmp_path, _fingerprint(), resume=False)
    _finish(m, "l0", b"0" * 100)
    _finish(m, "l1", b"1" * 100)
    _finish(m, "l2", b"2" * 100)
    m.set_merged({"model.safetensors": "x"})
    (tmp_path / "shards" / "l0.safetensors").write_bytes(b"0" * 50)  # truncated
    (tmp_path / "shards" / "l1.safetensors").unlink()
    again = Manifest.open(tmp_path, _fingerprint(), resume=True)
    assert sorted(again.verify()) == ["l0", "l1"]
    assert list(again.layers) == ["l2"]
    assert again.merged is None  # a merge made with a bad shard is stale
    assert list(Manifest.open(tmp_path, _fingerprint(), resume=True).layers) == ["l2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": {"seed": 1, "method": "pgkm"}}, r"config `seed` was 0, now 1"),
        ({"dist_pgkm_version": "0.2.0"}, r"written by dist-pgkm 0.1.0, this is 0.2.0"),
        (
            {"source": [{"name": "model.safetensors", "size": 11, "sha256_head": "ab"}]},
            "source file model.safetensors has changed",
        ),
        ({"source": []}, "source file model.safetensors is gone"),
        ({"layers": [["l0", [4, 4], 4, 4]]}, "the model's layers differ"),
    ],
)
def test_another_run_is_refused_with_the_reason(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    Manifest.open(tmp_path, _fingerprint(), resume=False)
    with pytest.raises(CheckpointError, match=message):
        Manifest.open(tmp_path, _fingerprint(**change), resume=False)


def test_directories_that_are_not_runs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is not empty \(notes\.txt\) and holds no manifest"):
        Manifest.open(tmp_path, _fingerprint(), resume=False)
    with pytest.raises(CheckpointError, match="holds no run to resume"):
        Manifest.open(tmp_path / "new", _fingerprint(), resume=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"manifest\.json is unreadable"):
        Manifest.open(tmp_path / "broken", _fingerprint(), resume=False)
    with pytest.raises(CheckpointError, match="is a file"):
        Manifest.open(tmp_path / "notes.txt", _fingerprint(), resume=False)


def test_disk_full_leaves_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    m = Manifest.open(tmp_path, _fingerprint(), resume=False)
    _finish(m, "l0", b"zero")
    before = (tmp_path / "manifest.json").read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"the disk is full .* run the same command again"):
        _finish(m, "l1", b"one")
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert list(Manifest.open(tmp_path, _fingerprint(), resume=True).layers) == ["l0"]


def test_changed_calibration_is_named() -> None:
    from dist_pgkm.checkpoint.manifest import fingerprint_diff

    base = {"dist_pgkm_version": "1", "config": {}, "source": [], "layers": []}
    calibrated = {**base, "calibration": {"windows_sha256": "a", "samples": 4}}
    assert fingerprint_diff(base, calibrated) == ["it ran without calibration, this one calibrates"]
    assert fingerprint_diff(calibrated, base) == ["it ran with calibration, this one without"]
    other = {**base, "calibration": {"windows_sha256": "b", "samples": 4}}
    (problem,) = fingerprint_diff(calibrated, other)
    assert problem.startswith("the calibration differs (windows_sha256: another text")
