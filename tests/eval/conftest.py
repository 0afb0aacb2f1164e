"""Real models and text for the evaluation tests, loaded once per session.

Tests that need them are skipped with the reason when a model package or WordNet is missing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dist_pgkm.errors import DataError, ModelSourceError
from dist_pgkm.eval import load_text, tokenize, windows_from_ids


@pytest.fixture(scope="session")
def wordnet_text() -> str:
    try:
        return load_text()
    except DataError as exc:
        pytest.skip(f"WordNet is not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of the original SmolLM2-135M-Instruct, fp32."""
    from dist_pgkm.models.offline import smollm2_dir

    transformers = pytest.importorskip("transformers")
    try:
        path = smollm2_dir()
    except ModelSourceError as exc:
        pytest.skip(str(exc))
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def wordnet_windows(smollm2: tuple[Any, Any], wordnet_text: str) -> dict[str, torch.Tensor]:
    """The default eval and calib windows of WordNet under SmolLM2's tokenizer."""
    ids = tokenize(smollm2[1], wordnet_text)  # the one tokenization of the session (~5 s)
    return {split: windows_from_ids(ids, split=split) for split in ("eval", "calib")}


@pytest.fixture(scope="session")
def minilm() -> tuple[Any, Any]:
    """(model, tokenizer) of the original all-MiniLM-L6-v2."""
    from dist_pgkm.models.offline import minilm_dir

    transformers = pytest.importorskip("transformers")
    try:
        path = minilm_dir()
    except ModelSourceError as exc:
        pytest.skip(str(exc))
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)
