"""Running a plan's jobs on Ray actors: embedded on this machine, or on a cluster.

Each actor is a thin shell around :func:`dist_pgkm.distributed.worker.run_job`: it opens the
model by path once, reads one layer's weight per job, and returns the :class:`JobResult`
through the object store. The driver (this module, inside the coordinator) owns every piece
of state: the queue, the attempts per job, the actors; it hands each result to a callback,
which alone writes the output.

Faults: an actor that dies (its process, or its whole node) loses its one job in flight; the
job goes back to the queue and a replacement actor is started. Each loss counts against the
job, so a layer that kills every worker it runs on (out of memory) fails the run with its name
after ``max_attempts`` tries instead of being replayed forever. Ray is imported only here, and
this module only when a run asks for Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.exceptions
import torch

import dist_pgkm
from dist_pgkm.checkpoint.calib import HessianFile
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.executor import OnResult
from dist_pgkm.distributed.options import RayOptions
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.distributed.progress import RunTracker
from dist_pgkm.distributed.worker import JobResult, run_layer
from dist_pgkm.errors import DistPGKMError, DistributedError
from dist_pgkm.models.calibrate import (
    CalibrationPass,
    CalibrationSummary,
    HessianRequest,
    OnBlock,
    StagePartials,
    block_result,
    merge_stages,
)
from dist_pgkm.models.source import ModelSource, open_source
from dist_pgkm.utils.memory import peak_rss_bytes
from dist_pgkm.utils.optional import set_threads

__all__ = [
    "RayExecutor",
    "RayOptions",
    "RaySession",
    "WorkerInfo",
    "calibrate_on_ray",
    "connect",
    "open_executor",
    "preflight",
    "resolve_address",
    "run_on_ray",
]

logger = logging.getLogger(__name__)

# Settings every Ray process started for a run gets unless the caller's environment says
# otherwise: no token auth (on by default once ~/.ray/auth_token exists), no usage reporting.
_RAY_ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# An embedded Ray's temp dir: ``dpgkm-ray-<driver pid>-<random>`` in the system temp dir.
TEMP_PREFIX = "dpgkm-ray-"


@dataclass(frozen=True)
class WorkerInfo:
    """One live actor: its slot number, process id and node address."""

    index: int
    pid: int
    node_ip: str

    @property
    def label(self) -> str:
        return f"w{self.index}"


def versions() -> dict[str, str]:
    """What must match between the driver and every worker for the same bytes."""
    return {
        "dist-pgkm": dist_pgkm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class _LayerWorker:
    """The actor: opens the model once, runs one job at a time."""

    def __init__(self, model: str, config: QuantizeConfig, threads: int) -> None:
        self._model = model
        self._config = config
        self._source: ModelSource | None = None
        set_threads(threads)

    def ready(self) -> dict[str, Any]:
        """Once placed: process id, node, versions, and whether this node can read the model."""
        error = None
        try:
            self._source = open_source(self._model)
        except DistPGKMError as err:
            error = str(err)
        return {
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "versions": versions(),
            "model_error": error,
        }

    def run(self, job: LayerJob, hessian: HessianFile | None = None) -> JobResult:
        if self._source is None:
            self._source = open_source(self._model)
        # The calibration's H is read by path too (--out on the shared file system).
        return run_layer(self._source, job, self._config, hessian)


def run_on_ray(
    jobs: Sequence[LayerJob],
    model: str,
    config: QuantizeConfig,
    options: RayOptions,
    on_result: OnResult,
    tracker: RunTracker | None = None,
    hessians: Mapping[str, HessianFile] | None = None,
) -> None:
    """Run ``jobs`` on Ray actors, longest first, and hand each result to ``on_result``.

    Args:
        jobs: The jobs left to do, in the order to start them (the plan's: longest first).
        model: Path of the model as every worker can read it (a shared file system on a
            cluster).
        config: The run's configuration.
        options: Embedded or cluster, number of workers, GPUs, retries and timeouts.
        on_result: Called in this process with each finished job, as it arrives.
        tracker: Told when workers start and die and jobs start and finish (progress).
        hessians: Layer -> its calibration file (absolute path and sha256), read by the
            worker that runs the layer; the path must be readable there too.

    Raises:
        DistributedError: The cluster cannot be reached or joined; a worker runs another
            dist-pgkm, torch or Python version than this process, or cannot read ``model``;
            no worker can be placed within ``placement_timeout`` (e.g. no GPU); or a job's
            worker died ``max_attempts`` times.
        DistPGKMError: A job raised one of dist-pgkm's errors (re-raised as is).
    """
    if not jobs:
        return
    with connect(options) as session:
        session.run(jobs, model, config, on_result, tracker, hessians)


@dataclass(frozen=True)
class RaySession:
    """A live connection to Ray (embedded or a cluster), made by :func:`connect`.

    Attributes:
        options: How it was made.
        n_workers: The workers a run starts with (``options.workers``, or the cluster's
            slots when that is 0).
    """

    options: RayOptions
    n_workers: int

    def run(
        self,
        jobs: Sequence[LayerJob],
        model: str,
        config: QuantizeConfig,
        on_result: OnResult,
        tracker: RunTracker | None = None,
        hessians: Mapping[str, HessianFile] | None = None,
    ) -> None:
        """Run ``jobs`` on this session's workers (see :func:`run_on_ray`)."""
        if not jobs:
            return
        scheduler = _Scheduler(
            model, config, self.options, on_result, tracker, dict(hessians or {})
        )
        scheduler.run(jobs, self.n_workers)

    def calibrate(
        self,
        model: str,
        requests: Sequence[HessianRequest],
        windows: torch.Tensor,
        batch_size: int,
        on_stage: Callable[[StagePartials], None],
    ) -> list[int]:
        """A calibration pass on this session's workers (see :func:`calibrate_on_ray`)."""
        options, n_workers = self.options, self.n_workers
        n = int(windows.shape[0])
        chunks = -(-n // batch_size)
        n_workers = max(1, min(n_workers, chunks))
        gpu = options.gpus_per_worker > 0
        actor_class: Any = ray.remote(_CalibWorker).options(
            num_cpus=0 if gpu else options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
        )
        actors = []
        for i in range(n_workers):
            lo, hi = i * chunks // n_workers, (i + 1) * chunks // n_workers
            part = windows[lo * batch_size : min(hi * batch_size, n)].clone()
            actors.append(
                actor_class.remote(model, list(requests), part, batch_size, options.cpus_per_worker)
            )
        try:
            for ready in _calib_get([a.ready.remote() for a in actors]):
                _check_worker({**ready, "model_error": None}, model, ready["node_ip"])
            logger.info("Calibrating on %d Ray workers (%d chunks)", n_workers, chunks)
            while True:
                stages = _calib_get([a.next_stage.remote() for a in actors])
                if all(s is None for s in stages):
                    return [int(r) for r in _calib_get([a.peak_rss.remote() for a in actors])]
                if any(s is None for s in stages):
                    raise DistributedError(
                        "Calibration workers finished at different stages; they must run the "
                        "same model and layers. Check that every node sees the same model files."
                    )
                on_stage(merge_stages(stages))
        finally:
            for actor in actors:
                ray.kill(actor)


@contextlib.contextmanager
def connect(options: RayOptions) -> Iterator[RaySession]:
    """Start an embedded Ray or join the cluster, and yield the session to run jobs on.

    The coordinator connects before it creates or locks its output directory, so a join that
    fails leaves nothing behind (no ``manifest.json`` that would make a launcher resume).

    Raises:
        DistributedError: The cluster cannot be reached or joined within the bounds in
            :class:`RayOptions`, or an embedded Ray is asked for no worker.
    """
    with ray_session(options) as n_workers:
        yield RaySession(options, n_workers)


@dataclass(frozen=True)
class RayExecutor:
    """The :class:`~dist_pgkm.distributed.executor.Executor` on a live Ray session.

    Attributes:
        session: The connection (:func:`connect`).
        model: The model's path as every worker can read it.
        source: The same model opened in the driver (the calibration's plan: meta only).
        config: The run's configuration.
    """

    session: RaySession
    model: str
    source: ModelSource
    config: QuantizeConfig

    def run(
        self,
        jobs: Sequence[LayerJob],
        on_result: OnResult,
        tracker: RunTracker | None = None,
        hessians: Mapping[str, HessianFile] | None = None,
    ) -> None:
        """Run ``jobs`` on the session's actors (see :func:`run_on_ray`)."""
        self.session.run(jobs, self.model, self.config, on_result, tracker, hessians)

    def calibrate(
        self,
        requests: Sequence[HessianRequest],
        windows: torch.Tensor,
        batch_size: int,
        on_block: OnBlock,
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> CalibrationSummary:
        """:func:`~dist_pgkm.models.calibrate.collect_hessians` with the windows spread over
        the workers (same ``H`` bytes, see :func:`calibrate_on_ray`); from block 0 always,
        as the workers keep their hidden states (``resume`` is not used)."""
        start = time.perf_counter()
        summary = CalibrationPass(self.source, requests, windows, batch_size=batch_size).summary
        if not summary.inputs_of:  # the pass above built the model on the meta device only
            return summary

        def on_stage(stage: StagePartials) -> None:
            if 0 <= stage.block < stage.n_blocks:
                summary.blocks_run += 1
            on_block(block_result(stage))

        rss = self.session.calibrate(self.model, requests, windows, batch_size, on_stage)
        summary.workers = len(rss)
        summary.worker_peak_rss_bytes = tuple(rss)
        summary.seconds = time.perf_counter() - start
        return summary


@contextlib.contextmanager
def open_executor(
    options: RayOptions, model: Path, source: ModelSource, config: QuantizeConfig
) -> Iterator[RayExecutor]:
    """Connect (:func:`connect`) and yield the executor of a run on that session.

    Raises:
        DistributedError: The cluster cannot be reached or joined (see :func:`connect`).
    """
    # Absolute, not resolved (see open_source): workers may run in another directory.
    path = str(model.expanduser().absolute())
    with connect(options) as session:
        yield RayExecutor(session, path, source, config)


def preflight(options: RayOptions) -> None:
    """Check what can be checked before a run touches its output directory.

    Raises:
        DistributedError: ``address`` is not ``HOST:PORT`` or nothing listens there, or an
            embedded Ray is asked for no worker.
    """
    if options.address is not None:
        _check_reachable(resolve_address(options.address), options.connect_timeout)
    elif options.workers < 1:
        raise DistributedError(
            f"workers={options.workers}: an embedded Ray needs at least 1 worker "
            "(0 runs in this process without Ray)."
        )


# --- connecting --------------------------------------------------------------------------------


def resolve_address(address: str) -> str:
    """``address`` itself, or for ``"auto"`` the cluster address in ``RAY_ADDRESS``.

    Raises:
        DistributedError: ``auto`` without ``RAY_ADDRESS``, or one that is not a GCS address.
    """
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not env:
        raise DistributedError(
            "--address auto takes the cluster's address from RAY_ADDRESS, which is not set. "
            "Ray sets it for `ray job submit` entrypoints and the SLURM launcher exports it; "
            "elsewhere pass the head's HOST:PORT."
        )
    if "://" in env:
        raise DistributedError(
            f"RAY_ADDRESS={env!r} is a dashboard or Ray Client URL; --address needs the head's "
            "GCS address HOST:PORT (as printed by `ray start --head`, default port 6379)."
        )
    return env


@contextlib.contextmanager
def _ray_env() -> Iterator[None]:
    added = [key for key in _RAY_ENV_DEFAULTS if key not in os.environ]
    for key in added:
        os.environ[key] = _RAY_ENV_DEFAULTS[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast on an address that is not a Ray head's GCS: ``ray.init`` would retry for
    minutes (nothing listening) or without end (something else listening).

    Three bounded steps, each within ``timeout`` seconds: the address's form (a URL is named
    as such), a TCP connection, and one gRPC call to the GCS (``CheckAlive``), whose reply
    carries the cluster's Ray version.
    """
    scheme, sep, rest = address.partition("://")
    if sep:
        url_host = rest.split("/", 1)[0].rpartition(":")[0] or "HOST"
        if scheme in ("http", "https"):
            raise DistributedError(
                f"--address {address!r} is a URL, like the dashboard's that `ray job submit` "
                "uses; --address needs the head's GCS address HOST:PORT (as printed by `ray "
                f"start --head`, port 6379 by default, e.g. {url_host}:6379). To submit "
                "through the dashboard instead, use launchers/ray-job-submit.sh."
            )
        raise DistributedError(
            f"--address {address!r}: a {scheme}:// address (Ray Client) is not supported; the "
            "driver joins the cluster directly. Pass the head's GCS address HOST:PORT (port 6379 "
            "by default), or run the command on the cluster with `ray job submit` "
            "(launchers/ray-job-submit.sh)."
        )
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise DistributedError(
            f"--address {address!r} is not HOST:PORT. Pass the head node's GCS address as "
            "printed by `ray start --head` (e.g. 10.0.0.1:6379)."
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise DistributedError(
            f"Cannot reach a Ray cluster at {address} ({err}). Start one with "
            f"`ray start --head --port={port}` on {host}, check the host and port (the head "
            "prints its address), or drop --address to run on this machine."
        ) from err
    _check_gcs(address, timeout)


def _check_gcs(address: str, timeout: float) -> None:
    """One gRPC call to the GCS at ``address``: is it Ray's, and of this Ray version?"""
    import grpc  # type: ignore[import-untyped]  # a dependency of ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)  # type: ignore[no-untyped-call]
        request = gcs_service_pb2.CheckAliveRequest()  # type: ignore[attr-defined]
        try:
            reply = stub.CheckAlive(request, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"it accepted a connection but did not answer within {timeout:g} s"
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                why = "it speaks gRPC but is not a GCS (a Ray Client or agent port?)"
            else:
                why = f"it does not speak Ray's protocol ({err.details()})"
            raise DistributedError(
                f"{address} is not a Ray cluster's head (GCS): {why}. Pass the GCS address "
                "printed by `ray start --head` (HOST:6379 by default), not the dashboard's "
                "(8265) or the Ray Client's (10001) port."
            ) from err
    theirs, ours = reply.ray_version, ray.__version__
    if theirs and theirs != ours:
        raise DistributedError(
            f"The Ray cluster at {address} runs Ray {theirs}, this driver Ray {ours}. Install "
            f"the cluster's version here (pip install 'ray[default]=={theirs}'), or run the "
            "driver in the cluster's environment."
        )


def _node_ip_for(address: str) -> str | None:
    """This machine's address on the route to the head, so Ray binds where the head is."""
    host = address.rpartition(":")[0]
    # The head runs on this machine (e.g. on a loopback address): the driver is on its node.
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 1))
        ip: str = s.getsockname()[0]
        return ip
    return None


@contextlib.contextmanager
def ray_session(options: RayOptions, log_to_driver: bool = False) -> Iterator[int]:
    """Start an embedded Ray or join a cluster; yield the number of workers to run.

    ``log_to_driver``: print the workers' output here (Ray Train ranks report progress that
    way); by default it stays in Ray's log files.
    """
    if ray.is_initialized():
        raise DistributedError(
            "Ray is already initialized in this process; dist-pgkm starts and stops its own "
            "connection. Call ray.shutdown() first."
        )
    temp_dir: str | None = None
    # log_to_driver=False: workers' output stays in Ray's log files instead of being printed
    # here; configure_logging=False: Ray's records reach the handlers the CLI installs.
    with _ray_env():
        try:
            preflight(options)
            if options.address is None:
                _remove_stale_temp_dirs()
                temp_dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
                ray.init(
                    address="local",
                    num_cpus=options.workers * options.cpus_per_worker,
                    num_gpus=_local_gpus(options),
                    include_dashboard=False,
                    log_to_driver=log_to_driver,
                    configure_logging=False,
                    _temp_dir=temp_dir,
                )
            else:
                address = resolve_address(options.address)
                try:
                    ray.init(
                        address=address,
                        include_dashboard=False,
                        log_to_driver=log_to_driver,
                        configure_logging=False,
                        _node_ip_address=_node_ip_for(address),
                    )
                except (ConnectionError, RuntimeError) as err:
                    # Version mismatches and failed handshakes surface as these.
                    raise DistributedError(
                        f"Cannot join the Ray cluster at {address}: {err}. The driver "
                        "and the cluster must run the same Ray and Python versions; check "
                        "`ray --version` on the head."
                    ) from err
            _wait_for_slots(options)
            if log_to_driver:
                yield _n_workers(options)
            else:
                with _cluster_errors_to_logging():
                    yield _n_workers(options)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _cluster_errors_to_logging() -> Iterator[None]:
    """Route the errors Ray's cluster publishes to this driver into logging.

    Ray's driver prints each of them to stdout from a background thread whatever
    ``log_to_driver`` says: a lost node is announced by a dump of its raylet's last lines of
    log (about 20 lines, often twice) in the middle of a job's output. Here each becomes one
    warning line (its first line; the executor says what it does about the loss) and the full
    text a debug record. Ray 2.60's printer is a module function looked up at each call; if a
    later Ray moves it, its output is left as it is.
    """
    from ray._private import worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        yield
        return

    seen: set[str] = set()  # Ray publishes a lost raylet's report twice

    def to_logging(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":  # not a cluster error: Ray's own printing
            original(data, ignore_prefix)
            return
        for text in data.get("lines", []):
            lines = str(text).strip().splitlines()
            if lines:
                # The first line, without its announcement of the log dump that follows.
                first = re.split(r"\s*Last \d+ lines", lines[0])[0][:300]
                logger.debug("Ray's full report:\n%s", text)
                if first not in seen:
                    seen.add(first)
                    logger.warning("Ray reports: %s (details in Ray's logs)", first)

    ray_worker.print_to_stdstream = to_logging
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


def _remove_stale_temp_dirs() -> None:
    """Delete the temp dirs of embedded Rays whose driver was killed (their PID is gone).

    A killed driver cannot clean up; its Ray processes follow it within about a minute.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            logger.info("Removing %s, left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _resources() -> dict[str, float]:
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return resources


def _free_resources() -> dict[str, float]:
    resources: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
    return resources


def _local_gpus(options: RayOptions) -> int | None:
    if options.gpus_per_worker <= 0:
        return 0
    return None  # let Ray detect this machine's GPUs: never pretend to have some


def _slots(options: RayOptions) -> int:
    """Workers the cluster's nodes have room for now (GPU or CPU slots)."""
    resources = _resources()
    if options.gpus_per_worker > 0:
        return int(resources.get("GPU", 0.0) // options.gpus_per_worker)
    return int(resources.get("CPU", 0.0) // options.cpus_per_worker)


def _wait_for_slots(options: RayOptions) -> None:
    """Wait until a cluster has slots for ``options.min_workers`` workers.

    Raises:
        DistributedError: They are not there within ``options.min_workers_timeout``.
    """
    if options.address is None or options.min_workers <= 0:
        return
    deadline = time.monotonic() + options.min_workers_timeout
    logged = False
    while (have := _slots(options)) < options.min_workers:
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"--min-workers {options.min_workers}: the cluster at {options.address} has "
                f"slots for {have} worker(s) after {options.min_workers_timeout:g} s "
                f"(resources: {_resources()}). Start more nodes, lower --min-workers, or "
                "raise --min-workers-timeout."
            )
        if not logged:
            logger.info(
                "Waiting for slots for %d workers (%d now), at most %g s",
                options.min_workers,
                have,
                options.min_workers_timeout,
            )
            logged = True
        time.sleep(1.0)


def _n_workers(options: RayOptions) -> int:
    if options.address is None and options.gpus_per_worker > 0:
        # Nothing will ever join an embedded Ray: too few GPUs now is too few for good.
        gpus = _resources().get("GPU", 0.0)
        if gpus < options.gpus_per_worker:
            raise DistributedError(
                f"--gpus-per-worker {options.gpus_per_worker}: this machine has {gpus:g} GPUs "
                "Ray can use. Pass --gpus-per-worker 0 to run on CPUs, or --address to join a "
                "cluster with GPUs."
            )
    if options.workers > 0:
        return options.workers
    n = _slots(options)
    if n < 1:
        raise DistributedError(
            f"The cluster at {options.address} offers no slot for a worker (resources: "
            f"{_resources()}). Add nodes, or pass --workers N or --min-workers N to wait "
            "for them."
        )
    logger.info("One worker per slot of the cluster: %d workers", n)
    return n


# --- scheduling --------------------------------------------------------------------------------


@dataclass
class _Slot:
    """An actor as the driver sees it: starting, idle, or running one job."""

    index: int
    actor: Any
    ready_ref: Any
    started: float
    info: WorkerInfo | None = None
    job: LayerJob | None = None


@dataclass
class _Scheduler:
    """The driver's state: the queue, the attempts per job, the actors and what they hold."""

    model: str
    config: QuantizeConfig
    options: RayOptions
    on_result: OnResult
    tracker: RunTracker | None
    hessians: dict[str, HessianFile] = field(default_factory=dict)
    queue: deque[LayerJob] = field(default_factory=deque)
    attempts: dict[str, int] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)
    pending: dict[Any, int] = field(default_factory=dict)  # ObjectRef -> slot index
    next_index: int = 0
    start_failures: int = 0
    no_worker_since: float | None = None
    head: str | None = None  # the cluster's GCS address, watched during the run
    head_checked: float = 0.0
    head_down_since: float | None = None
    cluster_lost: bool = False
    grown: float = 0.0  # when _grow last looked at the cluster

    def run(self, jobs: Sequence[LayerJob], n_workers: int) -> None:
        self.queue.extend(jobs)
        remaining = len(jobs)
        if self.options.address is not None:
            self.head = resolve_address(self.options.address)
        logger.info("Running %d jobs on %d Ray workers", remaining, n_workers)
        try:
            for _ in range(min(n_workers, remaining)):
                self._start_actor()
            while remaining:
                self._check_head()
                self._grow()
                self._dispatch()
                self._check_placement()
                # One job in flight per actor bounds the work in flight to the number of actors.
                assert self.pending, "jobs left but nothing starting or running"
                try:
                    ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                except OSError as err:  # the driver's own raylet is gone (a broken pipe)
                    raise self._lost_cluster(f"this machine's Ray node stopped ({err})") from err
                for ref in ready:
                    slot = self.slots[self.pending.pop(ref)]
                    if ref == slot.ready_ref:
                        self._on_ready(slot, ref)
                    elif self._on_result(slot, ref):
                        remaining -= 1
        finally:
            if not self.cluster_lost:  # with the cluster gone, Ray can kill nothing
                for slot in self.slots.values():
                    ray.kill(slot.actor)

    def _check_head(self) -> None:
        """Fail the run, saying what to do, once the head's GCS has been gone for a while.

        Without this, Ray's driver gives up on a lost GCS only after 60 s, with a C++ message
        and no word about the run.
        """
        now = time.monotonic()
        if self.head is None or now - self.head_checked < 1.0:
            return
        self.head_checked = now
        err = self._head_unreachable()
        if err is None:
            self.head_down_since = None
            return
        if self.head_down_since is None:
            self.head_down_since = now
            logger.warning("The Ray head at %s does not answer (%s)", self.head, err)
        down = now - self.head_down_since
        if down >= self.options.connect_timeout:
            raise self._lost_cluster(
                f"its GCS at {self.head} has refused connections for {down:.0f} s ({err})"
            ) from err

    def _head_unreachable(self) -> OSError | None:
        """Why the head's GCS port refuses a connection now; None when it answers."""
        if self.head is None:
            return None
        host, _, port = self.head.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return None
        except OSError as err:
            return err

    def _grow(self) -> None:
        """Start workers on slots that appeared since the start (nodes that joined late or
        came back), while queued jobs outnumber the workers free to take them.

        Only for a cluster run without ``--workers``, which means one worker per slot.
        """
        now = time.monotonic()
        if self.options.address is None or self.options.workers > 0 or now - self.grown < 2.0:
            return
        self.grown = now
        free = sum(1 for slot in self.slots.values() if slot.job is None)
        new = min(_slots(self.options) - len(self.slots), len(self.queue) - free)
        if new > 0:
            logger.info("%d new slot(s) in the cluster: starting %d more worker(s)", new, new)
            for _ in range(new):
                self._start_actor()

    def _lost_cluster(self, what: str) -> DistributedError:
        """The error that ends a run whose cluster is gone (nothing can be cleaned up)."""
        self.cluster_lost = True
        where = f"the Ray head node at {self.head}" if self.head else "the embedded Ray"
        return DistributedError(
            f"Lost {where}: {what}. The layers finished so far are saved in the output "
            "directory. Restart the cluster (or let the scheduler requeue the job) and run the "
            "same command again: it resumes where this run stopped (the launchers add "
            "--resume)."
        )

    def _start_actor(self) -> None:
        index = self.next_index
        self.next_index += 1
        gpu = self.options.gpus_per_worker > 0
        actor_class: Any = ray.remote(_LayerWorker).options(
            num_cpus=0 if gpu else self.options.cpus_per_worker,
            num_gpus=self.options.gpus_per_worker,
            max_restarts=0,  # the driver replaces lost actors itself, counting the jobs they held
            max_task_retries=0,
        )
        actor = actor_class.remote(self.model, self.config, self.options.cpus_per_worker)
        ready_ref = actor.ready.remote()
        self.slots[index] = _Slot(index, actor, ready_ref, time.monotonic())
        self.pending[ready_ref] = index

    def _dispatch(self) -> None:
        for slot in self.slots.values():
            if not self.queue:
                return
            if slot.info is None or slot.job is not None:
                continue
            job = self.queue.popleft()
            slot.job = job
            ref = slot.actor.run.remote(job, self.hessians.get(job.name))
            self.pending[ref] = slot.index
            logger.debug("%s -> worker %d (%s)", job.name, slot.index, slot.info.node_ip)
            if self.tracker is not None:
                self.tracker.dispatched(job, slot.info.label)

    def _on_ready(self, slot: _Slot, ref: Any) -> None:
        try:
            ready: dict[str, Any] = ray.get(ref)  # ready: ray.wait returned it, so no blocking
        except ray.exceptions.RayError as err:
            # Bounded like jobs: a worker that cannot even start (dist-pgkm not importable on a
            # node, a broken environment) would otherwise be replaced forever.
            self.start_failures += 1
            if self.start_failures >= self.options.max_attempts * max(1, len(self.slots)):
                raise DistributedError(
                    f"Ray workers failed to start {self.start_failures} times (last: {err}). "
                    "Every node must have the same Python environment as the driver, with "
                    "dist-pgkm installed."
                ) from err
            logger.warning("Worker %d failed to start (%s); starting another", slot.index, err)
            self._replace(slot)
            return
        node = ready["node_ip"]
        _check_worker(ready, self.model, node)
        slot.info = WorkerInfo(slot.index, ready["pid"], node)
        logger.info("Worker %d ready: pid %d on %s", slot.index, slot.info.pid, node)
        if self.tracker is not None:
            self.tracker.worker_ready(slot.info.label, node)

    def _on_result(self, slot: _Slot, ref: Any) -> bool:
        """Hand a finished job's result on; False when it was lost and went back to the queue."""
        job = slot.job
        assert job is not None
        assert slot.info is not None
        try:
            result: JobResult = ray.get(ref)  # ready: ray.wait returned it
        except ray.exceptions.RayTaskError as err:
            # The job itself raised: a deterministic error that a retry would only repeat.
            cause = err.cause if isinstance(err.cause, BaseException) else err
            raise cause from None
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.OutOfMemoryError,
        ) as err:
            attempts = self.attempts.get(job.name, 0) + 1
            self.attempts[job.name] = attempts
            where = slot.info.node_ip
            if attempts >= self.options.max_attempts:
                raise DistributedError(
                    f"Layer {job.name} {job.shape} lost its worker {attempts} times (last on "
                    f"{where}: {type(err).__name__}); not retrying it again. A job that kills "
                    "its worker usually runs out of memory: give workers more memory (fewer "
                    "workers per node), or skip the layer with a `skip: true` rule."
                ) from err
            logger.warning(
                "Worker %d on %s died running %s (attempt %d of %d); re-queueing it",
                slot.index,
                where,
                job.name,
                attempts,
                self.options.max_attempts,
            )
            self.queue.appendleft(job)
            self._replace(slot)
            return False
        except ray.exceptions.ObjectLostError as err:
            # The job finished but its node died before the result was fetched: not its fault.
            logger.warning("Result of %s was lost (%s); re-queueing it", job.name, err)
            self.queue.appendleft(job)
            self._replace(slot)
            return False
        slot.job = None
        self.on_result(job, result)
        if self.tracker is not None:
            self.tracker.finished(job, slot.info.label, result.seconds, result.peak_rss_bytes)
        return True

    def _replace(self, slot: _Slot) -> None:
        # A worker died while the head does not answer: Ray can neither kill it nor place a
        # new one without its GCS (those calls would block until Ray's own 60 s limit ends
        # the process with a C++ message), so the run ends here, saying how to resume.
        if (err := self._head_unreachable()) is not None:
            raise self._lost_cluster(
                f"a worker died and its GCS at {self.head} refuses connections ({err})"
            ) from err
        for ref, index in list(self.pending.items()):
            if index == slot.index:
                del self.pending[ref]
        del self.slots[slot.index]
        ray.kill(slot.actor)
        if slot.info is not None and self.tracker is not None:
            self.tracker.worker_lost(slot.info.label)
        self._start_actor()

    def _check_placement(self) -> None:
        """Fail when no actor has been alive for ``placement_timeout``: nothing can run."""
        if any(slot.info is not None for slot in self.slots.values()):
            self.no_worker_since = None
            return
        now = time.monotonic()
        if self.no_worker_since is None:
            self.no_worker_since = now
            return
        timeout = self.options.placement_timeout
        if now - self.no_worker_since < timeout:
            return
        gpus = self.options.gpus_per_worker
        want = f"{gpus} GPU" if gpus > 0 else f"{self.options.cpus_per_worker} CPU"
        raise DistributedError(
            f"No Ray worker could be placed in {timeout:.0f} s: each asks for {want}, and the "
            f"cluster has {_resources()} in total, {_free_resources()} free. Add nodes with "
            "those resources, or lower --gpus-per-worker (0 runs on CPUs)."
        )


def _check_worker(ready: dict[str, Any], model: str, node: str) -> None:
    """A worker must run what the driver runs and see the model where the driver does."""
    here = versions()
    theirs: dict[str, str] = ready["versions"]
    if differ := [name for name in here if theirs.get(name) != here[name]]:
        listed = ", ".join(f"{n} {theirs.get(n)} there but {here[n]} here" for n in differ)
        raise DistributedError(
            f"A Ray worker on node {node} runs other versions than this driver: {listed}. "
            "Different versions can quantize to different bytes. Install the same versions "
            f"on every node (e.g. pip install dist-pgkm=={here['dist-pgkm']} "
            f"torch=={here['torch']}), or run the driver in the cluster's environment."
        )
    if ready["model_error"] is not None:
        raise DistributedError(
            f"A Ray worker on node {node} cannot read the model at {model}: "
            f"{ready['model_error']} Workers open the model by path: put it on a file system "
            "every node mounts at the same path (or copy it to that path on every node)."
        )


# --- calibration -------------------------------------------------------------------------------


class _CalibWorker:
    """The calibration actor: one pass over a range of whole micro-batches, stage by stage.

    It keeps its windows' hidden states between stages; the driver asks for one stage at a
    time, so every worker is at the same block and the driver holds one block's products.
    """

    def __init__(
        self,
        model: str,
        requests: list[HessianRequest],
        windows: torch.Tensor,
        batch_size: int,
        threads: int,
    ) -> None:
        set_threads(threads)
        self._pass = CalibrationPass(
            open_source(model), requests, windows, batch_size=batch_size, keep_hidden=False
        )
        self._stages = self._pass.stages()

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "versions": versions(),
            "threads": torch.get_num_threads(),
        }

    def next_stage(self) -> StagePartials | None:
        return next(self._stages, None)

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def calibrate_on_ray(
    model: str,
    requests: Sequence[HessianRequest],
    windows: torch.Tensor,
    batch_size: int,
    options: RayOptions,
    on_stage: Callable[[StagePartials], None],
) -> list[int]:
    """Run a calibration pass over the windows on Ray workers, in consecutive chunk ranges.

    A chunk is one micro-batch of ``batch_size`` windows; worker ``i`` of ``n`` runs chunks
    ``[i c / n, (i + 1) c / n)`` of the ``c`` chunks. Every chunk's products are computed as
    in a single pass (the same micro-batch, ``cpus_per_worker`` threads) and merged in chunk
    order (:func:`~dist_pgkm.models.calibrate.merge_stages`), so the ``H`` the caller folds
    from them is the same for any number of workers.

    Args:
        model: Path of the model as every worker can read it.
        requests: The layers that need ``H``.
        windows: ``(samples, seq_len)`` token ids.
        batch_size: Windows per micro-batch (the chunk).
        options: Embedded or cluster, number of workers, CPUs per worker.
        on_stage: Called in this process with each merged stage, in order.

    Returns:
        The peak RSS of each worker used (at most one per chunk), in bytes.

    Raises:
        DistributedError: The cluster cannot be reached; a worker runs other versions than
            this process; a worker died (run the same command again: finished layers' ``H``
            files are kept).
        DistPGKMError: A worker raised one of dist-pgkm's errors (re-raised as is).
    """
    with connect(options) as session:
        return session.calibrate(model, requests, windows, batch_size, on_stage)


def _calib_get(refs: list[Any]) -> list[Any]:
    """Every result of ``refs``, in order; a lost worker fails the calibration."""
    try:
        return list(ray.get(refs))
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        raise cause from None
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
        raise DistributedError(
            f"A calibration worker died ({type(err).__name__}: {err}). Run the same command "
            "again: the H files of finished blocks are kept and only the missing layers are "
            "calibrated again."
        ) from err
