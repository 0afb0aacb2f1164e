"""The streaming safetensors writer: standard files, deterministic, one tensor at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_pgkm.checkpoint.writer import Entry, plan_files, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.centroids": torch.randn(7, 2, generator=g).half(),
        "b.codes": torch.randint(0, 255, (11,), generator=g).to(torch.uint8),  # odd length
        "c": torch.randn(4, generator=g).to(torch.bfloat16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.zeros(0, 4),  # empty tensors are legal
    }


def _entries(tensors: dict[str, torch.Tensor], log: list[str] | None = None) -> list[Entry]:
    def producer(key: str) -> torch.Tensor:
        if log is not None:
            log.append(key)
        return tensors[key]

    return [
        Entry(key, t.dtype, tuple(t.shape), lambda key=key: producer(key))
        for key, t in tensors.items()
    ]


def test_round_trip_through_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, _entries(tensors), {"format": "pt", "x": "1"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"}
        assert list(f.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor)
            assert f.get_tensor(key).dtype == tensor.dtype
    # Same payload as the reference writer: only the header layout may differ.
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt", "x": "1"})
    assert path.stat().st_size - ref.stat().st_size in range(-64, 65)


def test_bytes_are_deterministic_and_tensors_produced_in_order(tmp_path: Path) -> None:
    tensors = _tensors()
    log: list[str] = []
    a = write_safetensors(tmp_path / "a.safetensors", _entries(tensors, log), {})
    b = write_safetensors(tmp_path / "b.safetensors", _entries(tensors), {})
    assert a == b
    assert log == list(tensors)  # each produced exactly once, in file order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_a_producer_that_lies_is_caught_and_nothing_is_left(tmp_path: Path) -> None:
    entry = Entry("x", torch.float32, (2, 2), lambda: torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"produced torch.float32 \(2, 3\), the header says"):
        write_safetensors(tmp_path / "x.safetensors", [entry], {})
    assert list(tmp_path.iterdir()) == []


def test_plan_files_respects_the_limit_and_keeps_order() -> None:
    sizes = [40, 40, 30, 100, 10, 10]  # bytes of float32 tensors of n/4 values
    entries = [
        Entry(f"t{i}", torch.float32, (n // 4,), lambda: torch.zeros(0))
        for i, n in enumerate(sizes)
    ]
    files = plan_files(entries, max_bytes=80)
    assert [[e.key for e in f] for f in files] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [[e.key for e in f] for f in plan_files(entries, 10**9)] == [[e.key for e in entries]]
