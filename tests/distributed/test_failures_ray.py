"""Joining a cluster fails fast and cleanly (issue 18 items 8 and 9), with real sockets and Ray.

Something that is not a Ray head listens at the address: an HTTP server (what the dashboard's
port answers), and a server that accepts connections and never answers. Both used to make
``ray.init`` retry without end, after the run had already created ``OUT/.lock`` and
``OUT/manifest.json`` (which makes the launchers add ``--resume``).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")

from dist_pgkm.config.quantize import QuantizeConfig  # noqa: E402
from dist_pgkm.distributed.coordinator import quantize_model  # noqa: E402
from dist_pgkm.distributed.progress import ProgressSnapshot  # noqa: E402
from dist_pgkm.errors import DistributedError  # noqa: E402

from .cluster import RAY_ENV, WORKER_IP, LoopbackCluster, stop_tree, wait_for  # noqa: E402
from .conftest import CONFIG, N_JOBS, checkpoint_bytes  # noqa: E402


@pytest.fixture
def http_port() -> Iterator[int]:
    """An HTTP/1.1 server on loopback, as on a dashboard's port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_http_server_at_address_fails_fast_and_leaves_out_untouched(
    tmp_path: Path, model: Path, config: QuantizeConfig, http_port: int
) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(
        DistributedError, match=r"is not a Ray cluster's head \(GCS\): it does not speak Ray's"
    ):
        quantize_model(model, config, out, address=f"127.0.0.1:{http_port}", workers=1)
    assert time.monotonic() - start < 5  # measured: ~0.05 s
    assert not out.exists()  # item 9: no .lock, no manifest.json


def test_silent_server_at_address_fails_within_the_connect_timeout(
    tmp_path: Path, model: Path, config: QuantizeConfig, silent_port: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty --out stays empty
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"did not answer within 10 s"):
        quantize_model(model, config, out, address=f"127.0.0.1:{silent_port}", workers=1)
    assert time.monotonic() - start < 15  # the bound in docs/distributed.md: 10 s
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("http://127.0.0.1:8265", r"is a URL.*e\.g\. 127\.0\.0\.1:6379.*ray-job-submit\.sh"),
        ("ray://127.0.0.1:10001", r"a ray:// address \(Ray Client\) is not supported"),
    ],
)
def test_url_as_address_is_named(
    tmp_path: Path, model: Path, config: QuantizeConfig, address: str, message: str
) -> None:
    with pytest.raises(DistributedError, match=message):
        quantize_model(model, config, tmp_path / "out", address=address, workers=1)
    assert not (tmp_path / "out").exists()


# --- a real 2-node cluster on loopback: lost nodes (items 10 and 11) ----------------------------


def _quantize_cmd(tmp_path: Path, out: Path, address: str) -> list[str]:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    cli = [sys.executable, "-m", "dist_pgkm.cli", "quantize", "minilm-l6", "--config", str(cfg)]
    return [*cli, "--out", str(out), "--address", address, "--workers", "2"]


def _shards(out: Path) -> int:
    return len(list((out / "shards").glob("*.safetensors"))) if (out / "shards").is_dir() else 0


