"""dist-pgkm checkpoints load as working transformers models, exactly, or fail with the reason.

Checkpoints are built here from the real SmolLM2-135M (tied embeddings) and all-MiniLM-L6-v2
(a BertModel) exactly as docs/format.md describes: a few layers quantized, fp16 codebooks,
bit-packed codes, the tied ``lm_head`` not stored. The reference of every comparison is the
original model with the quantized layers' weights overwritten by ``centroids_fp16.float()[codes]``.
Codebook sizes are chosen so that ``k_used`` is not a power of two: a corrupted byte can then
hold a code past the codebook, which loading must catch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import dist_pgkm
from dist_pgkm.checkpoint import hf, hf_hook
from dist_pgkm.errors import CheckpointError, InvalidInputError
from dist_pgkm.models.offline import minilm_dir, smollm2_dir
from dist_pgkm.pq import PQEmbedding, PQLinear, PQModule, bits_for, pack_codes, quantize_weight
from dist_pgkm.pq.pack import unpack_codes

ATOL = 1e-5
PROMPT = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767]])
BERT_IDS = torch.tensor([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 102]])
HEADER = {"format": "pt", "quant_method": "pgkm", "dist_pgkm_format": "1"}

# name -> (kind, block_size, k)
SMOL_LAYERS = {
    "model.embed_tokens": ("embedding", 16, 24),
    "model.layers.0.mlp.down_proj": ("linear", 8, 40),
    "model.layers.3.self_attn.q_proj": ("linear", 16, 24),
}
SMOL_TIED = {"lm_head": "model.embed_tokens"}
BERT_LAYERS = {
    "embeddings.word_embeddings": ("embedding", 16, 24),
    "encoder.layer.0.attention.self.query": ("linear", 8, 40),
    "encoder.layer.1.intermediate.dense": ("linear", 16, 24),
    "encoder.layer.5.output.dense": ("linear", 8, 12),
}
QUERY = "encoder.layer.0.attention.self.query"


def build_checkpoint(
    source: Path,
    out: Path,
    layers: dict[str, tuple[str, int, int]],
    tied: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Write a dist-pgkm checkpoint of ``source`` (docs/format.md); return the decoded weights."""
    state = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    specs: dict[str, dict[str, Any]] = {}
    decoded: dict[str, torch.Tensor] = {}
    for name, (kind, block_size, k) in layers.items():
        weight = state.pop(f"{name}.weight")
        q = quantize_weight(weight, block_size, k, method="fairseq-em", backend="torch", n_iter=2)
        assert q.k_used & (q.k_used - 1), "k_used must not be a power of two (see module doc)"
        centroids = q.centroids.to(torch.float16).contiguous()
        state[f"{name}.centroids"] = centroids
        state[f"{name}.codes"] = pack_codes(q.codes, bits_for(q.k_used))
        decoded[name] = centroids.float()[q.codes].reshape(weight.shape)
        specs[name] = {
            "kind": kind,
            "shape": list(weight.shape),
            "block_size": block_size,
            "k": k,
            "k_used": q.k_used,
            "bits": bits_for(q.k_used),
        }
    for target in tied:
        state.pop(f"{target}.weight", None)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata=HEADER)
    config["quantization_config"] = {
        "quant_method": "pgkm",
        "format_version": 1,
        "centroid_dtype": "float16",
        "method": "fairseq-em",
        "layers": specs,
        "tied": tied,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for item in source.iterdir():
        if item.name not in ("config.json", "model.safetensors") and not item.name.startswith("."):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    return decoded


def reference(load: Callable[[], nn.Module], decoded: dict[str, torch.Tensor]) -> nn.Module:
    """The original model with the quantized layers' weights set to their decoded values."""
    model = load()
    with torch.no_grad():
        for name, weight in decoded.items():
            model.get_submodule(name).weight.copy_(weight)
    return model.eval()


def pq_modules(model: nn.Module) -> dict[str, PQModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PQModule)}


def assert_materialized(model: nn.Module) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert meta == []


