"""Merge: the finished per-layer shards and the source's float tensors into one checkpoint.

Streaming: the merged file's header is computed from the shards' headers and the source's
tensor index, then each tensor is read (from its shard or from the source) and written in turn,
so memory holds one tensor at a time. The layout is docs/format.md.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.checkpoint.atomic import atomic_open, atomic_write_json
from dist_pgkm.checkpoint.shard import FORMAT_VERSION, layer_spec
from dist_pgkm.checkpoint.spec import CENTROID_DTYPES
from dist_pgkm.checkpoint.writer import Entry, plan_files, write_safetensors
from dist_pgkm.errors import CheckpointError
from dist_pgkm.models.source import ModelSource
from dist_pgkm.utils.dtypes import SAFETENSORS_DTYPES
from dist_pgkm.utils.safetensors_io import UnreadableFile, read_header, read_tensors

__all__ = ["CHECKPOINT_METADATA", "QuantizedLayer", "merge_checkpoint", "read_shard_header"]

logger = logging.getLogger(__name__)

CHECKPOINT_METADATA = {"format": "pt", "quant_method": "pgkm", "dist_pgkm_format": FORMAT_VERSION}
"""``__metadata__`` of every merged model file."""

_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class QuantizedLayer:
    """A finished layer to merge: its module name, source weight key, shard, tied modules."""

    name: str
    tensor: str
    shard: Path
    tied: tuple[str, ...] = ()


def read_shard_header(
    path: Path,
) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """A shard's metadata and its tensors' dtypes and shapes, without reading the data."""
    try:
        header = read_header(path)
    except UnreadableFile as exc:
        raise CheckpointError(
            f"{path}: unreadable shard ({exc.why}). Run again to redo it."
        ) from exc
    info = {key: (entry.torch_dtype, entry.shape) for key, entry in header.tensors.items()}
    return header.metadata, info


def _shard_reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        try:
            return read_tensors(path, [key])[0][key]
        except UnreadableFile as exc:
            raise CheckpointError(
                f"{path}: unreadable shard ({exc.why}). Run again to redo it."
            ) from exc

    return read


def _layer_entry(layer: QuantizedLayer) -> tuple[list[Entry], dict[str, Any]]:
    """The merged file's entries of one layer (its shard's tensors, in the format's order) and
    its ``quantization_config.layers`` entry. A format-1 shard (of a resumed run) merges into
    format 2 unchanged: its layer has no books, scales or outliers."""
    meta, info = read_shard_header(layer.shard)
    spec = layer_spec(meta, str(layer.shard))
    centroid_dtype = meta.get("centroid_dtype", "")
    if centroid_dtype not in CENTROID_DTYPES:
        raise CheckpointError(
            f"{layer.shard}: header entry centroid_dtype is {centroid_dtype!r}. Delete the shard "
            "and run again to redo the layer."
        )
    expected = spec.tensors(centroid_dtype)
    entries = []
    for suffix, (dtype_name, shape) in expected.items():
        key = f"{layer.name}.{suffix}"
        if info.get(key) != (SAFETENSORS_DTYPES[dtype_name], shape):
            raise CheckpointError(
                f"{layer.shard}: tensor {key} is {info.get(key)}, its header describes "
                f"{dtype_name} {list(shape)}. Delete the shard and run again to redo the layer."
            )
        entries.append(Entry(key, *info[key], _shard_reader(layer.shard, key)))
    return entries, spec.to_config()


def merge_checkpoint(
    out_dir: Path,
    source: ModelSource,
    layers: Sequence[QuantizedLayer],
    quantization: dict[str, Any],
    max_shard_bytes: int,
) -> dict[str, str]:
    """Write the merged checkpoint, ``config.json`` and the source's auxiliary files.

    Args:
        out_dir: Output directory of the run.
        source: The model that was quantized.
        layers: Every quantized layer, with its finished shard.
        quantization: Run-level ``quantization_config`` entries (``method``,
            ``centroid_dtype``); ``layers`` and ``tied`` are added from the shards.
        max_shard_bytes: Largest tensor data per model file; above it the checkpoint is
            sharded with an index, as ``save_pretrained`` does.

    Returns:
        The written checkpoint files (relative names) and their sha256.
    """
    by_tensor = {layer.tensor: layer for layer in layers}
    entries: list[Entry] = []
    specs: dict[str, Any] = {}
    tied: dict[str, str] = {}
    for key, info in source.tensors().items():
        layer = by_tensor.get(key)
        if layer is None:
            entries.append(Entry(key, info.dtype, info.shape, _source_reader(source, key)))
            continue
        layer_entries, spec = _layer_entry(layer)
        entries.extend(layer_entries)
        specs[layer.name] = spec
        tied.update({name: layer.name for name in layer.tied})
    missing = sorted(set(by_tensor) - set(source.tensors()))
    assert not missing, f"quantized weights not in the source: {missing}"

    files = plan_files(entries, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    _remove_stale_model_files(out_dir, keep=set(names))
    written: dict[str, str] = {}
    for name, file_entries in zip(names, files, strict=True):
        logger.info("Writing %s (%d tensors)", name, len(file_entries))
        written[name] = write_safetensors(out_dir / name, file_entries, CHECKPOINT_METADATA)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.key: n for n, fe in zip(names, files, strict=True) for e in fe},
        }
        atomic_write_json(out_dir / _INDEX, index)

    config = dict(source.config() or {})
    if "dtype" not in config and "torch_dtype" not in config:
        # Without it transformers' dtype="auto" takes the first float tensor of the file, which
        # may be an fp16 codebook: the model would load in fp16. Record the source's dtype.
        floats = [i.dtype for i in source.tensors().values() if i.dtype.is_floating_point]
        if floats:
            config["dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "pgkm",
        "format_version": int(FORMAT_VERSION),
        **quantization,
        "layers": dict(sorted(specs.items())),
        "tied": dict(sorted(tied.items())),
    }
    atomic_write_json(out_dir / "config.json", config)
    for aux in source.aux_files():
        with atomic_open(out_dir / aux.name) as dst, aux.open("rb") as src:
            shutil.copyfileobj(src, dst)
    return written


def _source_reader(source: ModelSource, key: str) -> Callable[[], torch.Tensor]:
    return lambda: source.read(key)


def _remove_stale_model_files(out_dir: Path, keep: set[str]) -> None:
    """Remove model files of an earlier merge that this one does not rewrite."""
    for path in [*out_dir.glob("model*.safetensors"), out_dir / _INDEX]:
        if path.name not in keep and path.exists():
            if path.name == _INDEX and len(keep) > 1:
                continue
            path.unlink()
