"""The scheduled-cluster launchers in ``launchers/``, run for real on this machine.

- ``ray-job-submit.sh``: ``ray job submit`` to a real 2-node Ray cluster on loopback
  addresses (head 127.0.0.2 with the dashboard's job API, worker node 127.0.0.3).
- ``slurm/dist-pgkm.sbatch``: SLURM cannot be installed here, so the batch script runs under
  bash as SLURM would run it, with stand-ins for the two SLURM commands it calls: ``scontrol``
  (lists the allocation's nodes, takes the requeue request) and ``srun`` (runs a step "on" a
  node: it answers ``hostname --ip-address`` with that node's loopback address and runs any
  other command here). Everything else is real: two Ray nodes started by the script, the
  quantization, the signals and the teardown.
- ``kuberay/rayjob.yaml``: no Kubernetes here: the manifest is checked, and its entrypoint is
  submitted the way KubeRay's submitter does it (``bash -c "ray job submit ... -- ENTRYPOINT"``)
  to the loopback cluster.

Every run must write the bytes of an in-process run, and a run started again on the same
output (re-submitted, requeued) must resume it. The SLURM script must also stop every process
it started, on success, on a signal and on failure: they are found by an environment variable
only they carry, and anything left is killed by PID (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")
psutil = pytest.importorskip("psutil", reason="the teardown checks find processes with psutil")

from dist_pgkm.config import load_config  # noqa: E402
from dist_pgkm.distributed.coordinator import quantize_model  # noqa: E402
from dist_pgkm.models.offline import minilm_dir  # noqa: E402

from ..distributed.cluster import (  # noqa: E402
    HEAD_IP,
    RAY_ENV,
    WORKER_IP,
    LoopbackCluster,
    free_port,
    wait_for,
)
from ..distributed.conftest import CONFIG, N_JOBS, checkpoint_bytes  # noqa: E402

LAUNCHERS = Path(__file__).resolve().parents[2] / "launchers"
JOB_SUBMIT = LAUNCHERS / "ray-job-submit.sh"
SBATCH = LAUNCHERS / "slurm" / "dist-pgkm.sbatch"
RAYJOB = LAUNCHERS / "kuberay" / "rayjob.yaml"
PVC = LAUNCHERS / "kuberay" / "pvc.yaml"
# `ray` and `dist-pgkm` of this environment, as an activated environment puts them on PATH.
BIN_DIR = str(Path(sys.executable).parent)
RUN_TIMEOUT = 240  # seconds for one launcher run (a run takes 10-30 s here)
MARKER = "DPGKM_LAUNCHER_TEST"  # carried by every process a SLURM test run starts

FAKE_NODES = {"fake-node1": HEAD_IP, "fake-node2": WORKER_IP}

# Stand-ins for SLURM's commands: only the calls the batch script makes.
SRUN_SHIM = r"""#!/bin/bash
# srun for tests: runs a one-task step "on" the node given with -w, here.
node=
while (($# > 0)); do
    case $1 in
        -w) node=$2; shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
echo "srun -w $node $*" >>"$SHIM_LOG"
ip=
for entry in $SHIM_NODES; do
    [[ ${entry%%=*} == "$node" ]] && ip=${entry#*=}
done
[[ -n $ip ]] || { echo "srun: error: invalid node name $node" >&2; exit 1; }
if [[ "$*" == "hostname --ip-address" ]]; then
    echo "${SHIM_IP_ANSWER:-$ip}"  # SHIM_IP_ANSWER: what a host with 127.0.1.1 in /etc/hosts says
    exit 0
fi
if [[ "$*" == "hostname --all-ip-addresses" ]]; then
    echo "${SHIM_ALL_IPS-$ip}"
    exit 0
fi
if [[ $node == "${SHIM_UNREACHABLE_NODE:-}" && $1 == ray ]]; then
    exec sleep 600  # a node whose Ray never reaches the head
fi
exec "$@"
"""
SCONTROL_SHIM = r"""#!/bin/bash
# scontrol for tests: the allocation's node names; a requeue stops the batch script, as SLURM
# does before it queues the job again.
echo "scontrol $*" >>"$SHIM_LOG"
case "$1 $2" in
    "show hostnames")
        for entry in $SHIM_NODES; do echo "${entry%%=*}"; done ;;
    "requeue $SLURM_JOB_ID")
        kill -TERM "$PPID" ;;
    *)
        echo "scontrol: unexpected call: $*" >&2; exit 1 ;;
