"""The run tracker's figures, on a scripted run with a hand-driven clock, and their display."""

from __future__ import annotations

import io

import pytest

from dist_pgkm.console import format_duration, quantize_progress, worker_summary_lines
from dist_pgkm.distributed.eta import PLAIN_FIT
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.distributed.progress import CalibrationStatus, ProgressSnapshot, RunTracker


def _job(name: str, cost: float, n_weights: int) -> LayerJob:
    return LayerJob(name, "linear", f"{name}.weight", (n_weights,), 1, 2, 0, (), cost)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


# Costs 6 : 3 : 1 (the ETA weighs layers by cost); "done0" was finished by an earlier call.
JOBS = [_job("big", 6, 600), _job("mid", 3, 300), _job("small", 1, 100), _job("done0", 5, 500)]


def test_eta_weighs_layers_by_cost_and_ignores_startup(clock: _Clock) -> None:
    snaps: list[ProgressSnapshot] = []
    t = RunTracker(JOBS, done={"done0"}, listener=snaps.append, clock=clock)
    clock.now += 10  # 10 s of Ray start-up: not part of any rate
    t.worker_ready("w0", "10.0.0.1")
    t.worker_ready("w1", "10.0.0.2")
    t.dispatched(JOBS[0], "w0")
    t.dispatched(JOBS[1], "w1")
    clock.now += 3
    t.finished(JOBS[1], "w1", seconds=3.0)
    snap = snaps[-1]
    assert (snap.done, snap.total) == (2, 4)
    # 1 s per cost unit measured; 7 units left over 2 workers -> 3.5 s (w0 has 3 s of "big"
    # left, w1 then runs "small" in 1 s). 300 weights in 3 s.
    assert snap.eta_seconds == pytest.approx(3.5)
    assert snap.weights_per_second == pytest.approx(100.0)
    assert snap.elapsed == pytest.approx(13.0)
    assert [(w.label, w.job) for w in snap.workers] == [("w0", "big"), ("w1", None)]
    assert snap.workers[0].job_seconds == pytest.approx(3.0)
    assert snap.last_finished is not None
    assert snap.last_finished.name == "mid"


def test_summary_per_worker_idle_share_and_lost_workers(clock: _Clock) -> None:
    t = RunTracker(JOBS[:3], clock=clock)
    t.worker_ready("w0", "a")
    t.worker_ready("w1", "b")
    t.dispatched(JOBS[0], "w0")
    t.dispatched(JOBS[1], "w1")
    clock.now += 2
    t.worker_lost("w1")  # its job goes elsewhere; its 2 s were work, lost with it
    t.worker_ready("w2", "a")
    t.dispatched(JOBS[1], "w2")
    clock.now += 4
    t.finished(JOBS[0], "w0", seconds=6.0)
    t.finished(JOBS[1], "w2", seconds=4.0)
    t.dispatched(JOBS[2], "w0")
    clock.now += 1
    t.finished(JOBS[2], "w0", seconds=1.0)
    clock.now += 1  # 1 s of idle before the phase ends
    t.close()
    clock.now += 50  # merging: not counted as worker time
    s = t.summary()
    workers = {w["worker"]: w for w in s["workers"]}
    assert workers["w0"]["jobs"] == 2
    assert workers["w0"]["busy_seconds"] == pytest.approx(7.0)
    assert workers["w0"]["alive_seconds"] == pytest.approx(8.0)
    assert workers["w0"]["idle_share"] == pytest.approx(1 / 8, abs=1e-4)
    # Issue 18 item 11: a lost worker's in-flight time was reported as idle (100%).
    assert workers["w1"] == {
        **workers["w1"],
        "jobs": 0,
        "lost": True,
        "alive_seconds": 2.0,
        "busy_seconds": 0.0,
        "lost_seconds": 2.0,
        "idle_share": 0.0,
    }
    assert workers["w2"]["alive_seconds"] == pytest.approx(6.0)
    # all workers: busy 11 s + 2 s lost of 8 + 2 + 6 = 16 s alive
    assert s["lost_seconds"] == pytest.approx(2.0)
    assert s["idle_share"] == pytest.approx(1 - 13 / 16, abs=1e-4)
    assert worker_summary_lines(s)[1] == (
        "  w1 on b (lost): 0 layers, busy 0.0 s + 2.0 s on a job lost with it of 2.0 s, idle 0%"
    )
    assert [x["name"] for x in s["slowest_layers"]] == ["big", "mid", "small"]
    assert s["layer_seconds"] == {"big": 6.0, "mid": 4.0, "small": 1.0}
    assert t.snapshot().eta_seconds == 0.0


def test_log_lines_one_per_finished_layer(clock: _Clock) -> None:
    out = io.StringIO()  # not a terminal: plain lines, as in a SLURM or Ray job log
    with quantize_progress(out) as listener:
        t = RunTracker(JOBS[:2], listener=listener, clock=clock)
        t.worker_ready("w0", "a")
        t.dispatched(JOBS[0], "w0")
        clock.now += 6
        t.finished(JOBS[0], "w0", seconds=6.0)
        t.dispatched(JOBS[1], "w0")
    assert out.getvalue() == "[1/2] big 6.0 s on w0 · 0.00 M weights/s · eta 0:03\n"


