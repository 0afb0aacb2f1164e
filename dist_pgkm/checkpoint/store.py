"""One base for a run's state file: JSON in a directory, opened against the run's identity.

Three stores keep resumable state this way: ``manifest.json`` of a quantize run
(:class:`~dist_pgkm.checkpoint.manifest.Manifest`), a calibration's ``index.json``
(:class:`~dist_pgkm.checkpoint.calib.CalibStore`) and ``finetune.json`` of a fine-tuning run
(``dist_pgkm.finetune.state.RunState``). Each one

- opens its directory against the identity of the run that asks (its fingerprint): the state
  of this same run is resumed; one that another run left is refused with a
  :class:`~dist_pgkm.errors.CheckpointError` (a calibration folder is cleared instead);
- rewrites its whole file atomically after every change (temp file, fsync, ``os.replace``);
- forgets the records whose file is missing or no longer has the sha256 it was written with.

The file formats, and the words of each refusal, are the stores' own: this module holds the
mechanics they share, with one hook per decision a store makes differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, ClassVar

from dist_pgkm.checkpoint.atomic import atomic_write_json
from dist_pgkm.checkpoint.shard import file_sha256
from dist_pgkm.errors import CheckpointError

__all__ = ["RunStore"]


class RunStore:
    """A directory's state file and the records it keeps.

    Subclasses name the file (``STATE_NAME``) and the key of the identity in it
    (``IDENTITY_KEY``), and decide through :meth:`read_state`, :meth:`refuse` and
    :meth:`check_new` what an unreadable file, another run's file and a directory without one
    mean to them.
    """

    STATE_NAME: ClassVar[str]
    IDENTITY_KEY: ClassVar[str] = "fingerprint"

    def __init__(self, directory: Path, data: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.data = data

    @property
    def path(self) -> Path:
        """The state file."""
        return self.dir / self.STATE_NAME

    def save(self) -> None:
        """Rewrite the state file atomically."""
        atomic_write_json(self.path, self.data)

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def resumable(
        cls, directory: Path, identity: Any, *, resume: bool = False
    ) -> dict[str, Any] | None:
        """The state this same run left in ``directory``, or None to start afresh.

        Args:
            directory: The store's directory.
            identity: What the state must have been written for (JSON-ready).
            resume: The caller expects an existing state (``--resume``).

        Returns:
            The saved data when its identity equals ``identity``; None when there is none (or
            :meth:`refuse` cleared another run's).

        Raises:
            CheckpointError: From the hooks: an unreadable state, another run's, a directory
                holding something else, or ``resume`` and nothing to resume.
        """
        directory = Path(directory)
        path = directory / cls.STATE_NAME
        if path.is_file():
            data = cls.read_state(path)
            if isinstance(data, dict) and data.get(cls.IDENTITY_KEY) == identity:
                return data
            cls.refuse(directory, data, identity)
            return None
        cls.check_new(directory, resume)
        return None

    @classmethod
    def read_state(cls, path: Path) -> Any:
        """The parsed state file (subclasses check its form and version here).

        Raises:
            CheckpointError: The file cannot be read or is not JSON (truncated, edited).
        """
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}). It was not written by this tool, or was "
                "edited. Use a new --out directory, or delete this one to start over."
            ) from exc

    @classmethod
    def refuse(cls, directory: Path, data: Any, identity: Any) -> None:
        """``directory`` holds another run's state: raise, or clear it and return."""
        raise NotImplementedError

    @classmethod
    def check_new(cls, directory: Path, resume: bool) -> None:
        """No state in ``directory``: raise when a new one may not start there."""

    @staticmethod
    def strangers(directory: Path, ours: Callable[[str], bool]) -> list[str]:
        """The names in ``directory`` that ``ours`` does not claim (empty when it is missing)."""
        if not directory.is_dir():
            return []
        return [p.name for p in directory.iterdir() if not ours(p.name)]

    # --- records -------------------------------------------------------------------------------

    def intact(self, rel: str, sha256: str) -> bool:
        """Whether the file ``rel`` (relative to the directory) exists with this sha256."""
        path = self.dir / rel
        return path.is_file() and file_sha256(path) == sha256

    def drop_changed(self, records: MutableMapping[str, Any], file_key: str) -> list[str]:
        """Forget the records whose file is missing or whose sha256 changed (not saved).

        Args:
            records: Name -> record, a dict holding the file under ``file_key`` and its
                ``sha256``; changed in place.
            file_key: The key of the record's file, relative to the directory.

        Returns:
            The names forgotten, in the records' order.
        """
        bad = [
            name for name, record in records.items()
            if not self.intact(record[file_key], record["sha256"])
        ]  # fmt: skip
        for name in bad:
            del records[name]
        return bad
