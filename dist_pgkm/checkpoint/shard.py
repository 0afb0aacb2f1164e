"""One quantized layer as one safetensors shard, written atomically and verified on read.

A shard holds ``<name>.centroids`` (``(k_used, block_size)``, or ``(n_books, k_used,
block_size)`` with one codebook per ``codebook_rows`` output rows; fp16 unless configured),
``<name>.codes`` (``uint8``, bit-packed at ``ceil(log2 k_used)`` bits) and, when the layer has
them, ``<name>.scales`` (F16), ``<name>.outlier_idx`` (I32) and ``<name>.outlier_val`` (F16).
Its header carries string metadata: format version, weight shape, block size, k_used, bits per
code, the number of blocks, codebook rows, scale group, outlier count and metric
(:class:`~dist_pgkm.checkpoint.spec.LayerSpec`). Nothing is pickled. Reading checks the sha256
(when the caller knows it), the header, every tensor's presence, shape and dtype, the code
range, the scales and the outliers before any tensor is used; format-1 shards still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.checkpoint.spec import CENTROID_DTYPES, FORMAT_VERSION, LayerSpec
from dist_pgkm.errors import CheckpointError, InvalidInputError
from dist_pgkm.kmeans.result import KMeansStats
from dist_pgkm.pq.layout import side_problems
from dist_pgkm.pq.pack import bits_for, pack_codes, unpack_codes
from dist_pgkm.pq.quantize import QuantizedWeight
from dist_pgkm.utils.dtypes import SAFETENSORS_DTYPES
from dist_pgkm.utils.safetensors_io import UnreadableFile, read_header, read_tensors

__all__ = [
    "FORMAT_VERSION",
    "decode_layer",
    "encode_layer",
    "file_sha256",
    "layer_spec",
    "read_shard",
    "write_shard",
]

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SHARD_FIX = "The shard is inconsistent; delete it and run again to redo the layer."


def _spec_of(q: QuantizedWeight, kind: str, k: int | None, name: str) -> LayerSpec:
    """The format's description of ``q``, after checking that its parts fit together."""
    shape = tuple(int(s) for s in q.shape)
    out = shape[0]
    width = math.prod(shape[1:])
    problems = side_problems(shape, q.scales, q.outlier_idx, q.outlier_val)
    if q.codebook_rows:
        books_fit = q.centroids.dim() == 3 and q.n_books * q.codebook_rows == out
    else:
        books_fit = q.centroids.dim() == 2
    if not books_fit:
        problems.append(
            f"centroids {tuple(q.centroids.shape)} do not hold one book per codebook_rows="
            f"{q.codebook_rows} of the {out} rows"
        )
    if (q.scales is None) != (q.scale_group == 0) or (
        q.scales is not None and q.scales.shape[-1] * q.scale_group != width
    ):
        problems.append(f"scale_group {q.scale_group} does not match scales {_dims(q.scales)}")
    if problems:
        raise InvalidInputError(f"{name}: cannot encode the layer: {'; '.join(problems)}.")
    return LayerSpec(
        kind=kind,
        shape=shape,
        block_size=q.block_size,
        k=q.k_used if k is None else k,
        k_used=q.k_used,
        bits=bits_for(q.k_used),
        codebook_rows=q.codebook_rows,
        scale_group=q.scale_group,
        n_outliers=q.n_outliers,
        metric=q.metric,
    )


