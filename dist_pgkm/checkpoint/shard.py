"""One quantized layer as one safetensors shard, written atomically and verified on read.

A shard holds ``<name>.centroids`` (``(k_used, block_size)``, fp16 unless configured) and
``<name>.codes`` (``uint8``, bit-packed at ``ceil(log2 k_used)`` bits), and its header carries
string metadata: format version, weight shape, block size, k_used, bits per code and the
number of blocks. Nothing is pickled. Reading checks the sha256 (when the caller knows it), the
header, every shape and dtype and the code range before any tensor is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dist_pgkm.errors import CheckpointError, InvalidInputError
from dist_pgkm.pq.pack import bits_for, pack_codes, packed_nbytes, unpack_codes
from dist_pgkm.pq.quantize import QuantizedWeight

__all__ = [
    "FORMAT_VERSION",
    "decode_layer",
    "encode_layer",
    "file_sha256",
    "read_shard",
    "write_shard",
]

FORMAT_VERSION = "1"
_CENTROID_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_layer(
    name: str,
    q: QuantizedWeight,
    centroid_dtype: str = "float16",
    kind: str = "linear",
    k: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of one quantized layer (docs/format.md).

    Args:
        name: Module name of the layer.
        q: The quantized weight.
        centroid_dtype: Storage dtype of the codebook.
        kind: ``linear``, ``embedding`` or ``conv2d``.
        k: Requested codebook size (default: the stored one).
    """
    if centroid_dtype not in _CENTROID_DTYPES:
        raise InvalidInputError(
            f"centroid dtype {centroid_dtype!r} is not supported; use one of "
            f"{sorted(_CENTROID_DTYPES)}."
        )
    bits = bits_for(q.k_used)
    stats = q.stats.as_dict() if q.stats is not None else {}
    tensors = {
        f"{name}.centroids": q.centroids.to(_CENTROID_DTYPES[centroid_dtype]).contiguous(),
        f"{name}.codes": pack_codes(q.codes, bits),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "layer": name,
        "kind": kind,
        "k": str(q.k_used if k is None else k),
        "shape": json.dumps(list(q.shape)),
        "block_size": str(q.block_size),
        "k_used": str(q.k_used),
        "bits": str(bits),
        "n_blocks": str(q.codes.numel()),
        "centroid_dtype": centroid_dtype,
        "stats": json.dumps({**stats, "weight_sq": q.weight_sq}, sort_keys=True),
    }
    return tensors, meta


def _meta_int(meta: dict[str, str], key: str, where: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: header entry {key!r} is missing or not an integer ({meta.get(key)!r}); "
            "the shard is corrupt or from another tool. Delete it and run again to redo it."
        ) from exc


def decode_layer(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str = "shard"
) -> tuple[str, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Validate a shard's content and return ``(name, centroids fp32, codes int64, shape)``.

    Raises:
        CheckpointError: Wrong version, missing tensor, or inconsistent shapes, dtypes or codes.
    """
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {meta.get('format_version')!r}, this dist-pgkm reads "
            f"{FORMAT_VERSION!r}. Re-quantize with this version, or install the one that wrote it."
        )
    name = meta.get("layer", "")
    block_size, k_used, bits, n_blocks = (
        _meta_int(meta, key, where) for key in ("block_size", "k_used", "bits", "n_blocks")
    )
    try:
        shape = tuple(int(s) for s in json.loads(meta["shape"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: header entry 'shape' is missing or malformed.") from exc
    centroids = tensors.get(f"{name}.centroids")
    packed = tensors.get(f"{name}.codes")
    if centroids is None or packed is None:
        raise CheckpointError(
            f"{where}: tensors {name}.centroids and {name}.codes expected, found "
            f"{sorted(tensors)}. The shard is corrupt; delete it and run again to redo it."
        )
    n_weights = 1
    for size in shape:
        n_weights *= size
    problems = []
    if tuple(centroids.shape) != (k_used, block_size):
        problems.append(f"centroids {tuple(centroids.shape)} != ({k_used}, {block_size})")
    if centroids.dtype not in _CENTROID_DTYPES.values():
        problems.append(f"centroids dtype {centroids.dtype}")
    if n_blocks * block_size != n_weights:
        problems.append(f"{n_blocks} blocks of {block_size} != {n_weights} weights of {shape}")
    if bits != bits_for(k_used):
        problems.append(f"{bits} bits per code for {k_used} codewords")
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(n_blocks, bits):
        problems.append(f"codes hold {packed.numel()} {packed.dtype} values")
    if problems:
        raise CheckpointError(
            f"{where} ({name}): {'; '.join(problems)}. The shard is inconsistent; delete it and "
            "run again to redo the layer."
        )
    codes = unpack_codes(packed, n_blocks, bits)
    if n_blocks and int(codes.max()) >= k_used:
        raise CheckpointError(
            f"{where} ({name}): a code reaches {int(codes.max())} but the codebook has "
            f"{k_used} codewords. The shard is corrupt; delete it and run again."
        )
    return name, centroids.to(torch.float32), codes, shape


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Write a safetensors file atomically (temp file, fsync, ``os.replace``, fsync dir).

    The bytes are a pure function of the arguments (keys and metadata in the order given):
    ``safetensors.torch.save`` writes the metadata in the iteration order of a Rust hash map,
    which changes from one process to the next, so a resumed run's shards differed from an
    uninterrupted run's in their header while holding the same tensors.

    Returns:
        The sha256 of the written file, for the manifest.
    """
    from dist_pgkm.checkpoint.writer import Entry, write_safetensors

    entries = [
        Entry(key, t.dtype, tuple(t.shape), lambda t=t: t)  # type: ignore[misc]
        for key, t in tensors.items()
    ]
    return write_safetensors(Path(path), entries, dict(meta))


def read_shard(
    path: Path, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a shard's tensors and metadata, after checking its sha256 when given.

    Raises:
        CheckpointError: Missing file, checksum mismatch, or a header safetensors rejects.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such shard. Run the same command again to redo it.")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(
            f"{path}: sha256 differs from the manifest (truncated or modified after it was "
            "written). Delete it; a resumed run redoes the layer."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}). Delete it and run again."
        ) from exc
    return tensors, meta
