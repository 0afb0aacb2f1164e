"""Real English text available offline, and held-out token windows cut from it.

Three corpora need no network:

* ``wordnet``: the ~82k noun glosses of WordNet 3.0 (Debian package ``wordnet-base``), the
  default. :func:`load_text` writes one ``"lemma: gloss\\n"`` line per synset, in file order.
* ``debian-reference``: the English Debian Reference manual (``debian-reference-en``), read from
  its plain-text edition, or from its HTML chapters with the tags stripped when that is absent.
* Any UTF-8 text file, gzip-compressed when its name ends in ``.gz``.

With internet access, ``wikitext-2`` (the raw test split of WikiText-2, through the optional
``datasets`` package) is the usual benchmark text.

:func:`token_windows` (:func:`tokenize` then :func:`windows_from_ids`) cuts a tokenized corpus
into non-overlapping windows and hands out two disjoint sets of them, ``"eval"`` and
``"calib"``, so that calibration never sees evaluation text. :func:`calibration_windows` is
the ``"calib"`` split as ``quantize --calib`` uses it; :func:`calibration_ids` the same for a
model and a config's ``calibration`` section (it loads the model's tokenizer).
"""

from __future__ import annotations

import gzip
import html.parser
import importlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from dist_pgkm.errors import DataError, InvalidInputError, ModelSourceError

if TYPE_CHECKING:
    from dist_pgkm.config.quantize import CalibrationConfig

__all__ = [
    "CORPORA",
    "DEBIAN_REFERENCE_DIR",
    "WORDNET_NOUNS",
    "Split",
    "TextTokenizer",
    "calibration_ids",
    "calibration_windows",
    "load_text",
    "token_windows",
    "tokenize",
    "windows_from_ids",
    "wordnet_glosses",
]

logger = logging.getLogger(__name__)

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
"""WordNet's noun synsets as installed by the Debian package ``wordnet-base``."""

DEBIAN_REFERENCE_DIR = Path("/usr/share/debian-reference")
"""Where the Debian package ``debian-reference-en`` installs the manual."""

CORPORA = ("wordnet", "debian-reference", "wikitext-2")
"""Names :func:`load_text` accepts in place of a file."""

Split = Literal["eval", "calib"]

_DEBIAN_REFERENCE_TEXT = "debian-reference.en.txt.gz"
_WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")
# WordNet's data files open with the license, each line indented by two spaces.
_LICENSE_PREFIX = "  "
_GLOSS_SEPARATOR = " | "


class TextTokenizer(Protocol):
    """What :func:`token_windows` needs from a tokenizer (any Hugging Face tokenizer fits)."""

    def __call__(
        self, text: str, *, add_special_tokens: bool = ..., verbose: bool = ...
    ) -> Mapping[str, Any]:
        """Tokenize ``text``; the result maps ``"input_ids"`` to a list of token ids."""
        ...


def wordnet_glosses(path: Path | None = None) -> list[tuple[str, str]]:
    """Read the (lemma, gloss) pair of every synset in a WordNet ``data.noun`` file.

    Args:
        path: The WordNet data file; :data:`WORDNET_NOUNS` when None.

    Returns:
        One pair per synset, in file order. The lemma is the synset's first word with
        underscores turned into spaces (``"physical entity"``); the gloss is the text after
        ``" | "``: the definition, then any example sentences in double quotes.

    Raises:
        DataError: If the file does not exist (the message says how to install it), cannot be
            read, or is not a WordNet data file.
    """
    path = WORDNET_NOUNS if path is None else Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(
            f"WordNet's noun glosses are not installed: {path} does not exist. Install them "
            "with `apt-get install wordnet-base`, or pass your own text with `--text FILE`."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Cannot read WordNet's noun glosses from {path} ({exc}). Reinstall them with "
            "`apt-get install --reinstall wordnet-base`, or pass your own text with `--text FILE`."
        ) from exc
    pairs: list[tuple[str, str]] = []
    for line in lines:
        if not line or line.startswith(_LICENSE_PREFIX):
            continue
        # synset_offset lex_filenum ss_type w_cnt word lex_id ... | gloss
        fields = line.split(" ", 5)
        _, separator, gloss = line.partition(_GLOSS_SEPARATOR)
        if len(fields) < 6 or not separator:
            raise DataError(
                f"{path} is not a WordNet data file: the line {line[:80]!r} has no word and "
                "gloss. Reinstall it with `apt-get install --reinstall wordnet-base`, or pass "
                "your own text with `--text FILE`."
            )
        pairs.append((fields[4].replace("_", " "), gloss.strip()))
    if not pairs:
        raise DataError(
            f"{path} holds no WordNet synset. Reinstall it with "
            "`apt-get install --reinstall wordnet-base`, or pass your own text with `--text FILE`."
        )
    logger.debug("Read %d synsets from %s", len(pairs), path)
    return pairs


