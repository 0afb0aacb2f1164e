"""Quantize-mode Quant-Noise with per-row-group codebooks, scales and outliers (real weights).

With fixed codes a replaced block is exactly the layer's decode (``QuantizedWeight.dense()``);
with nearest codewords it is the best codeword of the block's own book for its scale, and the
weights kept as outliers are never replaced.
"""

from __future__ import annotations

import pytest
import torch

from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise import Codebook, apply_noise_mask, noise_mask, quant_noise
from dist_pgkm.pq import quantize_weight, to_subvectors
from dist_pgkm.pq.quantize import QuantizedWeight
from tests.conftest import smollm2_weight

BS = 8
OPTIONS = LayerQuantOptions(scale="group", scale_group=64, codebook_rows=32, outliers=0.005)

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, QuantizedWeight]:
    """SmolLM2's layer-0 k_proj (192, 576), quantized with books, group scales and outliers."""
    w = smollm2_weight("model.layers.0.self_attn.k_proj.weight")
    return w, quantize_weight(w, BS, 32, options=OPTIONS, backend="torch", n_iter=4)


def _book(q: QuantizedWeight, codes: bool) -> Codebook:
    return Codebook(
        q.centroids,
        q.codes if codes else None,
        scales=q.scales,
        outlier_idx=q.outlier_idx,
        shape=q.shape,
    )


def test_fixed_codes_replace_blocks_by_the_decoded_weight(
    layer: tuple[torch.Tensor, QuantizedWeight],
) -> None:
    w, q = layer
    full = quant_noise(w, 1.0, BS, "quantize", codebook=_book(q, codes=True))
    # Outliers keep the weight's own value, which the decode stores in fp16: equal up to that.
    decoded = q.dense()
    assert q.outlier_idx is not None
    kept = torch.zeros(w.numel(), dtype=torch.bool)
    kept[q.outlier_idx] = True
    assert torch.equal(full.reshape(-1)[~kept], decoded.reshape(-1)[~kept])
    assert torch.equal(full.reshape(-1)[kept], w.reshape(-1)[kept])


def test_nearest_codewords_use_the_blocks_book_and_scale(
    layer: tuple[torch.Tensor, QuantizedWeight],
) -> None:
    w, q = layer
    n_blocks = w.numel() // BS
    mask = noise_mask(n_blocks, 0.5, torch.Generator().manual_seed(0))
    noised = to_subvectors(
        apply_noise_mask(w, mask, 0.5, BS, "quantize", _book(q, codes=False)), BS
    )
    blocks = to_subvectors(w, BS)
    assert torch.equal(noised[~mask], blocks[~mask])
    # Reference: for every masked block, its scale s and book b, the codeword minimising
    # |w - s c|^2 over book b (float64), outliers left as they are.
    assert q.scales is not None
    assert q.outlier_idx is not None
    index = mask.nonzero().squeeze(1)
    per_row, group = 576 // BS, 64
    s = q.scales[index // per_row, (index % per_row) * BS // group].double()[:, None]
    book = index // (n_blocks // q.n_books)
    c = q.centroids.double()[book]  # (m, k, bs)
    d = ((blocks[index].double()[:, None, :] / s[:, :, None] - c) ** 2).sum(-1)  # (m, k)
    chosen = c[torch.arange(index.numel()), d.argmin(1)] * s  # (m, bs)
    positions = index[:, None] * BS + torch.arange(BS)
    kept = torch.isin(positions, q.outlier_idx)
    expected = torch.where(kept, blocks[index].double(), chosen)
    torch.testing.assert_close(noised[index].double(), expected, atol=1e-6, rtol=0)
    assert 0 < int(kept.sum()) < kept.numel()


def test_a_codebook_with_extras_needs_the_weight_shape(
    layer: tuple[torch.Tensor, QuantizedWeight],
) -> None:
    _, q = layer
    with pytest.raises(InvalidInputError, match="needs the weight's shape"):
        Codebook(q.centroids, scales=q.scales)
    with pytest.raises(InvalidInputError, match=r"scales \(192, 9\) do not hold whole blocks"):
        Codebook(q.centroids, scales=q.scales, shape=(96, 1152))
    book = _book(q, codes=False)
    with pytest.raises(InvalidInputError, match="made for a weight of shape"):
        book.check(1000, BS)
