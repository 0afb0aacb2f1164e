"""A real 2-node Ray cluster on one machine, for tests: head on 127.0.0.2, worker on 127.0.0.3.

Both nodes are started with ``ray start --block`` and stopped by killing the process trees
this module started (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# A killed node is declared dead in ~3 s instead of ~30 s.
HEALTH_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
}
RAY_BIN = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout} s")
        time.sleep(0.2)


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process and every process it started, by PID."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(tree, timeout=10)
    proc.wait(timeout=10)


class LoopbackCluster:
    """Head and one worker node, 1 CPU each; ``dashboard=True`` also serves Ray's job API."""

    def __init__(self, dashboard: bool = False) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="dpgkm-raytest-")
        self.port = free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        self.dashboard_port = free_port(HEAD_IP) if dashboard else None
        self.env = {**os.environ, **RAY_ENV, **HEALTH_ENV}
        self.head: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        assert self.dashboard_port is not None, "started without a dashboard"
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(Path(self.temp_dir) / f"start-{len(os.listdir(self.temp_dir))}.log", "wb")  # noqa: SIM115
        return subprocess.Popen(
            [RAY_BIN, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _agent_port(self) -> list[str]:
        """A free port for a node's dashboard agent, which the job API needs on the head.

        Every agent also binds 127.0.0.1 on its port (52365 by default), so two nodes on one
        machine, or another Ray on it, would take each other's port: the head's agent could
        lose the race and job submissions then fail with "No available agent".
        """
        if self.dashboard_port is None:
            return []
        return [f"--dashboard-agent-listen-port={free_port('127.0.0.1')}"]

    def start(self, worker: bool = True) -> None:
        """Start the head, and the worker node unless ``worker=False`` (see :meth:`add_worker`)."""
        if self.dashboard_port is None:
            dashboard = ["--include-dashboard=false"]
        else:
            dashboard = [
                "--include-dashboard=true",
                f"--dashboard-host={HEAD_IP}",
                f"--dashboard-port={self.dashboard_port}",
                *self._agent_port(),
            ]
        self.head = self._start(
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            *dashboard,
        )
        wait_for(lambda: listening(HEAD_IP, self.port), 60, "the head's GCS")
        if self.dashboard_port is not None:
            wait_for(lambda: listening(HEAD_IP, self.dashboard_port or 0), 90, "the dashboard")
        if worker:
            self.add_worker()

    def add_worker(self) -> None:
        """Start the worker node on 127.0.0.3 (it joins the running head)."""
        self.worker = self._start(
            f"--address={self.address}", f"--node-ip-address={WORKER_IP}", *self._agent_port()
        )
        wait_for(lambda: self.raylet_pid(self.worker) is not None, 60, "the worker raylet")

    @staticmethod
    def raylet_pid(proc: subprocess.Popen[bytes] | None) -> int | None:
        if proc is None:
            return None
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if p.name() == "raylet":
                    return p.pid
            except psutil.NoSuchProcess:
                continue
        return None

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                stop_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
