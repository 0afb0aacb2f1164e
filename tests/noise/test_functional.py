"""Quant-Noise as a pure function: the iPQ block layout, its statistics, both modes."""

from __future__ import annotations

import math

import pytest
import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise import Codebook, apply_noise_mask, noise_mask, quant_noise
from dist_pgkm.pq import from_subvectors, quantize_weight, to_subvectors
from tests.conftest import with_duplicates, with_zero_blocks

QUERY = "encoder.layer.0.attention.self.query.weight"  # (384, 384)
DENSE = "encoder.layer.0.intermediate.dense.weight"  # (1536, 384)

# (shape, block size): Linear, Embedding, and a Conv2d whose blocks of 6 straddle the boundary
# between two input channels' 3x3 kernels (the layout flattens in * kh * kw per output channel).
LAYOUTS = {
    "linear": ((6, 24), 4),
    "embedding": ((10, 16), 8),
    "conv2d": ((4, 2, 3, 3), 6),
}


def block_of_each_weight(shape: tuple[int, ...], bs: int) -> torch.Tensor:
    """The block index of every weight, from the definition in DESIGN.md §2 (not the codec)."""
    out, width = shape[0], math.prod(shape[1:])
    row = torch.arange(out).view(-1, 1)  # (out, 1)
    col = torch.arange(width).view(1, -1)  # (1, width); conv: i*kh*kw + y*kw + x
    return (row * (width // bs) + col // bs).reshape(shape)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_drop_mask_follows_the_pq_block_layout(kind: str) -> None:
    shape, bs = LAYOUTS[kind]
    # Distinct non-zero weights: an output zero can only come from a dropped block.
    w = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
    n_blocks = w.numel() // bs
    p = 0.4
    mask = noise_mask(n_blocks, p, torch.Generator().manual_seed(3))
    noised = apply_noise_mask(w, mask, p, bs)

    # The codec's layout is the documented one.
    block_id = block_of_each_weight(shape, bs)
    assert torch.equal(to_subvectors(block_id, bs), torch.arange(n_blocks)[:, None].expand(-1, bs))
    # Every weight is dropped exactly when its block is.
    assert torch.equal(noised == 0, mask[block_id])
    dropped = to_subvectors(noised == 0, bs)  # (n_blocks, bs)
    assert bool((dropped.all(1) | ~dropped.any(1)).all())  # all-kept or all-dropped blocks
    assert 0 < int(mask.sum()) < n_blocks
    # Kept weights are rescaled by 1/(1-p), with the rounding of that very division.
    keep = ~mask[block_id]
    assert torch.equal(noised[keep], w[keep] / (1 - p))
    # quant_noise draws the same mask from the same generator state.
    assert torch.equal(quant_noise(w, p, bs, generator=torch.Generator().manual_seed(3)), noised)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_kept_fraction_is_binomial(minilm: dict[str, torch.Tensor], p: float) -> None:
    w = minilm[DENSE]  # 73,728 blocks of 8
    g = torch.Generator().manual_seed(0)
    draws = 20
    kept = 0
    for _ in range(draws):
        noised = quant_noise(w, p, 8, generator=g)
        kept += int(to_subvectors(noised, 8).ne(0).any(1).sum())
    n = draws * w.numel() // 8
    sigma = math.sqrt(p * (1 - p) / n)  # p = 0.05: 1.8e-4, p = 0.5: 4.1e-4
    assert abs(kept / n - (1 - p)) <= 5 * sigma


def test_drop_mode_is_unbiased(minilm: dict[str, torch.Tensor]) -> None:
    """E[noised] = w: the mean of N noised copies deviates from w only by binomial noise."""
    w = minilm[QUERY].double()
    bs, p, draws = 4, 0.2, 100
    g = torch.Generator().manual_seed(1)
    total = torch.zeros_like(w)
    for _ in range(draws):
        total += quant_noise(w, p, bs, generator=g)
    mean = total / draws
    # Per block, mean = w * K_b / (N (1 - p)) with K_b ~ Binomial(N, 1 - p): a block ratio R_b.
    blocks_w, blocks_m = to_subvectors(w, bs), to_subvectors(mean, bs)
    ratio = (blocks_m * blocks_w).sum(1) / (blocks_w * blocks_w).sum(1)  # R_b per block
    var_r = p / ((1 - p) * draws)  # Var(R_b) = 0.0025
    # Pooled over the layer, weighted by block energy S_b = |w_b|^2.
    s = (blocks_w * blocks_w).sum(1)
    r = float((ratio * s).sum() / s.sum())
    sd_r = math.sqrt(var_r * float((s * s).sum()) / float(s.sum()) ** 2)  # ~3e-4
    assert abs(r - 1) <= 5 * sd_r
    # The spread of R_b is the binomial one (a wrong rescale or correlated masks would not be).
    assert abs(float(ratio.var()) / var_r - 1) <= 0.05
    # Each block's mean is exactly its weight times one ratio (blocks are dropped as a whole).
    assert torch.allclose(blocks_m, blocks_w * ratio[:, None], rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def hard_query(minilm: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Codebook]:
    """The real query weight with 20% zero blocks and 20% duplicated blocks, and its codebook."""
    bs = 4
    blocks = to_subvectors(minilm[QUERY], bs)
    blocks = with_duplicates(with_zero_blocks(blocks, 0.2, seed=0), 0.2, seed=1)
    w = from_subvectors(blocks, (384, 384))
    q = quantize_weight(w, bs, k=256, backend="torch", n_iter=8)
    return w, Codebook(q.centroids, q.codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_mode_replaces_exactly_the_masked_blocks_by_their_nearest_codeword(
    hard_query: tuple[torch.Tensor, Codebook], dtype: torch.dtype
) -> None:
    w32, book = hard_query
    w, bs, p = w32.to(dtype), 4, 0.3
    n_blocks = w.numel() // bs
    mask = noise_mask(n_blocks, p, torch.Generator().manual_seed(5))
    noised = to_subvectors(
        apply_noise_mask(w, mask, p, bs, "quantize", Codebook(book.centroids)), bs
    )
    blocks = to_subvectors(w, bs)
    assert torch.equal(noised[~mask], blocks[~mask])  # bit-identical, no rescale
    # Every masked block is now a codeword (in the weight's dtype) ...
    c64 = book.centroids.double()
    d = torch.cdist(blocks[mask].double(), c64) ** 2  # (m, k) float64 reference distances
    chosen = torch.cdist(noised[mask].double(), c64.to(dtype).double()).argmin(1)
    assert torch.equal(noised[mask], book.centroids[chosen].to(dtype))
    # ... a nearest one: its float64 distance is the minimum up to float32 search rounding.
    gap = d.gather(1, chosen[:, None]).squeeze(1) - d.min(1).values
    assert float(gap.max()) <= 1e-6 * float(d.min(1).values.max()) + 1e-12
    # Zero blocks and duplicates share a codeword: equal blocks are replaced by equal values.
    zeros = blocks[mask].eq(0).all(1)
    assert int(zeros.sum()) > 100
    assert bool((noised[mask][zeros] == noised[mask][zeros][0]).all())


def test_quantize_mode_with_fixed_codes(hard_query: tuple[torch.Tensor, Codebook]) -> None:
    w, book = hard_query
    assert book.codes is not None
    bs, p = 4, 0.25
    mask = noise_mask(w.numel() // bs, p, torch.Generator().manual_seed(6))
    noised = to_subvectors(apply_noise_mask(w, mask, p, bs, "quantize", book), bs)
    assert torch.equal(noised[mask], book.centroids[book.codes[mask]])
    assert torch.equal(noised[~mask], to_subvectors(w, bs)[~mask])
    # p = 1 is quantization-aware training: the whole weight is the decoded PQ weight.
    full = quant_noise(w, 1.0, bs, "quantize", codebook=book)
    assert torch.equal(full, from_subvectors(book.centroids[book.codes], (384, 384)))


def test_the_input_weight_is_never_written() -> None:
    w = torch.randn(8, 16, requires_grad=True)
    before, version = w.detach().clone(), w._version
    for mode, book in (("drop", None), ("quantize", Codebook(torch.zeros(2, 4)))):
        out = quant_noise(w, 0.5, 4, mode, codebook=book)
        assert out.data_ptr() != w.data_ptr()
        out.sum().backward()
    assert torch.equal(w.detach(), before)
    assert w._version == version


def test_masks_are_reproducible_from_a_seed() -> None:
    w = torch.randn(32, 64)
    a = [quant_noise(w, 0.3, 8, generator=g) for g in [torch.Generator().manual_seed(9)] * 3]
    b = [quant_noise(w, 0.3, 8, generator=g) for g in [torch.Generator().manual_seed(9)] * 3]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # successive draws differ


def test_bad_input_is_refused() -> None:
    w = torch.randn(8, 12)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(InvalidInputError, match=r"outside \[0, 1\) for mode 'drop'"):
            quant_noise(w, p, 4)
    with pytest.raises(InvalidInputError, match=r"outside \[0, 1\] for mode 'quantize'"):
        quant_noise(w, 1.5, 4, "quantize", codebook=Codebook(torch.zeros(2, 4)))
    with pytest.raises(InvalidInputError, match=r"unknown Quant-Noise mode 'prune'"):
        quant_noise(w, 0.1, 4, "prune")
    with pytest.raises(
        InvalidInputError,
        match=r"up\.proj: weight of shape \(8, 12\) has rows of 12 \(in\) weights, which blocks "
        r"of 8 cannot tile\. Use a block size that divides 12 \(e\.g\. 1, 2, 4\)",
    ):
        quant_noise(w, 0.1, 8, name="up.proj")
    with pytest.raises(InvalidInputError, match=r"rows of 27 \(in/groups \* kh \* kw\)"):
        quant_noise(torch.randn(4, 3, 3, 3), 0.1, 4)
    with pytest.raises(InvalidInputError, match=r"a codebook is only used in mode 'quantize'"):
        quant_noise(w, 0.1, 4, codebook=Codebook(torch.zeros(2, 4)))
    with pytest.raises(InvalidInputError, match=r"needs a codebook"):
        quant_noise(w, 0.1, 4, "quantize")
    with pytest.raises(InvalidInputError, match=r"codewords of 2 weights but .* blocks of 4"):
        quant_noise(w, 0.1, 4, "quantize", codebook=Codebook(torch.zeros(3, 2)))
    with pytest.raises(InvalidInputError, match=r"5 codes for a weight of 24 blocks"):
        quant_noise(
            w,
            0.1,
            4,
            "quantize",
            codebook=Codebook(torch.zeros(3, 4), torch.zeros(5, dtype=torch.long)),
        )
    with pytest.raises(
        InvalidInputError, match=r"codes range over \[0, 3\] but the codebook has 3"
    ):
        Codebook(torch.zeros(3, 4), torch.tensor([0, 3]))
    with pytest.raises(InvalidInputError, match=r"mask must be a bool tensor of shape \(24,\)"):
        apply_noise_mask(w, torch.zeros(24), 0.1, 4)
