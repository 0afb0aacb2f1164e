"""Crash-safe file writes: temp file in the same directory, fsync, ``os.replace``, fsync dir."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dist_pgkm.errors import CheckpointError

__all__ = [
    "atomic_open",
    "atomic_write_json",
    "exclusive_run",
    "fsync_dir",
    "remove_stale_temp_files",
]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temp file that replaces it only once complete and on disk.

    A crash (or an exception in the ``with`` body) leaves the previous ``path`` untouched and
    no temp file behind (a ``kill -9`` may leave a ``.<name>.*.tmp``, which is harmless).

    Raises:
        CheckpointError: The disk is full (or over quota); nothing was replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"{path}: the disk is full ({exc.strerror}); the file was not written and "
                "everything finished before is intact. Free some space (or choose another "
                "--out) and run the same command again: the run resumes."
            ) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (deterministic bytes), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with atomic_open(path) as f:
        f.write(text.encode("utf-8"))


LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_run(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` (``flock``) for a run: one writer per output directory.

    The lock dies with its process, so a killed run never leaves the directory locked.

    Raises:
        CheckpointError: Another process is running in ``directory``, or ``directory`` cannot
            be created or written (a read-only file system, no permission).
    """
    import fcntl  # POSIX only

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fh = (directory / LOCK_NAME).open("a+b")
    except OSError as exc:
        raise _not_writable(directory, exc) from exc
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CheckpointError(
                f"{directory} is in use by another dist-pgkm process (it holds {LOCK_NAME}). "
                "Wait for it to finish, or stop it and run again to resume."
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _not_writable(directory: Path, exc: OSError) -> CheckpointError:
    """The error for an output directory this process cannot create or write in."""
    why = {
        errno.EROFS: "it is on a read-only file system",
        errno.EACCES: "this user may not write there",
        errno.EPERM: "this user may not write there",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return CheckpointError(
        f"Cannot write the output directory {directory}: {why} ({exc}). The run writes its "
        "shards, manifest and checkpoint there. Choose a writable --out (e.g. on a scratch or "
        "shared file system mounted read-write), or fix the directory's permissions."
    )


def remove_stale_temp_files(directory: Path) -> int:
    """Delete the ``.<name>.*.tmp`` files a killed writer left (call with the run lock held).

    Returns:
        How many were removed.
    """
    stale = [p for p in directory.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
