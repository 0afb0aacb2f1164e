"""Ray execution with real Ray: same bytes as in-process, surviving lost workers and nodes.

No mocks: an embedded Ray on this machine, and a 2-node cluster on loopback addresses started
with ``ray start`` (head on 127.0.0.2, worker node on 127.0.0.3). Faults are real: worker
processes and a raylet are killed with SIGKILL by PID, found among the processes this test
started (never by name on the whole machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")
psutil = pytest.importorskip("psutil", reason="the fault tests find processes with psutil")

from dist_pgkm.config.quantize import QuantizeConfig  # noqa: E402
from dist_pgkm.distributed.coordinator import quantize_model  # noqa: E402
from dist_pgkm.distributed.plan import plan_run  # noqa: E402
from dist_pgkm.distributed.ray_executor import TEMP_PREFIX, RayOptions, run_on_ray  # noqa: E402
from dist_pgkm.errors import DistributedError, InvalidInputError  # noqa: E402
from dist_pgkm.models.layers import find_layers  # noqa: E402
from dist_pgkm.models.source import open_source  # noqa: E402

from .cluster import RAY_ENV, LoopbackCluster, free_port, wait_for  # noqa: E402
from .conftest import CONFIG, N_JOBS, checkpoint_bytes  # noqa: E402


def _n_shards(out: Path) -> int:
    return len(list((out / "shards").glob("*.safetensors"))) if (out / "shards").is_dir() else 0


def _n_recorded(out: Path) -> int:
    """Layers the run's manifest records as done (a shard lands just before its record)."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["layers"])
    except (OSError, ValueError, KeyError):  # not written yet
        return 0


def _running_workers(root: int) -> list[psutil.Process]:
    """Actor processes under ``root`` that are running a job (Ray titles them by method)."""
    found = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if "_LayerWorker.run" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class _Killer:
    """A background thread that kills running workers under ``root`` when ``when()`` holds."""

    def __init__(self, root: int, when: Callable[[], bool], times: int) -> None:
        self.killed: list[int] = []
        self._root, self._when, self._times = root, when, times
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.1) and len(self.killed) < self._times:
            if not self._when():
                continue
            for proc in _running_workers(self._root)[:1]:
                if proc.pid not in self.killed:
                    os.kill(proc.pid, signal.SIGKILL)
                    self.killed.append(proc.pid)


def test_embedded_two_workers_match_in_process(
    tmp_path: Path, model: Path, config: QuantizeConfig, reference: Path
) -> None:
    out = tmp_path / "ray"
    summary = quantize_model(model, config, out, workers=2)
    assert len(summary.plan.jobs) == len(list((out / "shards").iterdir()))
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
    # Both workers ran jobs; every job is counted once, with the time the worker reported.
    workers = summary.timing["workers"]
    assert sorted(w["worker"] for w in workers) == ["w0", "w1"]
    assert all(w["jobs"] >= 1 and 0 <= w["idle_share"] < 1 for w in workers)
    assert sum(w["jobs"] for w in workers) == N_JOBS
    assert set(summary.timing["layer_seconds"]) == {job.name for job in summary.plan.jobs}


def test_killed_worker_job_is_rerun(
    tmp_path: Path, model: Path, config: QuantizeConfig, reference: Path
) -> None:
    out = tmp_path / "ray"
    # Kill the first worker seen running a job once a layer is done: mid-run, mid-job.
    with _Killer(os.getpid(), lambda: _n_shards(out) >= 1, times=1) as killer:
        quantize_model(model, config, out, workers=2)
    assert len(killer.killed) == 1
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_job_that_kills_every_worker_fails_with_its_name(
    tmp_path: Path, model: Path, config: QuantizeConfig
) -> None:
    out = tmp_path / "ray"
    # One worker; every process that runs a job dies: the first (longest) job is blamed.
    with (
        _Killer(os.getpid(), lambda: True, times=10) as killer,
        pytest.raises(DistributedError, match=r"embeddings\.word_embeddings.*lost its worker 3"),
    ):
        quantize_model(model, config, out, workers=1)
    assert len(killer.killed) == 3
    assert _n_shards(out) == 0


def test_unreachable_address_fails_fast(
    tmp_path: Path, model: Path, config: QuantizeConfig
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"Cannot reach a Ray cluster.*ray start --head"):
        quantize_model(model, config, tmp_path / "out", address=f"127.0.0.1:{port}", workers=1)
    assert time.monotonic() - start < 15
    assert not (tmp_path / "out").exists()  # checked before the output is touched


def test_gpus_this_machine_lacks(tmp_path: Path, model: Path, config: QuantizeConfig) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DistributedError, match="has 0 GPUs"):
        quantize_model(model, config, tmp_path / "out", workers=1, gpus_per_worker=1)


