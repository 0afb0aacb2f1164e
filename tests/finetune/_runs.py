"""Helpers for tests that run `dist-pgkm finetune` in a child process and kill it mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_at(proc: subprocess.Popen[bytes], out: Path, stage: int, step: int) -> None:
    """SIGKILL ``proc`` once ``out/finetune.json`` records ``step`` of ``stage`` (0-based).

    Fails the test if the run ends first or nothing is recorded within 10 minutes.
    """
    state = out / "finetune.json"

    def reached() -> bool:
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            return False
        return any(h["stage"] == stage and h["step"] >= step for h in data["history"])

    deadline = time.monotonic() + 600
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
