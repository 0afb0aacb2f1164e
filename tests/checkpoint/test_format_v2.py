"""Format 2: scales, outliers and per-row-group codebooks round-trip exactly; format 1 still reads.

Real data: layers of SmolLM2-135M. The shard tests quantize its layer-0 q_proj (576 x 576); the
checkpoint tests build a one-block Llama with SmolLM2's real layer 0, its first 512 token
embeddings (tied to the LM head) and its norms, quantize five of its layers with every
combination of the options (one layer through the format-1 shard writer, as a run resumed across
the upgrade would have it), merge with the real merge, and load with both loaders. Every
comparison of decoded weights and logits is bit for bit (float32); bits per weight from the
headers are compared with ``QuantizedWeight.bits_per_weight()`` with ``==``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dist_pgkm
from dist_pgkm.checkpoint import decode_layer, encode_layer, read_shard, write_shard
from dist_pgkm.checkpoint.merge import QuantizedLayer, merge_checkpoint
from dist_pgkm.checkpoint.shard import layer_spec
from dist_pgkm.checkpoint.summary import describe
from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import CheckpointError
from dist_pgkm.models.offline import smollm2_dir
from dist_pgkm.models.source import open_source
from dist_pgkm.pq import PQEmbedding, PQLinear, PQModule, bits_for, pack_codes, quantize_weight
from dist_pgkm.pq.quantize import QuantizedWeight

from ..conftest import run_cli, smollm2_weight

BS, K = 8, 64
CASES = {
    "row-scales": LayerQuantOptions(scale="row"),
    "group-scales": LayerQuantOptions(scale="group", scale_group=64),
    "books": LayerQuantOptions(codebook_rows=64),
    "outliers": LayerQuantOptions(outliers=0.01),
    "all": LayerQuantOptions(scale="group", scale_group=64, codebook_rows=64, outliers=0.005),
}
Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"
IDS = torch.tensor([[1, 504, 236, 354, 7, 27, 90, 260, 11, 511]])  # vocabulary: 512

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _quantize(weight: torch.Tensor, options: LayerQuantOptions) -> QuantizedWeight:
    return quantize_weight(weight, BS, K, options=options, backend="torch", n_iter=4)


def _stored(q: QuantizedWeight) -> QuantizedWeight:
    """``q`` as a float16 checkpoint holds it: codebooks rounded to fp16 (scales and outlier
    values are fp16-exact already)."""
    return dataclasses.replace(q, centroids=q.centroids.half().float())


def _payload_bytes(path: Path) -> int:
    header = int(struct.unpack("<Q", path.read_bytes()[:8])[0])
    return path.stat().st_size - 8 - header


def v1_encode(name: str, q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A layer as dist-pgkm wrote it before format 2 (docs/format.md of version 1)."""
    assert q.centroids.dim() == 2
    assert q.scales is None
    assert q.n_outliers == 0
    bits = bits_for(q.k_used)
    tensors = {
        f"{name}.centroids": q.centroids.half().contiguous(),
        f"{name}.codes": pack_codes(q.codes, bits),
    }
    meta = {
        "format_version": "1",
        "layer": name,
        "kind": "linear",
        "k": str(K),
        "shape": json.dumps(list(q.shape)),
        "block_size": str(q.block_size),
        "k_used": str(q.k_used),
        "bits": str(bits),
        "n_blocks": str(q.codes.numel()),
        "centroid_dtype": "float16",
        "stats": json.dumps({**q.stats.as_dict(), "weight_sq": q.weight_sq}, sort_keys=True),
    }
    return tensors, meta


# --------------------------------------------------------------------------------------------
# shards


