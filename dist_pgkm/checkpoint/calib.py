"""The calibration's ``H`` files and its resume state: ``OUT/calib/`` or a shared cache.

Layout (all written atomically: temp file, fsync, ``os.replace``)::

    calib/index.json                 identity of the calibration, finished files and sha256s
    calib/<layer>.safetensors        one layer's H: "hessian" (width / g, g, g) float32, its
                                     diagonal g x g blocks (g: stored_block_size, 24 for
                                     SmolLM2); a layer's bs x bs blocks are read out of them
    calib/hidden.safetensors         hidden states entering block b (resume point; removed
                                     when the calibration is complete)

The folder is ``OUT/calib`` by default; with a calibration cache it is
``CACHE/<cache_key(identity)>`` and serves every run (every preset) on the same model and
windows: its identity holds no layer list and no block size.

A layer's file is written as soon as its block finishes, then recorded with its sha256 in
``index.json``; a missing or modified file is redone. The hidden states are saved at a block
boundary at most every ``checkpoint_every`` seconds, so the extra I/O stays bounded (one
``samples * seq_len * dim`` float32 tensor per period: 151 MB for SmolLM2-135M at 128 x 512).
A resumed calibration starts at the last saved boundary, skipping the blocks whose layers are
all on disk, and writes the same bytes as an uninterrupted one: the forward pass is the same
computation on the same float32 inputs.

The identity (model files, windows digest, samples, seq_len, micro-batch, layout of the stored
blocks) decides every file's bytes; with the layers and their block sizes it is also part of
the run's fingerprint, so a changed calibration is refused like a changed config. A folder whose
identity differs (left by another run) is cleared. Nothing is pickled; a
file's header names its layer and is checked on read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.checkpoint.shard import file_sha256
from dist_pgkm.checkpoint.store import RunStore
from dist_pgkm.checkpoint.writer import Entry, write_safetensors
from dist_pgkm.errors import CheckpointError
from dist_pgkm.models.calibrate import diagonal_blocks
from dist_pgkm.utils.safetensors_io import UnreadableFile, read_tensors

__all__ = [
    "CALIB_DIR",
    "CalibStore",
    "HessianFile",
    "cache_key",
    "read_hessian",
    "write_hessian",
]

logger = logging.getLogger(__name__)

CALIB_DIR = "calib"
_INDEX = "index.json"
_HIDDEN = "hidden.safetensors"
_FORMAT = "1"
_HESSIAN_KEY = "hessian"
_HIDDEN_KEY = "hidden"


@dataclass(frozen=True)
class HessianFile:
    """Where a layer's ``H`` is and the sha256 it was written with (what a worker reads).

    ``block_size`` is the stored ``g`` (0 when unknown): a layer's block size must divide it.
    """

    path: str
    sha256: str
    block_size: int = 0


def cache_key(identity: dict[str, Any]) -> str:
    """The folder name of a calibration in a cache: sha256 of its identity (canonical JSON)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def write_hessian(path: Path, name: str, hessian: torch.Tensor, inputs_of: str) -> str:
    """Write one layer's ``H`` blocks as a safetensors file, atomically.

    Args:
        path: The file.
        name: The layer (recorded in the header and checked on read).
        hessian: ``(width / bs, bs, bs)`` float32.
        inputs_of: The Linear whose inputs gave it (the layer itself, or ``lm_head`` for a tied
            embedding).

    Returns:
        The file's sha256.
    """
    h = hessian.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": _FORMAT,
        "layer": name,
        "inputs_of": inputs_of,
        "block_size": str(h.shape[-1]),
    }
    entry = Entry(_HESSIAN_KEY, h.dtype, tuple(h.shape), lambda: h)
    return write_safetensors(path, [entry], meta)


