"""Tests for dist_pgkm.eval.text: offline corpora and disjoint eval / calib windows."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_pgkm.errors import DataError, InvalidInputError
from dist_pgkm.eval import load_text, token_windows, windows_from_ids, wordnet_glosses
from dist_pgkm.eval import text as text_module

# WordNet 3.0 as shipped by Debian's wordnet-base.
WORDNET_SYNSETS = 82115
FIRST_GLOSS = (
    "that which is perceived or known or inferred to have its own distinct existence "
    "(living or nonliving)"
)


class CharTokenizer:
    """One token per character (its code point); records how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        assert kwargs == {"add_special_tokens": False, "verbose": False}
        self.calls += 1
        return {"input_ids": [ord(c) for c in text]}


# ---------------------------------------------------------------- WordNet


def test_wordnet_glosses_parses_every_synset(wordnet_text: str) -> None:
    pairs = wordnet_glosses()
    assert len(pairs) == WORDNET_SYNSETS
    assert pairs[0] == ("entity", FIRST_GLOSS)
    assert pairs[1][0] == "physical entity"  # physical_entity: underscores become spaces
    # A gloss keeps its examples; no license line slipped through.
    assert pairs[6] == (
        "congener",
        'a whole (a thing or person) of the same kind or category as another; "lard was also '
        'used, though its congener, butter, was more frequently employed"; "the American '
        'shopkeeper differs from his European congener"',
    )
    assert not any("LICENSEE" in gloss for _, gloss in pairs)
    assert wordnet_text.startswith(f"entity: {FIRST_GLOSS}\nphysical entity: ")
    assert wordnet_text.count("\n") == WORDNET_SYNSETS


