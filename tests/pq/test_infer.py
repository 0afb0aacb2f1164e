"""The code forward (dist_pgkm/pq/infer.py) against the decoding forward, on real SmolLM2 weights.

Every layer type and every extra of format 2 (row and group scales, one codebook per row group,
outliers) and of format 1 (none), at 8-bit and non-byte code widths. Tolerances: Linear and
Conv2d outputs within float32 round-off of a sum of ~600 products, ``atol = 1e-5 * max|y|``
(the sums run in another order); an Embedding's rows are bit for bit (the same gather, the
same multiplications). Both table-sum backends (numba when installed, torch) are checked.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq import PQConv2d, PQEmbedding, PQLinear, infer, pack_codes, unpack_codes
from dist_pgkm.pq.modules import PQModule
from dist_pgkm.pq.pack import codes_at
from dist_pgkm.pq.quantize import QuantizedWeight, quantize_weight

from ..conftest import smollm2_weight

OPTIONS = {
    "plain": LayerQuantOptions(),
    "row-scales": LayerQuantOptions(scale="row"),
    "group-scales": LayerQuantOptions(scale="group", scale_group=64),
    "books": LayerQuantOptions(codebook_rows=32),
    "outliers": LayerQuantOptions(outliers=0.01),
    "all": LayerQuantOptions(scale="group", scale_group=64, codebook_rows=32, outliers=0.005),
}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # (576, 576)
BACKENDS = ("torch", "numba")

pytestmark = pytest.mark.usefixtures("one_thread_module")

_CACHE: dict[tuple[str, int, int], QuantizedWeight] = {}


def _quantized(case: str, bs: int = 4, k: int = 200) -> QuantizedWeight:
    """The first 96 rows of SmolLM2's q_proj, quantized (k 200: 8-bit codes; 300: 9-bit)."""
    key = (case, bs, k)
    if key not in _CACHE:
        weight = smollm2_weight(Q_PROJ, rows=96)
        _CACHE[key] = quantize_weight(
            weight, bs, k, options=OPTIONS[case], backend="torch", n_iter=3
        )
    return _CACHE[key]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name = str(request.param)
    if name == "numba" and infer.lut_backend("cpu") != "numba":
        pytest.skip("numba is not installed (pip install 'dist-pgkm[infer]')")
    if name == "torch":
        monkeypatch.setattr(infer, "lut_backend", lambda device="cpu": "torch")
    return name