def test_cli_unreachable_address_exits_2_with_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(CONFIG))  # JSON is YAML
    port = free_port("127.0.0.1")
    cli = [sys.executable, "-m", "dist_pgkm.cli", "quantize", "minilm-l6", "--config", str(cfg)]
    run = subprocess.run(
        [*cli, "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Cannot reach a Ray cluster" in run.stderr
    assert "ray start --head" in run.stderr


def test_gpus_need_ray_workers(tmp_path: Path, model: Path, config: QuantizeConfig) -> None:
    with pytest.raises(InvalidInputError, match="Add --workers N"):
        quantize_model(model, config, tmp_path / "out", gpus_per_worker=1)


def test_malformed_address(tmp_path: Path, model: Path, config: QuantizeConfig) -> None:
    with pytest.raises(DistributedError, match="is not HOST:PORT"):
        quantize_model(model, config, tmp_path / "out", address="no-port", workers=1)


# --- a real 2-node cluster on loopback ---------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[LoopbackCluster]:
    c = LoopbackCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_cluster_survives_a_lost_node(
    tmp_path: Path, model: Path, config: QuantizeConfig, reference: Path, cluster: LoopbackCluster
) -> None:
    out = tmp_path / "ray"
    raylet = cluster.raylet_pid(cluster.worker)
    assert raylet is not None
    killed_at: list[float] = []

    def kill_node_when_busy() -> None:
        # Once two layers are done, both nodes are busy: the worker node dies mid-job.
        while _n_shards(out) < 2:
            time.sleep(0.1)
        os.kill(raylet, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_node_when_busy, daemon=True)
    killer.start()
    quantize_model(model, config, out, address=cluster.address, workers=2)
    killer.join(timeout=1)
    assert killed_at, "the run finished before the node was killed"
    assert not psutil.pid_exists(raylet) or psutil.Process(raylet).status() == "zombie"
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_cluster_without_the_gpus_times_out(
    model: Path, config: QuantizeConfig, cluster: LoopbackCluster
) -> None:
    jobs = plan_run(find_layers(open_source(model)), config).jobs
    options = RayOptions(address=cluster.address, workers=1, gpus_per_worker=1, placement_timeout=3)
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"No Ray worker could be placed in 3 s.*1 GPU"):
        run_on_ray(jobs, str(model), config, options, on_result=lambda job, result: None)
    assert time.monotonic() - start < 30


def test_address_auto_reads_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_pgkm.distributed.ray_executor import resolve_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address("auto") == "10.0.0.1:6379"
    assert resolve_address("10.0.0.2:1234") == "10.0.0.2:1234"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    with pytest.raises(DistributedError, match="dashboard or Ray Client URL"):
        resolve_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(DistributedError, match="RAY_ADDRESS, which is not set"):
        resolve_address("auto")


# --- the driver dies; workers that differ from the driver ---------------------------------------


@pytest.mark.slow  # ~75 s on 2 quiet cores
def test_killed_driver_resumes_to_the_same_bytes(tmp_path: Path, reference: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dist_pgkm.cli", "quantize", "minilm-l6", "--config", str(cfg)]
    cmd += ["--out", str(out), "--workers", "2"]
    env = {**os.environ, **RAY_ENV}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait for 3 recorded layers, not 3 shard files: a kill between a shard's write and its
        # record leaves that shard unrecorded, and the resume does that layer again.
        wait_for(lambda: _n_recorded(out) >= 3 or driver.poll() is not None, 240, "3 layers")
        assert driver.poll() is None, "the run ended before the driver could be killed"
        tree = psutil.Process(driver.pid).children(recursive=True)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert 3 <= _n_shards(out) < N_JOBS
    stale = list(Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}{driver.pid}-*"))
    assert len(stale) == 1  # the killed driver's embedded Ray could not clean up

    rerun = subprocess.run(
        [*cmd, "--resume", "--json", str(tmp_path / "summary.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert not stale[0].exists()  # removed by the next run, as its driver's PID is gone
    # The killed driver's Ray processes share its fate (Ray's agents give up on the dead GCS
    # after about a minute): nothing of it is left.
    _, alive = psutil.wait_procs(tree, timeout=120)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["done_before"] >= 3
    assert sum(w["jobs"] for w in summary["timing"]["workers"]) == N_JOBS - summary["done_before"]
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_worker_with_another_dist_pgkm_version_is_refused(
    tmp_path: Path, model: Path, config: QuantizeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dist_pgkm

    # A real second installation: workers import this copy first (PYTHONPATH; and Ray puts the
    # driver's working directory first on workers' sys.path, so not the repository), while the
    # driver already runs the installed one.
    other = tmp_path / "site" / "dist_pgkm"
    shutil.copytree(Path(dist_pgkm.__file__).parent, other)
    init = other / "__init__.py"
    init.write_text(
        init.read_text().replace(
            f'__version__ = "{dist_pgkm.__version__}"', '__version__ = "0.0.0+other"'
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(other.parent))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistributedError, match=r"dist-pgkm 0\.0\.0\+other there but") as err:
        quantize_model(model, config, tmp_path / "out", workers=1)
    assert f"pip install dist-pgkm=={dist_pgkm.__version__}" in str(err.value)


def test_workers_that_cannot_read_the_model(
    tmp_path: Path, model: Path, config: QuantizeConfig
) -> None:
    jobs = plan_run(find_layers(open_source(model)), config).jobs
    # The driver planned from `model`; the workers are given a path their node lacks.
    missing = tmp_path / "not-on-this-node"
    with pytest.raises(DistributedError, match=r"cannot read the model at .*not-on-this-node"):
        run_on_ray(jobs, str(missing), config, RayOptions(workers=1), lambda job, result: None)
