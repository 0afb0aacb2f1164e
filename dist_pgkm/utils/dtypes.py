"""The safetensors dtype names and their torch dtypes: one table for every reader and writer."""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "SAFETENSORS_NAMES", "element_bytes"]

# The unsigned wide types and float8 exist in torch >= 2.3 only; absent ones are left out.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "C64": torch.complex64,
    }.items()
    if dtype is not None
}
"""safetensors dtype name -> torch dtype."""

SAFETENSORS_NAMES: dict[torch.dtype, str] = {d: n for n, d in SAFETENSORS_DTYPES.items()}
"""torch dtype -> safetensors dtype name."""


def element_bytes(name: str) -> int:
    """Bytes per element of the safetensors dtype ``name``."""
    return SAFETENSORS_DTYPES[name].itemsize
