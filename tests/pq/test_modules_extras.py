"""PQ modules with scales, per-row-group codebooks and outliers, on real SmolLM2-135M weights.

Every forward is compared bit for bit with the reference decode (``QuantizedWeight.dense()``);
gradients with an autograd reference through ``decode_weight`` (float32, atol 1e-6 relative to
their scale) and, for the scales, with central finite differences in float64 (rtol 1e-6).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq import PQConv2d, PQEmbedding, PQLinear, quantize_weight, to_subvectors
from dist_pgkm.pq.modules import PQModule, SideTensors, pq_module_for
from dist_pgkm.pq.quantize import QuantizedWeight, decode_weight

from ..conftest import smollm2_weight

OPTIONS = {
    "row-scales": LayerQuantOptions(scale="row"),
    "group-scales": LayerQuantOptions(scale="group", scale_group=64),
    "books": LayerQuantOptions(codebook_rows=32),
    "outliers": LayerQuantOptions(outliers=0.01),
    "all": LayerQuantOptions(scale="group", scale_group=64, codebook_rows=32, outliers=0.005),
}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # (576, 576)

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def real_rows() -> torch.Tensor:
    """The first 128 output rows of SmolLM2's layer-0 q_proj: (128, 576)."""
    return smollm2_weight(Q_PROJ, rows=128)


_CACHE: dict[tuple[int, str, int], QuantizedWeight] = {}


def _quantize(weight: torch.Tensor, options: LayerQuantOptions, k: int = 32) -> QuantizedWeight:
    """``weight`` quantized in blocks of 8 (cached: every layer kind shares the real weight)."""
    flat = weight.reshape(weight.shape[0], -1)
    key = (hash(flat.numpy().tobytes()), options.model_dump_json(), k)
    if key not in _CACHE:
        _CACHE[key] = quantize_weight(flat, 8, k, options=options, backend="torch", n_iter=4)
    return dataclasses.replace(_CACHE[key], shape=tuple(weight.shape))