def test_summary_lines_and_durations() -> None:
    timing = {
        "workers": [
            {
                "worker": "w0",
                "node": "a",
                "jobs": 2,
                "busy_seconds": 7.0,
                "alive_seconds": 8.0,
                "idle_share": 0.125,
                "peak_rss_bytes": 1_234_000_000,
                "lost": False,
            }
        ],
        "idle_share": 0.125,
        "slowest_layers": [{"name": "big", "worker": "w0", "seconds": 6.0}],
    }
    assert worker_summary_lines(timing) == [
        "  w0 on a: 2 layers, busy 7.0 s of 8.0 s, idle 12%, peak RSS 1.2 GB",
        "  idle share over all workers: 12%",
        "  slowest layers: big 6.0 s",
    ]
    assert [format_duration(x) for x in (None, 59.6, 3725)] == ["?", "1:00", "1:02:05"]


def test_calibration_blocks_then_layers_in_the_log(clock: _Clock) -> None:
    out = io.StringIO()
    with quantize_progress(out) as listener:
        t = RunTracker(JOBS[:1], listener=listener, clock=clock)
        t.calibrating(CalibrationStatus(0, 3, 0.0, None))  # the model is built: no line yet
        t.calibrating(CalibrationStatus(1, 3, 12_345.6, 20.0))
        t.calibrating(CalibrationStatus(1, 3, 12_345.6, 20.0))  # the same block: no new line
        t.calibrating(CalibrationStatus(2, 3, 10_000.0, 9.0))
        snap = t.snapshot()
        assert snap.description == "calibrating"
        assert snap.calibration == CalibrationStatus(2, 3, 10_000.0, 9.0)
        t.stage("quantizing")
        assert t.snapshot().calibration is None
        t.worker_ready("local", "this process")
        t.dispatched(JOBS[0], "local")
        clock.now += 2
        t.finished(JOBS[0], "local", 2.0)
    lines = out.getvalue().splitlines()
    assert lines[:2] == [
        "[calibration 1/3 blocks] 12,346 tokens/s · eta 0:20",
        "[calibration 2/3 blocks] 10,000 tokens/s · eta 0:09",
    ]
    assert lines[2].startswith("[1/1] big 2.0 s on local")
    assert len(lines) == 3


def _smollm2_like_jobs() -> list[LayerJob]:
    """30 blocks of SmolLM2-135M's 7 Linear layers at bs 8, K 256, 15 iterations, longest
    first: est_cost = rows x cols / 8 blocks x 256 x 8 x 15 multiply-adds."""
    shapes = {"gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    shapes |= {"q": (576, 576), "o": (576, 576), "k": (192, 576), "v": (192, 576)}
    jobs = [
        _job(f"layers.{i}.{name}", rows * cols / 8 * 256 * 8 * 15, rows * cols)
        for i in range(30)
        for name, (rows, cols) in shapes.items()
    ]
    return sorted(jobs, key=lambda job: (-job.est_cost, job.name))


def test_eta_at_mid_run_is_within_25_percent_of_the_rest(clock: _Clock) -> None:
    """Issue 17 item 4: the ETA comes from the remaining work, not from the first layer.

    A simulated one-worker run whose layer times follow a machine 2.5x slower than the fit,
    with a deterministic +-20% spread per layer and a first layer 6x slower (warm-up).
    """
    jobs = _smollm2_like_jobs()
    spread = (0.85, 1.1, 0.95, 1.2, 0.9, 1.05, 0.8)
    seconds = [
        2.5 * PLAIN_FIT.predict(job.est_cost) * spread[i % len(spread)] * (6.0 if i == 0 else 1)
        for i, job in enumerate(jobs)
    ]
    snaps: list[ProgressSnapshot] = []
    t = RunTracker(jobs, listener=snaps.append, clock=clock, cost_model=PLAIN_FIT)
    t.worker_ready("local", "this process")
    half, mid = sum(job.est_cost for job in jobs) / 2, None
    done_cost = 0.0
    for i, (job, took) in enumerate(zip(jobs, seconds, strict=True)):
        t.dispatched(job, "local")
        clock.now += took
        t.finished(job, "local", seconds=took)
        done_cost += job.est_cost
        if mid is None and done_cost >= half:
            mid = i
    t.close()
    assert mid is not None
    assert 0 < mid < len(jobs) - 1
    rest = sum(seconds[mid + 1 :])
    # One snapshot per event: the worker's, then two per layer (dispatched, finished).
    eta = snaps[2 + 2 * mid].eta_seconds
    assert eta is not None
    assert abs(eta - rest) <= 0.25 * rest
    # What extrapolating the first layer would have said at the same point: far off.
    cost_left = sum(job.est_cost for job in jobs[mid + 1 :])
    first_layer = cost_left * seconds[0] / jobs[0].est_cost
    assert first_layer > 3 * rest
    check = t.summary()["eta_check"]
    assert check["estimate_seconds"] == pytest.approx(eta, abs=1e-3)
    assert check["actual_seconds"] == pytest.approx(rest, abs=1e-3)
    assert check["at_seconds"] == pytest.approx(sum(seconds[: mid + 1]), abs=1e-3)
    assert worker_summary_lines(t.summary())[-1] == (
        f"  eta at mid-run: {format_duration(eta)}, the rest took {format_duration(rest)}"
    )
