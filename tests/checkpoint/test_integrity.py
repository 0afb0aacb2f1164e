"""A checkpoint you can trust (issue 18, items 1-2): every reader verifies, every damage is named.

The checkpoint is the fuzz benchmark's: real MiniLM weights cut to one block and 1,024 tokens,
quantized by ``quantize_model`` (a manifest with the merged file's sha256, shards, and a layer
with books, scales and outliers).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_pgkm.bench import fuzz  # type: ignore[import-not-found, unused-ignore]
from safetensors import SafetensorError, safe_open

import dist_pgkm
from dist_pgkm.checkpoint import decode_layer, read_shard
from dist_pgkm.checkpoint.summary import describe
from dist_pgkm.checkpoint.verify import VERIFY_ENV
from dist_pgkm.cli import main
from dist_pgkm.errors import CheckpointError
from dist_pgkm.utils.safetensors_io import read_header, read_tensors

from ..conftest import torch_threads

QUERY = "encoder.layer.0.attention.self.query"
FFN = "encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch_threads(1):
        return Path(fuzz.build_checkpoint(tmp_path_factory.mktemp("integrity")))


@pytest.fixture(scope="module")
def reference(built: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in dist_pgkm.load(built).state_dict().items()}


@pytest.fixture
def out(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(built, copy)
    return copy


def _byte_of(path: Path, key: str) -> int:
    """File offset of the first byte of tensor ``key``."""
    header = read_header(path)
    return len(header.raw) + header.tensors[key].begin


def _set_byte(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


def _same(model: Any, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in reference.items())


def _auto(path: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


# --- item 1: the merged file's sha256 is verified ------------------------------------------


def test_an_edited_code_in_range_is_refused_by_every_reader(
    out: Path,
    reference: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_file = out / "model.safetensors"
    offset = _byte_of(model_file, f"{FFN}.codes")
    old = model_file.read_bytes()[offset]
    _set_byte(model_file, offset, old ^ 0x11)  # 4-bit codes of 16 codewords: still in range
    # What used to happen: the edited checkpoint loads, with another weight.
    unverified = dist_pgkm.load(out, verify=False)
    assert not _same(unverified, reference)

    message = r"model\.safetensors: its sha256 .* differs from the one manifest\.json recorded"
    with pytest.raises(CheckpointError, match=message) as caught:
        dist_pgkm.load(out)
    assert "run the same `dist-pgkm quantize` command again" in str(caught.value)  # the fix
    with pytest.raises(CheckpointError, match=message):
        _auto(out)
    with pytest.raises(CheckpointError, match=message):
        describe(out, verify=True)
    assert main(["inspect", str(out)]) == 2
    assert main(["eval", str(out), "--task", "retrieval", "--pairs", "4"]) == 2
    assert capsys.readouterr().err.count("its sha256") == 2
    # Skipping is explicit: an environment variable, or the flag.
    assert main(["inspect", str(out), "--no-verify"]) == 0
    monkeypatch.setenv(VERIFY_ENV, "0")
    assert not _same(_auto(out), reference)
    # The unedited file loads verified, with the weights written.
    _set_byte(model_file, offset, old)
    monkeypatch.delenv(VERIFY_ENV)
    assert _same(_auto(out), reference)
    assert describe(out, verify=True).verified is True


def test_a_run_that_did_not_finish_merging_is_refused(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["merged"] = None  # e.g. a layer redone after the merge, then killed
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"records no merged checkpoint.*quantize` command"):
        dist_pgkm.load(out)


def test_a_copy_without_manifest_loads_with_a_warning(
    out: Path, reference: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    (out / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="dist_pgkm.checkpoint.verify"):
        assert _same(dist_pgkm.load(out), reference)
    assert "so they are not verified" in caplog.text


# --- item 2: every damaged file is a CheckpointError naming it -------------------------------


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x07" * 32
    path.write_bytes(bytes(data))


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_entry(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        edit(header)
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return apply


def _bad_dtype(header: dict[str, Any]) -> None:
    header[f"{QUERY}.centroids"]["dtype"] = "F4X"


def _codes_past_codebook(path: Path) -> None:
    offset = _byte_of(path, f"{QUERY}.codes")
    _set_byte(path, offset, 0xFF)  # code 15 of a 12-codeword codebook


def _missing_tensor(path: Path) -> None:
    from dist_pgkm.checkpoint.shard import write_shard

    tensors, meta = read_tensors(path)
    del tensors[f"{QUERY}.centroids"]
    write_shard(path, tensors, meta)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage header": (_garbage_header, r"header is not valid JSON"),
    "oversized header": (_huge_header, r"announce a 1099511627776-byte header"),
    "truncated": (_truncated, r"it is truncated"),
    "bad dtype": (_edit_entry(_bad_dtype), r"dtype 'F4X', which dist-pgkm cannot read"),
    "codes past the codebook": (_codes_past_codebook, r"index.*(15|code).*12|code.*12"),
    "missing tensor": (_missing_tensor, rf"{QUERY}\.centroids"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_merged_file_is_a_checkpoint_error_naming_it(
    out: Path,
    damage: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edit, message = DAMAGE[damage]
    model_file = out / "model.safetensors"
    edit(model_file)
    if damage in ("garbage header", "oversized header", "truncated", "bad dtype"):
        # What escaped before: safetensors' own error.
        with pytest.raises(SafetensorError), safe_open(str(model_file), framework="pt") as f:
            f.get_tensor(f"{QUERY}.codes")
    # Verified (the default): the header checks or the sha256 refuse it. Unverified: the
    # checks of the file itself, each naming the file and the fix.
    for verify in (None, False):
        with pytest.raises(CheckpointError, match=message if verify is False else None) as caught:
            dist_pgkm.load(out, verify=verify)
        assert str(model_file) in str(caught.value)
        assert "dist-pgkm quantize` command again" in str(caught.value)
    monkeypatch.setenv(VERIFY_ENV, "0")
    with pytest.raises(CheckpointError, match=message):
        _auto(out)
    if damage in ("garbage header", "oversized header", "truncated", "bad dtype"):
        with pytest.raises(CheckpointError, match=message):
            describe(out)
        assert main(["inspect", str(out)]) == 2
    assert main(["eval", str(out), "--task", "retrieval", "--pairs", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(model_file) in err


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_shard_is_a_checkpoint_error_naming_it(out: Path, damage: str) -> None:
    edit, _ = DAMAGE[damage]
    shard = out / "shards" / f"{QUERY}.safetensors"
    manifest = json.loads((out / "manifest.json").read_text())
    sha = manifest["layers"][QUERY]["sha256"]
    edit(shard)
    with pytest.raises(CheckpointError, match=r"sha256 differs.*redoes the layer"):
        read_shard(shard, sha)
    with pytest.raises(CheckpointError) as caught:
        decode_layer(*read_shard(shard), where=str(shard))
    assert str(shard) in str(caught.value)
    assert "run again" in str(caught.value)
    if damage in ("garbage header", "oversized header", "truncated", "bad dtype"):
        with pytest.raises(CheckpointError, match=str(shard)):
            describe(out)
