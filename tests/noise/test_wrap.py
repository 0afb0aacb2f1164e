"""Quant-Noise installed on modules: functional forward, untouched parameters, exact gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise import (
    Codebook,
    QuantNoise,
    add_quant_noise,
    noise_mask,
    quant_noise,
    quant_noise_handle,
    remove_quant_noise,
)
from dist_pgkm.pq import PQLinear, from_subvectors, quantize_weight
from dist_pgkm.utils.seeding import derive_seed

QUERY = "encoder.layer.0.attention.self.query.weight"  # (384, 384)
POSITIONS = "embeddings.position_embeddings.weight"  # (512, 384)


class Block(nn.Module):
    """A toy model with every supported layer type, named like a transformer's."""

    def __init__(self, query: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 384, padding_idx=0)
        self.query = nn.Linear(384, 384)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.norm = nn.LayerNorm(384)
        with torch.no_grad():
            self.embed.weight.copy_(positions)
            self.query.weight.copy_(query)


@pytest.fixture
def block(minilm: dict[str, torch.Tensor]) -> Block:
    torch.manual_seed(0)
    return Block(minilm[QUERY], minilm[POSITIONS]).double()


def inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (6, 20), generator=g)  # repeats, and the padding row 0
    return {
        "embed": ids,
        "query": torch.randn(10, 384, generator=g, dtype=torch.float64),
        "conv": torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64),
    }


LAYERS = ("embed", "query", "conv")
BLOCK_SIZES = {"embed": 8, "query": 4, "conv": 6}  # conv: blocks straddle kernels (36 = 4*3*3)


def wrap_all(model: nn.Module, p: float, seed: int | None = 5) -> list[QuantNoise]:
    return [add_quant_noise(model, name, p, BLOCK_SIZES[name], seed=seed) for name in LAYERS]


@pytest.mark.parametrize("name", LAYERS)
def test_training_forward_uses_the_noised_weight_and_eval_the_plain_one(
    block: Block, name: str
) -> None:
    plain = copy.deepcopy(block)
    wrap_all(block, 0.3)
    module, x = getattr(block, name), inputs(0)[name]
    # Training: the output of the functional op on quant_noise's weight from the same generator.
    g = torch.Generator().manual_seed(derive_seed(5, name))
    for _ in range(3):
        expected_weight = quant_noise(module.weight, 0.3, BLOCK_SIZES[name], generator=g)
        reference = copy.deepcopy(getattr(plain, name))
        reference.weight = nn.Parameter(expected_weight.detach())
        assert torch.equal(module(x), reference(x))
    # Eval: exactly the plain module, and no random number is drawn.
    block.eval()
    state = quant_noise_handle(module).generator.get_state()
    assert torch.equal(module(x), getattr(plain, name)(x))
    assert torch.equal(quant_noise_handle(module).generator.get_state(), state)
    # p = 0 in training is the plain module too.
    block.train()
    quant_noise_handle(module).p = 0.0
    assert torch.equal(module(x), getattr(plain, name)(x))


def test_linear_output_shows_the_block_layout(block: Block) -> None:
    """Feeding the identity through a noised Linear reads its effective weight back exactly."""
    block.query.bias = None
    add_quant_noise(block, "query", 0.5, 4, seed=1)
    effective = block.query(torch.eye(384, dtype=torch.float64)).t()  # (out, in)
    mask = noise_mask(384 * 96, 0.5, torch.Generator().manual_seed(derive_seed(1, "query")))
    dropped = from_subvectors(mask[:, None].expand(-1, 4), (384, 384))
    assert torch.equal(effective == 0, dropped)
    assert torch.equal(effective[~dropped], block.query.weight[~dropped] / 0.5)


