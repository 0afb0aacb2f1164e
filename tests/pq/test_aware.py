"""Activation-aware quantization of one weight: metric from H, scales, books, outliers.

The real-layer tests use SmolLM2-135M's weights and its real inputs on WordNet glosses: the
calibration inputs (``H``) come from the calibration windows and the output error is measured
on inputs from the evaluation windows, which the calibration never saw.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.models.offline import smollm2_dir
from dist_pgkm.pq.aware import fit_scales, hessian_metric, refit_scales, select_outliers
from dist_pgkm.pq.quantize import QuantizedWeight, bits_per_weight, quantize_weight

LAYER = "model.layers.3.self_attn.q_proj"  # (576, 576)


def block_diagonal(h: torch.Tensor, bs: int) -> torch.Tensor:
    """``(width / bs, bs, bs)`` diagonal blocks of a ``(width, width)`` matrix."""
    g = h.shape[0] // bs
    return torch.stack([h[i * bs : (i + 1) * bs, i * bs : (i + 1) * bs] for i in range(g)])


class _StopError(Exception):
    pass


@pytest.fixture(scope="module")
def real_layer() -> dict[str, Any]:
    """LAYER's weight, ``H`` from 2 calibration windows and ``X`` from 2 evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_pgkm.eval import load_text, token_windows

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = load_text()
    inputs: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).detach())
        raise _StopError  # nothing after this layer is needed

    layer = model.get_submodule(LAYER)
    handle = layer.register_forward_pre_hook(grab)
    xs = {}
    for split in ("calib", "eval"):
        windows = token_windows(tokenizer, text, window=256, n_tokens=512, split=split)
        inputs.clear()
        with torch.no_grad(), pytest.raises(_StopError):
            model(windows)
        xs[split] = inputs[0].double()  # (512 tokens, 576)
    handle.remove()
    return {
        "weight": layer.weight.detach().clone(),
        "H": xs["calib"].T @ xs["calib"],
        "X_eval": xs["eval"],
    }


def output_error(x: torch.Tensor, w: torch.Tensor, q: QuantizedWeight) -> float:
    """``|X (W - W_hat)^T|^2 / |X W^T|^2``."""
    diff = q.dense().double() - w.double()
    return float((x @ diff.T).square().sum() / (x @ w.double().T).square().sum())