def _dims(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def encode_layer(
    name: str,
    q: QuantizedWeight,
    centroid_dtype: str = "float16",
    kind: str = "linear",
    k: int | None = None,
    stats: KMeansStats | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of one quantized layer (docs/format.md, format 2).

    Args:
        name: Module name of the layer.
        q: The quantized weight (scales and outliers are stored in fp16, outlier indices as
            int32; :func:`~dist_pgkm.pq.quantize.quantize_weight` makes them fp16-exact).
        centroid_dtype: Storage dtype of the codebook(s).
        kind: ``linear``, ``embedding`` or ``conv2d``.
        k: Requested codebook size (default: the stored one).
        stats: The header's ``stats`` record: how the codebook was made (default:
            ``q.stats``, the clustering run's; empty when neither is given).

    Raises:
        InvalidInputError: Unknown ``centroid_dtype``, or parts of ``q`` that do not fit
            together (books, scales or outliers of the wrong shape, unsorted outliers).
    """
    if centroid_dtype not in CENTROID_DTYPES:
        raise InvalidInputError(
            f"centroid dtype {centroid_dtype!r} is not supported; use one of "
            f"{sorted(CENTROID_DTYPES)}."
        )
    spec = _spec_of(q, kind, k, name)
    stats = stats if stats is not None else q.stats
    record = stats.as_dict() if stats is not None else {}
    tensors = {
        f"{name}.centroids": q.centroids.to(_TORCH_DTYPES[centroid_dtype]).contiguous(),
        f"{name}.codes": pack_codes(q.codes, spec.bits),
    }
    if q.scales is not None:
        tensors[f"{name}.scales"] = q.scales.to(torch.float16).contiguous()
    if q.outlier_idx is not None and q.outlier_val is not None and spec.n_outliers:
        tensors[f"{name}.outlier_idx"] = q.outlier_idx.to(torch.int32).contiguous()
        tensors[f"{name}.outlier_val"] = q.outlier_val.to(torch.float16).contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "layer": name,
        **spec.to_header(),
        "centroid_dtype": centroid_dtype,
        "stats": json.dumps({**record, "weight_sq": q.weight_sq}, sort_keys=True),
    }
    return tensors, meta


def layer_spec(meta: dict[str, str], where: str = "shard") -> LayerSpec:
    """The validated :class:`LayerSpec` of a shard from its header (format 1 or 2).

    Raises:
        CheckpointError: Another format version, or a missing or inconsistent entry.
    """
    return LayerSpec.from_header(meta, f"{where} ({meta.get('layer', '')})", _SHARD_FIX)


def _stats(meta: dict[str, str], spec: LayerSpec, where: str) -> tuple[KMeansStats, float]:
    """The clustering statistics and ``||W||^2`` recorded in a shard's header."""
    try:
        raw: Any = json.loads(meta.get("stats", "{}"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CheckpointError(f"{where}: header entry 'stats' is malformed. {_SHARD_FIX}") from exc
    fields = {f.name for f in dataclasses.fields(KMeansStats)}
    base: dict[str, Any] = {
        "method": "?",
        "backend": "?",
        "n": spec.n_blocks,
        "d": spec.block_size,
        "k": spec.k,
    }
    try:
        stats = KMeansStats(**{**base, **{k: v for k, v in raw.items() if k in fields}})
    except TypeError:  # informative only: a stats entry of another version is not an error
        stats = KMeansStats(**base)
    weight_sq = raw.get("weight_sq", 0.0)
    return stats, float(weight_sq) if isinstance(weight_sq, int | float) else 0.0


def decode_layer(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str = "shard"
) -> tuple[str, QuantizedWeight]:
    """Validate a shard's content and return ``(name, the quantized weight)``.

    The weight's centroids, scales and outlier values are float32 (the stored values,
    exactly), codes and outlier indices int64.

    Raises:
        CheckpointError: Wrong version, missing or unexpected tensor, or inconsistent shapes,
            dtypes, codes, scales or outliers.
    """
    name = meta.get("layer", "")
    spec = layer_spec(meta, where)
    centroid_dtype = meta.get("centroid_dtype", "")
    if centroid_dtype not in CENTROID_DTYPES:
        raise CheckpointError(
            f"{where} ({name}): header entry 'centroid_dtype' is {centroid_dtype!r}, not one of "
            f"{sorted(CENTROID_DTYPES)}. {_SHARD_FIX}"
        )
    expected = {f"{name}.{suffix}": info for suffix, info in spec.tensors(centroid_dtype).items()}
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{where}: tensors {sorted(expected)} expected, found {sorted(tensors)}. The shard "
            "is corrupt; delete it and run again to redo it."
        )
    problems = []
    for key, (dtype, shape) in expected.items():
        t, suffix = tensors[key], key.rpartition(".")[2]
        if tuple(t.shape) != shape:
            problems.append(f"{suffix} {tuple(t.shape)} != {shape}")
        elif t.dtype != SAFETENSORS_DTYPES[dtype]:
            problems.append(f"{suffix} dtype {t.dtype} != {SAFETENSORS_DTYPES[dtype]}")
    if problems:
        raise CheckpointError(f"{where} ({name}): {'; '.join(problems)}. {_SHARD_FIX}")
    centroids = tensors[f"{name}.centroids"].to(torch.float32)
    scales = tensors.get(f"{name}.scales")
    outlier_idx = tensors.get(f"{name}.outlier_idx")
    outlier_val = tensors.get(f"{name}.outlier_val")
    problems = side_problems(spec.shape, scales, outlier_idx, outlier_val)
    if not bool(torch.isfinite(centroids).all()):
        problems.append("centroids hold NaN or infinity")
    if problems:
        raise CheckpointError(f"{where} ({name}): {'; '.join(problems)}. {_SHARD_FIX}")
    codes = unpack_codes(tensors[f"{name}.codes"], spec.n_blocks, spec.bits)
    if spec.n_blocks and int(codes.max()) >= spec.k_used:
        raise CheckpointError(
            f"{where} ({name}): a code reaches {int(codes.max())} but the codebook has "
            f"{spec.k_used} codewords. The shard is corrupt; delete it and run again."
        )
    stats, weight_sq = _stats(meta, spec, f"{where} ({name})")
    q = QuantizedWeight(
        centroids=centroids,
        codes=codes,
        shape=spec.shape,
        stats=stats,
        weight_sq=weight_sq,
        scales=None if scales is None else scales.to(torch.float32),
        scale_group=spec.scale_group,
        codebook_rows=spec.codebook_rows,
        outlier_idx=None if outlier_idx is None else outlier_idx.to(torch.int64),
        outlier_val=None if outlier_val is None else outlier_val.to(torch.float32),
        metric=spec.metric,
    )
    return name, q


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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such shard. Run the same command again to redo it.")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(
            f"{path}: sha256 differs from the manifest (truncated or modified after it was "
            "written). Delete it; a resumed run redoes the layer."
        )
    try:
        read_header(path)  # the format's rules, and a truncated or extended file, first
        tensors, meta = read_tensors(path)
    except UnreadableFile as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc.why}). Delete it and run again."
        ) from exc
    return tensors, meta
