"""Check a checkpoint's model files against the sha256 its run recorded when it wrote them.

A run records the sha256 of every merged model file (``merged`` in ``manifest.json``, or in
``finetune.json`` for a fine-tuning run). Loading (:func:`dist_pgkm.load`,
``from_pretrained``, ``dist-pgkm eval``) and ``dist-pgkm inspect`` verify them before a byte is
used, so a code edited in place (still in range, the header intact) is refused instead of
loading another weight. Hashing reads every byte once (docs/format.md gives the cost per GB);
for large trusted checkpoints it can be skipped with ``DIST_PGKM_VERIFY=0``, ``verify=False``
or ``--no-verify``. A directory without such a record (a ``save_pretrained`` copy) has nothing
to verify against: it loads with a warning, its headers still fully checked.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from dist_pgkm.checkpoint.manifest import MANIFEST_NAME
from dist_pgkm.checkpoint.shard import file_sha256
from dist_pgkm.checkpoint.spec import REMERGE
from dist_pgkm.errors import CheckpointError

__all__ = [
    "FINETUNE_STATE_NAME",
    "VERIFY_ENV",
    "verification",
    "verify_enabled",
    "verify_files",
]

logger = logging.getLogger(__name__)

VERIFY_ENV = "DIST_PGKM_VERIFY"
"""Environment variable: ``0`` (or ``false``, ``no``, ``off``) skips the sha256 verification."""

FINETUNE_STATE_NAME = "finetune.json"
"""The state file of a fine-tuning run, which records its merged files like ``manifest.json``."""

_RECORDS = (MANIFEST_NAME, FINETUNE_STATE_NAME)
_OFF = {"0", "false", "no", "off"}
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "dist_pgkm_verify", default=None
)


def verify_enabled(verify: bool | None = None) -> bool:
    """Whether to verify: ``verify`` when given, else a :func:`verification` block's choice,
    else ``$DIST_PGKM_VERIFY`` (on unless ``0``, ``false``, ``no`` or ``off``)."""
    if verify is not None:
        return verify
    chosen = _override.get()
    if chosen is not None:
        return chosen
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in _OFF


@contextlib.contextmanager
def verification(verify: bool | None) -> Iterator[None]:
    """Within the block, loads verify (or not) as ``verify`` says (None: the default)."""
    token = _override.set(verify)
    try:
        yield
    finally:
        _override.reset(token)


def _fix(record: str) -> str:
    """How to rewrite the model files of the run that ``record`` belongs to."""
    if record == FINETUNE_STATE_NAME:
        return (
            "Delete the directory's model*.safetensors files and run the same `dist-pgkm "
            "finetune` command again: it merges them again from its per-layer shards"
        )
    return REMERGE[0].upper() + REMERGE[1:]


def _recorded(directory: Path) -> tuple[Path, dict[str, str]] | None:
    """The record of the merged files in ``directory``: its file and name -> sha256."""
    for name in _RECORDS:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}), so the model files cannot be verified against "
                f"the sha256 it records. Restore it, or skip the check ({VERIFY_ENV}=0, "
                "--no-verify) if you trust the files."
            ) from exc
        merged = data.get("merged") if isinstance(data, dict) else None
        if merged is None:
            raise CheckpointError(
                f"{path} records no merged checkpoint: the run did not finish merging, or a "
                f"layer was redone after the merge, so the model files are not the run's. "
                f"{_fix(name)}."
            )
        if not isinstance(merged, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in merged.items()
        ):
            raise CheckpointError(
                f"{path}: its 'merged' entry is not a map of file names to sha256; it was "
                f"edited. {_fix(name)}."
            )
        return path, merged
    return None


def verify_files(directory: str | Path, files: Iterable[str | Path]) -> bool:
    """Check each model file's sha256 against the run's record in ``directory``.

    Args:
        directory: The checkpoint directory.
        files: The model files about to be read (``model*.safetensors``).

    Returns:
        True when every file was verified; False when ``directory`` records nothing to verify
        against (a warning is logged).

    Raises:
        CheckpointError: A file's sha256 differs from the record, or the record does not list
            it, or the record is unreadable or names no merged checkpoint.
    """
    directory = Path(directory)
    paths = [Path(file) for file in files]
    found = _recorded(directory)
    if found is None:
        logger.warning(
            "%s: no %s or %s records the model files' sha256, so they are not verified "
            "(their headers, shapes and codes still are)",
            directory,
            *_RECORDS,
        )
        return False
    record, merged = found
    for path in paths:
        expected = merged.get(path.name)
        if expected is None:
            raise CheckpointError(
                f"{path}: {record.name} does not list this file among the merged checkpoint "
                f"({', '.join(sorted(merged)) or 'none'}); it is left from another merge or was "
                f"added. {_fix(record.name)}."
            )
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc}). {_fix(record.name)}.") from exc
        if actual != expected:
            raise CheckpointError(
                f"{path}: its sha256 ({actual[:16]}...) differs from the one {record.name} "
                f"recorded when the run wrote it ({expected[:16]}...): the file was modified "
                f"or damaged since. Do not use it. {_fix(record.name)}. (Only if you "
                f"trust the file as it is: {VERIFY_ENV}=0, verify=False or --no-verify skip "
                "this check.)"
            )
    names = ", ".join(path.name for path in paths)
    logger.info("%s: %s verified against %s", directory, names, record.name)
    return True
