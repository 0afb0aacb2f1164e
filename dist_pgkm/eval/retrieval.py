"""Gloss-to-word retrieval with a sentence-embedding model, on WordNet nouns.

Each query is the definition of a WordNet noun synset that shares no word stem with its lemma;
the candidates are the lemmas of all the queries. A model scores a hit when the query's own
lemma is the nearest candidate (cosine similarity of mean-pooled, L2-normalised embeddings, the
sentence-transformers recipe for all-MiniLM-L6-v2). Chance level is ``1 / n``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.eval.text import wordnet_glosses

__all__ = [
    "RetrievalResult",
    "definition",
    "embed",
    "retrieval_accuracy",
    "retrieval_pairs",
    "training_texts",
]

logger = logging.getLogger(__name__)

# A gloss is the definition, then optional example sentences: `...; "an example"`.
_EXAMPLES = re.compile(r';\s*"')
_WORD = re.compile(r"\w+")
# Words sharing their first 4 letters count as the same word ("market" / "marketing"): with only
# whole-word filtering, even a randomly initialised encoder scored 20x chance on shared sub-words.
_STEM = 4


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """Top-1 accuracy of gloss-to-lemma retrieval.

    Attributes:
        top1: Fraction of queries whose own lemma is the most similar candidate.
        n: Queries evaluated.
        n_candidates: Candidates each query is ranked against (chance is ``1 / n_candidates``).
        seconds: Wall time, embedding included.
    """

    top1: float
    n: int
    n_candidates: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def definition(gloss: str) -> str:
    """Return a WordNet gloss without its example sentences.

    Args:
        gloss: A gloss as returned by :func:`dist_pgkm.eval.text.wordnet_glosses`.

    Returns:
        The text before the first ``; "`` (stripped).
    """
    return _EXAMPLES.split(gloss, maxsplit=1)[0].strip()


def _stems(text: str) -> set[str]:
    """The first :data:`_STEM` characters of each lowercased word of ``text``."""
    return {word[:_STEM] for word in _WORD.findall(text.lower())}


def _eligible(glosses: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (definition, lemma) pairs :func:`retrieval_pairs` draws from, in file order."""
    eligible: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lemma, gloss in glosses:
        query = definition(gloss)
        key = lemma.lower()
        if key in seen or not query or _stems(key) & _stems(query):
            continue
        seen.add(key)
        eligible.append((query, lemma))
    return eligible


def retrieval_pairs(
    n: int = 1000, seed: int = 0, path: Path | None = None
) -> list[tuple[str, str]]:
    """Pick ``n`` (definition, lemma) pairs from WordNet's nouns, deterministically.

    Rules, applied in file order. The query is the synset's definition: its gloss without the
    example sentences, which mostly quote the word itself. A synset is skipped when its lemma
    and definition share a word stem (the first 4 letters of a lowercased word; shorter words
    whole): retrieval must rest on meaning, not on shared letters ("shopping at a market" for
    "marketing" is skipped). Of the synsets sharing a lemma (case-insensitive, as the model is
    uncased), only the first kept one counts, so that the candidates are distinct. ``n`` of the
    eligible synsets are then drawn without replacement by ``torch.randperm`` under ``seed``
    and returned in file order.

    Args:
        n: Number of pairs, also the number of candidates each query is ranked against.
        seed: Seed of the draw.
        path: WordNet's ``data.noun``; the Debian location when None.

    Returns:
        ``n`` pairs ``(definition, lemma)`` with distinct lemmas.

    Raises:
        InvalidInputError: If ``n < 2`` or fewer than ``n`` synsets qualify.
        DataError: If the WordNet file is missing (see :func:`wordnet_glosses`).
    """
    if n < 2:
        raise InvalidInputError(f"n={n}: retrieval needs at least 2 pairs (1 is always a hit).")
    eligible = _eligible(wordnet_glosses(path))
    if n > len(eligible):
        raise InvalidInputError(
            f"n={n}: only {len(eligible)} WordNet synsets qualify (a distinct lemma sharing no "
            f"word stem with its definition). Use n <= {len(eligible)}."
        )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(eligible), generator=generator)[:n].sort().values
    return [eligible[i] for i in picks.tolist()]