def read_hessian(
    path: str | Path,
    sha256: str | None = None,
    name: str | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Read and check one layer's ``H``.

    Args:
        path: The file.
        sha256: Its expected sha256 (checked when given).
        name: The layer it must belong to (checked when given).
        block_size: The layer's block size ``bs``: its ``bs x bs`` diagonal blocks are read
            out of the stored ``g x g`` ones. None: the stored blocks as they are.

    Returns:
        ``(width / bs, bs, bs)`` float32 (``(width / g, g, g)`` without ``block_size``).

    Raises:
        CheckpointError: Missing or unreadable file, checksum mismatch, another layer's file,
            a tensor that is not ``(groups, g, g)`` float32, or ``block_size`` not dividing
            ``g``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: calibration file missing. On a Ray cluster, --out must be on a file "
            "system every node mounts at the same path; otherwise run the same command again "
            "to redo the calibration."
        )
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(
            f"{path}: sha256 differs from calib/index.json (truncated or modified). Run the "
            "same command again: the calibration of that layer is redone."
        )
    try:
        tensors, meta = read_tensors(path, [_HESSIAN_KEY])
    except UnreadableFile as exc:
        raise CheckpointError(
            f"{path}: not a readable calibration file ({exc.why}). Delete it and run again."
        ) from exc
    tensor = tensors[_HESSIAN_KEY]
    problems = []
    if meta.get("format") != _FORMAT:
        problems.append(f"format {meta.get('format')!r}")
    if name is not None and meta.get("layer") != name:
        problems.append(f"it belongs to {meta.get('layer')!r}, not {name!r}")
    if tensor.dtype != torch.float32 or tensor.dim() != 3 or tensor.shape[1] != tensor.shape[2]:
        problems.append(f"tensor {tensor.dtype} {tuple(tensor.shape)}")
    if problems:
        raise CheckpointError(
            f"{path}: {'; '.join(problems)}: not this run's calibration file. Delete the "
            "run's calib/ folder and run again."
        )
    if block_size is not None and tensor.shape[-1] % block_size:
        raise CheckpointError(
            f"{path}: H is stored in {tensor.shape[-1]} x {tensor.shape[-1]} blocks, which a "
            f"block size of {block_size} does not divide. Run again: the calibration of that "
            "layer is redone at a size that serves it."
        )
    return tensor if block_size is None else diagonal_blocks(tensor, block_size)