def test_identity_hessian_gives_the_plain_bytes(real_layer: dict[str, Any]) -> None:
    w = real_layer["weight"]
    plain = quantize_weight(w, 4, 64, seed=5)
    for metric, scale in (("hessian", 1.0), ("hessian-diag", 250.0)):
        eye = scale * torch.eye(4).expand(576 // 4, 4, 4).contiguous()
        aware = quantize_weight(
            w, 4, 64, seed=5, options=LayerQuantOptions(metric=metric), hessian=eye
        )
        assert torch.equal(aware.centroids, plain.centroids)
        assert torch.equal(aware.codes, plain.codes)
        assert aware.metric == metric


def test_aware_lowers_the_output_error_on_held_out_inputs(real_layer: dict[str, Any]) -> None:
    """Measured on LAYER, bs 4, K 256, 512 calibration tokens, relative output errors on 512
    evaluation tokens: plain 0.0824, hessian 0.0254 (0.31x), hessian-diag 0.0273 (0.33x);
    asserted < 0.45x. The weight error goes the other way (1,834 -> 2,207: the metric spends
    the codebook where the inputs are large)."""
    w, x = real_layer["weight"], real_layer["X_eval"]
    hb = block_diagonal(real_layer["H"].float(), 4)
    plain = quantize_weight(w, 4, 256, seed=1)
    full = quantize_weight(
        w, 4, 256, seed=1, options=LayerQuantOptions(metric="hessian"), hessian=hb
    )
    diag = quantize_weight(
        w, 4, 256, seed=1, options=LayerQuantOptions(metric="hessian-diag"), hessian=hb
    )
    e_plain, e_full, e_diag = (output_error(x, w, q) for q in (plain, full, diag))
    assert e_full < 0.45 * e_plain
    assert e_diag < 0.45 * e_plain
    assert full.stats.sse > plain.stats.sse
    assert full.stats.metric_sse is not None
    assert full.stats.empty_final == 0


def test_levers_decode_and_count_their_bits(real_layer: dict[str, Any]) -> None:
    w = real_layer["weight"]
    hb = block_diagonal(real_layer["H"].float(), 4)
    opts = LayerQuantOptions(
        metric="hessian", scale="group", scale_group=64, codebook_rows=288, outliers=0.005
    )
    q = quantize_weight(w, 4, 64, seed=2, options=opts, hessian=hb)
    assert q.centroids.shape[:1] == (2,)
    assert q.centroids.shape[2] == 4
    assert q.scales is not None
    assert q.scales.shape == (576, 9)
    assert torch.equal(q.scales, q.scales.half().float())  # fp16-exact
    assert q.outlier_idx is not None
    assert q.outlier_val is not None
    assert q.n_outliers == round(0.005 * w.numel())
    dense = q.dense().reshape(-1)
    assert torch.equal(dense[q.outlier_idx], w.reshape(-1)[q.outlier_idx].half().float())
    k_store = q.centroids.shape[1]
    expected = (
        q.codes.numel() * 6  # ceil(log2 64)
        + 2 * k_store * 4 * 16
        + 576 * 9 * 16
        + q.n_outliers * 48
    ) / w.numel()
    assert q.bits_per_weight() == pytest.approx(expected, rel=1e-12)
    assert q.bits_per_weight() == bits_per_weight(
        q.codes.numel(), k_store, 4, n_books=2, n_scales=576 * 9, n_outliers=q.n_outliers
    )
    # The recomputed SSE is the decode's.
    assert q.stats.sse == pytest.approx(float((q.dense() - w).double().square().sum()), rel=1e-6)


def test_each_lever_helps_on_its_own(real_layer: dict[str, Any]) -> None:
    """Weight SSE at bs 4, K 64 on LAYER, relative to plain: row scales 0.878, group scales
    (64) 0.854, one book per 144 rows 0.948, 1% outliers 0.801 (measured); each asserted below
    0.97."""
    w = real_layer["weight"]
    base = quantize_weight(w, 4, 64, seed=3).stats.sse
    for opts in (
        LayerQuantOptions(scale="row"),
        LayerQuantOptions(scale="group", scale_group=64),
        LayerQuantOptions(codebook_rows=144),
        LayerQuantOptions(outliers=0.01),
    ):
        assert quantize_weight(w, 4, 64, seed=3, options=opts).stats.sse < 0.97 * base


def test_refit_never_loses() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    decoded = w + 0.3 * torch.randn(64, 128, generator=g)
    scales = torch.ones(64, 4)
    m = torch.randn(32, 4, 4, generator=g)
    metric = m @ m.transpose(1, 2) + torch.eye(4)
    new = refit_scales(w, decoded, scales, metric, 4)
    assert torch.equal(new, new.half().float())

    def err(s: torch.Tensor) -> float:
        e = (decoded * s.repeat_interleave(32, dim=1) - w).reshape(64, 32, 4).double()
        return float(torch.einsum("ogi,gij,ogj->", e, metric.double(), e))

    assert err(new) < err(scales)


def test_outliers_follow_the_input_weight() -> None:
    w = torch.ones(4, 8)
    w[2, 5] = 3.0  # largest weight
    input_weight = torch.ones(8)
    input_weight[1] = 100.0  # but column 1's inputs are 100x larger
    idx, val = select_outliers(w, 4 / 32, input_weight)
    assert torch.equal(idx, torch.tensor([1, 9, 17, 25]))  # column 1 of every row
    idx, _ = select_outliers(w, 1 / 32, None)
    assert torch.equal(idx, torch.tensor([2 * 8 + 5]))
    assert torch.equal(val, torch.ones(4))


def test_fit_scales_guards_zero_groups() -> None:
    w = torch.zeros(3, 8)
    w[1] = 2.0
    s = fit_scales(w, 4)
    assert torch.equal(s, torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]))


def test_hessian_metric_bad_and_degenerate_inputs() -> None:
    h = torch.eye(4).expand(3, 4, 4).clone()
    bad = h.clone()
    bad[1, 2, 2] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or infinity"):
        hessian_metric(bad, 4, 0.01, False, "layer.x")
    bad = h.clone()
    bad[0, 0, 0] = -1.0
    with pytest.raises(InvalidInputError, match="negative diagonal"):
        hessian_metric(bad, 4, 0.01, False, "layer.x")
    with pytest.raises(InvalidInputError, match=r"expected \(width / 2"):
        hessian_metric(h, 2, 0.01, False, "layer.x")
    assert hessian_metric(torch.zeros(3, 4, 4), 4, 0.01, False, "layer.x") is None
    # An input channel that is always zero: singular H, still a valid metric after damping.
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(1))
    x[:, 5] = 0.0
    singular = block_diagonal(x.T @ x, 4)
    m = hessian_metric(singular, 4, 0.0, False, "layer.x")
    assert m is not None
    assert bool(torch.isfinite(torch.linalg.cholesky(m.double())).all())
    w = torch.randn(256, 12, generator=torch.Generator().manual_seed(2))
    q = quantize_weight(
        w, 4, 32, options=LayerQuantOptions(metric="hessian"), hessian=singular, damp=0.0
    )
    assert bool(torch.isfinite(q.centroids).all())
    zero = quantize_weight(
        w, 4, 32, options=LayerQuantOptions(metric="hessian"), hessian=torch.zeros(3, 4, 4)
    )
    assert zero.metric == "weight"  # documented fallback: inputs never seen
