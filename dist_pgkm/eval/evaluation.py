"""Evaluate a model directory, quantized or original, the one way ``dist-pgkm eval`` does.

:func:`evaluate` loads the tokenizer and the model (a dist-pgkm checkpoint through
:func:`dist_pgkm.load`, anything else through transformers' auto classes) and measures either
held-out perplexity (causal LMs) or WordNet gloss-to-lemma retrieval (sentence encoders).
transformers is imported inside the functions, never at import time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.eval.perplexity import PerplexityResult, ProgressCallback, perplexity
from dist_pgkm.eval.retrieval import RetrievalResult, retrieval_accuracy, retrieval_pairs
from dist_pgkm.eval.text import load_text, token_windows

__all__ = ["Evaluation", "Task", "evaluate", "is_causal_lm", "model_directory"]

Task = Literal["ppl", "retrieval"]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        model: The model as given (a directory, or a GGUF / safetensors file).
        task: ``"ppl"`` or ``"retrieval"``.
        quantized: Whether the directory is a dist-pgkm checkpoint.
        perplexity: The result of ``task="ppl"`` (None otherwise).
        retrieval: The result of ``task="retrieval"`` (None otherwise).
        text: The texts the perplexity windows came from (``["wordnet"]`` by default; empty
            for retrieval).
    """

    model: Path
    task: Task
    quantized: bool
    perplexity: PerplexityResult | None = None
    retrieval: RetrievalResult | None = None
    text: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The evaluation as JSON-ready values (``dist-pgkm eval --json``)."""
        out: dict[str, Any] = {
            "model": str(self.model),
            "task": self.task,
            "quantized": self.quantized,
        }
        if self.perplexity is not None:
            out.update(self.perplexity.as_dict())
            out["text"] = list(self.text)
        if self.retrieval is not None:
            out.update(self.retrieval.as_dict())
        return out


def is_causal_lm(model_dir: Path) -> bool:
    """Whether ``model_dir/config.json`` names a ``*ForCausalLM`` architecture.

    A directory whose config cannot be read counts as a causal LM (the caller's loading then
    says what is wrong).
    """
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def model_directory(model: str | Path) -> Path:
    """The directory :func:`evaluate` loads for ``model``: what ``quantize`` takes, evaluated.

    A directory with a ``config.json`` (a Hugging Face model, a dist-pgkm checkpoint) is itself.
    Anything else is opened as ``quantize`` opens its MODEL
    (:func:`dist_pgkm.models.source.open_source`): a GGUF file, or a directory holding one, is
    the Hugging Face directory converted from it (converted on first use, then cached), so the
    perplexity is that of the weights ``quantize`` reads; a ``.safetensors`` file is the
    directory holding it with its ``config.json``.

    Raises:
        ModelSourceError: ``model`` cannot be opened, or has no ``config.json`` to build the
            model from (a bare ``.safetensors`` file).
    """
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    from dist_pgkm.models.source import open_source

    source = open_source(path)
    if source.model_dir is None or not (source.model_dir / "config.json").is_file():
        raise ModelSourceError(
            f"{path}: no config.json beside the weights; `eval` builds the model from a Hugging "
            "Face model directory, the --out directory of `dist-pgkm quantize`, or a GGUF file. "
            "Put the model's config.json (and tokenizer files) next to the .safetensors file."
        )
    return source.model_dir


def evaluate(
    model_dir: str | Path,
    task: Task | None = None,
    *,
    text: Sequence[str | Path] = (),
    tokens: int = 8192,
    window: int = 512,
    batch_size: int = 4,
    pairs: int = 1000,
    verify: bool | None = None,
    progress: ProgressCallback | None = None,
) -> Evaluation:
    """Evaluate a quantized checkpoint or an original model the same way.

    Args:
        model_dir: A dist-pgkm checkpoint (the ``--out`` directory of quantize or finetune), a
            Hugging Face model directory, or any other model ``quantize`` takes (a GGUF file or
            a directory holding one, a ``.safetensors`` file beside its ``config.json``; see
            :func:`model_directory`).
        task: ``"ppl"``: perplexity on held-out windows of real text; ``"retrieval"``: WordNet
            gloss-to-lemma top-1 for sentence encoders. None: ``"ppl"`` for causal LMs
            (:func:`is_causal_lm`), ``"retrieval"`` otherwise.
        text: Text files or corpus names for the perplexity (:func:`load_text`; default
            ``wordnet``).
        tokens: Tokens to evaluate, rounded up to whole windows.
        window: Tokens per window.
        batch_size: Windows per forward.
        pairs: Retrieval queries.
        verify: For a checkpoint: check its files' sha256 before loading (see
            :func:`dist_pgkm.load`; None follows ``DIST_PGKM_VERIFY``).
        progress: Called with ``(done, total, description)`` during the perplexity.

    Returns:
        The :class:`Evaluation`.

    Raises:
        ModelSourceError: ``model_dir`` is none of these (:func:`model_directory`).
        InvalidInputError: The text is too short for ``tokens``, or the options are invalid.
    """
    import transformers

    from dist_pgkm.checkpoint.hf import load

    given = Path(model_dir)
    model_dir = model_directory(given)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    quantized = config.get("quantization_config", {}).get("quant_method") == "pgkm"
    task = task or ("ppl" if is_causal_lm(model_dir) else "retrieval")
    auto: Any = transformers.AutoTokenizer
    tokenizer = auto.from_pretrained(str(model_dir))
    if quantized:
        model = load(model_dir, verify=verify)
    else:
        cls: Any = transformers.AutoModelForCausalLM if task == "ppl" else transformers.AutoModel
        model = cls.from_pretrained(str(model_dir))
    if task == "ppl":
        windows = token_windows(tokenizer, load_text(list(text)), window=window, n_tokens=tokens)
        ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
        names = tuple(str(t) for t in text) or ("wordnet",)
        return Evaluation(given, task, quantized, perplexity=ppl, text=names)
    retrieval = retrieval_accuracy(model, tokenizer, retrieval_pairs(pairs))
    return Evaluation(given, task, quantized, retrieval=retrieval)
