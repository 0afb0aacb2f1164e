"""A streaming safetensors writer: the header first, then one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; merging a 70B model must
not. The header of a safetensors file only needs each tensor's dtype and shape, so it is
written from :class:`Entry` descriptions and each tensor is produced, written and dropped in
turn. The files are standard safetensors (read back by ``safe_open``), and their bytes are a
pure function of the entries: keys in the order given, compact JSON, 8-byte aligned header.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_pgkm.checkpoint.atomic import atomic_open
from dist_pgkm.utils.dtypes import SAFETENSORS_NAMES

__all__ = ["Entry", "plan_files", "write_safetensors"]


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its key, dtype, shape, and how to produce it when its turn comes."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def plan_files(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Cut ``entries`` (kept in order) into files of at most ``max_bytes`` of tensor data.

    A tensor larger than ``max_bytes`` gets a file of its own.
    """
    files: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if files[-1] and size + entry.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += entry.nbytes
    return files


def write_safetensors(path: Path, entries: Sequence[Entry], metadata: dict[str, str]) -> str:
    """Write ``entries`` as one safetensors file, atomically, holding one tensor at a time.

    Returns:
        The sha256 of the file.

    Raises:
        ValueError: A produced tensor differs from its entry's dtype or shape (a bug upstream).
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in entries:
        header[entry.key] = {
            "dtype": SAFETENSORS_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors does
    digest = hashlib.sha256()
    with atomic_open(Path(path)) as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for entry in entries:
            tensor = entry.produce()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(
                    f"{entry.key}: produced {tensor.dtype} {tuple(tensor.shape)}, the header "
                    f"says {entry.dtype} {entry.shape}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            digest.update(data.data)
            del tensor, data
    return digest.hexdigest()