def test_missing_wordnet_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "wordnet" / "data.noun"
    with pytest.raises(DataError, match=r"apt-get install wordnet-base.*--text FILE") as info:
        wordnet_glosses(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # The default corpus goes through the same check.
    monkeypatch.setattr(text_module, "WORDNET_NOUNS", missing)
    with pytest.raises(DataError, match=r"does not exist.*apt-get install wordnet-base"):
        load_text()


def test_wordnet_parser_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "data.noun"
    bad.write_text("  license line\nnot a synset line\n", encoding="utf-8")
    with pytest.raises(DataError, match="is not a WordNet data file"):
        wordnet_glosses(bad)
    bad.write_text("  only a license\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no WordNet synset"):
        wordnet_glosses(bad)


def test_wordnet_parser_on_a_built_file(tmp_path: Path) -> None:
    path = tmp_path / "data.noun"
    path.write_text(
        "  1 license\n  2 more license  \n"
        '00001740 03 n 02 ice_cream 0 icecream 0 000 | frozen dessert; "ice cream | cake"  \n'
        "00001930 03 n 01 Aare 0 001 @ 00001740 n 0000 | a river  \n",
        encoding="utf-8",
    )
    assert wordnet_glosses(path) == [
        ("ice cream", 'frozen dessert; "ice cream | cake"'),
        ("Aare", "a river"),
    ]


# ---------------------------------------------------------------- other corpora


def test_files_are_concatenated_in_order(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("first file", encoding="utf-8")
    packed = tmp_path / "b.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write("second file, compressed: é\n")
    assert load_text([plain, str(packed)]) == "first file\nsecond file, compressed: é\n"


def test_bad_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is a directory; pass text files"):
        load_text([tmp_path])
    with pytest.raises(DataError, match=r"neither an existing file nor a known corpus"):
        load_text([tmp_path / "missing.txt"])
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        load_text([binary])
    fake_gz = tmp_path / "y.txt.gz"
    fake_gz.write_text("not gzip", encoding="utf-8")
    with pytest.raises(DataError, match="gzip-compressed UTF-8"):
        load_text([fake_gz])


def test_wikitext_without_datasets_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install datasets.*'wordnet'"):
        load_text(["wikitext-2"])


def test_debian_reference_plain_text() -> None:
    if not (text_module.DEBIAN_REFERENCE_DIR / "debian-reference.en.txt.gz").is_file():
        pytest.skip("debian-reference-en is not installed")
    text = load_text(["debian-reference"])
    assert text.startswith("Debian Reference")
    assert len(text) > 500_000
    assert "<html" not in text


def test_debian_reference_html_fallback_and_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(text_module, "DEBIAN_REFERENCE_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install debian-reference-en"):
        load_text(["debian-reference"])
    (tmp_path / "ch01.en.html").write_text(
        "<html><head><style>p {color: red}</style><script>var x = 1;</script></head>"
        "<body><h1>Tutorials</h1><p>Use <code>ls</code> &amp; friends.</p></body></html>",
        encoding="utf-8",
    )
    (tmp_path / "ch02.en.html").write_text("<p>Second</p>", encoding="utf-8")
    assert load_text(["debian-reference"]) == "Tutorials\nUse ls & friends.\nSecond\n"


# ---------------------------------------------------------------- windows


def test_windows_shape_and_spread() -> None:
    ids = torch.arange(10_000)  # a token's id is its position
    out = windows_from_ids(ids, window=100, n_tokens=1000)
    assert out.shape == (10, 100)
    assert out.dtype == torch.int64
    # Every window is a contiguous run that starts on a window boundary.
    assert torch.equal(out - out[:, :1], torch.arange(100).expand(10, 100))
    starts = (out[:, 0] // 100).tolist()
    # 100 windows: 50 eval candidates (even indices), 10 of them evenly spread.
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    calib = windows_from_ids(ids, window=100, n_tokens=1000, split="calib")
    assert (calib[:, 0] // 100).tolist() == [s + 1 for s in starts]
    # n_tokens is rounded up to whole windows; the tail that fills no window is dropped.
    assert windows_from_ids(ids[:9_999], window=100, n_tokens=101).shape == (2, 100)


def test_windows_are_deterministic_and_eval_calib_disjoint() -> None:
    tokenizer = CharTokenizer()
    text = "".join(chr(0x4E00 + i) for i in range(20_000))  # distinct tokens
    a = token_windows(tokenizer, text, window=64, n_tokens=4096)
    b = token_windows(tokenizer, text, window=64, n_tokens=4096)
    calib = token_windows(tokenizer, text, window=64, n_tokens=4096, split="calib")
    assert tokenizer.calls == 3
    assert a.shape == calib.shape == (64, 64)
    assert torch.equal(a, b)
    assert not set(a.flatten().tolist()) & set(calib.flatten().tolist())
    # All the candidates of both splits: together they tile the stream without overlap.
    n = 20_000 // 64
    every_eval = windows_from_ids(torch.arange(20_000), 64, (n + 1) // 2 * 64, "eval")
    every_calib = windows_from_ids(torch.arange(20_000), 64, n // 2 * 64, "calib")
    tiled = torch.cat([every_eval, every_calib]).flatten().sort().values
    assert torch.equal(tiled, torch.arange(n * 64))


def test_too_short_text_raises_with_the_fix() -> None:
    with pytest.raises(InvalidInputError, match=r"too short.*lower n_tokens to at most 1024"):
        token_windows(CharTokenizer(), "x" * 2_100, window=512, n_tokens=2048)
    with pytest.raises(InvalidInputError, match=r"too short.*of which 0 are 'calib' windows"):
        windows_from_ids(torch.arange(600), window=512, n_tokens=1, split="calib")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, "at least 2 tokens"),
        ({"n_tokens": 0}, "at least one token"),
        ({"split": "test"}, "use 'eval' or 'calib'"),
    ],
)
def test_window_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        windows_from_ids(torch.arange(10_000), **kwargs)


def test_windows_need_a_token_stream() -> None:
    with pytest.raises(InvalidInputError, match="1-D token stream"):
        windows_from_ids(torch.arange(10_000).view(100, 100))


def test_real_wordnet_windows(wordnet_windows: dict[str, torch.Tensor]) -> None:
    ev, calib = wordnet_windows["eval"], wordnet_windows["calib"]
    assert ev.shape == calib.shape == (16, 512)
    assert ev.dtype == torch.int64
    # No window of one split reappears in the other.
    assert not {tuple(w) for w in ev.tolist()} & {tuple(w) for w in calib.tolist()}


def test_eval_import_is_lean() -> None:
    code = (
        "import json, sys; import dist_pgkm.eval; "
        "print(json.dumps([m for m in ('transformers', 'datasets', 'safetensors', 'ray', "
        "'deepspeed', 'faiss') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_calibration_windows_are_the_calib_split_and_say_what_is_missing() -> None:
    from dist_pgkm.eval import calibration_windows

    text = "".join(chr(33 + i % 90) for i in range(1000))  # 1000 tokens: 15 windows of 64
    windows = calibration_windows(CharTokenizer(), text, 7, 64)
    assert torch.equal(
        windows, windows_from_ids(torch.tensor([ord(c) for c in text]), 64, 7 * 64, "calib")
    )
    with pytest.raises(
        InvalidInputError,
        match=r"too short: 8 samples of 64 tokens need 1,024 tokens .* but it has 1,000 tokens, "
        r"enough for 7 samples\. .*--calib-samples \(calibration\.samples\) to at most 7",
    ):
        calibration_windows(CharTokenizer(), text, 8, 64)
    with pytest.raises(InvalidInputError, match=r"enough for 0 samples\. Pass a longer text"):
        calibration_windows(CharTokenizer(), text[:100], 1, 64)
    with pytest.raises(InvalidInputError, match="at least 1 window of at least 2 tokens"):
        calibration_windows(CharTokenizer(), text, 0, 64)