def training_texts(path: Path | None = None) -> list[str]:
    """Texts to fine-tune a sentence encoder on that no retrieval query or candidate can be.

    :func:`retrieval_pairs` draws its pairs from the *eligible* synsets (see there), whatever
    ``n`` and ``seed``. This takes every other WordNet noun synset whose lemma is no eligible
    synset's lemma (case-insensitive) and returns its definition and its lemma, as two texts
    (the evaluation embeds both kinds: definitions as queries, lemmas as candidates). A text
    equal (case-insensitive) to an eligible definition or lemma is dropped as well. So a model
    trained on these never saw a query or a candidate of any draw. Of WordNet 3.0's 82,115
    noun synsets, 38,645 are eligible and 29,715 remain for training.

    Args:
        path: WordNet's ``data.noun``; the Debian location when None.

    Returns:
        The texts in file order: definition, lemma, definition, lemma, ...

    Raises:
        DataError: If the WordNet file is missing (see :func:`wordnet_glosses`).
    """
    glosses = wordnet_glosses(path)
    eligible = _eligible(glosses)
    lemmas = {lemma.lower() for _, lemma in eligible}
    held_out = lemmas | {query.lower() for query, _ in eligible}
    texts: list[str] = []
    for lemma, gloss in glosses:
        if lemma.lower() in lemmas:
            continue
        texts += [t for t in (definition(gloss), lemma) if t and t.lower() not in held_out]
    return texts


def embed(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 256,
) -> torch.Tensor:
    """Embed texts as sentence-transformers does for all-MiniLM-L6-v2.

    Mean of the last hidden states over the attention mask, then L2 normalisation. Texts are
    truncated to ``max_length`` tokens (the model's sentence-transformers setting is 256). The
    model runs under :func:`torch.inference_mode` in whatever mode it is in: call ``.eval()``
    first (:func:`retrieval_accuracy` does).

    Args:
        model: An encoder whose ``forward(**tokenizer_output)`` returns ``.last_hidden_state``
            (e.g. a Hugging Face ``BertModel``).
        tokenizer: Its Hugging Face tokenizer.
        texts: The texts to embed.
        batch_size: Texts per forward pass.
        max_length: Truncation length in tokens.

    Returns:
        Float32 tensor ``(len(texts), hidden)`` of unit rows, on the CPU, in the input order.

    Raises:
        InvalidInputError: If ``texts`` is empty.
    """
    if not texts:
        raise InvalidInputError("No texts to embed: pass at least one.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Longest first, as sentence-transformers does: batches of similar lengths pad little.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            encoded = tokenizer(
                [texts[i] for i in order[first : first + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**encoded).last_hidden_state.float()  # (b, seq, hidden)
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, seq, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, hidden)
            chunks.append(F.normalize(mean, dim=-1).cpu())
    return torch.cat(chunks)[torch.tensor(order).argsort()]  # back to the input order


def retrieval_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 64,
) -> RetrievalResult:
    """Top-1 accuracy of retrieving each query's own lemma among all the pairs' lemmas.

    Args:
        model: A sentence encoder, see :func:`embed`.
        tokenizer: Its tokenizer.
        pairs: ``(query, lemma)`` pairs with distinct lemmas, e.g. from :func:`retrieval_pairs`.
        batch_size: Texts per forward pass.

    Returns:
        The accuracy and counts. On ties the earlier candidate wins (``argmax``).

    Raises:
        InvalidInputError: If fewer than 2 pairs are given or their lemmas are not distinct.
    """
    if len(pairs) < 2:
        raise InvalidInputError(
            f"{len(pairs)} pairs given: retrieval needs at least 2 (1 is always a hit)."
        )
    queries = [query for query, _ in pairs]
    lemmas = [lemma for _, lemma in pairs]
    if len(set(lemmas)) != len(lemmas):
        raise InvalidInputError(
            "The pairs' lemmas are not distinct, so a hit would be ambiguous. Build the pairs "
            "with retrieval_pairs(), or remove the duplicates."
        )
    was_training = model.training
    start = time.perf_counter()
    model.eval()
    try:
        q = embed(model, tokenizer, queries, batch_size)  # (n, hidden)
        c = embed(model, tokenizer, lemmas, batch_size)  # (n, hidden)
    finally:
        model.train(was_training)
    best = (q @ c.T).argmax(dim=1)  # (n,) cosine similarity: rows are unit vectors
    hits = int((best == torch.arange(len(pairs))).sum())
    result = RetrievalResult(
        top1=hits / len(pairs),
        n=len(pairs),
        n_candidates=len(pairs),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "Retrieval top-1 %.4f (%d / %d, chance %.4f) in %.1f s",
        result.top1,
        hits,
        result.n,
        1 / result.n_candidates,
        result.seconds,
    )
    return result
