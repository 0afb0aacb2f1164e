"""The plan is pure: rules -> jobs, longest first, seeds from (run seed, name) only."""

from __future__ import annotations

import pytest

from dist_pgkm.config import load_config
from dist_pgkm.distributed.plan import layer_seed, plan_run
from dist_pgkm.errors import ConfigError
from dist_pgkm.models.layers import LayerInfo

LAYERS = [
    LayerInfo("embed", "embedding", "embed.weight", (1000, 64), ("lm_head",)),
    LayerInfo("blocks.0.attn", "linear", "blocks.0.attn.weight", (64, 64)),
    LayerInfo("blocks.0.mlp", "linear", "blocks.0.mlp.weight", (256, 64)),
    LayerInfo("blocks.0.odd", "linear", "blocks.0.odd.weight", (64, 30)),  # 30 % 4 != 0
    LayerInfo("head", "linear", "head.weight", (2, 64)),  # 32 blocks < k
    LayerInfo("conv", "conv2d", "conv.weight", (8, 3, 3, 3)),
]


def test_jobs_follow_the_rules_longest_first() -> None:
    config = load_config(
        {
            "n_iter": 10,
            "rules": [
                {"match": "conv", "skip": True},
                {"match": "re:blocks\\..*", "block_size": 4, "k": 64},
                {"match": ["embed", "head"], "block_size": 4, "k": 256},
            ],
        }
    )
    plan = plan_run(LAYERS, config)
    assert [job.name for job in plan.jobs] == ["embed", "blocks.0.mlp", "blocks.0.attn"]
    embed = plan.jobs[0]
    assert embed.est_cost == 1000 * 64 / 4 * 256 * 4 * 10
    assert embed.tied == ("lm_head",)
    assert {s.name: s.reason for s in plan.skipped} == {
        "blocks.0.odd": "input width 30 is not a multiple of block size 4",
        "head": "32 blocks of 4 are fewer than k = 256 codewords",
    }
    assert plan.n_float == 1  # conv
    assert plan.n_weights == 1000 * 64 + 256 * 64 + 64 * 64


def test_seeds_depend_on_run_seed_and_name_only() -> None:
    a = plan_run(LAYERS[:3], load_config({"rules": [{"match": "re:.*", "block_size": 4, "k": 16}]}))
    b = plan_run(
        list(reversed(LAYERS[:3])),
        load_config({"rules": [{"match": "re:.*", "block_size": 8, "k": 32}]}),
    )
    assert {j.name: j.seed for j in a.jobs} == {j.name: j.seed for j in b.jobs}
    assert layer_seed(0, "embed") == next(j.seed for j in a.jobs if j.name == "embed")
    assert layer_seed(1, "embed") != layer_seed(0, "embed")
    assert len({layer_seed(0, f"layers.{i}") for i in range(1000)}) == 1000
    assert 0 <= layer_seed(2**40, "x") < 2**63


def test_unsupported_layers_are_an_error_when_asked() -> None:
    config = load_config(
        {"on_unsupported": "error", "rules": [{"match": "re:.*", "block_size": 4, "k": 256}]}
    )
    with pytest.raises(
        ConfigError, match=r"3 selected layer\(s\) cannot be quantized.*blocks.0.odd"
    ):
        plan_run(LAYERS, config)
    with pytest.raises(ConfigError, match="selects no layer"):
        plan_run(LAYERS, load_config({"rules": [{"match": "nothing", "block_size": 4, "k": 4}]}))
