"""Tests for dist_pgkm.eval.retrieval: the pair rules, a float64 reference and real MiniLM."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dist_pgkm.errors import DataError, InvalidInputError
from dist_pgkm.eval import definition, embed, retrieval_accuracy, retrieval_pairs
from dist_pgkm.eval.retrieval import training_texts

# WordNet 3.0 noun synsets with a distinct lemma that shares no 4-letter word stem with its
# definition.
ELIGIBLE = 38_645
# all-MiniLM-L6-v2 on retrieval_pairs(1000, seed=0): 229 hits, measured with torch 2.13 CPU and
# transformers 5.24. +-0.02 leaves room for BLAS rounding flipping a few near-ties.
MINILM_TOP1 = 0.229
MINILM_TOP1_ATOL = 0.02
# A randomly initialised BertModel of the same config: 0.005 (chance is 0.001).
RANDOM_TOP1_MAX = 0.02


@pytest.fixture(scope="module")
def pairs(wordnet_text: str) -> list[tuple[str, str]]:
    return retrieval_pairs()


def _stems(text: str) -> set[str]:
    return {w[:4] for w in "".join(c if c.isalnum() else " " for c in text.lower()).split()}


def test_definition_drops_examples() -> None:
    assert definition('a whole; "lard was used"; "and more"') == "a whole"
    assert definition("a river (in Switzerland); a border") == "a river (in Switzerland); a border"


def test_pairs_follow_the_rules(pairs: list[tuple[str, str]]) -> None:
    assert len(pairs) == 1000
    lemmas = [lemma.lower() for _, lemma in pairs]
    assert len(set(lemmas)) == 1000
    assert all(query and not _stems(query) & _stems(lemma) for query, lemma in pairs)
    assert all('"' not in query for query, _ in pairs)  # no example sentences
    assert retrieval_pairs() == pairs  # deterministic
    other = retrieval_pairs(seed=1)
    assert len(set(other) & set(pairs)) < 100  # ~1000 * 1000 / 38,645 = 26 expected


def test_pair_count_limits(wordnet_text: str) -> None:
    assert len(retrieval_pairs(n=ELIGIBLE)) == ELIGIBLE
    with pytest.raises(InvalidInputError, match=f"only {ELIGIBLE} WordNet synsets qualify"):
        retrieval_pairs(n=ELIGIBLE + 1)
    with pytest.raises(InvalidInputError, match="at least 2 pairs"):
        retrieval_pairs(n=1)


def test_training_texts_are_no_query_or_candidate_of_any_draw(wordnet_text: str) -> None:
    texts = training_texts()
    # 29,715 synsets whose lemma no eligible synset has, a definition and a lemma each, less
    # 129 texts equal to an eligible definition or lemma.
    assert len(texts) == 59_301
    every_pair = retrieval_pairs(n=ELIGIBLE)  # every query and candidate of any draw
    held_out = {text.lower() for pair in every_pair for text in pair}
    assert not held_out & {text.lower() for text in texts}
    assert texts[:2] == ["an entity that has physical existence", "physical entity"]
    assert texts == training_texts()  # deterministic


def test_missing_wordnet_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        retrieval_pairs(path=tmp_path / "data.noun")


def test_minilm_top1(minilm: tuple[Any, Any], pairs: list[tuple[str, str]]) -> None:
    model, tokenizer = minilm
    result = retrieval_accuracy(model, tokenizer, pairs)
    assert (result.n, result.n_candidates) == (1000, 1000)
    assert result.top1 == pytest.approx(MINILM_TOP1, abs=MINILM_TOP1_ATOL)
    assert result.as_dict()["top1"] == result.top1


def test_random_init_is_near_chance(minilm: tuple[Any, Any], pairs: list[tuple[str, str]]) -> None:
    import transformers

    model, tokenizer = minilm
    torch.manual_seed(0)
    random_model = transformers.AutoModel.from_config(model.config)
    random_model.train()
    result = retrieval_accuracy(random_model, tokenizer, pairs)
    assert result.top1 < RANDOM_TOP1_MAX
    assert random_model.training  # the caller's mode is restored


def test_matches_float64_brute_force(minilm: tuple[Any, Any], pairs: list[tuple[str, str]]) -> None:
    model, tokenizer = minilm
    subset = pairs[::20]  # 50 pairs
    model64 = copy.deepcopy(model).double()

    def one(text: str) -> torch.Tensor:
        # No batching, no padding: the plain mean of the token states, then unit length.
        encoded = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model64(**encoded).last_hidden_state[0]  # (seq, hidden)
        return F.normalize(hidden.mean(0), dim=0)

    queries = torch.stack([one(q) for q, _ in subset])
    lemmas = torch.stack([one(lemma) for _, lemma in subset])
    similarity = queries @ lemmas.T  # (50, 50) float64
    hits = int((similarity.argmax(1) == torch.arange(len(subset))).sum())
    # The float32, padded, length-sorted path must agree hit for hit, barring a near-tie.
    result = retrieval_accuracy(model, tokenizer, subset, batch_size=16)
    assert result.top1 == hits / len(subset)
    assert embed(model, tokenizer, [q for q, _ in subset]).double().sub(queries).abs().max() < 1e-5


def test_bad_pairs_raise(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    with pytest.raises(InvalidInputError, match="not distinct"):
        retrieval_accuracy(model, tokenizer, [("a feline", "cat"), ("a pet", "cat")])
    with pytest.raises(InvalidInputError, match="at least 2"):
        retrieval_accuracy(model, tokenizer, [("a feline", "cat")])
    with pytest.raises(InvalidInputError, match="No texts"):
        embed(model, tokenizer, [])
