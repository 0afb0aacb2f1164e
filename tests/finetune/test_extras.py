"""Fine-tuning layers with per-row-group codebooks, scales and outliers (a real SmolLM2 layer).

A stage swaps such a layer in from its shard with trainable codebooks and scales and frozen
codes and outliers; the merge re-encodes exactly what the module computes. DKM-family stages
refuse such layers when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from dist_pgkm.checkpoint import decode_layer, encode_layer
from dist_pgkm.config.finetune import load_finetune_config
from dist_pgkm.config.quantize import LayerQuantOptions
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.errors import ConfigError
from dist_pgkm.finetune.stages import stage_layers
from dist_pgkm.finetune.surgery import codebook_parameters, dense_state_dict, swap_in
from dist_pgkm.kmeans.result import KMeansStats
from dist_pgkm.pq import PQLinear, quantize_weight
from tests.conftest import smollm2_weight

OPTIONS = LayerQuantOptions(scale="group", scale_group=64, codebook_rows=32, outliers=0.005)

pytestmark = pytest.mark.usefixtures("one_thread")


def _job(name: str, options: LayerQuantOptions, shape: tuple[int, ...] = (192, 576)) -> LayerJob:
    return LayerJob(name, "linear", f"{name}.weight", shape, 8, 32, 0, (), 1.0, options)


def test_swapped_layer_trains_codebooks_and_scales_and_re_encodes_exactly() -> None:
    weight = smollm2_weight("model.layers.0.self_attn.k_proj.weight")  # (192, 576)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(576, 192, bias=False)))
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    q = quantize_weight(weight, 8, 32, options=OPTIONS, backend="torch", n_iter=4)
    swap_in(model, _job("proj", OPTIONS), q)
    pq = model.proj
    assert isinstance(pq, PQLinear)
    assert torch.equal(pq.weight, q.dense())
    trained = codebook_parameters(pq)
    assert trained == [pq.centroids, pq.scales]
    assert all(p.requires_grad for p in trained)
    before = {n: t.detach().clone() for n, t in pq.state_dict().items()}

    optimizer = torch.optim.SGD(trained, lr=1e-2)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).mean().backward()
    optimizer.step()
    after = pq.state_dict()
    assert not torch.equal(after["centroids"], before["centroids"])
    assert not torch.equal(after["scales"], before["scales"])
    for frozen in ("codes", "outlier_idx", "outlier_val"):
        assert torch.equal(after[frozen], before[frozen]), frozen

    # The merge's encoding holds exactly what the trained module computes, once its trained
    # scales are rounded to the fp16 the format stores them in (float32 codebooks here).
    stats = KMeansStats("finetuned", "none", pq.n_blocks, pq.block_size, pq.k)
    trained_q = pq.quantized(stats)
    tensors, meta = encode_layer("proj", trained_q, "float32", k=32)
    _, back = decode_layer(tensors, meta)
    assert trained_q.scales is not None
    rounded = dataclasses.replace(trained_q, scales=trained_q.scales.half().float())
    assert torch.equal(back.dense(), rounded.dense())
    assert torch.equal(trained_q.dense(), pq.weight.detach())
    # The dense state dict (the next stage's source) holds the decoded weight, no PQ tensor.
    assert set(dense_state_dict(model)) == {"proj.weight"}


CONFIG: dict[str, Any] = {
    "quantize": {
        "rules": [
            {"match": "a", "block_size": 8, "k": 32, "scale": "row"},
            {"match": "b", "block_size": 8, "k": 32, "metric": "hessian"},
        ]
    },
    "stages": [
        {"name": "first", "match": "a", "steps": 1, "method": "idkm"},
        {"name": "second", "match": "b", "steps": 1, "method": "idkm"},
    ],
}


def test_dkm_stages_refuse_layers_with_stored_extras() -> None:
    config = load_finetune_config(CONFIG)
    jobs = [_job("a", LayerQuantOptions(scale="row")), _job("b", LayerQuantOptions())]
    with pytest.raises(ConfigError, match=r"stage first: method idkm on a, whose rule asks for"):
        stage_layers(jobs, config)
    # A metric alone stores nothing extra: the layer's codebook is a plain one.
    jobs[0] = _job("a", LayerQuantOptions(metric="hessian"))
    assert [[j.name for j in s] for s in stage_layers(jobs, config)] == [["a"], ["b"]]