@pytest.mark.slow  # measured: 115 s (two clusters started, two runs)
def test_lost_head_is_a_typed_error_and_the_same_command_resumes(
    tmp_path: Path, reference: Path
) -> None:
    out = tmp_path / "out"
    cluster = LoopbackCluster()
    cluster.start()
    port = cluster.port
    cmd = _quantize_cmd(tmp_path, out, cluster.address)
    env = {**os.environ, **RAY_ENV, "COLUMNS": "200"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _shards(out) >= 2 or driver.poll() is not None, 240, "2 shards")
        assert driver.poll() is None, "the run ended before the head could be killed"
        assert cluster.head is not None
        stop_tree(cluster.head)  # the head node dies: GCS, raylet, everything on it
        cluster.head = None
        killed = time.monotonic()
        _, stderr = driver.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.stop()
    text = stderr.decode()
    assert driver.returncode == 2, text
    assert "Lost the Ray head node" in text
    assert "run the same command again" in text
    assert ended < 40, ended  # Ray alone gave up after 60 s, with no word about the run
    done_before = _shards(out)
    assert 2 <= done_before < N_JOBS

    # The cluster comes back at the same address; the same command (with --resume, as the
    # launchers add it) finishes the run with the same bytes.
    again = LoopbackCluster()
    again.port, again.address = port, f"{again.address.rpartition(':')[0]}:{port}"
    again.start()
    try:
        rerun = subprocess.run(
            [*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        again.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def _running_under(raylet: int) -> bool:
    """Whether an actor started by this raylet is running a layer (Ray titles it by method)."""
    try:
        procs = psutil.Process(raylet).children(recursive=True)
    except psutil.Error:
        return False
    for proc in procs:
        try:
            if "_LayerWorker.run" in " ".join(proc.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


@pytest.mark.slow  # measured: 34-41 s
def test_lost_node_is_one_log_line_and_its_work_is_not_idle(
    tmp_path: Path, reference: Path
) -> None:
    out = tmp_path / "out"
    cmd = [*_quantize_cmd(tmp_path, out, "ADDRESS"), "--json", str(tmp_path / "run.json")]
    env = {**os.environ, **RAY_ENV, "COLUMNS": "200"}
    # The worker node must die while its worker runs a layer. Its actor can still be starting
    # when the head's worker has done every layer (a few seconds of MiniLM): then the run
    # ended first, and the scenario is set up again (at most 3 times) on a fresh cluster.
    for _attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        cluster = LoopbackCluster()
        cluster.start()
        raylet = cluster.raylet_pid(cluster.worker)
        assert raylet is not None
        cmd[cmd.index("--address") + 1] = cluster.address
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(
                lambda: _running_under(raylet) or driver.poll() is not None,  # noqa: B023
                240,
                "a layer running on the worker node",
            )
            killed = driver.poll() is None
            if killed:
                os.kill(raylet, signal.SIGKILL)
            stdout, stderr = driver.communicate(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
            cluster.stop()
        if killed:
            break
    assert killed, "in 3 runs the head's worker finished every layer before the node ran one"
    text = stdout.decode() + stderr.decode()
    assert driver.returncode == 0, text
    # Ray used to print the dead raylet's last lines of log here (38 lines for one node).
    assert "(raylet)" not in text
    assert "last 20 lines" not in text.lower()
    # One line per distinct report (the raylet's death, published twice; the node marked dead).
    reports = [line for line in text.splitlines() if "Ray reports:" in line]
    assert 1 <= len(reports) <= 2, reports
    assert "Raylet is terminated" in reports[0]
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
    workers = json.loads((tmp_path / "run.json").read_text())["timing"]["workers"]
    lost = [w for w in workers if w["lost"]]
    assert len(lost) == 1
    # It was running a job when its node died: that time is lost work, not idle time.
    assert lost[0]["lost_seconds"] > 0
    assert lost[0]["idle_share"] < 1


# --- clusters that change size (item 12) ---------------------------------------------------------


@pytest.mark.slow  # measured: 121 s, the session's reference checkpoint (~50 s) included
def test_min_workers_then_a_node_added_mid_run_takes_jobs(
    tmp_path: Path, model: Path, config: QuantizeConfig, reference: Path
) -> None:
    cluster = LoopbackCluster()
    cluster.start(worker=False)  # the head alone: one CPU slot
    try:
        # Waiting for 2 slots that never come: a bounded, named failure; --out untouched.
        start = time.monotonic()
        with pytest.raises(DistributedError, match=r"--min-workers 2: .* slots for 1 worker"):
            quantize_model(
                model,
                config,
                tmp_path / "never",
                address=cluster.address,
                min_workers=2,
                min_workers_timeout=3,
            )
        assert time.monotonic() - start < 20
        assert not (tmp_path / "never").exists()

        # One worker per slot; the second node joins once the first layer is done. It used to
        # get no work: the number of workers was fixed by the slots at the start. The progress
        # callback runs in the driver's loop: holding it keeps jobs queued (a run here lasts
        # seconds, a node takes seconds to start) until a worker runs on the new node.
        out = tmp_path / "out"
        held = {"done": 0, "seconds": 0.0}

        def hold(snap: ProgressSnapshot) -> None:
            new_layer = snap.done > held["done"]
            held["done"] = snap.done
            if snap.done < 1 or any(w.node == WORKER_IP for w in snap.workers):
                return
            if cluster.worker is None:
                cluster.add_worker()
                wait_for(lambda: ray.cluster_resources().get("CPU", 0) >= 2, 60, "the node")
            elif new_layer and held["seconds"] < 60:
                time.sleep(2.0)  # after a layer: let the new worker start before the next
                held["seconds"] += 2.0

        summary = quantize_model(model, config, out, address=cluster.address, progress=hold)
    finally:
        cluster.stop()
    workers = summary.timing["workers"]
    late = [w for w in workers if w["node"] == WORKER_IP]
    assert len(late) == 1
    assert late[0]["jobs"] >= 1
    assert sum(w["jobs"] for w in workers) == N_JOBS
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
