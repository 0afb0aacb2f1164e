"""Evaluation of original and quantized models on real text available offline.

* :mod:`~dist_pgkm.eval.text`: corpora (WordNet glosses, the Debian Reference, files,
  wikitext-2) and disjoint ``eval`` / ``calib`` token windows cut from them.
* :mod:`~dist_pgkm.eval.perplexity`: perplexity of a causal LM on those windows.
* :mod:`~dist_pgkm.eval.retrieval`: gloss-to-word retrieval for sentence-embedding models.
* :mod:`~dist_pgkm.eval.evaluation`: :func:`evaluate`, a model directory (quantized or not)
  loaded and measured by one of the two, as ``dist-pgkm eval`` does.

Models and tokenizers are passed in, except to :func:`evaluate` and
:func:`~dist_pgkm.eval.text.calibration_ids`, which load them from a model directory; they
import transformers when called, nothing here does at import time.
"""

from __future__ import annotations

from dist_pgkm.eval.evaluation import Evaluation, evaluate, is_causal_lm, model_directory
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
    calibration_ids,
    calibration_windows,
    load_text,
    token_windows,
    tokenize,
    windows_from_ids,
    wordnet_glosses,
)

__all__ = [
    "CORPORA",
    "Evaluation",
    "PerplexityResult",
    "ProgressCallback",
    "RetrievalResult",
    "calibration_ids",
    "calibration_windows",
    "definition",
    "embed",
    "evaluate",
    "is_causal_lm",
    "load_text",
    "model_directory",
    "perplexity",
    "retrieval_accuracy",
    "retrieval_pairs",
    "token_windows",
    "tokenize",
    "windows_from_ids",
    "wordnet_glosses",
]
