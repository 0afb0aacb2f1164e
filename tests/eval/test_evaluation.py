"""``evaluate()``'s pieces that need no model: the task rule, the JSON form, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_pgkm.config.quantize import CalibrationConfig
from dist_pgkm.errors import InvalidInputError, ModelSourceError
from dist_pgkm.eval import (
    Evaluation,
    PerplexityResult,
    RetrievalResult,
    calibration_ids,
    evaluate,
    is_causal_lm,
)


def _model_dir(path: Path, architectures: list[str]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": architectures}))
    return path


def test_is_causal_lm_reads_the_architectures(tmp_path: Path) -> None:
    assert is_causal_lm(_model_dir(tmp_path / "llama", ["LlamaForCausalLM"]))
    assert not is_causal_lm(_model_dir(tmp_path / "bert", ["BertModel"]))
    assert is_causal_lm(tmp_path / "missing")  # unreadable: the loader says what is wrong


def test_as_dict_is_the_eval_json() -> None:
    ppl = PerplexityResult(ppl=12.5, nll=2.5, n_tokens=511, n_windows=1, seconds=0.5)
    result = Evaluation(Path("m"), "ppl", True, perplexity=ppl, text=("wordnet",))
    assert list(result.as_dict()) == [
        "model", "task", "quantized", "ppl", "nll", "n_tokens", "n_windows", "seconds", "text",
    ]  # fmt: skip
    assert result.as_dict()["text"] == ["wordnet"]
    top1 = RetrievalResult(top1=0.5, n=2, n_candidates=2, seconds=0.1)
    retrieval = Evaluation(Path("m"), "retrieval", False, retrieval=top1).as_dict()
    assert retrieval == {"model": "m", "task": "retrieval", "quantized": False, **top1.as_dict()}


def test_evaluate_needs_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"no config\.json; `eval` needs"):
        evaluate(tmp_path)


def test_calibration_ids_need_a_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"calibration\.text is not set"):
        calibration_ids(tmp_path, CalibrationConfig())
