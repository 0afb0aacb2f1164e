"""Tests for dist_pgkm.checkpoint.calib: H files, their checks, and the resume point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_pgkm.checkpoint.calib import (
    CALIB_DIR,
    CalibStore,
    cache_key,
    read_hessian,
    write_hessian,
)
from dist_pgkm.errors import CheckpointError

IDENTITY = {"windows_sha256": "ab" * 32, "samples": 4, "seq_len": 8, "layers": [["l0", 2]]}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _h(groups: int = 3, bs: int = 2, seed: int = 0) -> torch.Tensor:
    x = torch.randn(50, groups, bs, generator=torch.Generator().manual_seed(seed))
    return torch.einsum("tgi,tgj->gij", x, x)


def test_hessian_file_round_trip_is_deterministic_and_checked(tmp_path: Path) -> None:
    h = _h()
    digest = write_hessian(tmp_path / "a.safetensors", "l0", h, "l0")
    assert write_hessian(tmp_path / "b.safetensors", "l0", h.clone(), "l0") == digest
    assert torch.equal(read_hessian(tmp_path / "a.safetensors", digest, "l0"), h)
    with pytest.raises(CheckpointError, match="belongs to 'l0', not 'l1'"):
        read_hessian(tmp_path / "a.safetensors", name="l1")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="sha256 differs"):
        read_hessian(tmp_path / "a.safetensors", digest)
    with pytest.raises(CheckpointError, match=r"missing.*every node mounts"):
        read_hessian(tmp_path / "nope.safetensors")


def test_store_records_verifies_and_redoes_corrupt_files(tmp_path: Path) -> None:
    store = CalibStore.open(tmp_path, IDENTITY)
    store.add({"l0": _h(), "l1": _h(seed=1)}, {"l0": "l0", "l1": "head"})
    store.complete(["emb"])
    again = CalibStore.open(tmp_path, IDENTITY)
    assert set(again.hessians) == {"l0", "l1"}
    assert again.without_input == {"emb"}
    assert torch.equal(again.read("l1"), _h(seed=1))
    path = Path(again.hessians["l1"].path)
    assert path == (tmp_path / CALIB_DIR / "l1.safetensors").absolute()
    path.write_bytes(path.read_bytes().replace(b"head", b"hexd"))  # same size, other bytes
    third = CalibStore.open(tmp_path, IDENTITY)
    assert set(third.hessians) == {"l0"}
    index = json.loads((tmp_path / CALIB_DIR / "index.json").read_text())
    assert index["complete"] is False


def test_another_identity_clears_the_folder(tmp_path: Path) -> None:
    store = CalibStore.open(tmp_path, IDENTITY)
    store.add({"l0": _h()}, {})
    other = CalibStore.open(tmp_path, {**IDENTITY, "samples": 5})
    assert other.hessians == {}
    assert not (tmp_path / CALIB_DIR / "l0.safetensors").exists()


def test_hidden_states_are_saved_at_most_every_period(tmp_path: Path) -> None:
    clock = _Clock()
    store = CalibStore.open(tmp_path, IDENTITY, checkpoint_every=60.0, clock=clock)
    hidden = torch.randn(4, 8, 6)
    assert not store.add({}, {}, next_block=1, hidden=hidden)  # 0 s since the start
    clock.now = 59.0
    assert not store.add({}, {}, next_block=2, hidden=hidden)
    clock.now = 61.0
    assert store.add({"l0": _h()}, {}, next_block=3, hidden=hidden + 1)
    clock.now = 100.0
    assert not store.add({}, {}, next_block=4, hidden=hidden)  # 39 s since the last save
    assert not store.add({}, {}, next_block=0, hidden=hidden)  # block 0's inputs: never
    saved = CalibStore.open(tmp_path, IDENTITY).hidden()
    assert saved is not None
    assert saved[0] == 3
    assert torch.equal(saved[1], hidden + 1)
    store.complete()
    assert CalibStore.open(tmp_path, IDENTITY).hidden() is None
    assert not (tmp_path / CALIB_DIR / "hidden.safetensors").exists()


def test_corrupt_hidden_states_are_not_resumed_from(tmp_path: Path) -> None:
    store = CalibStore.open(tmp_path, IDENTITY, checkpoint_every=0.0)
    assert store.add({}, {}, next_block=2, hidden=torch.ones(2, 3, 4))
    path = tmp_path / CALIB_DIR / "hidden.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    assert CalibStore.open(tmp_path, IDENTITY).hidden() is None


def test_stored_blocks_are_read_out_per_block_size_and_a_misfit_is_refused(
    tmp_path: Path,
) -> None:
    h = _h(groups=2, bs=24)  # width 48 in 24 x 24 blocks
    store = CalibStore.at(tmp_path / "cache" / cache_key(IDENTITY), IDENTITY)
    store.add({"l0": h}, {})
    (record,) = store.hessians.values()
    assert record.block_size == 24
    assert Path(record.path).parent == tmp_path / "cache" / cache_key(IDENTITY)
    got = store.read("l0", block_size=8)
    assert got.shape == (6, 8, 8)
    assert torch.equal(got[4], h[1, 8:16, 8:16])
    assert torch.equal(store.read("l0"), h)
    with pytest.raises(CheckpointError, match=r"stored in 24 x 24 blocks.*block size of 16"):
        store.read("l0", block_size=16)
    assert cache_key(IDENTITY) != cache_key({**IDENTITY, "samples": 5})
    assert cache_key(IDENTITY) == cache_key(dict(reversed(list(IDENTITY.items()))))