@pytest.mark.parametrize("mode", ["drop", "quantize"])
def test_parameters_are_bit_identical_after_many_training_steps(block: Block, mode: str) -> None:
    params = {name: p.detach().clone() for name, p in block.named_parameters()}
    versions = {name: p._version for name, p in block.named_parameters()}
    for name in LAYERS:
        weight = getattr(block, name).weight
        book = Codebook(weight.detach()[:3].reshape(-1, BLOCK_SIZES[name])[:16].clone())
        books = {name: book} if mode == "quantize" else None
        add_quant_noise(block, name, 0.5, BLOCK_SIZES[name], mode=mode, codebooks=books, seed=0)
    for step in range(20):
        x = inputs(step)
        loss = sum(getattr(block, name)(x[name]).square().mean() for name in LAYERS)
        loss.backward()
    for name, param in block.named_parameters():
        assert torch.equal(param.detach(), params[name]), name
        assert param._version == versions[name], name  # no in-place op ever touched it
    assert block.query.weight.grad is not None


def test_drop_gradients_are_the_plain_gradients_times_mask_over_keep(block: Block) -> None:
    p = 0.3
    wrap_all(block, p, seed=11)
    x = inputs(1)
    g = torch.Generator().manual_seed(99)
    for name in LAYERS:
        module = getattr(block, name)
        mask = noise_mask(
            module.weight.numel() // BLOCK_SIZES[name],
            p,
            torch.Generator().manual_seed(derive_seed(11, name)),
        )
        keep = ~from_subvectors(mask[:, None].expand(-1, BLOCK_SIZES[name]), module.weight.shape)
        # Reference: autograd w.r.t. the effective weight as a leaf, then the chain rule by hand.
        effective = (torch.where(keep, module.weight.detach() / (1 - p), 0.0)).requires_grad_()
        xin = x[name].clone().requires_grad_(x[name].is_floating_point())
        reference = copy.deepcopy(module)
        remove_quant_noise(reference)
        del reference.weight
        reference.weight = effective  # a plain tensor attribute: the functional op reads it
        out_ref = reference(xin)
        t = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
        (out_ref * t).sum().backward()
        assert effective.grad is not None
        expected = effective.grad * keep / (1 - p)

        xin2 = x[name].clone().requires_grad_(x[name].is_floating_point())
        (module(xin2) * t).sum().backward()
        scale = float(expected.abs().max())
        assert float((module.weight.grad - expected).abs().max()) <= 1e-12 * scale, name
        assert not bool(module.weight.grad[~keep].any()), name  # dropped blocks: exactly 0
        if xin.grad is not None:
            assert torch.allclose(
                xin2.grad, xin.grad, rtol=0, atol=1e-12 * float(xin.grad.abs().max())
            )
        if name == "embed":
            assert not bool(module.weight.grad[0].any())  # the padding row gets no gradient


def test_quantize_gradients_are_straight_through(block: Block) -> None:
    book = Codebook(torch.randn(32, 4, dtype=torch.float64))
    add_quant_noise(block, "query", 0.5, 4, mode="quantize", codebooks={"query": book}, seed=2)
    x = inputs(2)["query"]
    mask = noise_mask(384 * 96, 0.5, torch.Generator().manual_seed(derive_seed(2, "query")))
    w = block.query.weight.detach()
    effective = w.clone()
    blocks = effective.view(-1, 4)  # (n_blocks, bs)
    blocks[mask] = book(w.view(-1, 4)[mask], mask.nonzero().squeeze(1))
    effective.requires_grad_()
    t = torch.randn(10, 384, dtype=torch.float64)
    (F.linear(x, effective, block.query.bias) * t).sum().backward()
    (block.query(x) * t).sum().backward()
    assert effective.grad is not None
    assert torch.allclose(block.query.weight.grad, effective.grad, rtol=0, atol=1e-12)


def test_a_seeded_run_resumes_with_the_same_masks(block: Block) -> None:
    twin = copy.deepcopy(block)
    noise = add_quant_noise(block, ["query", "re:emb.*"], 0.2, 8, seed=3)
    outputs, saved = [], {}
    for step in range(5):
        if step == 3:
            saved = {k: v.clone() for k, v in noise.state_dict().items()}
        outputs.append(block.query(inputs(step)["query"]))
    assert sorted(saved) == ["embed", "query"]
    resumed = add_quant_noise(twin, ["query", "embed"], 0.2, 8, seed=3)
    resumed.load_state_dict(saved)
    for step in (3, 4):
        assert torch.equal(twin.query(inputs(step)["query"]), outputs[step])
    assert not torch.equal(outputs[3], outputs[4])
    with pytest.raises(InvalidInputError, match=r"does not match the wrapped layers"):
        resumed.load_state_dict({"query": saved["query"]})