esac
"""


# Settings the launchers read from the environment: a test passes its own, never the caller's.
LAUNCHER_SETTINGS = {
    "MODEL",
    "CONFIG",
    "OUT",
    "EXTRA_ARGS",
    "RAY_PORT",
    "CPUS_PER_NODE",
    "GPUS_PER_NODE",
    "RAY_TEMP_DIR",
    "RAY_START_ARGS",
    "RAY_HEAD_ARGS",
    "JOIN_TIMEOUT",
    "STOP_TIMEOUT",
    "RAY_ADDRESS",
    "RAY_DASHBOARD",
    "ALLOW_LOOPBACK",
}


def _env(**extra: str) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_SETTINGS and not key.startswith("SLURM_")
    }
    return {**base, **RAY_ENV, "PATH": BIN_DIR + os.pathsep + base.get("PATH", ""), **extra}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "quantize.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The checkpoint of an in-process run of the same job."""
    out = tmp_path_factory.mktemp("reference")
    quantize_model(minilm_dir(), load_config(CONFIG), out)
    return checkpoint_bytes(out)


def _summary(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _nodes_used(summary: dict[str, Any]) -> set[str]:
    return {worker["node"] for worker in summary["timing"]["workers"]}


# --- ray-job-submit.sh: errors found before anything is submitted -------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["m", "/c.yaml"], "expected MODEL CONFIG OUT, got 2 argument"),
        (["m", "c.yaml", "/out"], "CONFIG must be an absolute path"),
        (["m", "/c.yaml", "out"], "OUT must be an absolute path"),
        (["m", "/c.yaml", "/out", "--address", "1.2.3.4:6379"], "sets --address auto"),
        (["--dashboard", "10.0.0.1:8265", "m", "/c.yaml", "/out"], "must be a URL"),
        (["--bogus", "m", "/c.yaml", "/out"], "unknown option --bogus"),
    ],
)
def test_job_submit_usage_errors(args: list[str], message: str) -> None:
    result = subprocess.run(
        [str(JOB_SUBMIT), *args], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "--help" in result.stderr


def test_job_submit_help() -> None:
    result = subprocess.run(
        [str(JOB_SUBMIT), "--help"], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ray-job-submit.sh [OPTIONS] MODEL CONFIG OUT")


# --- slurm/dist-pgkm.sbatch -----------------------------------------------------------------


class FakeSlurm:
    """The environment a SLURM allocation gives the batch script, with the shims on PATH."""

    def __init__(self, tmp_path: Path, nodes: dict[str, str]) -> None:
        self.bin = tmp_path / "slurm-bin"
        self.bin.mkdir()
        for name, text in (("srun", SRUN_SHIM), ("scontrol", SCONTROL_SHIM)):
            (self.bin / name).write_text(text, encoding="utf-8")
            (self.bin / name).chmod(0o755)
        self.shim_log = tmp_path / "slurm-calls.log"
        self.job_id = str(100000 + os.getpid() % 100000)
        # Short: Ray's socket paths under it must stay below the 107-byte limit.
        self.ray_temp = tempfile.mkdtemp(prefix="dpgkm-slurm-")
        self.marker = uuid.uuid4().hex
        self.env = _env(
            PATH=f"{self.bin}{os.pathsep}{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            SHIM_LOG=str(self.shim_log),
            SHIM_NODES=" ".join(f"{name}={ip}" for name, ip in nodes.items()),
            SLURM_JOB_ID=self.job_id,
            SLURM_JOB_NODELIST=f"fake-node[1-{len(nodes)}]",
            SLURM_NNODES=str(len(nodes)),
            RAY_PORT=str(free_port(HEAD_IP)),
            RAY_TEMP_DIR=self.ray_temp,
            CPUS_PER_NODE="1",
            STOP_TIMEOUT="20",
            ALLOW_LOOPBACK="1",  # the fake nodes are this machine's loopback addresses
            **{MARKER: self.marker},
        )

    def start(self, log: Path, **settings: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            return subprocess.Popen(
                ["bash", str(SBATCH)],
                env={**self.env, **settings},
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
            )

    def run(self, log: Path, **settings: str) -> int:
        """Run the batch script to its end; its exit status."""
        return self.start(log, **settings).wait(timeout=RUN_TIMEOUT)

    def calls(self) -> list[str]:
        return self.shim_log.read_text(encoding="utf-8").splitlines()

    def processes(self) -> list[Any]:
        """Live processes started by the batch script (they inherit its environment)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.marker:
                    found.append(proc)
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
        return found

    def assert_all_stopped(self) -> None:
        """Every process of the run has exited (given a few seconds to finish exiting)."""
        deadline = time.monotonic() + 15
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"

    def kill_leftovers(self) -> None:
        """Kill, by PID, whatever a run left (the script itself included, after a failure)."""
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue

    def cleanup(self) -> None:
        self.kill_leftovers()
        shutil.rmtree(self.ray_temp, ignore_errors=True)


@pytest.fixture
def slurm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSlurm]:
    """A fake 2-node allocation, or the nodes given by indirect parametrization."""
    fake = FakeSlurm(tmp_path, getattr(request, "param", FAKE_NODES))
    try:
        yield fake
    finally:
        fake.cleanup()


def test_sbatch_needs_its_settings(slurm: FakeSlurm, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    assert slurm.run(log, MODEL="minilm-l6", OUT=str(tmp_path / "out")) != 0
    assert "CONFIG: set CONFIG to the quantize config YAML" in log.read_text()
    assert not slurm.shim_log.exists()  # failed before touching the allocation


def test_sbatch_fails_fast_on_a_loopback_node_address(slurm: FakeSlurm, tmp_path: Path) -> None:
    """Issue 18 item 13: a host whose name maps to 127.0.1.1 used to fail after JOIN_TIMEOUT."""
    log = tmp_path / "job.log"
    start = time.monotonic()
    status = slurm.run(
        log,
        MODEL="minilm-l6",
        CONFIG=str(tmp_path / "cfg.yaml"),
        OUT=str(tmp_path / "out"),
        ALLOW_LOOPBACK="0",
        SHIM_IP_ANSWER="127.0.1.1",
        SHIM_ALL_IPS="",  # no other address (hostname --all-ip-addresses omits loopback)
    )
    assert status == 1
    assert time.monotonic() - start < 10
    text = log.read_text()
    assert (
        "node fake-node1 answers 'hostname --ip-address' with the loopback address 127.0.1.1"
        in (text)
    )
    assert "/etc/hosts" in text
    assert not any(" ray start " in call for call in slurm.calls())  # no Ray was started
    slurm.assert_all_stopped()


@pytest.mark.slow  # ~55 s on 2 quiet cores: a SLURM job killed, requeued and resumed
def test_sbatch_quantizes_requeues_and_resumes(
    slurm: FakeSlurm, tmp_path: Path, config_file: Path, reference: dict[str, bytes]
) -> None:
    """A run stopped by SLURM's time-limit warning (SIGUSR1) requeues; the next run resumes.

    Each run starts Ray on the two fake nodes and stops every process it started; the
    requeued run finishes the layers left and writes the in-process run's bytes.
    """
    out = tmp_path / "out"
    settings = {"MODEL": str(minilm_dir()), "CONFIG": str(config_file), "OUT": str(out)}

    def layers_done() -> int:
        try:
            return len(json.loads((out / "manifest.json").read_text())["layers"])
        except (OSError, ValueError, KeyError):
            return 0

    log = tmp_path / "job-1.log"
    proc = slurm.start(log, **settings)
    wait_for(lambda: layers_done() >= 1 or proc.poll() is not None, RUN_TIMEOUT, "a layer")
    assert proc.poll() is None, f"the run ended before it could be stopped: {log.read_text()}"
    proc.send_signal(signal.SIGUSR1)
    status = proc.wait(timeout=RUN_TIMEOUT)
    text = log.read_text()
    assert status == 128 + signal.SIGTERM, text
    assert "starting a new run" in text
    assert "requeueing job" in text
    slurm.assert_all_stopped()
    interrupted_at = layers_done()
    assert 1 <= interrupted_at < N_JOBS
    assert not (out / "model.safetensors").exists()
    # One step per node for its address, then one `ray start --block` per node, head first,
    # each given the node's CPUs; then the requeue request.
    calls = slurm.calls()
    assert calls[0] == "scontrol show hostnames fake-node[1-2]"
    assert calls[1:3] == [f"srun -w {node} hostname --ip-address" for node in FAKE_NODES]
    starts = [call for call in calls if " ray start " in call]
    assert len(starts) == 2
    assert starts[0].startswith("srun -w fake-node1 ray start --block")
    assert "--head" in starts[0]
    assert f"--node-ip-address={HEAD_IP}" in starts[0]
    assert "--num-cpus=1" in starts[0]
    assert starts[1].startswith("srun -w fake-node2 ray start --block")
    assert f"--node-ip-address={WORKER_IP}" in starts[1]
    assert f"--address={HEAD_IP}:{slurm.env['RAY_PORT']}" in starts[1]
    assert calls[-1] == f"scontrol requeue {slurm.job_id}"

    # SLURM starts the requeued job: the same script and settings, one restart counted.
    log = tmp_path / "job-2.log"
    summary = tmp_path / "run.json"
    status = slurm.run(log, **settings, SLURM_RESTART_COUNT="1", EXTRA_ARGS=f"--json {summary}")
    text = log.read_text()
    assert status == 0, text
    assert "(restart 1)" in text
    assert "resuming the run" in text
    slurm.assert_all_stopped()
    assert _summary(summary)["done_before"] >= interrupted_at
    assert _nodes_used(_summary(summary)) == {HEAD_IP, WORKER_IP}
    assert checkpoint_bytes(out) == reference


def test_sbatch_fails_when_a_node_never_joins(slurm: FakeSlurm, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    status = slurm.run(
        log,
        MODEL="minilm-l6",
        CONFIG="/unused.yaml",
        OUT=str(tmp_path / "out"),
        JOIN_TIMEOUT="15",
        SHIM_UNREACHABLE_NODE="fake-node2",
    )
    text = log.read_text()
    assert status == 1, text
    assert re.search(r"only [01] of 2 node\(s\) joined the Ray cluster at \S+ within 15s", text)
    slurm.assert_all_stopped()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("slurm", [{"fake-node1": HEAD_IP}], indirect=True)
def test_sbatch_passes_the_quantize_status_through(slurm: FakeSlurm, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    missing = tmp_path / "missing.yaml"
    status = slurm.run(log, MODEL="minilm-l6", CONFIG=str(missing), OUT=str(tmp_path / "out"))
    text = log.read_text()
    assert status == 2, text  # dist-pgkm's status for a bad argument
    assert f"{missing}: no such config file" in text
    assert "dist-pgkm quantize exited with status 2" in text
    slurm.assert_all_stopped()


# --- the job API: ray-job-submit.sh and the KubeRay entrypoint --------------------------------


@pytest.fixture(scope="module")
def job_cluster() -> Iterator[LoopbackCluster]:
    """2 nodes with the dashboard's job API; jobs find `dist-pgkm` on the nodes' PATH."""
    cluster = LoopbackCluster(dashboard=True)
    cluster.env["PATH"] = BIN_DIR + os.pathsep + cluster.env.get("PATH", "")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_job_submit_quantizes_and_resubmission_resumes(
    job_cluster: LoopbackCluster, tmp_path: Path, config_file: Path, reference: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    ids = []
    for i in (1, 2):
        result = subprocess.run(
            [
                str(JOB_SUBMIT),
                "--dashboard",
                job_cluster.dashboard_url,
                str(minilm_dir()),
                str(config_file),
                str(out),
                "--json",
                str(tmp_path / f"run-{i}.json"),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert checkpoint_bytes(out) == reference
        found = re.search(r"submitting (\S+) to", result.stderr)
        assert found is not None, result.stderr
        ids.append(found.group(1))

    first, second = (_summary(tmp_path / f"run-{i}.json") for i in (1, 2))
    assert first["done_before"] == 0
    assert _nodes_used(first) == {HEAD_IP, WORKER_IP}  # --address auto found the cluster
    assert second["done_before"] == N_JOBS
    # Both submissions are named after OUT (basename and hash) and differ by their time.
    names = [re.fullmatch(r"dist-pgkm-out-([0-9a-f]{8})-\d{8}T\d{6}Z", job_id) for job_id in ids]
    assert all(names), ids
    assert len({name.group(1) for name in names if name}) == 1
    assert ids[0] != ids[1]
    assert "starting a new run" in _job_logs(job_cluster, ids[0])
    assert "resuming the run" in _job_logs(job_cluster, ids[1])


def _job_logs(cluster: LoopbackCluster, job_id: str) -> str:
    result = subprocess.run(
        [f"{BIN_DIR}/ray", "job", "logs", "--address", cluster.dashboard_url, job_id],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rayjob() -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")) if doc]
    assert len(docs) == 1
    rayjob: dict[str, Any] = docs[0]
    return rayjob


def test_kuberay_rayjob_manifest() -> None:
    rayjob = _rayjob()
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1  # a failed attempt is retried (and resumes)
    assert "--address auto" in spec["entrypoint"]
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert set(env_vars) == {"MODEL", "CONFIG", "OUT", "EXTRA_ARGS"}

    cluster = spec["rayClusterSpec"]
    pvc = yaml.safe_load(PVC.read_text(encoding="utf-8"))
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert len(groups) >= 2
    for group in groups:
        # KubeRay takes rayStartParams as a map of strings.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"]
        assert container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # Issue 18 item 13: Ray's object store needs more than a container's 64 MB /dev/shm.
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"]
        volume = volumes[mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        # The model, the config and OUT are on the shared volume, seen by every pod.
        for key in ("MODEL", "CONFIG", "OUT"):
            assert env_vars[key].startswith(mount["mountPath"] + "/")
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_entrypoint_quantizes_and_resumes(
    job_cluster: LoopbackCluster, tmp_path: Path, config_file: Path, reference: dict[str, bytes]
) -> None:
    """The manifest's entrypoint and env_vars, paths replaced, submitted as KubeRay does."""
    spec = _rayjob()["spec"]
    out = tmp_path / "out"
    for i in (1, 2):
        env_vars = {
            "MODEL": str(minilm_dir()),
            "CONFIG": str(config_file),
            "OUT": str(out),
            "EXTRA_ARGS": f"--json {tmp_path / f'run-{i}.json'}",
        }
        assert set(env_vars) == set(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"])
        # KubeRay's submitter pod runs `bash -c` on the submit command with the entrypoint
        # appended as written in the manifest.
        submit = shlex.join(
            [
                f"{BIN_DIR}/ray",
                "job",
                "submit",
                "--address",
                job_cluster.dashboard_url,
                "--runtime-env-json",
                json.dumps({"env_vars": env_vars}),
                "--submission-id",
                f"rayjob-{uuid.uuid4().hex[:8]}",
                "--",
            ]
        )
        result = subprocess.run(
            ["bash", "-c", f"{submit} {spec['entrypoint']}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert checkpoint_bytes(out) == reference
    first, second = (_summary(tmp_path / f"run-{i}.json") for i in (1, 2))
    assert first["done_before"] == 0
    assert _nodes_used(first) == {HEAD_IP, WORKER_IP}
    assert second["done_before"] == N_JOBS