# --------------------------------------------------------------------------------------------
# SmolLM2-135M: tied, quantized embeddings


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("smol") / "ckpt"
    return out, build_checkpoint(smollm2_dir(), out, SMOL_LAYERS, SMOL_TIED)


@pytest.fixture(scope="module")
def smol_reference(smol: tuple[Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = reference(lambda: AutoModelForCausalLM.from_pretrained(smollm2_dir()), smol[1])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the reference is tied too
    with torch.no_grad():
        return {
            "logits": model(PROMPT).logits,
            "tokens": model.generate(PROMPT, max_new_tokens=5, do_sample=False),
            "inv_freq": model.model.rotary_emb.inv_freq.clone(),
        }


@pytest.fixture(scope="module")
def smol_pq(smol: tuple[Path, dict[str, torch.Tensor]]) -> Any:
    return dist_pgkm.load(smol[0])


def test_load_equals_reference(smol_pq: Any, smol_reference: dict[str, torch.Tensor]) -> None:
    from transformers import LlamaForCausalLM

    assert type(smol_pq) is LlamaForCausalLM
    assert {n: type(m) for n, m in pq_modules(smol_pq).items()} == {
        "model.embed_tokens": PQEmbedding,
        "model.layers.0.mlp.down_proj": PQLinear,
        "model.layers.3.self_attn.q_proj": PQLinear,
        "lm_head": PQLinear,
    }
    assert_materialized(smol_pq)
    assert torch.equal(smol_pq.model.rotary_emb.inv_freq, smol_reference["inv_freq"])
    with torch.no_grad():
        logits = smol_pq(PROMPT).logits
    torch.testing.assert_close(logits, smol_reference["logits"], atol=ATOL, rtol=0)


def test_lm_head_shares_the_embedding_codebook(smol_pq: Any) -> None:
    head, embed = smol_pq.lm_head, smol_pq.model.embed_tokens
    assert isinstance(head, PQLinear)
    assert head.centroids is embed.centroids
    assert head.codes is embed.codes
    assert head.index is embed.index
    assert smol_pq.all_tied_weights_keys == {"lm_head.centroids": "model.embed_tokens.centroids"}
    smol_pq.tie_weights()  # transformers re-tying on its own must neither crash nor untie
    assert head.centroids is embed.centroids
    assert head.codes is embed.codes


def test_fp16_codebooks_load_exactly(
    smol: tuple[Path, dict[str, torch.Tensor]], smol_pq: Any
) -> None:
    spec = json.loads((smol[0] / "config.json").read_text())["quantization_config"]["layers"]
    with safe_open(str(smol[0] / "model.safetensors"), framework="pt") as f:
        for name, module in pq_modules(smol_pq).items():
            if name == "lm_head":
                continue
            stored = f.get_tensor(f"{name}.centroids")
            assert stored.dtype == torch.float16
            assert torch.equal(module.centroids, stored.float())
            s = spec[name]
            codes = unpack_codes(f.get_tensor(f"{name}.codes"), module.n_blocks, s["bits"])
            dense = stored.float()[codes].reshape(s["shape"])
            assert torch.equal(module.weight, dense)
            assert torch.equal(dense, smol[1][name])


def test_generate_equals_reference_greedy(
    smol_pq: Any, smol_reference: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        tokens = smol_pq.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, PROMPT.shape[1] + 5)
    assert torch.equal(tokens, smol_reference["tokens"])


def test_transformers_auto_classes_load_it(
    smol: tuple[Path, dict[str, torch.Tensor]],
    smol_pq: Any,
    smol_reference: dict[str, torch.Tensor],
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol[0])
    assert model.lm_head.centroids is model.model.embed_tokens.centroids
    with torch.no_grad():
        logits = model(PROMPT).logits
    torch.testing.assert_close(logits, smol_reference["logits"], atol=ATOL, rtol=0)
    assert (
        model.config.quantization_config.to_dict()
        == json.loads((smol[0] / "config.json").read_text())["quantization_config"]
    )


def test_dense_load_is_a_plain_model(
    smol: tuple[Path, dict[str, torch.Tensor]], smol_reference: dict[str, torch.Tensor]
) -> None:
    model = dist_pgkm.load(smol[0], dense=True)
    assert pq_modules(model) == {}
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config")
    assert not model.is_quantized
    assert_materialized(model)
    with torch.no_grad():
        logits = model(PROMPT).logits
    torch.testing.assert_close(logits, smol_reference["logits"], atol=ATOL, rtol=0)


EXPORT_CHECK = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert AutoTokenizer.from_pretrained(sys.argv[1]).decode([504, 2365]) == "The quick"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    assert "dist_pgkm" not in sys.modules
    save_file({"logits": logits.contiguous()}, sys.argv[2])
    """
)


def test_export_dense_reloads_with_plain_transformers(
    smol: tuple[Path, dict[str, torch.Tensor]],
    smol_reference: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    out = hf.export_dense(smol[0], tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {"tokenizer.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    code = EXPORT_CHECK.replace("PROMPT", str(PROMPT[0].tolist()))
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "logits.safetensors")],
        check=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, smol_reference["logits"], atol=ATOL, rtol=0)
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        hf.export_dense(smol[0], out)


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: a BertModel, loaded with AutoModel; every corruption


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("bert") / "ckpt"
    return out, build_checkpoint(minilm_dir(), out, BERT_LAYERS, {})


def test_bert_loads_with_automodel(bert: tuple[Path, dict[str, torch.Tensor]]) -> None:
    from transformers import AutoModel, BertModel

    model = AutoModel.from_pretrained(bert[0])
    assert type(model) is BertModel
    assert set(pq_modules(model)) == set(BERT_LAYERS)
    assert isinstance(model.embeddings.word_embeddings, PQEmbedding)
    assert_materialized(model)
    ref = reference(lambda: AutoModel.from_pretrained(minilm_dir()), bert[1])
    assert torch.equal(model.embeddings.position_ids, ref.embeddings.position_ids)
    with torch.no_grad():
        hidden = model(BERT_IDS).last_hidden_state
        expected = ref(BERT_IDS).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=0)

    # In half precision the codebooks are cast like the float weights (fp16 ones stay exact)
    # and every layer computes in half precision.
    half = dist_pgkm.load(bert[0], dtype=torch.float16)
    assert half.encoder.layer[0].output.dense.weight.dtype == torch.float16
    with safe_open(str(bert[0] / "model.safetensors"), framework="pt") as f:
        assert torch.equal(half.get_submodule(QUERY).centroids, f.get_tensor(f"{QUERY}.centroids"))
    with torch.no_grad():
        hidden_half = half(BERT_IDS).last_hidden_state
    assert hidden_half.dtype == torch.float16
    torch.testing.assert_close(hidden_half.float(), expected, atol=2e-2, rtol=0)


@pytest.fixture(scope="module")
def bert_state(bert: tuple[Path, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return load_file(str(bert[0] / "model.safetensors"))


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        del state[key]

    return edit


def _set(
    key: str, make: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = make(state[key])

    return edit


def _code_past_codebook(packed: torch.Tensor) -> torch.Tensor:
    corrupt = packed.clone()
    corrupt[0] = 0xFF  # the first code's bits all set: 2**bits - 1 >= k_used
    return corrupt


def _extra_weight(state: dict[str, torch.Tensor]) -> None:
    state[f"{QUERY}.weight"] = torch.zeros(384, 384)


TENSOR_CORRUPTIONS = {
    "missing-codes": (_drop(f"{QUERY}.codes"), rf"missing {QUERY}\.codes of quantized layer"),
    "missing-float": (
        _drop("encoder.layer.2.output.dense.bias"),
        r"missing encoder\.layer\.2\.output\.dense\.bias",
    ),
    "centroid-shape": (
        _set(f"{QUERY}.centroids", lambda c: c[:-1].clone()),
        rf"{QUERY}\.centroids is F16 \[\d+, 8\], but layer {QUERY} .* needs F16 \[\d+, 8\]",
    ),
    "centroid-dtype": (
        _set(f"{QUERY}.centroids", lambda c: c.float()),
        rf"{QUERY}\.centroids is F32 .* needs F16",
    ),
    "codes-dtype": (_set(f"{QUERY}.codes", lambda c: c.to(torch.int32)), rf"{QUERY}\.codes is I32"),
    "float-shape": (
        _set("pooler.dense.weight", lambda w: w[:, :-1].clone()),
        r"pooler\.dense\.weight has shape \[384, 383\], the model's pooler\.dense\.weight has "
        r"\[384, 384\]",
    ),
    "unexpected": (_extra_weight, rf"unexpected {QUERY}\.weight: .* is quantized"),
    "code-out-of-range": (
        _set(f"{QUERY}.codes", _code_past_codebook),
        rf"model\.safetensors: layer {QUERY}: codes range over \[\d+, \d+\] but the codebook has "
        r"\d+ codewords",
    ),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CORRUPTIONS))
def test_corrupt_tensors_raise_checkpoint_error(
    case: str,
    bert: tuple[Path, dict[str, torch.Tensor]],
    bert_state: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    from transformers import AutoModel

    edit, message = TENSOR_CORRUPTIONS[case]
    state = dict(bert_state)
    edit(state)
    shutil.copy2(bert[0] / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"), metadata=HEADER)
    with pytest.raises(CheckpointError, match=message) as caught:
        dist_pgkm.load(tmp_path)
    assert "run the same `dist-pgkm quantize` command again" in str(caught.value)  # the fix
    with pytest.raises(CheckpointError, match=message):
        AutoModel.from_pretrained(tmp_path)


def _config_with(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["quantization_config"].update(changes)

    return edit


def _layer_with(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["quantization_config"]["layers"][QUERY].update(changes)

    return edit


def _extra_layer(config: dict[str, Any]) -> None:
    layers = config["quantization_config"]["layers"]
    layers["encoder.layer.9.output.dense"] = layers[QUERY]


CONFIG_CORRUPTIONS = {
    "format-version": (
        _config_with(format_version=3),
        r"config\.json: quantization_config\.format_version is 3; this dist-pgkm reads formats "
        r"1 and 2",
    ),
    "unknown-key": (_config_with(group_size=4), r"unknown keys \['group_size'\]"),
    "bits": (
        _layer_with(bits=8),
        rf"layers\['{QUERY}'\]: bits is 8, but codes of \d+ codewords take \d+",
    ),
    "shape": (
        _layer_with(shape=[384, 192]),
        rf"layer {QUERY} is a Linear with a weight of shape \(384, 384\)",
    ),
    "no-such-layer": (
        _extra_layer,
        r"'encoder\.layer\.9\.output\.dense' of quantization_config is not a module of BertModel",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CORRUPTIONS))
def test_corrupt_config_raises_checkpoint_error(
    case: str, bert: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    from transformers import AutoModel

    edit, message = CONFIG_CORRUPTIONS[case]
    config = json.loads((bert[0] / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(bert[0] / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        dist_pgkm.load(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        AutoModel.from_pretrained(tmp_path)


def test_foreign_header_metadata_is_refused(
    bert: tuple[Path, dict[str, torch.Tensor]], bert_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    shutil.copy2(bert[0] / "config.json", tmp_path / "config.json")
    save_file(bert_state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the header metadata has"):
        dist_pgkm.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        dist_pgkm.load(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# a tiny tied Llama (random weights): base-model loading, saving, tie inconsistencies


TINY_LAYERS = {
    "model.embed_tokens": ("embedding", 8, 24),
    "model.layers.1.mlp.up_proj": ("linear", 8, 12),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    source = tmp_path_factory.mktemp("tiny") / "source"
    LlamaForCausalLM(config).save_pretrained(source)
    out = source.parent / "ckpt"
    return out, build_checkpoint(source, out, TINY_LAYERS, SMOL_TIED)


def test_base_model_finds_layers_without_the_head_prefix(
    tiny: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    from transformers import AutoModel

    model = dist_pgkm.load(tiny[0], forward="decode")  # as from_pretrained builds them
    base = AutoModel.from_pretrained(tiny[0])  # a LlamaModel: lm_head's tensors are not used
    assert set(pq_modules(base)) == {"embed_tokens", "layers.1.mlp.up_proj"}
    assert base.config.quantization_config.layers.keys() == {"embed_tokens", "layers.1.mlp.up_proj"}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        expected = model.model(ids).last_hidden_state
        torch.testing.assert_close(base(ids).last_hidden_state, expected, atol=0, rtol=0)


def test_save_pretrained_round_trips(
    tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    model = dist_pgkm.load(tiny[0])
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == HEADER
        assert f.get_tensor("model.embed_tokens.centroids").dtype == torch.float16
        assert not any(key.startswith("lm_head") for key in f.keys())  # noqa: SIM118
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((tiny[0] / "config.json").read_text())["quantization_config"]
    again = dist_pgkm.load(tmp_path)
    assert again.lm_head.centroids is again.model.embed_tokens.centroids
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_format_1_checkpoints_load_and_describe_as_before(
    tiny: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Every checkpoint of this module is format 1 (as dist-pgkm wrote before format 2): it
    loads, saves back as format 1 (test_save_pretrained_round_trips), and its sizes are the
    format-1 ones: packed codes plus one codebook, nothing else."""
    from dist_pgkm.checkpoint.summary import describe
    from dist_pgkm.pq import bits_per_weight

    info = describe(tiny[0])
    assert {layer.name for layer in info.layers} == set(TINY_LAYERS)
    for layer in info.layers:
        n_blocks = layer.n_weights // layer.block_size
        assert layer.bits_per_weight == bits_per_weight(n_blocks, layer.k_used, layer.block_size)
        assert (layer.codebook_rows, layer.scale_group, layer.n_outliers) == (0, 0, 0)
        assert layer.side_bytes == 0
    assert dist_pgkm.load(tiny[0]).config.quantization_config.format_version == 1


def test_tie_inconsistencies_raise_checkpoint_error(
    tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    config = json.loads((tiny[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(tiny[0] / "model.safetensors")

    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM does not tie these weights"):
        dist_pgkm.load(tmp_path)

    config["tie_word_embeddings"] = True
    config["quantization_config"]["tied"] = {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization_config\.tied does not name lm_head"):
        dist_pgkm.load(tmp_path)


# --------------------------------------------------------------------------------------------
# registration


LEAN = textwrap.dedent(
    """
    import json, sys
    import dist_pgkm
    lean = "transformers" not in sys.modules and "safetensors" not in sys.modules
    from dist_pgkm.checkpoint import hf_hook
    waiting = hf_hook.installed()
    import transformers
    still_waiting = hf_hook.installed()
    from transformers.quantizers import auto
    print(json.dumps({
        "lean": lean,
        "waiting": waiting,
        "waiting_after_import_transformers": still_waiting,
        "hook_left": hf_hook.installed(),
        "quantizer": auto.AUTO_QUANTIZER_MAPPING["pgkm"].__name__,
        "config": auto.AUTO_QUANTIZATION_CONFIG_MAPPING["pgkm"].__name__,
    }))
    """
)


def test_lean_import_then_lazy_registration() -> None:
    out = subprocess.run(
        [sys.executable, "-c", LEAN], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "lean": True,
        "waiting": True,
        "waiting_after_import_transformers": True,  # the registry is imported lazily
        "hook_left": False,
        "quantizer": "PGKMHfQuantizer",
        "config": "PGKMConfig",
    }


def test_import_without_transformers_is_harmless() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import dist_pgkm\n"
        "try:\n    import transformers.quantizers.auto\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok"


def test_registration_is_idempotent_and_immediate_when_transformers_is_loaded() -> None:
    from transformers.quantizers import auto

    hf.register()
    hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["pgkm"] is hf.PGKMHfQuantizer
    del auto.AUTO_QUANTIZER_MAPPING["pgkm"], auto.AUTO_QUANTIZATION_CONFIG_MAPPING["pgkm"]
    hf_hook.install()  # the registry is already imported: registers at once, no hook
    assert not hf_hook.installed()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["pgkm"] is hf.PGKMConfig
    assert auto.AUTO_QUANTIZER_MAPPING["pgkm"] is hf.PGKMHfQuantizer
