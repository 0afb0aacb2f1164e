"""Checkpoint format: atomic per-layer shards (safetensors, string metadata, no pickle)."""

from dist_pgkm.checkpoint.shard import (
    FORMAT_VERSION,
    decode_layer,
    encode_layer,
    read_shard,
    write_shard,
)

__all__ = ["FORMAT_VERSION", "decode_layer", "encode_layer", "read_shard", "write_shard"]
