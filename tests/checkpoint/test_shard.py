"""Per-layer shards: exact round trip, bytes on disk match the bits, every corruption caught."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from dist_pgkm.checkpoint import decode_layer, encode_layer, read_shard, write_shard
from dist_pgkm.errors import CheckpointError
from dist_pgkm.pq import quantize_weight
from dist_pgkm.pq.quantize import QuantizedWeight

from ..conftest import gaussian_mixture


@pytest.fixture
def layer() -> QuantizedWeight:
    weight = gaussian_mixture(96 * 80 // 4, 4, 30, seed=0).reshape(96, 80)  # (out, in)
    return quantize_weight(weight, block_size=4, k=300, backend="torch")


def _header_len(path: Path) -> int:
    return int(struct.unpack("<Q", path.read_bytes()[:8])[0])


def test_round_trip_and_bytes_on_disk(tmp_path: Path, layer: QuantizedWeight) -> None:
    tensors, meta = encode_layer("model.layers.0.mlp", layer)
    path = tmp_path / "shards" / "layer.safetensors"
    digest = write_shard(path, tensors, meta)
    assert [p.name for p in path.parent.iterdir()] == ["layer.safetensors"]  # no temp left
    name, q = decode_layer(*read_shard(path, digest), where=str(path))
    assert name == "model.layers.0.mlp"
    assert q.shape == (96, 80)
    assert torch.equal(q.codes, layer.codes)
    assert torch.equal(q.centroids, layer.centroids.half().float())
    assert q.scales is None
    assert q.outlier_idx is None
    assert q.codebook_rows == 0
    # 300 codewords -> 9-bit codes: the payload is exactly codes + fp16 codebook.
    payload = path.stat().st_size - 8 - _header_len(path)
    assert payload == (layer.codes.numel() * 9 + 7) // 8 + layer.k_used * 4 * 2


def test_truncated_or_modified_shards_are_detected(tmp_path: Path, layer: QuantizedWeight) -> None:
    path = tmp_path / "layer.safetensors"
    digest = write_shard(path, *encode_layer("l", layer))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"sha256 differs.*resumed run redoes the layer"):
        read_shard(path, digest)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_shard(path)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_shard(path)
    with pytest.raises(CheckpointError, match="no such shard"):
        read_shard(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format_version": "0"}, r"format version '0'.*reads '1'"),
        ({"k_used": "7"}, r"bits is 9, but codes of 7 codewords take 3"),
        ({"shape": json.dumps([96, 81])}, r"blocks of 4 != 7776 weights"),
        ({"bits": "x"}, r"'bits' is missing or not an integer"),
    ],
)
def test_inconsistent_headers_are_refused(
    tmp_path: Path, layer: QuantizedWeight, edit: dict[str, str], match: str
) -> None:
    tensors, meta = encode_layer("l", layer)
    path = tmp_path / "layer.safetensors"
    write_shard(path, tensors, {**meta, **edit})
    with pytest.raises(CheckpointError, match=match):
        decode_layer(*read_shard(path))


def test_out_of_range_codes_are_refused(tmp_path: Path) -> None:
    # 5 codewords -> 3-bit codes, which could encode 7: a corrupt stream must not index past 4.
    q = QuantizedWeight(torch.zeros(5, 2), torch.tensor([0, 1, 2, 3]), (2, 4), None)  # type: ignore[arg-type]
    tensors, meta = encode_layer("l", q)
    tensors["l.codes"] = torch.tensor([0xFF, 0x0F], dtype=torch.uint8)  # codes 7, 7, ...
    path = tmp_path / "layer.safetensors"
    write_shard(path, tensors, meta)
    with pytest.raises(CheckpointError, match="a code reaches 7 but the codebook has 5"):
        decode_layer(*read_shard(path))


def test_shard_bytes_are_the_same_in_every_process(tmp_path: Path) -> None:
    """A resumed run must rewrite a shard byte for byte: the header may not depend on the
    process (safetensors' own writer orders the metadata by a per-process hash seed)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from dist_pgkm.checkpoint import write_shard\n"
        "g = torch.Generator().manual_seed(0)\n"
        "t = {'codes': torch.randint(0, 255, (64,), generator=g, dtype=torch.uint8),\n"
        "     'centroids': torch.randn(16, 4, generator=g).half()}\n"
        "meta = {f'key{i}': str(i) for i in range(12)}\n"
        "print(write_shard(Path(sys.argv[1]), t, meta))\n"
    )
    digests = set()
    for i in range(4):
        path = tmp_path / f"s{i}.safetensors"
        run = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        )
        digests.add(run.stdout.strip())
        assert read_shard(path)[1] == {f"key{i}": str(i) for i in range(12)}
    assert len(digests) == 1