def _float_copy(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """``module`` with ``weight`` as its weight (same bias and attributes)."""
    dense = type(module).__new__(type(module))
    dense.__dict__ = dict(module.__dict__)
    dense._parameters = dict(module._parameters)
    dense.weight = nn.Parameter(weight)
    return dense


def _layers(weight: torch.Tensor) -> dict[str, nn.Module]:
    """A Linear, an Embedding and a Conv2d holding the real weight (out, 576)."""
    out, width = weight.shape
    linear = nn.Linear(width, out)
    embedding = nn.Embedding(out, width, padding_idx=5)
    conv = nn.Conv2d(64, out, 3)  # 64 * 3 * 3 = 576 inputs per channel
    with torch.no_grad():
        linear.weight.copy_(weight)
        embedding.weight.copy_(weight)
        conv.weight.copy_(weight.reshape(out, 64, 3, 3))
    return {"linear": linear, "embedding": embedding, "conv2d": conv}


def _input(kind: str, module: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "embedding":
        return torch.tensor([[5, 7, 7, 127], [0, 5, 64, 1]])
    if kind == "conv2d":
        return torch.randn(2, 64, 6, 6, generator=g)
    return torch.randn(4, 576, generator=g)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_forward_is_the_reference_decode_bit_for_bit(
    real_rows: torch.Tensor, kind: str, case: str
) -> None:
    module = _layers(real_rows)[kind]
    q = _quantize(module.weight.detach(), OPTIONS[case])
    assert (q.scales is not None) == ("scales" in case or case == "all")
    assert (q.n_outliers > 0) == (case in ("outliers", "all"))
    assert (q.n_books > 1) == (case in ("books", "all"))
    pq = pq_module_for(module).from_quantized(module, q)
    assert torch.equal(pq.weight, q.dense())
    x = _input(kind, module)
    with torch.no_grad():
        assert torch.equal(pq(x), _float_copy(module, q.dense())(x))
    dense = pq.to_float()
    assert type(dense) is type(module)
    assert torch.equal(dense.weight, q.dense())
    # The module gives back what it holds, exactly.
    back = pq.quantized(q.stats)
    assert torch.equal(back.dense(), q.dense())
    assert back.codebook_rows == q.codebook_rows
    assert back.scale_group == q.scale_group


def _reference_grads(
    q: QuantizedWeight, loss_of_weight: object
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of a loss of the dense weight w.r.t. centroids and scales, via decode_weight."""
    c = q.centroids.clone().requires_grad_(True)
    s = None if q.scales is None else q.scales.clone().requires_grad_(True)
    w = decode_weight(
        c, q.codes, q.shape, scales=s, outlier_idx=q.outlier_idx, outlier_val=q.outlier_val
    )
    loss_of_weight(w).backward()  # type: ignore[operator]
    assert c.grad is not None
    return c.grad, None if s is None else s.grad


@pytest.mark.parametrize("case", ["all", "group-scales"])
def test_linear_gradients_match_the_reference_decode(real_rows: torch.Tensor, case: str) -> None:
    linear = _layers(real_rows)["linear"]
    q = _quantize(real_rows, OPTIONS[case])
    pq = PQLinear.from_quantized(linear, q)
    x = _input("linear", linear)
    upstream = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    (pq(x) * upstream).sum().backward()
    ref_c, ref_s = _reference_grads(q, lambda w: (F.linear(x, w, linear.bias) * upstream).sum())
    assert pq.centroids.grad is not None
    assert pq.scales is not None
    assert pq.scales.grad is not None
    assert ref_s is not None
    torch.testing.assert_close(
        pq.centroids.grad, ref_c, atol=1e-6 * float(ref_c.abs().max()), rtol=0
    )
    torch.testing.assert_close(pq.scales.grad, ref_s, atol=1e-6 * float(ref_s.abs().max()), rtol=0)
    assert pq.outlier_val is not None or case != "all"
    assert pq.outlier_val is None or not pq.outlier_val.requires_grad  # kept exact, not trained
    # Deterministic: a second backward gives the same bits.
    first = (pq.centroids.grad.clone(), pq.scales.grad.clone())
    pq.zero_grad()
    (pq(x) * upstream).sum().backward()
    assert torch.equal(pq.centroids.grad, first[0])
    assert torch.equal(pq.scales.grad, first[1])


def test_scale_gradient_matches_finite_differences(real_rows: torch.Tensor) -> None:
    linear = _layers(real_rows[:32])["linear"]
    q = _quantize(real_rows[:32], OPTIONS["all"].model_copy(update={"codebook_rows": 16}), k=16)
    pq = PQLinear.from_quantized(linear, q).double()
    x = _input("linear", linear).double()

    def loss() -> torch.Tensor:
        return pq(x).pow(2).sum() / 2

    loss().backward()
    assert pq.scales is not None
    assert pq.scales.grad is not None
    grad = pq.scales.grad.clone()
    eps = 1e-6
    for row, group in [(0, 0), (3, 4), (17, 8), (31, 2)]:
        with torch.no_grad():
            pq.scales[row, group] += eps
            up = float(loss())
            pq.scales[row, group] -= 2 * eps
            down = float(loss())
            pq.scales[row, group] += eps
        fd = (up - down) / (2 * eps)
        assert fd == pytest.approx(float(grad[row, group]), rel=1e-6, abs=1e-9)


def test_embedding_decodes_only_its_rows_with_scales_and_books(real_rows: torch.Tensor) -> None:
    table = _layers(real_rows)["embedding"]
    q = _quantize(real_rows, OPTIONS["group-scales"].model_copy(update={"codebook_rows": 32}))
    pq = PQEmbedding.from_quantized(table, q)
    ids = _input("embedding", table)
    out = pq(ids)
    assert torch.equal(out, F.embedding(ids, q.dense()))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    ref_c, ref_s = _reference_grads(
        q, lambda w: (F.embedding(ids, w, padding_idx=5) * upstream).sum()
    )
    assert pq.centroids.grad is not None
    assert pq.scales is not None
    assert pq.scales.grad is not None
    assert ref_s is not None
    torch.testing.assert_close(
        pq.centroids.grad, ref_c, atol=1e-6 * float(ref_c.abs().max()), rtol=0
    )
    torch.testing.assert_close(pq.scales.grad, ref_s, atol=1e-6 * float(ref_s.abs().max()), rtol=0)
    assert torch.count_nonzero(pq.scales.grad[5]) == 0  # the padding row learns nothing


def test_conv_codeword_gradient_is_the_mean_of_its_members_per_book(
    real_rows: torch.Tensor,
) -> None:
    conv = _layers(real_rows)["conv2d"]
    q = _quantize(conv.weight.detach(), OPTIONS["books"])
    pq = PQConv2d.from_quantized(conv, q)
    x = _input("conv2d", conv)
    pq(x).sum().backward()
    w = q.dense().reshape(conv.weight.shape).requires_grad_(True)
    F.conv2d(x, w, conv.bias).sum().backward()
    assert w.grad is not None
    assert pq.centroids.grad is not None
    flat = q.codes + torch.arange(q.codes.numel()) // (q.codes.numel() // q.n_books) * q.k_used
    sums = torch.zeros(q.n_books * q.k_used, 8).index_add_(0, flat, to_subvectors(w.grad, 8))
    counts = torch.bincount(flat, minlength=q.n_books * q.k_used).clamp(min=1)
    expected = (sums / counts[:, None]).reshape(q.centroids.shape)
    torch.testing.assert_close(pq.centroids.grad, expected, atol=1e-5, rtol=1e-5)


def test_tied_modules_share_codebooks_scales_and_outliers(real_rows: torch.Tensor) -> None:
    layers = _layers(real_rows)
    q = _quantize(real_rows, OPTIONS["all"])
    embed = PQEmbedding.from_quantized(layers["embedding"], q)
    head = PQLinear.from_quantized(layers["linear"], q)
    head.tie_to(embed)
    for attr in ("centroids", "scales", "codes", "index", "outlier_idx", "outlier_val"):
        assert getattr(head, attr) is getattr(embed, attr), attr
    assert torch.equal(head.weight, embed.weight)
    plain = PQLinear.from_quantized(layers["linear"], _quantize(real_rows, OPTIONS["books"]))
    with pytest.raises(InvalidInputError, match="tied layers must have the same shape and layout"):
        plain.tie_to(embed)


def test_state_dict_is_the_checkpoint_form_and_loads_into_an_empty_module(
    real_rows: torch.Tensor,
) -> None:
    linear = _layers(real_rows)["linear"]
    q = _quantize(real_rows, OPTIONS["all"])
    pq = PQLinear.from_quantized(linear, q)
    state = pq.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "centroids": torch.float32,
        "scales": torch.float32,
        "codes": torch.uint8,
        "outlier_idx": torch.int32,
        "outlier_val": torch.float32,
        "bias": torch.float32,
    }
    empty = PQLinear.for_loading(
        _layers(real_rows)["linear"],
        q.k_used,
        8,
        codebook_rows=32,
        scale_group=64,
        n_outliers=q.n_outliers,
    )
    assert all(t.is_meta for t in empty.state_dict().values())
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    empty.load_state_dict(state, assign=True)
    assert torch.equal(empty.weight, q.dense())

    bad = dict(state)
    bad["outlier_idx"] = state["outlier_idx"].flip(0)
    with pytest.raises(InvalidInputError, match="outlier indices are not strictly increasing"):
        PQLinear.from_quantized(_layers(real_rows)["linear"], q).load_state_dict(bad)
    bad = dict(state)
    bad["scales"] = torch.full_like(state["scales"], float("nan"))
    with pytest.raises(InvalidInputError, match="scales hold NaN or infinity"):
        PQLinear.from_quantized(_layers(real_rows)["linear"], q).load_state_dict(bad)


def test_malformed_side_tensors_are_refused() -> None:
    centroids, codes = torch.zeros(4, 2), torch.zeros(8, dtype=torch.int64)
    side = SideTensors(outlier_idx=torch.tensor([3, 16]), outlier_val=torch.zeros(2))
    with pytest.raises(InvalidInputError, match=r"outlier indices range over \[3, 16\]"):
        PQModule(centroids, codes, (2, 8), side=side)
    with pytest.raises(
        InvalidInputError, match=r"scales .* are not \(out=2, width / scale_group\)"
    ):
        PQModule(centroids, codes, (2, 8), side=SideTensors(scales=torch.ones(2, 3)))
    with pytest.raises(InvalidInputError, match="3 codebooks cannot share the 2 output rows"):
        PQModule(torch.zeros(3, 4, 2), codes, (2, 8))
