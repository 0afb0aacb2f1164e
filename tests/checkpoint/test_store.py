"""RunStore: the base of manifest.json, calib index.json and finetune.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_pgkm.checkpoint.shard import file_sha256
from dist_pgkm.errors import CheckpointError
from dist_pgkm.finetune.state import RunState


def test_the_same_run_resumes_and_another_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = RunState.open(out, {"config": "a", "text": "t"}, resume=False)
    state.data["stage"] = 1
    state.save()
    again = RunState.open(out, {"config": "a", "text": "t"}, resume=True)
    assert again.data["stage"] == 1
    assert json.loads((out / "finetune.json").read_text())["stage"] == 1
    with pytest.raises(CheckpointError, match=r"another fine-tuning run \(its config differ\)"):
        RunState.open(out, {"config": "b", "text": "t"}, resume=False)


def test_a_new_run_needs_an_empty_directory_and_no_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="--resume given, but there is no fine-tuning run"):
        RunState.open(tmp_path / "none", {}, resume=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not empty and holds no fine-tuning run"):
        RunState.open(tmp_path / "full", {}, resume=False)


def test_records_whose_file_changed_are_dropped(tmp_path: Path) -> None:
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(name.encode())
    records: dict[str, Any] = {
        name: {"file": f"{name}.bin", "sha256": file_sha256(tmp_path / f"{name}.bin")}
        for name in ("a", "b")
    }
    records["gone"] = {"file": "gone.bin", "sha256": "0" * 64}
    (tmp_path / "b.bin").write_bytes(b"changed")
    store = RunState(tmp_path, {}, writer=False)
    assert store.drop_changed(records, "file") == ["b", "gone"]
    assert list(records) == ["a"]
    store.save()  # not the writer: nothing written
    assert not (tmp_path / "finetune.json").exists()


@pytest.mark.parametrize("content", [b'{"identity": {"config"', b"\xff\xfe", b""])
def test_a_damaged_state_file_is_a_checkpoint_error_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    out = tmp_path / "out"
    RunState.open(out, {"config": "a"}, resume=False).save()
    (out / "finetune.json").write_bytes(content)  # truncated, not UTF-8, empty
    with pytest.raises(CheckpointError, match=r"finetune\.json is unreadable .* delete this one"):
        RunState.open(out, {"config": "a"}, resume=True)