def load_text(sources: Sequence[str | Path] = ()) -> str:
    """Return a corpus: the concatenation of files and named corpora.

    An entry naming an existing path is read as a file; any other entry must be one of
    :data:`CORPORA` (so a file called ``wordnet`` in the working directory shadows the corpus).

    Args:
        sources: Files (UTF-8; gzip-compressed when the name ends in ``.gz``) and corpus names:
            ``"wordnet"`` (one ``"lemma: gloss\\n"`` line per WordNet noun synset, in file
            order), ``"debian-reference"`` (the English Debian Reference as plain text) and
            ``"wikitext-2"`` (the raw WikiText-2 test split, needs ``datasets`` and either
            internet access or its cache). Empty means ``["wordnet"]``.

    Returns:
        The texts in the given order, each ending with a newline.

    Raises:
        DataError: If a file or a corpus cannot be found or read, or an entry is a directory.
    """
    texts = [_read_source(source) for source in (sources or ("wordnet",))]
    return "".join(text if text.endswith("\n") else text + "\n" for text in texts)


def tokenize(tokenizer: TextTokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus in one call, without special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer, or anything called as
            ``tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]``.
        text: The corpus, e.g. from :func:`load_text`.

    Returns:
        The token ids, int64, shape ``(n_tokens,)``.
    """
    # verbose=False: the corpus is longer than the model's context, which is fine here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def windows_from_ids(
    ids: torch.Tensor, window: int = 512, n_tokens: int = 8192, split: Split = "eval"
) -> torch.Tensor:
    """Return held-out, non-overlapping windows of a token stream.

    The stream is cut into ``W = len(ids) // window`` consecutive windows (the tail is dropped).
    Windows with an even index belong to ``"eval"``, odd ones to ``"calib"``, so the two splits
    never share a token. Each call takes ``n = ceil(n_tokens / window)`` windows of its split,
    spread evenly over the whole stream (the ``j``-th is candidate ``floor(j * C / n)`` of the
    split's ``C`` candidates), so that a corpus sorted by topic, as WordNet is, is sampled
    everywhere and not only at its start.

    Args:
        ids: 1-D token ids, e.g. from :func:`tokenize`.
        window: Tokens per window (the sequence length fed to the model).
        n_tokens: Tokens wanted; rounded up to whole windows.
        split: ``"eval"`` or ``"calib"``.

    Returns:
        A new int64 tensor of shape ``(n, window)``; the same inputs give the same windows.

    Raises:
        InvalidInputError: If ``ids`` is not 1-D, ``window < 2``, ``n_tokens < 1`` or
            ``split`` is unknown, or if the stream holds fewer than ``n`` windows of the split.
    """
    if ids.dim() != 1:
        raise InvalidInputError(
            f"ids has shape {tuple(ids.shape)}: pass the 1-D token stream from tokenize()."
        )
    if window < 2:
        raise InvalidInputError(
            f"window={window}: a window needs at least 2 tokens (one context, one predicted)."
        )
    if n_tokens < 1:
        raise InvalidInputError(f"n_tokens={n_tokens}: ask for at least one token.")
    if split not in ("eval", "calib"):
        raise InvalidInputError(f"split={split!r}: use 'eval' or 'calib'.")
    n_windows = ids.numel() // window
    windows = ids[: n_windows * window].reshape(n_windows, window)  # (W, window)
    candidates = windows[(0 if split == "eval" else 1) :: 2]  # (C, window)
    n = math.ceil(n_tokens / window)
    if n > candidates.shape[0]:
        raise InvalidInputError(
            f"The text is too short: {n_tokens} tokens in windows of {window} need {n} "
            f"{split!r} windows, but its {ids.numel()} tokens make {n_windows} windows, of "
            f"which {candidates.shape[0]} are {split!r} windows (every other window is held out "
            f"for the other split). Pass a longer text (e.g. more files), or lower n_tokens to "
            f"at most {candidates.shape[0] * window}."
        )
    picks = torch.arange(n) * candidates.shape[0] // n
    return candidates[picks].to(torch.int64)  # advanced indexing copies


def token_windows(
    tokenizer: TextTokenizer,
    text: str,
    window: int = 512,
    n_tokens: int = 8192,
    split: Split = "eval",
) -> torch.Tensor:
    """Tokenize ``text`` once and return held-out windows of it.

    Same as ``windows_from_ids(tokenize(tokenizer, text), window, n_tokens, split)``; call
    those two directly to cut both splits from one tokenization. No special token is added:
    every window starts mid-text, and its first token is not predicted.

    The defaults give 16 windows of 512 tokens, of which 8,176 are predicted.

    Args:
        tokenizer: See :func:`tokenize`.
        text: The corpus, e.g. from :func:`load_text`.
        window: Tokens per window.
        n_tokens: Tokens wanted; rounded up to whole windows.
        split: ``"eval"`` or ``"calib"``; see :func:`windows_from_ids` for the rule.

    Returns:
        An int64 tensor of shape ``(ceil(n_tokens / window), window)``.

    Raises:
        InvalidInputError: See :func:`windows_from_ids`; the message says how long the text
            must be.
    """
    return windows_from_ids(tokenize(tokenizer, text), window, n_tokens, split)


def calibration_windows(
    tokenizer: TextTokenizer, text: str, samples: int, seq_len: int
) -> torch.Tensor:
    """The ``samples`` calibration windows of ``seq_len`` tokens of a text (``"calib"`` split).

    Every other window of the text is held out for evaluation (:func:`windows_from_ids`), so
    the text needs at least ``2 * samples * seq_len`` tokens.

    Args:
        tokenizer: The model's tokenizer (see :func:`tokenize`).
        text: The calibration corpus, e.g. from :func:`load_text`.
        samples: Windows wanted (``calibration.samples``, ``--calib-samples``).
        seq_len: Tokens per window (``calibration.seq_len``).

    Returns:
        ``(samples, seq_len)`` int64 token ids, spread over the whole text.

    Raises:
        InvalidInputError: ``samples`` or ``seq_len`` out of range, or the text is too short
            for them (the message gives its length and the largest ``samples`` it allows).
    """
    if samples < 1 or seq_len < 2:
        raise InvalidInputError(
            f"calibration samples={samples}, seq_len={seq_len}: at least 1 window of at least "
            "2 tokens is needed."
        )
    ids = tokenize(tokenizer, text)
    available = ids.numel() // seq_len // 2  # odd windows: the calibration split
    if samples > available:
        fewer = (
            f"lower --calib-samples (calibration.samples) to at most {available}, "
            if available
            else ""
        )
        raise InvalidInputError(
            f"The calibration text is too short: {samples} samples of {seq_len} tokens need "
            f"{2 * samples * seq_len:,} tokens (every other window is held out for evaluation), "
            f"but it has {ids.numel():,} tokens, enough for {available} samples. Pass a longer "
            f"text (another corpus, or a larger file), {fewer}or lower calibration.seq_len."
        )
    return windows_from_ids(ids, seq_len, samples * seq_len, "calib")


def calibration_ids(model: str | Path, calibration: CalibrationConfig) -> torch.Tensor:
    """The calibration token windows of a quantize config's ``calibration`` under the model's
    tokenizer: what ``quantize_model(calib_ids=...)`` takes for rules with ``metric: hessian``.

    Args:
        model: The model as ``quantize_model`` takes it; its Hugging Face directory must hold
            the tokenizer files.
        calibration: ``config.calibration``: the text (a corpus name or a file, see
            :func:`load_text`), ``samples`` and ``seq_len``.

    Returns:
        ``(calibration.samples, calibration.seq_len)`` int64 token ids
        (:func:`calibration_windows`).

    Raises:
        InvalidInputError: ``calibration.text`` is not set, or the text is too short.
        ModelSourceError: The model has no directory with a tokenizer, or its tokenizer does
            not load.
    """
    import transformers

    from dist_pgkm.models.source import open_source

    if calibration.text is None:
        raise InvalidInputError(
            "calibration.text is not set: name a corpus (wordnet, debian-reference, wikitext-2) "
            "or a text file in the config's calibration section."
        )
    source = open_source(model)
    if source.model_dir is None:
        raise ModelSourceError(
            f"{model} has no model directory with a tokenizer, so the calibration text cannot "
            "be tokenized. Pass the Hugging Face directory of the model (config.json and "
            "tokenizer files next to the weights)."
        )
    auto: Any = transformers.AutoTokenizer
    try:
        tokenizer = auto.from_pretrained(str(source.model_dir))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"Cannot load the tokenizer of {source.model_dir} ({exc}); the calibration text "
            "cannot be tokenized. Copy the model's tokenizer files next to its config.json."
        ) from exc
    text = load_text([calibration.text])
    return calibration_windows(tokenizer, text, calibration.samples, calibration.seq_len)


def _read_source(source: str | Path) -> str:
    path = Path(source)
    if path.is_dir():
        raise DataError(
            f"{path} is a directory; pass text files (a shell glob such as {path}/*.txt works)."
        )
    if path.exists():
        return _read_file(path)
    name = str(source)
    if name == "wordnet":
        return "".join(f"{lemma}: {gloss}\n" for lemma, gloss in wordnet_glosses())
    if name == "debian-reference":
        return _debian_reference()
    if name == "wikitext-2":
        return _wikitext_2()
    raise DataError(
        f"{name!r} is neither an existing file nor a known corpus ({', '.join(CORPORA)}). "
        "Check the path, or pass one of those names."
    )


def _read_file(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Cannot read {path} as {'gzip-compressed ' if path.suffix == '.gz' else ''}UTF-8 "
            f"text ({exc}). Pass a UTF-8 text file, or a .gz file holding one."
        ) from exc


def _debian_reference() -> str:
    plain = DEBIAN_REFERENCE_DIR / _DEBIAN_REFERENCE_TEXT
    if plain.is_file():
        return _read_file(plain)
    # Some releases ship the HTML pages only; they are read in file-name order.
    pages = sorted(DEBIAN_REFERENCE_DIR.glob("*.en.html"))
    if not pages:
        raise DataError(
            f"The English Debian Reference is not installed: {DEBIAN_REFERENCE_DIR} holds "
            f"neither {_DEBIAN_REFERENCE_TEXT} nor *.en.html. Install it with "
            "`apt-get install debian-reference-en`, or pass your own text with `--text FILE`."
        )
    return "\n".join(_html_text(_read_file(page)) for page in pages)


class _TextExtractor(html.parser.HTMLParser):
    """Collects the character data of an HTML page outside ``<script>`` and ``<style>``.

    Block elements start and end lines, so that headings and paragraphs do not run together.
    """

    _HIDDEN = frozenset({"script", "style"})
    _BLOCKS = frozenset(
        {"br", "dd", "div", "dt", "li", "p", "pre", "td", "th", "title", "tr"}
        | {f"h{level}" for level in range(1, 7)}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._skip = max(self._skip - 1, 0)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_text(page: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(page)
    extractor.close()
    lines = (line.strip() for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _wikitext_2() -> str:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise DataError(
            "wikitext-2 is read with the `datasets` package, which is not installed. Install it "
            "with `pip install datasets` (it downloads the text once, then works offline), or "
            "use an offline corpus: 'wordnet', 'debian-reference' or `--text FILE`."
        ) from exc
    path, config, split = _WIKITEXT
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except OSError as exc:  # ConnectionError, missing cache files, hub errors
        raise DataError(
            f"Cannot load wikitext-2 ({path}/{config}, {split} split) with `datasets`: {exc}. "
            "It needs internet access the first time (or HF_DATASETS_OFFLINE=1 with a filled "
            "cache); otherwise use 'wordnet', 'debian-reference' or `--text FILE`."
        ) from exc
    # The usual construction for WikiText perplexity: the raw lines joined by blank lines.
    return "\n\n".join(str(line) for line in rows["text"])