class CalibStore(RunStore):
    """A calibration folder: ``H`` files, their sha256s, the resume point.

    Use :meth:`open` (``OUT/calib``) or :meth:`at` (a cache folder); the coordinator (the only
    writer) calls :meth:`add` after each stage of the calibration and :meth:`complete` at its
    end. Another calibration's folder is cleared, not refused: its files are only a cache.
    """

    STATE_NAME = _INDEX
    IDENTITY_KEY = "identity"

    def __init__(
        self,
        directory: Path,
        identity: dict[str, Any],
        data: dict[str, Any],
        checkpoint_every: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(directory, data)
        self.identity = identity
        self._every = checkpoint_every
        self._clock = clock
        self._last_hidden = clock()

    @classmethod
    def open(
        cls,
        out_dir: Path,
        identity: dict[str, Any],
        checkpoint_every: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> CalibStore:
        """Open (or start) the calibration state of ``out_dir``.

        Args:
            out_dir: The run's output directory.
            identity: What decides the calibration's bytes (JSON-ready).
            checkpoint_every: Minimum seconds between two saves of the hidden states.
            clock: Monotonic seconds (tests pass their own).

        Returns:
            The store; files recorded under another identity are deleted first.
        """
        return cls.at(Path(out_dir) / CALIB_DIR, identity, checkpoint_every, clock)

    @classmethod
    def at(
        cls,
        directory: Path,
        identity: dict[str, Any],
        checkpoint_every: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> CalibStore:
        """Open (or start) the calibration folder ``directory`` itself (a cache entry).

        Args:
            directory: The folder (``CACHE/<cache_key(identity)>`` for a cache).
            identity: What decides the calibration's bytes (JSON-ready).
            checkpoint_every: Minimum seconds between two saves of the hidden states.
            clock: Monotonic seconds (tests pass their own).

        Returns:
            The store; files recorded under another identity are deleted first.
        """
        data = cls.resumable(directory, identity)
        if data is None:
            data = {"identity": identity, "hessians": {}, "without_input": [], "hidden": None}
            data["complete"] = False
        store = cls(directory, identity, data, checkpoint_every, clock)
        store.verify()
        return store

    @classmethod
    def read_state(cls, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: cleared like another calibration's

    @classmethod
    def refuse(cls, directory: Path, data: Any, identity: Any) -> None:
        logger.warning("%s belongs to another calibration; starting it again", directory)
        _clear(directory)

    # --- state ---------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Check every recorded file against its sha256; forget the bad ones.

        Returns:
            The layers whose file was missing or modified (they will be collected again).
        """
        bad = self.drop_changed(self.data["hessians"], "file")
        hidden = self.data.get("hidden")
        if hidden is not None and not self.intact(hidden["file"], hidden["sha256"]):
            path = self.dir / hidden["file"]
            logger.warning("%s is missing or modified; not resuming from it", path)
            self.data["hidden"] = None
            bad.append(_HIDDEN)
        for name in bad:
            if name != _HIDDEN:
                logger.warning("Calibration file of %s is missing or corrupt; redoing it", name)
        if bad:
            self.data["complete"] = False
            self.save()
        return [name for name in bad if name != _HIDDEN]

    @property
    def hessians(self) -> dict[str, HessianFile]:
        """Finished layers: name -> file (absolute path), sha256 and stored block size."""
        return {
            name: HessianFile(
                str((self.dir / record["file"]).absolute()),
                record["sha256"],
                int(record.get("block_size", 0)),
            )
            for name, record in self.data["hessians"].items()
        }

    @property
    def without_input(self) -> frozenset[str]:
        """Layers the calibration found no Linear input for (weight metric)."""
        return frozenset(self.data["without_input"])

    def read(self, name: str, block_size: int | None = None) -> torch.Tensor:
        """One finished layer's ``H``, checked against its sha256 (see :func:`read_hessian`)."""
        record = self.hessians[name]
        return read_hessian(record.path, record.sha256, name, block_size)

    def hidden(self) -> tuple[int, torch.Tensor] | None:
        """The saved hidden states and the block they enter, or None."""
        record = self.data.get("hidden")
        if record is None:
            return None
        path = self.dir / record["file"]
        try:
            tensor = read_tensors(path, [_HIDDEN_KEY])[0][_HIDDEN_KEY]
        except UnreadableFile as exc:
            raise CheckpointError(
                f"{path}: not a readable calibration file ({exc.why}). Delete it and run again."
            ) from exc
        return int(record["next_block"]), tensor

    # --- writing -------------------------------------------------------------------------------

    def add(
        self,
        hessians: Mapping[str, torch.Tensor],
        inputs_of: Mapping[str, str],
        next_block: int | None = None,
        hidden: torch.Tensor | None = None,
    ) -> bool:
        """Record a finished stage: its layers' ``H``, then maybe the hidden states.

        Args:
            hessians: Layer -> ``H`` finished by the stage.
            inputs_of: Layer -> the Linear whose inputs gave it.
            next_block: The block the hidden states enter.
            hidden: The hidden states at that boundary; saved when ``checkpoint_every``
                seconds have passed since the last save (or the store was opened).

        Returns:
            Whether the hidden states were saved.
        """
        for name, hessian in hessians.items():
            rel = f"{name}.safetensors"
            digest = write_hessian(self.dir / rel, name, hessian, inputs_of.get(name, name))
            g = int(hessian.shape[-1])
            self.data["hessians"][name] = {"file": rel, "sha256": digest, "block_size": g}
        saved = False
        due = self._clock() - self._last_hidden >= self._every
        if hidden is not None and next_block is not None and next_block > 0 and due:
            tensor = hidden.detach().to("cpu", torch.float32).contiguous()
            entry = Entry(_HIDDEN_KEY, tensor.dtype, tuple(tensor.shape), lambda: tensor)
            meta = {"format": _FORMAT, "next_block": str(next_block)}
            digest = write_safetensors(self.dir / _HIDDEN, [entry], meta)
            self.data["hidden"] = {"file": _HIDDEN, "sha256": digest, "next_block": next_block}
            self._last_hidden = self._clock()
            saved = True
        if hessians or saved:
            self.save()
        return saved

    def complete(self, without_input: Any = ()) -> None:
        """The calibration is over: note the layers without input, drop the hidden states."""
        self.data["without_input"] = sorted(set(self.data["without_input"]) | set(without_input))
        self.data["hidden"] = None
        self.data["complete"] = True
        self.save()
        (self.dir / _HIDDEN).unlink(missing_ok=True)


def _clear(directory: Path) -> None:
    """Delete a stale ``calib/`` folder's files (only ours: safetensors and the index)."""
    for path in directory.glob("*.safetensors"):
        path.unlink(missing_ok=True)
    (directory / _INDEX).unlink(missing_ok=True)