@pytest.fixture(scope="module")
def q_proj() -> dict[str, QuantizedWeight]:
    weight = smollm2_weight(f"{Q_PROJ}.weight")
    return {case: _quantize(weight, options) for case, options in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shard_round_trip_is_exact_and_bits_come_from_the_header(
    tmp_path: Path, q_proj: dict[str, QuantizedWeight], case: str
) -> None:
    q = q_proj[case]
    tensors, meta = encode_layer(Q_PROJ, q, "float16", kind="linear", k=K)
    path = tmp_path / "shard.safetensors"
    digest = write_shard(path, tensors, meta)
    name, back = decode_layer(*read_shard(path, digest), where=str(path))
    assert name == Q_PROJ
    assert meta["format_version"] == "2"
    # Dense decode after reload == the reference decode of what was stored, bit for bit.
    assert torch.equal(back.dense(), _stored(q).dense())
    assert (back.codebook_rows, back.scale_group, back.n_outliers) == (
        q.codebook_rows,
        q.scale_group,
        q.n_outliers,
    )
    for attr in ("codes", "scales", "outlier_idx", "outlier_val"):
        mine, theirs = getattr(back, attr), getattr(q, attr)
        assert (mine is None) == (theirs is None), attr
        assert theirs is None or torch.equal(mine, theirs), attr  # exact: fp16-exact values
    # Bits per weight from the header alone == QuantizedWeight.bits_per_weight(), exactly.
    spec = layer_spec(meta)
    assert spec.bits_per_weight("float16") == q.bits_per_weight()
    # ... and they are the bytes on disk (up to the last partial byte of the packed codes).
    bits_on_disk = 8 * _payload_bytes(path)
    assert -1e-6 <= bits_on_disk - q.bits_per_weight() * 576 * 576 < 8


def test_float32_codebooks_round_trip_the_quantized_weight_itself(
    tmp_path: Path, q_proj: dict[str, QuantizedWeight]
) -> None:
    q = q_proj["all"]
    path = tmp_path / "shard.safetensors"
    write_shard(path, *encode_layer(Q_PROJ, q, "float32", k=K))
    _, back = decode_layer(*read_shard(path))
    assert torch.equal(back.dense(), q.dense())
    assert layer_spec(read_shard(path)[1]).bits_per_weight("float32") == q.bits_per_weight(32)


def test_a_format_1_shard_still_reads(tmp_path: Path) -> None:
    q = _quantize(smollm2_weight(f"{Q_PROJ}.weight", rows=128), LayerQuantOptions())
    path = tmp_path / "v1.safetensors"
    write_shard(path, *v1_encode(Q_PROJ, q))
    name, back = decode_layer(*read_shard(path))
    assert name == Q_PROJ
    assert torch.equal(back.dense(), _stored(q).dense())
    assert back.scales is None
    assert back.outlier_idx is None
    assert back.codebook_rows == 0
    assert layer_spec(read_shard(path)[1]).to_config("1") == {
        "kind": "linear",
        "shape": [128, 576],
        "block_size": BS,
        "k": K,
        "k_used": q.k_used,
        "bits": bits_for(q.k_used),
    }


def _edit_tensor(
    suffix: str, make: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors[f"{Q_PROJ}.{suffix}"] = make(tensors[f"{Q_PROJ}.{suffix}"])

    return edit


def _edit_meta(**changes: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        meta.update(changes)

    return edit


def _drop(suffix: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        del tensors[f"{Q_PROJ}.{suffix}"]

    return edit


def _v1_with_scales(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    meta["format_version"] = "1"
    for key in ("codebook_rows", "scale_group", "n_outliers", "metric"):
        del meta[key]


def _swap_two(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out[[3, 4]] = t[[4, 3]]
    return out


def _set_first(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.view(-1)[0] = value
        return out

    return make


SHARD_CORRUPTIONS = {
    "unsorted-outliers": (
        _edit_tensor("outlier_idx", _swap_two),
        "outlier indices are not strictly increasing",
    ),
    "repeated-outlier": (
        _edit_tensor("outlier_idx", lambda t: torch.cat([t[:1], t[:-1]])),
        "outlier indices are not strictly increasing",
    ),
    "outlier-out-of-range": (
        _edit_tensor("outlier_idx", lambda t: torch.cat([t[:-1], t.new_tensor([576 * 576])])),
        r"outlier indices range over \[\d+, 331776\], outside the weight's \[0, 331775\]",
    ),
    "outlier-index-dtype": (
        _edit_tensor("outlier_idx", lambda t: t.long()),
        r"outlier_idx dtype torch\.int64 != torch\.int32",
    ),
    "outlier-value-inf": (
        _edit_tensor("outlier_val", _set_first(float("inf"))),
        "outlier values hold NaN or infinity",
    ),
    "scales-nan": (_edit_tensor("scales", _set_first(float("nan"))), "scales hold NaN"),
    "scales-shape": (
        _edit_tensor("scales", lambda t: t[:, :-1].contiguous()),
        r"scales \(576, 8\) != \(576, 9\)",
    ),
    "missing-outlier-values": (
        _drop("outlier_val"),
        r"tensors \[.*outlier_val.*\] expected, found",
    ),
    "header-outliers": (_edit_meta(n_outliers="7"), r"outlier_idx \(\d+,\) != \(7,\)"),
    "header-books": (
        _edit_meta(codebook_rows="100"),
        "codebook_rows 100 does not divide the 576 rows",
    ),
    "header-scale-group": (
        _edit_meta(scale_group="100"),
        "scale_group 100 does not divide the width 576",
    ),
    "header-metric": (_edit_meta(metric=""), "metric must be a non-empty string"),
    "v1-with-extras": (_v1_with_scales, r"tensors .* expected, found .*scales"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CORRUPTIONS))
def test_corrupt_extras_in_a_shard_raise_checkpoint_error(
    tmp_path: Path, q_proj: dict[str, QuantizedWeight], case: str
) -> None:
    edit, message = SHARD_CORRUPTIONS[case]
    tensors, meta = encode_layer(Q_PROJ, q_proj["all"], k=K)
    edit(tensors, meta)
    path = tmp_path / "shard.safetensors"
    write_shard(path, tensors, meta)
    with pytest.raises(CheckpointError, match=message) as caught:
        decode_layer(*read_shard(path), where=str(path))
    assert "delete it and run again" in str(caught.value)  # the fix


# --------------------------------------------------------------------------------------------
# a merged checkpoint: real SmolLM2 layer 0 in a one-block Llama

# name -> options (None: written through the format-1 shard writer)
LAYERS: dict[str, LayerQuantOptions | None] = {
    "model.embed_tokens": LayerQuantOptions(scale="row", outliers=0.01),
    Q_PROJ: LayerQuantOptions(scale="group", scale_group=64, codebook_rows=64),
    "model.layers.0.mlp.down_proj": LayerQuantOptions(
        scale="group", scale_group=128, codebook_rows=96, outliers=0.002
    ),
    "model.layers.0.mlp.gate_proj": LayerQuantOptions(),
    "model.layers.0.self_attn.k_proj": None,
}


@dataclasses.dataclass
class Built:
    source: Path
    out: Path
    quantized: dict[str, QuantizedWeight]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("v2")
    source = root / "source"
    source.mkdir()
    config = json.loads((smollm2_dir() / "config.json").read_text())
    config.update(num_hidden_layers=1, vocab_size=512)
    (source / "config.json").write_text(json.dumps(config))
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(smollm2_dir() / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            if key.startswith("model.layers.0.") or key == "model.norm.weight":
                state[key] = f.get_tensor(key).float().contiguous()
        state["model.embed_tokens.weight"] = f.get_slice("model.embed_tokens.weight")[:512]
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})

    out = root / "ckpt"
    (out / "shards").mkdir(parents=True)
    quantized: dict[str, QuantizedWeight] = {}
    layers = []
    for name, options in LAYERS.items():
        weight = state[f"{name}.weight"]
        q = _quantize(weight, options or LayerQuantOptions())
        kind = "embedding" if "embed" in name else "linear"
        encoded = v1_encode(name, q) if options is None else encode_layer(name, q, k=K, kind=kind)
        shard = out / "shards" / f"{name}.safetensors"
        write_shard(shard, *encoded)
        tied = ("lm_head",) if kind == "embedding" else ()
        layers.append(QuantizedLayer(name, f"{name}.weight", shard, tied))
        quantized[name] = _stored(q)
    merge_checkpoint(
        out, open_source(source), layers, {"method": "pgkm", "centroid_dtype": "float16"}, 1 << 40
    )
    return Built(source, out, quantized)


@pytest.fixture(scope="module")
def reference_logits(built: Built) -> torch.Tensor:
    """The float model with every quantized weight replaced by its reference decode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built.source, dtype=torch.float32)
    with torch.no_grad():
        for name, q in built.quantized.items():
            model.get_submodule(name).weight.copy_(q.dense())
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model(IDS).logits  # type: ignore[no-any-return]


def test_merged_files_say_format_2_and_list_the_extras(built: Built) -> None:
    qconfig = json.loads((built.out / "config.json").read_text())["quantization_config"]
    assert qconfig["format_version"] == 2
    down = qconfig["layers"]["model.layers.0.mlp.down_proj"]
    assert {k: down[k] for k in ("codebook_rows", "scale_group", "metric")} == {
        "codebook_rows": 96,
        "scale_group": 128,
        "metric": "weight",
    }
    assert down["n_outliers"] == built.quantized["model.layers.0.mlp.down_proj"].n_outliers > 0
    assert qconfig["layers"]["model.layers.0.self_attn.k_proj"]["n_outliers"] == 0  # from v1
    with safe_open(str(built.out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dist_pgkm_format"] == "2"
        assert f.get_slice(f"{Q_PROJ}.centroids").get_shape() == [9, K, BS]
        assert f.get_slice("model.embed_tokens.scales").get_dtype() == "F16"
        assert f.get_slice("model.embed_tokens.outlier_idx").get_dtype() == "I32"
        assert not any(key.startswith("lm_head") for key in f.keys())  # noqa: SIM118


def test_bits_per_weight_from_headers_equal_the_quantized_weights(built: Built) -> None:
    info = describe(built.out)
    layers = {layer.name: layer for layer in info.layers}
    assert set(layers) == set(LAYERS)
    for name, q in built.quantized.items():
        assert layers[name].bits_per_weight == q.bits_per_weight(), name
        assert layers[name].n_outliers == q.n_outliers
    total = sum(q.bits_per_weight() * q.codes.numel() * BS for q in built.quantized.values())
    assert info.bits_per_weight == pytest.approx(total / info.quantized_params, rel=1e-12)
    assert layers[Q_PROJ].extras == "book per 64 rows, scale per 64"
    assert (
        layers["model.embed_tokens"].extras
        == f"row scales, {layers['model.embed_tokens'].n_outliers} outliers"
    )
    assert layers["model.layers.0.mlp.gate_proj"].extras == "-"
    # Every byte of the file is a quantized layer's, a float tensor's or the header's.
    header = int.from_bytes((built.out / "model.safetensors").read_bytes()[:8], "little")
    assert info.checkpoint_bytes == info.quantized_bytes + info.float_bytes + header + 8


def test_inspect_shows_the_extras(built: Built) -> None:
    result = run_cli("inspect", str(built.out))
    assert result.returncode == 0, result.stderr
    n = built.quantized[DOWN].n_outliers
    assert f"book per 96 rows, scale per 128, {n} outliers" in result.stdout
    assert "(codebooks, scales and outliers included)" in result.stdout


def _check_model(model: Any, built: Built, reference_logits: torch.Tensor) -> None:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, PQModule)}
    assert set(modules) == {*LAYERS, "lm_head"}
    assert isinstance(modules["model.embed_tokens"], PQEmbedding)
    assert isinstance(modules["lm_head"], PQLinear)
    for name, q in built.quantized.items():
        assert torch.equal(modules[name].weight, q.dense()), name
    head, embed = model.lm_head, model.model.embed_tokens
    for attr in ("centroids", "scales", "codes", "index", "outlier_idx", "outlier_val"):
        assert getattr(head, attr) is getattr(embed, attr), attr
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference_logits)


def test_dist_pgkm_load_is_the_reference_decode_bit_for_bit(
    built: Built, reference_logits: torch.Tensor
) -> None:
    # The decoding forward is the reference decode bit for bit (the code forward, the default,
    # is within float32 round-off of it: tests/checkpoint/test_infer_load.py).
    model = dist_pgkm.load(built.out, forward="decode")
    _check_model(model, built, reference_logits)
    # In half precision the codebooks, scales and outlier values take the model's dtype (the
    # fp16 ones exactly) and the layers compute in it.
    half = dist_pgkm.load(built.out, dtype=torch.float16)
    assert half.model.embed_tokens.scales.dtype == torch.float16
    assert half.model.embed_tokens.outlier_val.dtype == torch.float16
    with torch.no_grad():
        logits_half = half(IDS).logits.float()
    scale = float(reference_logits.abs().max())  # ~90: fp16 keeps ~3 significant digits
    torch.testing.assert_close(logits_half, reference_logits, atol=2e-3 * scale, rtol=0)
    dense = dist_pgkm.load(built.out, dense=True)
    assert not any(isinstance(m, PQModule) for m in dense.modules())
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, reference_logits)


def test_transformers_from_pretrained_and_save_pretrained(
    built: Built, reference_logits: torch.Tensor, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built.out)
    _check_model(model, built, reference_logits)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dist_pgkm_format"] == "2"
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    assert stored["model.embed_tokens.scales"] == "F16"
    assert stored["model.embed_tokens.outlier_val"] == "F16"
    assert stored["model.embed_tokens.outlier_idx"] == "I32"
    assert not any(key.startswith("lm_head") for key in stored)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((built.out / "config.json").read_text())["quantization_config"]
    _check_model(dist_pgkm.load(tmp_path, forward="decode"), built, reference_logits)


def _tensor_edit(
    key: str, make: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = make(state[key])

    return edit


CHECKPOINT_CORRUPTIONS = {
    "unsorted-outliers": (
        _tensor_edit(f"{DOWN}.outlier_idx", _swap_two),
        rf"layer {DOWN}: .*outlier indices are not strictly increasing",
    ),
    "scales-nan": (
        _tensor_edit("model.embed_tokens.scales", _set_first(float("nan"))),
        r"layer model\.embed_tokens: .*scales hold NaN or infinity",
    ),
    "scales-shape": (
        _tensor_edit(f"{Q_PROJ}.scales", lambda t: t[:, :-1].contiguous()),
        rf"{Q_PROJ}\.scales is F16 \[576, 8\], but layer {Q_PROJ} .* needs F16 \[576, 9\]",
    ),
    "books-shape": (
        _tensor_edit(f"{Q_PROJ}.centroids", lambda t: t[:-1].contiguous()),
        rf"{Q_PROJ}\.centroids is F16 \[8, {K}, 8\], .*codebook_rows=64.* needs F16 \[9, {K}, 8\]",
    ),
    "outlier-dtype": (
        _tensor_edit(f"{DOWN}.outlier_val", lambda t: t.float()),
        rf"{DOWN}\.outlier_val is F32 .* needs F16",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CORRUPTIONS))
def test_corrupt_extras_in_a_checkpoint_raise_checkpoint_error(
    built: Built, tmp_path: Path, case: str
) -> None:
    from transformers import AutoModelForCausalLM

    edit, message = CHECKPOINT_CORRUPTIONS[case]
    state = load_file(str(built.out / "model.safetensors"))
    edit(state)
    shutil.copy2(built.out / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"), metadata=_metadata(built.out))
    with pytest.raises(CheckpointError, match=message) as caught:
        dist_pgkm.load(tmp_path)
    assert "run the same `dist-pgkm quantize` command again" in str(caught.value)  # the fix
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return dict(f.metadata())


def _layer_entry(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(qconfig: dict[str, Any]) -> None:
        qconfig["layers"][DOWN].update(changes)

    return edit


def _drop_key(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(qconfig: dict[str, Any]) -> None:
        del qconfig["layers"][DOWN][key]

    return edit


def _as_format_1(qconfig: dict[str, Any]) -> None:
    qconfig["format_version"] = 1


CONFIG_CORRUPTIONS = {
    "missing-key": (_drop_key("metric"), r"expected the keys \[.*'metric'\] \(format 2\)"),
    "scale-group": (_layer_entry(scale_group=100), "scale_group 100 does not divide the width"),
    "books": (_layer_entry(codebook_rows=7), "codebook_rows 7 does not divide the 576 rows"),
    "negative-outliers": (_layer_entry(n_outliers=-1), "must be integers >= 0"),
    # The format-1 keys of a format-2 entry are refused before any header is compared.
    "format-1-config": (_as_format_1, r"expected the keys .* \(format 1\)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CORRUPTIONS))
def test_corrupt_format_2_config_raises_checkpoint_error(
    built: Built, tmp_path: Path, case: str
) -> None:
    edit, message = CONFIG_CORRUPTIONS[case]
    config = json.loads((built.out / "config.json").read_text())
    edit(config["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(built.out / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        dist_pgkm.load(tmp_path)


def test_files_of_another_format_than_the_config_are_refused(built: Built, tmp_path: Path) -> None:
    shutil.copy2(built.out / "config.json", tmp_path / "config.json")
    state = load_file(str(built.out / "model.safetensors"))
    metadata = {**_metadata(built.out), "dist_pgkm_format": "1"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"config\.json says format 2"):
        dist_pgkm.load(tmp_path)