def _pair(module: PQModule) -> tuple[PQModule, PQModule]:
    """``module`` in code mode and a copy in decode mode."""
    other = type(module).__new__(type(module))
    other.__dict__ = dict(module.__dict__)
    other._buffers = dict(module._buffers)
    other._parameters = dict(module._parameters)
    other.set_forward("decode")
    module.set_forward("codes")
    return module, other


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 12, 16])
def test_codes_at_reads_the_packed_stream_like_unpack(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    n = 1001  # odd: the last code ends inside a zero-padded byte
    codes = torch.randint(0, 1 << bits, (n,), generator=gen)
    packed = pack_codes(codes, bits)
    positions = torch.cat([torch.randint(0, n, (300,), generator=gen), torch.tensor([n - 1, 0])])
    assert torch.equal(codes_at(packed, positions, bits), codes[positions])
    assert torch.equal(codes_at(packed, torch.arange(n), bits), unpack_codes(packed, n, bits))


@pytest.mark.parametrize("case", sorted(OPTIONS))
@pytest.mark.parametrize("k", [200, 300])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_linear_from_codes_equals_the_decoding_forward(
    case: str, k: int, tokens: int, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = _quantized(case, k=k)
    bias = torch.linspace(-1, 1, q.shape[0])
    codes, decoding = _pair(PQLinear.from_quantized(nn.Linear(576, 96), q))
    assert codes.bias is not None
    codes.bias.data = bias
    x = torch.randn(2, tokens, 576, generator=torch.Generator().manual_seed(tokens))
    monkeypatch.setattr(infer, "TILE_WEIGHTS", 576 * 7)  # 14 tiles, one of 5 rows
    with torch.no_grad():
        got = codes(x)
        want = decoding(x)
    assert codes.index.numel() == 0  # no unpacked index in code mode
    assert got.shape == want.shape == (2, tokens, 96)
    _close(got, want)


def test_code_forward_with_a_gradient_is_the_decoding_forward() -> None:
    q = _quantized("all")
    module, decoding = _pair(PQLinear.from_quantized(nn.Linear(576, 96), q))
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    got = module(x)  # grad enabled, trainable codebook: the decode, exactly
    assert torch.equal(got, decoding(x))
    got.sum().backward()
    assert module.centroids.grad is not None


def test_switching_back_to_decode_restores_the_index() -> None:
    q = _quantized("books")
    module = PQLinear.from_quantized(nn.Linear(576, 96), q)
    index = module.index.clone()
    module.set_forward("codes")
    assert module.index.numel() == 0
    assert torch.equal(module.weight, q.dense())  # still decodes, from the codes
    module.set_forward("decode")
    assert torch.equal(module.index, index)
    with pytest.raises(InvalidInputError, match="forward must be one of"):
        module.set_forward("lut")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["plain", "row-scales", "outliers", "all"])
def test_embedding_from_codes_is_bit_for_bit(case: str) -> None:
    q = _quantized(case)
    module, decoding = _pair(PQEmbedding.from_quantized(nn.Embedding(96, 576), q))
    ids = torch.tensor([[3, 95, 3, 0], [17, 17, 40, 95]])  # repeated ids, first and last rows
    with torch.no_grad():
        got = module(ids)
    assert torch.equal(got, decoding(ids))
    assert torch.equal(got, nn.functional.embedding(ids, q.dense()))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_conv2d_from_codes_equals_the_decoding_forward(
    groups: int, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = dataclasses.replace(_quantized(case), shape=(96, 64, 3, 3))  # rows of 64 x 3 x 3
    conv = nn.Conv2d(64 * groups, 96, 3, padding=1, groups=groups)
    module, decoding = _pair(PQConv2d.from_quantized(conv, q))
    monkeypatch.setattr(infer, "TILE_WEIGHTS", 576 * 10)
    x = torch.randn(2, 64 * groups, 7, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(module(x), decoding(x))


def test_use_forward_switches_every_pq_module() -> None:
    q = _quantized("plain")
    model = nn.Sequential(
        PQEmbedding.from_quantized(nn.Embedding(96, 576), q),
        PQLinear.from_quantized(nn.Linear(576, 96), q),
    )
    assert infer.use_forward(model, "codes") == 2
    assert all(m.forward_mode == "codes" for m in model if isinstance(m, PQModule))
    with infer.forward_default("codes"):
        built = PQLinear.from_quantized(nn.Linear(576, 96), q)
    assert built.forward_mode == "codes"
    assert built.index.numel() == 0
    assert PQLinear.from_quantized(nn.Linear(576, 96), q).forward_mode == "decode"


@pytest.mark.parametrize("k", [200, 300])
@pytest.mark.parametrize("tokens", [1, 3])
def test_parallel_table_sums_equal_the_serial_ones(
    k: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads split the rows in tasks (two here: 96 rows, 64 per task); each row's sum is
    the same arithmetic, so the outputs are bit for bit the serial ones."""
    kernels = infer._numba_module()
    if kernels is None:
        pytest.skip("numba is not installed (pip install 'dist-pgkm[infer]')")
    module = PQLinear.from_quantized(nn.Linear(576, 96), _quantized("all", k=k))
    module.set_forward("codes")
    x = torch.randn(tokens, 576, generator=torch.Generator().manual_seed(k + tokens))
    with torch.no_grad():
        serial = module(x)
        monkeypatch.setattr(infer, "_numba_kernel", lambda: kernels.lut_sums_parallel)
        parallel = module(x)
    assert torch.equal(parallel, serial)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.gpu
def test_code_forward_on_cuda_equals_the_decoding_forward() -> None:
    q = _quantized("all")
    module, decoding = _pair(PQLinear.from_quantized(nn.Linear(576, 96), q))
    module.cuda()
    decoding.cuda()
    x = torch.randn(4, 576, device="cuda")
    with torch.no_grad():
        _close(module(x), decoding(x))