def test_global_rng_masks_survive_activation_checkpointing(block: Block) -> None:
    """seed=None draws from torch's RNG, which checkpoint() restores before recomputing."""
    twin = copy.deepcopy(block)
    add_quant_noise(block, "query", 0.4, 4, seed=None)
    add_quant_noise(twin, "query", 0.4, 4, seed=None)
    x = inputs(3)["query"]
    torch.manual_seed(7)
    block.query(x).square().sum().backward()
    torch.manual_seed(7)
    checkpoint(twin.query, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(block.query.weight.grad, twin.query.weight.grad)


def test_selection_add_and_remove(block: Block) -> None:
    q = quantize_weight(torch.randn(4, 8), block_size=4, k=2)
    block.add_module("quantized", PQLinear.from_float(nn.Linear(8, 4), q.centroids, q.codes))
    keys = list(block.state_dict())
    # re: patterns select only the supported float layers (not the LayerNorm, not PQ modules).
    noise = add_quant_noise(block, "re:.*", 0.1, 2)
    assert noise.names == ["embed", "query", "conv"]
    assert list(block.state_dict()) == keys  # same parameters, same names
    assert "forward" in vars(block.query)
    noise["query"].remove()
    assert "forward" not in vars(block.query)
    assert remove_quant_noise(block) == ["embed", "conv"]
    assert all("forward" not in vars(m) for m in block.modules())


def test_bad_selections_are_refused_before_anything_is_installed(block: Block) -> None:
    with pytest.raises(InvalidInputError, match=r"norm is a LayerNorm; only Linear"):
        add_quant_noise(block, ["query", "norm"], 0.1, 4)
    assert quant_noise_handle(block.query) is None  # nothing half-installed
    with pytest.raises(InvalidInputError, match=r"no module named 'qeury'"):
        add_quant_noise(block, "qeury", 0.1, 4)
    with pytest.raises(InvalidInputError, match=r"'re:.*mlp.*' matches no Linear, Embedding"):
        add_quant_noise(block, "re:.*mlp.*", 0.1, 4)
    with pytest.raises(
        InvalidInputError,
        match=r"conv: weight of shape \(6, 4, 3, 3\) has rows of 36 \(in/groups \* kh \* kw\) "
        r"weights, which blocks of 8 cannot tile",
    ):
        add_quant_noise(block, ["query", "conv"], 0.1, 8)
    assert quant_noise_handle(block.query) is None
    with pytest.raises(InvalidInputError, match=r"outside \[0, 1\)"):
        add_quant_noise(block, "query", 1.0, 4)
    with pytest.raises(InvalidInputError, match=r"needs a codebook for every selected layer"):
        add_quant_noise(block, "query", 0.1, 4, mode="quantize")
    with pytest.raises(InvalidInputError, match=r"codebooks are only used in mode 'quantize'"):
        add_quant_noise(block, "query", 0.1, 4, codebooks={"query": Codebook(torch.zeros(2, 4))})
    with pytest.raises(InvalidInputError, match=r"max_norm=1\.0 renormalises its weight"):
        add_quant_noise(nn.ModuleDict({"e": nn.Embedding(4, 8, max_norm=1.0)}), "e", 0.1, 4)
    noise = add_quant_noise(block, "query", 0.1, 4)
    with pytest.raises(InvalidInputError, match=r"query already has Quant-Noise; remove it"):
        add_quant_noise(block, "re:que.*", 0.2, 4)
    with pytest.raises(InvalidInputError, match=r"outside \[0, 1\)"):
        noise.set_p(1.2)
    assert noise["query"].p == 0.1


def test_wrapping_needs_no_materialised_weight() -> None:
    """Shapes come from module attributes: a meta (or ZeRO-3-partitioned) weight is fine."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(384, 1536), nn.Conv2d(3, 8, 3))
    model[0].weight = nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves between forwards
    noise = add_quant_noise(model, "0", 0.1, 8)
    assert len(noise) == 1
    with pytest.raises(InvalidInputError, match=r"rows of 27"):
        add_quant_noise(model, "1", 0.1, 4)
