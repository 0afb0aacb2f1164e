"""Evaluation of original and quantized models on real text available offline.

* :mod:`~dist_pgkm.eval.text`: corpora (WordNet glosses, the Debian Reference, files,
  wikitext-2) and disjoint ``eval`` / ``calib`` token windows cut from them.
* :mod:`~dist_pgkm.eval.perplexity`: perplexity of a causal LM on those windows.
* :mod:`~dist_pgkm.eval.retrieval`: gloss-to-word retrieval for sentence-embedding models.

Nothing here imports transformers: models and tokenizers are passed in.
"""

from __future__ import annotations

from dist_pgkm.eval.perplexity import PerplexityResult, ProgressCallback, perplexity
from dist_pgkm.eval.retrieval import (
    RetrievalResult,
    definition,
    embed,
    retrieval_accuracy,
    retrieval_pairs,
)
from dist_pgkm.eval.text import (
    CORPORA,
    calibration_windows,
    load_text,
    token_windows,
    tokenize,
    windows_from_ids,
    wordnet_glosses,
)

__all__ = [
    "CORPORA",
    "PerplexityResult",
    "ProgressCallback",
    "RetrievalResult",
    "calibration_windows",
    "definition",
    "embed",
    "load_text",
    "perplexity",
    "retrieval_accuracy",
    "retrieval_pairs",
    "token_windows",
    "tokenize",
    "windows_from_ids",
    "wordnet_glosses",
]
