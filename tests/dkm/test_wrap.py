"""add_dkm on real layer shapes: soft forward in training, hard forward = the exported PQ layer.

The same for LR²VQ (``DKMOptions.rank``): the layer trains ``R`` and ``P`` instead of its weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.dkm import soft_kmeans, soft_weight
from dist_pgkm.dkm.wrap import BUFFER, LR2VQ_P, LR2VQ_R, DKMOptions, LR2VQLayer, add_dkm
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.modules import pq_module_for
from dist_pgkm.pq.quantize import quantize_weight


def _heavy_tailed_(weights: list[torch.Tensor], seed: int) -> None:
    """Fill ``weights`` with heavy-tailed values: a few large ones among small ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in weights:
            p.copy_(torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g) ** 3)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 32)
        self.proj = nn.Linear(32, 48)
        _heavy_tailed_([self.embed.weight, self.proj.weight], seed=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(self.embed(ids))
        return out


class TiedLM(nn.Module):
    """An embedding and an output projection sharing one weight (as SmolLM2's do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 96, bias=False)
        _heavy_tailed_([self.embed.weight, self.mix.weight], seed=1)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.mix(self.embed(ids))))
        return out


@pytest.fixture(scope="module")
def minilm_up() -> torch.Tensor:
    """A real MiniLM weight (1536, 384): the first block's MLP up-projection."""
    from safetensors import safe_open

    from dist_pgkm.models.offline import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as fh:
        return fh.get_tensor("encoder.layer.0.intermediate.dense.weight").float()


def _init(model: Tiny, bs: int, k: int) -> dict[str, torch.Tensor]:
    return {
        name: quantize_weight(getattr(model, name).weight, bs, k, seed=1).centroids
        for name in ("embed", "proj")
    }


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm-jfb"])
def test_training_forward_uses_the_soft_weight_and_warm_starts(method: str) -> None:
    model = Tiny()
    init = _init(model, 4, 16)
    options = DKMOptions(method=method, iters=3)  # type: ignore[arg-type]
    handle = add_dkm(model, "proj", 4, init, options)
    layer = handle["proj"]
    ids = torch.randint(0, 96, (5, 7))
    model.train()
    start = layer.centroids.clone()
    out = model(ids)
    sub = to_subvectors(model.proj.weight, 4)
    c = soft_kmeans(sub, start, layer.tau, 3)
    expected = F.linear(
        model.embed(ids), from_subvectors(soft_weight(sub, c, layer.tau), (48, 32)), model.proj.bias
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.centroids, c.detach())  # the buffer holds the warm start
    assert not torch.equal(layer.centroids, start)
    out.pow(2).mean().backward()
    assert model.proj.weight.grad is not None
    assert model.proj.weight.grad.abs().sum() > 0


def test_eval_forward_equals_the_exported_pq_layer() -> None:
    model = Tiny()
    handle = add_dkm(model, "re:.*", 4, _init(model, 4, 16), DKMOptions(iters=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, 96, (4, 9))
    model.train()
    for _ in range(3):  # train a little: weights and centroids move
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids)
        hard_proj = handle["proj"].hard_weight()
    for name in ("embed", "proj"):
        module = getattr(model, name)
        centroids, codes = handle[name].export()
        assert int(codes.max()) < centroids.shape[0]
        pq = pq_module_for(module).from_float(module, centroids, codes)
        setattr(model, name, pq)
    handle.remove()
    with torch.no_grad():
        exported = model(ids)
        assert torch.equal(model.proj.weight, hard_proj)
    assert torch.equal(exported, trained)


def test_remove_restores_the_module() -> None:
    model = Tiny()
    reference = model(torch.arange(6)[None])
    handle = add_dkm(model, "proj", 4, _init(model, 4, 16))
    assert BUFFER in dict(model.proj.named_buffers())
    assert f"proj.{BUFFER}" in model.state_dict()  # checkpointed with the model
    handle.remove()
    assert BUFFER not in dict(model.proj.named_buffers())
    assert "forward" not in vars(model.proj)
    assert torch.equal(model(torch.arange(6)[None]), reference)


def test_bad_input_is_named() -> None:
    model = Tiny()
    init = _init(model, 4, 16)
    with pytest.raises(InvalidInputError, match="no initial centroids for embed"):
        add_dkm(model, "embed", 4, {"proj": init["proj"]})
    with pytest.raises(InvalidInputError, match=r"expected \(k, 8\)"):
        add_dkm(model, "proj", 8, init)
    with pytest.raises(InvalidInputError, match="tau > 0"):
        DKMOptions(tau=0.0)
    with pytest.raises(InvalidInputError, match="rank 0"):
        DKMOptions(rank=0)
    with pytest.raises(InvalidInputError, match=r"rank 5 exceeds the sub-vector size 4"):
        add_dkm(model, "proj", 4, init, DKMOptions(rank=5))
    add_dkm(model, "proj", 4, init)
    with pytest.raises(InvalidInputError, match="already has its forward replaced"):
        add_dkm(model, "proj", 4, init)


def test_lr2vq_trains_r_and_p_through_the_soft_clustering() -> None:
    model = Tiny()
    init = _init(model, 4, 16)
    handle = add_dkm(model, "proj", 4, init, DKMOptions(method="idkm", iters=3, rank=2))
    layer = handle["proj"]
    assert isinstance(layer, LR2VQLayer)
    r, p = getattr(model.proj, LR2VQ_R), getattr(model.proj, LR2VQ_P)
    assert r.shape == (48 * 32 // 4, 2)
    assert p.shape == (2, 4)
    assert not model.proj.weight.requires_grad  # the layer is R P now
    # Started from the truncated SVD: P has orthonormal rows, R P is the best rank-2 fit.
    torch.testing.assert_close(p @ p.T, torch.eye(2), atol=1e-5, rtol=0)
    # The warm start is PG k-means' codebook projected into the rank-2 space.
    torch.testing.assert_close(layer.centroids, init["proj"] @ p.detach().T, atol=1e-6, rtol=0)
    ids = torch.randint(0, 96, (5, 7))
    model.train()
    start = layer.centroids.clone()
    out = model(ids)
    c = soft_kmeans(r.detach(), start, layer.tau, 3)
    soft = soft_weight(r.detach(), c, layer.tau) @ p.detach()
    expected = F.linear(model.embed(ids), from_subvectors(soft, (48, 32)), model.proj.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    assert model.proj.weight.grad is None
    assert r.grad is not None
    assert r.grad.abs().sum() > 0
    assert p.grad is not None
    assert p.grad.abs().sum() > 0


def test_lr2vq_eval_forward_equals_the_exported_pq_layer_and_remove_restores() -> None:
    model = Tiny()
    floats = {name: getattr(model, name).weight.detach().clone() for name in ("embed", "proj")}
    handle = add_dkm(model, "re:.*", 4, _init(model, 4, 16), DKMOptions(iters=2, rank=3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 96, (4, 9))
    model.train()
    for _ in range(3):  # R, P and the centroids move
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    exported = Tiny()
    for name in ("embed", "proj"):
        module = getattr(model, name)
        codebook, codes = handle[name].export()
        assert codebook.shape == (16, 4)  # C P: the PQ format with block m, whatever d
        pq = pq_module_for(module).from_float(module, codebook, codes)
        setattr(exported, name, pq)
    with torch.no_grad():
        assert torch.equal(exported(ids), trained)
    handle.remove()
    assert not any(n.startswith("lr2vq") for n, _ in model.named_parameters(recurse=True))
    assert model.proj.weight.requires_grad
    for name, weight in floats.items():  # frozen while R P trained
        assert torch.equal(getattr(model, name).weight, weight)


def test_lr2vq_reconstruction_error_falls_with_d(minilm_up: torch.Tensor) -> None:
    """At the start (PG k-means projected to rank d), a real MiniLM layer's error falls with d.

    At d = m, P is a rotation, so the codebook is PG k-means' own; the codes are each
    sub-vector's nearest centroid, which PG k-means' last codes (assigned before its last
    centroid update) need not be, so the error may only be lower (measured: 0.03%).
    Measured relative SSE: 0.872, 0.764, 0.613, 0.4636 at d = 1, 2, 4, 8 (PG k-means 0.4637).
    """
    weight = minilm_up
    k, bs = 64, 8
    init = quantize_weight(weight, bs, k, seed=0)
    plain = float((init.dense() - weight).pow(2).sum() / weight.pow(2).sum())
    errors = {}
    for d in (1, 2, 4, 8):
        linear = nn.Linear(384, 1536)
        with torch.no_grad():
            linear.weight.copy_(weight)
        layer = add_dkm(linear, "", bs, {"": init.centroids}, DKMOptions(rank=d))[""]
        errors[d] = float((layer.hard_weight() - weight).pow(2).sum() / weight.pow(2).sum())
    assert errors[1] > errors[2] > errors[4] > errors[8]
    assert plain * (1 - 2e-3) <= errors[8] <= plain * (1 + 1e-6)


def test_idkm_solver_cap_and_stats() -> None:
    model = Tiny()
    init = _init(model, 4, 16)
    capped = add_dkm(model, "proj", 4, init, DKMOptions(method="idkm", iters=2, solver_iters=2))
    layer = capped["proj"]
    model.train()
    ids = torch.randint(0, 96, (5, 7), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(ids).pow(2).mean().backward()
    # One solve per backward, each cut at 2 iterations. Uncapped, the first of the same solves
    # diverged at iteration 33 (fell back to JFB) and the other two stopped at 50 unconverged.
    assert layer.stats.calls == 3
    assert layer.stats.iterations == 2
    assert (layer.stats.truncated, layer.stats.fallbacks) == (3, 0)
    capped.remove()
    jfb = add_dkm(model, "proj", 4, init, DKMOptions(method="idkm-jfb", iters=2))
    model(ids).pow(2).mean().backward()
    assert jfb["proj"].stats.calls == 0  # no implicit solve without idkm
    with pytest.raises(InvalidInputError, match="solver_iters 0"):
        DKMOptions(solver_iters=0)


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm-jfb"])
def test_tied_modules_share_one_clustering_per_pass(method: str) -> None:
    """The LM head tied to the embedding uses the embedding's soft weight: one clustering per
    forward pass (the warm start moves once), the gradient of both uses summed in the shared
    float weight, exactly as a reference that builds the soft weight once and uses it twice."""
    model = TiedLM()
    init = quantize_weight(model.embed.weight, 4, 16, seed=1).centroids
    options = DKMOptions(method=method, iters=3)  # type: ignore[arg-type]
    handle = add_dkm(model, "embed", 4, {"embed": init}, options, tied={"embed": ["head"]})
    layer = handle["embed"]
    model.train()
    ids = torch.randint(0, 96, (5, 7), generator=torch.Generator().manual_seed(2))
    weight = model.embed.weight.detach().clone().requires_grad_(True)
    starts = []
    for _ in range(2):  # the second pass clusters again, from the first one's centroids
        starts.append(layer.centroids.clone())
        model.zero_grad()
        out = model(ids)
        out.pow(2).mean().backward()
    sub = to_subvectors(weight, 4)
    c = soft_kmeans(sub, starts[1], layer.tau, 3, method)  # type: ignore[arg-type]
    soft = from_subvectors(soft_weight(sub, c, layer.tau), (96, 32))
    expected = F.linear(torch.tanh(model.mix(F.embedding(ids, soft))), soft)
    expected.pow(2).mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.centroids, c.detach())  # moved once in the pass, not twice
    assert not torch.equal(starts[1], starts[0])
    assert model.embed.weight.grad is not None
    assert weight.grad is not None
    torch.testing.assert_close(model.embed.weight.grad, weight.grad, rtol=1e-5, atol=1e-8)


def test_tied_eval_equals_the_exported_tied_pq_layers_and_remove_restores() -> None:
    model = TiedLM()
    reference_ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(reference_ids)
    init = quantize_weight(model.embed.weight, 4, 16, seed=1).centroids
    handle = add_dkm(model, "embed", 4, {"embed": init}, DKMOptions(iters=2), {"embed": ["head"]})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, 96, (4, 9), generator=torch.Generator().manual_seed(4))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    assert model.head.weight is model.embed.weight
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    codebook, codes = handle["embed"].export()
    exported = TiedLM()
    exported.mix = model.mix
    embed = pq_module_for(model.embed).from_float(model.embed, codebook, codes)
    head = pq_module_for(model.head).from_float(model.head, codebook, codes)
    head.tie_to(embed)
    exported.embed, exported.head = embed, head
    with torch.no_grad():
        assert torch.equal(exported(ids), trained)
    handle.remove()
    assert "forward" not in vars(model.head)
    assert "forward" not in vars(model.embed)
    with torch.no_grad():
        after = model(reference_ids)  # the float model again (its weight trained)
        expected = F.linear(
            torch.tanh(model.mix(model.embed.weight[reference_ids])), model.embed.weight
        )
    torch.testing.assert_close(after, expected)
    assert not torch.equal(after, before)


def test_tied_bad_input_is_named() -> None:
    model = TiedLM()
    init = {"embed": quantize_weight(model.embed.weight, 4, 16, seed=1).centroids}
    with pytest.raises(InvalidInputError, match=r"head shares its weight with embed; pass tied="):
        add_dkm(model, "embed", 4, init)
    with pytest.raises(InvalidInputError, match="mix does not share embed's weight"):
        add_dkm(model, "embed", 4, init, tied={"embed": ["mix"]})
    with pytest.raises(InvalidInputError, match="head is both selected and tied to embed"):
        add_dkm(
            model, ["embed", "head"], 4, {**init, "head": init["embed"]}, tied={"embed": ["head"]}
        )
    with pytest.raises(InvalidInputError, match="embed shares its weight with head; select one"):
        add_dkm(model, ["embed", "head"], 4, {**init, "head": init["embed"]})
    with pytest.raises(InvalidInputError, match=r"tied names \['mix'\], which are not selected"):
        add_dkm(model, "embed", 4, init, tied={"mix": ["head"]})
    with pytest.raises(
        InvalidInputError, match=r"nope \(tied to embed\) is not a Linear, Embedding, Conv2d module"
    ):
        add_dkm(model, "embed", 4, init, tied={"embed": ["nope"]})
    assert "forward" not in vars(model.embed)
    assert "forward" not in vars(model.head)
