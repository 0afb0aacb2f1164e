"""``finetune.json``: what a fine-tuning run is (its fingerprint), where it is, its losses.

The run's stage, its phase in the stage (``quantize`` or ``train``), the loss history, the
LR²VQ ranks chosen, IDKM's solver counts and, once merged, the checkpoint's files with their
sha256. Rank 0 writes the file; the other ranks keep the same data in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_pgkm.checkpoint.atomic import LOCK_NAME
from dist_pgkm.checkpoint.store import RunStore
from dist_pgkm.checkpoint.verify import FINETUNE_STATE_NAME
from dist_pgkm.errors import CheckpointError

__all__ = ["RAY_TRAIN_DIR", "STATE_NAME", "STATE_VERSION", "RunState", "nothing_to_resume"]

STATE_NAME = FINETUNE_STATE_NAME
STATE_VERSION = 1

RAY_TRAIN_DIR = "ray-train"
"""Ray Train's run records inside the output directory (``--ranks``)."""


def nothing_to_resume(out: Path) -> CheckpointError:
    """The error of ``--resume`` on a directory without a fine-tuning run."""
    return CheckpointError(
        f"{out}: --resume given, but there is no fine-tuning run to resume "
        f"({STATE_NAME} is missing). Drop --resume to start one."
    )


class RunState(RunStore):
    """The state of the fine-tuning run in an output directory.

    Args:
        directory: The output directory.
        data: The state (see the module docstring).
        writer: Whether :meth:`save` writes the file (rank 0) or does nothing (other ranks).
    """

    STATE_NAME = STATE_NAME

    def __init__(self, directory: Path, data: dict[str, Any], writer: bool = True) -> None:
        super().__init__(directory, data)
        self.writer = writer

    @classmethod
    def open(cls, out: Path, fingerprint: dict[str, Any], resume: bool) -> RunState:
        """Start a run in ``out`` or continue the one there.

        Raises:
            CheckpointError: ``out`` holds another run, or files and no run; or ``resume``
                and nothing to resume.
        """
        data = cls.resumable(out, fingerprint, resume=resume)
        if data is not None:
            return cls(out, data)
        data = {"version": STATE_VERSION, "fingerprint": fingerprint, "stage": 0,
                "phase": "quantize", "history": [], "merged": None}  # fmt: skip
        state = cls(out, data)
        state.save()
        return state

    @classmethod
    def refuse(cls, directory: Path, data: Any, identity: Any) -> None:
        old = data.get("fingerprint", {})
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise CheckpointError(
            f"{directory} holds another fine-tuning run (its {', '.join(changed)} differ), so it "
            "cannot be resumed. Run with the same model, config and text, or choose a "
            "new --out directory."
        )

    @classmethod
    def check_new(cls, directory: Path, resume: bool) -> None:
        if resume:
            raise nothing_to_resume(directory)
        if cls.strangers(directory, lambda name: name in (LOCK_NAME, RAY_TRAIN_DIR)):
            raise CheckpointError(
                f"{directory} is not empty and holds no fine-tuning run. Choose an empty or new "
                "--out directory."
            )

    def save(self) -> None:
        if self.writer:
            super().save()
