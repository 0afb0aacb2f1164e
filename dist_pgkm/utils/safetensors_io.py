"""The one boundary to safetensors files: header parsing and tensor reads.

Every reader of a safetensors file in dist-pgkm goes through here: model sources
(``models/source.py``), shards, calibration files, the merge, the loader's header checks and the
size report (``checkpoint/``). Writing is :mod:`dist_pgkm.checkpoint.writer`'s (a streaming
writer of our own, whose bytes do not depend on the process).

:func:`read_header` parses and checks a header by hand (8-byte little-endian length, then a
JSON object) without importing safetensors or reading tensor data, with the rules of the
format: a length of at most 100,000,000 bytes (safetensors' own limit), a JSON object of
``{dtype, shape, data_offsets}`` entries plus an optional ``__metadata__`` of strings, each
tensor spanning exactly ``prod(shape) * itemsize`` bytes, and the tensors tiling the data
section exactly (so a truncated or extended file is found from its header and size).
:func:`read_tensors` reads tensor data through ``safetensors.safe_open`` (imported lazily:
``import dist_pgkm`` does not import safetensors) and returns tensors that own their memory.

A problem raises :class:`UnreadableFile`, which carries the file and the reason and is not a
user-facing error: each caller turns it into its own typed error (``ModelSourceError`` for a
source, ``CheckpointError`` for a checkpoint) with the remedy that fits, and nothing else
escapes from here, neither a ``SafetensorError`` nor an ``OSError``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_pgkm.utils.dtypes import SAFETENSORS_DTYPES

__all__ = [
    "MAX_HEADER_BYTES",
    "Header",
    "TensorEntry",
    "UnknownDtype",
    "UnreadableFile",
    "read_header",
    "read_tensors",
]

MAX_HEADER_BYTES = 100_000_000
"""Largest JSON header safetensors accepts; a larger length prefix means a corrupt file."""


class UnreadableFile(Exception):  # noqa: N818 (internal: callers convert it to a typed error)
    """A safetensors file that cannot be read as such.

    Attributes:
        path: The file.
        why: What is wrong, as a clause ("its header is not valid JSON (...)").
    """

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


class UnknownDtype(UnreadableFile):
    """A tensor of a dtype dist-pgkm has no torch dtype for (the file may be valid)."""

    def __init__(self, path: Path, key: str, dtype: object) -> None:
        super().__init__(path, f"tensor {key!r} has dtype {dtype!r}, which dist-pgkm cannot read")
        self.key = key
        self.dtype = dtype


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: its safetensors dtype name, shape and byte range in the data.

    Attributes:
        dtype: The safetensors dtype name (``"F16"``, ``"U8"``, ...), one of
            :data:`~dist_pgkm.utils.dtypes.SAFETENSORS_DTYPES`.
        shape: Shape as stored.
        begin: First byte in the data section (after the header).
        end: One past the last byte in the data section.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed and checked safetensors header.

    Attributes:
        path: The file.
        metadata: The ``__metadata__`` entries (strings), empty when absent.
        tensors: Every tensor by key, sorted by key.
        raw: The header's bytes as stored: the 8-byte length prefix and the JSON.
        size: The file's size in bytes.
    """

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    raw: bytes
    size: int


def read_header(path: str | Path) -> Header:
    """Read and check the header of a safetensors file, without reading tensor data.

    Args:
        path: The file.

    Returns:
        The header, checked against the rules of the format and the file's size.

    Raises:
        UnknownDtype: A tensor's dtype is not one dist-pgkm reads.
        UnreadableFile: The file cannot be read, or its header is not valid for its size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise UnreadableFile(path, f"it has {size} bytes, fewer than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise UnreadableFile(
                    path,
                    f"its first 8 bytes announce a {header_len}-byte header, but the file "
                    f"has {size} bytes",
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise UnreadableFile(path, f"it cannot be read ({exc})") from exc
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("it does not start with '{'")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnreadableFile(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise UnreadableFile(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise UnreadableFile(path, "its __metadata__ is not an object of strings")

    tensors: dict[str, TensorEntry] = {}
    for key in sorted(header):
        tensors[key] = _parse_entry(path, key, header[key])
    # The format requires the tensors to tile the data section exactly.
    data_size = size - 8 - header_len
    expected = 0
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != expected:
            raise UnreadableFile(
                path, f"tensor {key!r} starts at byte {entry.begin}, not {expected}"
            )
        expected = entry.end
    if expected != data_size:
        problem = "truncated" if expected > data_size else "longer than its header says"
        raise UnreadableFile(
            path,
            f"its header describes {expected} bytes of tensor data but the file holds "
            f"{data_size}: it is {problem}",
        )
    return Header(path, dict(metadata), tensors, prefix + raw, size)


def _parse_entry(path: Path, key: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict):
        raise UnreadableFile(path, f"the header entry of {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(type(n) is int and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int for n in offsets)
    ):
        raise UnreadableFile(path, f"the header entry of {key!r} has no valid shape and offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise UnknownDtype(path, key, dtype)
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise UnreadableFile(
            path,
            f"tensor {key!r} ({dtype}, shape {shape}) spans {end - begin} bytes instead "
            f"of {nbytes}",
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_tensors(
    path: str | Path, keys: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and the ``__metadata__`` of a safetensors file.

    Args:
        path: The file.
        keys: The tensors to read (default: all of them, in the file's key order).

    Returns:
        ``(tensors, metadata)``: plain CPU tensors in their stored dtype and shape that own
        their memory (they stay valid, and writable, after the file is closed or replaced).

    Raises:
        UnreadableFile: The file cannot be opened or read, or has no tensor of a given key.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        # One handle per call: nothing is left open, so reads are safe from any thread.
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            available = list(fh.keys())
            present = set(available)
            wanted = available if keys is None else list(keys)
            missing = [key for key in wanted if key not in present]
            if missing:
                raise UnreadableFile(path, f"it has no tensor {missing[0]!r}")
            # get_tensor returns a view into the file's mmap: copy it into memory we own.
            tensors = {key: fh.get_tensor(key).clone() for key in wanted}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnreadableFile(path, str(exc)) from exc
    return tensors, metadata
