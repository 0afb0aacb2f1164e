"""Thread pools sized to the cores a process gets, and passive OpenMP waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_pgkm.utils import threads


def _cgroup_v2(root: Path, own: str, limits: dict[str, str]) -> Path:
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory")
    for rel, value in limits.items():
        folder = root / rel.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(value + "\n")
    proc = root.parent / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return proc


def test_cgroup_v2_quota_is_the_smallest_on_the_path_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    proc = _cgroup_v2(
        root, "/job/step", {"/": "max 100000", "/job": "300000 100000", "/job/step": "max 100000"}
    )
    assert threads.cgroup_cpu_limit(root, proc) == 3.0
    proc = _cgroup_v2(root, "/job/step", {"/job/step": "150000 100000"})
    assert threads.cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_without_quota_and_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    proc = _cgroup_v2(root, "/", {"/": "max 100000"})
    assert threads.cgroup_cpu_limit(root, proc) is None

    v1 = tmp_path / "v1"
    (v1 / "cpu" / "slurm").mkdir(parents=True)
    (v1 / "cpu" / "slurm" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "slurm" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_v1"
    proc.write_text("4:cpu,cpuacct:/slurm\n3:memory:/slurm\n")
    assert threads.cgroup_cpu_limit(v1, proc) == 2.5
    (v1 / "cpu" / "slurm" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.cgroup_cpu_limit(v1, proc) is None


def test_available_cores_follow_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 4
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cores() == 2  # a fractional quota rounds up
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.available_cores() == 1


def test_set_threads_sizes_torch_and_faiss() -> None:
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1
        assert torch.get_num_threads() == 1
        faiss = pytest.importorskip("faiss")
        assert faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_import_sets_passive_wait_before_torch_loads_and_keeps_a_user_choice() -> None:
    code = (
        "import os, sys, json; import dist_pgkm; "
        "print(json.dumps(os.environ.get('OMP_WAIT_POLICY')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip()) == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip()) == "active"
    # The policy is in the environment when torch (and its OpenMP runtime) is first imported.
    code = """
import json, os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
import dist_pgkm
print(json.dumps(seen))
"""
    env.pop("OMP_WAIT_POLICY")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip()) == ["PASSIVE"]
