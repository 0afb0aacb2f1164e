"""add_dkm on real layer shapes: soft forward in training, hard forward = the exported PQ layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.dkm import soft_kmeans, soft_weight
from dist_pgkm.dkm.wrap import BUFFER, DKMOptions, add_dkm
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.modules import pq_module_for
from dist_pgkm.pq.quantize import quantize_weight


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(96, 32)
        self.proj = nn.Linear(32, 48)
        with torch.no_grad():  # heavy-tailed weights: a few large values among small ones
            for p in (self.embed.weight, self.proj.weight):
                p.copy_(torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g) ** 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(self.embed(ids))
        return out


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
    add_dkm(model, "proj", 4, init)
    with pytest.raises(InvalidInputError, match="already has its forward replaced"):
        add_dkm(model, "proj", 4, init)
