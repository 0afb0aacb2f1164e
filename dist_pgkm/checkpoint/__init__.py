"""Checkpoint format: atomic per-layer shards (safetensors, string metadata, no pickle)."""

from dist_pgkm.checkpoint.shard import (
    FORMAT_VERSION,
    decode_layer,
    encode_layer,
    layer_spec,
    read_shard,
    write_shard,
)
from dist_pgkm.checkpoint.spec import READABLE_VERSIONS, LayerSpec

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "LayerSpec",
    "decode_layer",
    "encode_layer",
    "layer_spec",
    "read_shard",
    "write_shard",
]
