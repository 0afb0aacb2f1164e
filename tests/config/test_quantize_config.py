"""The quantize config: presets load, rules select as documented, typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_pgkm.config import load_config
from dist_pgkm.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RULE = {"match": "re:.*", "block_size": 2, "k": 256}


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_is_valid(preset: str) -> None:
    if preset.endswith("-finetune.yaml"):  # a finetune config naming a quantize preset
        from dist_pgkm.config.finetune import load_finetune_config

        assert load_finetune_config(CONFIGS / preset).quantize.rules
        return
    config = load_config(CONFIGS / preset)
    assert config.rules


def test_first_matching_rule_wins_and_patterns_match_whole_names() -> None:
    config = load_config(
        {
            "rules": [
                {"match": "model.layers.0.mlp.up_proj", "skip": True},
                {"match": ["re:.*\\.mlp\\..*", "model.embed_tokens"], "block_size": 8, "k": 256},
                {"match": "re:.*proj", "block_size": 4, "k": 4096},
            ]
        }
    )
    assert config.rule_for("model.layers.0.mlp.up_proj").skip  # type: ignore[union-attr]
    assert config.rule_for("model.layers.1.mlp.up_proj").block_size == 8  # type: ignore[union-attr]
    assert config.rule_for("model.embed_tokens").k == 256  # type: ignore[union-attr]
    assert config.rule_for("model.layers.1.self_attn.q_proj").k == 4096  # type: ignore[union-attr]
    # `re:` must match the whole name, an exact name only itself.
    assert config.rule_for("model.layers.1.self_attn.q_proj.lora") is None
    assert config.rule_for("model.embed_tokens2") is None


def test_fingerprint_depends_on_settings_not_on_spelling() -> None:
    a = load_config({"rules": [RULE], "seed": 0})
    b = load_config({"rules": [{**RULE, "match": ["re:.*"]}]})
    c = load_config({"rules": [RULE], "seed": 1})
    assert a.sha256 == b.sha256
    assert a.sha256 != c.sha256


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rules": [RULE], "sed": 1}, r"sed: unknown key \(a typo\?\)"),
        ({"rules": [{**RULE, "blocksize": 2}]}, r"rules\.0\.blocksize: unknown key"),
        ({"rules": [{**RULE, "k": 70000}]}, r"rules\.0\.k: Input should be less than or equal"),
        ({"rules": [{**RULE, "k": 1}]}, r"rules\.0\.k: Input should be greater than or equal"),
        ({"rules": [{"match": "x", "k": 256}]}, "a rule needs block_size and k"),
        ({"rules": [{**RULE, "match": "re:("}]}, "not a valid regular expression"),
        ({"rules": []}, "rules: List should have at least 1 item"),
        ({"rules": [RULE], "method": "kmeans"}, "method: Input should be 'pgkm'"),
        (
            {"rules": [RULE], "method": "faiss", "method_options": {"moves": 0.1}},
            r"method_options\.moves: unknown option for method 'faiss'",
        ),
        (
            {"rules": [RULE], "method_options": {"moves": 0.5}},
            r"method_options\.moves: Input should be less than or equal to 0\.25",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read it as YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_overrides_replace_file_values() -> None:
    config = load_config(CONFIGS / "ptq-4bit.yaml", method="faiss", seed=None)
    assert config.method == "faiss"
    assert config.seed == 0
