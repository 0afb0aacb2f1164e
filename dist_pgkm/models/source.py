"""Model sources on disk, read lazily tensor by tensor.

:func:`open_source` accepts

* a Hugging Face directory with ``model.safetensors``, or with shards and
  ``model.safetensors.index.json`` (every file the index names must exist and hold the tensors
  the index assigns to it), or with other ``*.safetensors`` files and no index (all of them);
* a single ``.safetensors`` file (its directory is the model directory if it has a
  ``config.json``);
* a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file and no safetensors: it is
  converted once into a safetensors directory in the dist-pgkm cache
  (:func:`dist_pgkm.models.offline.gguf_dir`) and read from there.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling can run code.

Opening a source reads only the safetensors headers (a few KB to MB per file), which are parsed
and checked here: a truncated or corrupt file is reported at open, naming the file. Tensor data
is read one tensor at a time by :meth:`ModelSource.read`. Both go through
:mod:`dist_pgkm.utils.safetensors_io`, the one boundary to safetensors.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.utils.dtypes import SAFETENSORS_DTYPES
from dist_pgkm.utils.safetensors_io import UnknownDtype, UnreadableFile, read_header, read_tensors

__all__ = ["ModelSource", "TensorInfo", "open_source"]

logger = logging.getLogger(__name__)

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_CONFIG_FILE = "config.json"
_FINGERPRINT_BYTES = 1 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files worth copying next to a quantized model: tokenizers, processors, generation settings,
# chat templates, licences. An allowlist, so that training debris (optimizer.pt, trainer_state,
# README model cards describing the unquantized model) is not carried along.
_AUX_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "LICENSE*",
    "NOTICE*",
)
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", *_PICKLE_SUFFIXES)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a source lives and what it looks like, without its data.

    Attributes:
        name: Key in the checkpoint, e.g. ``"model.layers.0.mlp.down_proj.weight"``.
        shape: Shape as stored.
        dtype: Dtype as stored.
        file: The weight file holding it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class ModelSource:
    """A model on disk, read lazily tensor by tensor (never the whole model in RAM).

    Built by :func:`open_source`, which has already parsed and checked every header.

    Attributes:
        path: What the user passed.
        model_dir: The Hugging Face directory with ``config.json`` and tokenizer files, or None
            for a bare ``.safetensors`` file whose directory has no ``config.json``. For a GGUF
            source, the converted directory in the cache.
        files: The weight files, sorted.
    """

    def __init__(
        self,
        path: Path,
        model_dir: Path | None,
        root: Path,
        tensors: dict[str, TensorInfo],
        headers: dict[Path, bytes],
    ) -> None:
        self.path = path
        self.model_dir = model_dir
        self.files: tuple[Path, ...] = tuple(sorted(headers))
        self._root = root  # fingerprint names are relative to it
        self._tensors = tensors
        self._headers = headers

    def __repr__(self) -> str:
        return (
            f"ModelSource(path={str(self.path)!r}, {len(self.files)} file(s), "
            f"{len(self._tensors)} tensors)"
        )

    def tensors(self) -> dict[str, TensorInfo]:
        """Return every tensor of the source, ordered by (file, key).

        Returns:
            A new dict from checkpoint key to :class:`TensorInfo`; no tensor data is read.
        """
        return dict(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor, and only that one.

        Args:
            name: Its checkpoint key.

        Returns:
            A plain CPU tensor in its stored dtype and shape that owns its memory: it stays
            valid, and writable, after the file is closed or replaced.

        Raises:
            ModelSourceError: If no tensor has that key (the closest keys are named), or if
                the file cannot be read any more.
        """
        info = self._tensors.get(name)
        if info is None:
            close = difflib.get_close_matches(name, self._tensors, n=3, cutoff=0.6)
            hint = f" Closest keys: {', '.join(close)}." if close else ""
            raise ModelSourceError(
                f"{self.path} has no tensor {name!r} ({len(self._tensors)} tensors in "
                f"{len(self.files)} file(s)).{hint} List the keys with `.tensors()`."
            )
        try:
            # One handle per read: opening costs ~0.5 ms (the header is parsed again), and
            # nothing is left open between reads, so reads are safe from any thread.
            tensor = read_tensors(info.file, [name])[0][name]
        except UnreadableFile as exc:
            raise ModelSourceError(
                f"Cannot read tensor {name!r} from {info.file}: {exc.why}. The file changed or "
                f"became unreadable after the source was opened; open the source again."
            ) from exc
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ModelSourceError(
                f"Tensor {name!r} in {info.file} is now {tensor.dtype} {tuple(tensor.shape)}, "
                f"but was {info.dtype} {info.shape} when the source was opened: the file was "
                f"replaced. Open the source again."
            )
        return tensor

    def config(self) -> dict[str, Any] | None:
        """Return the parsed ``config.json`` of the model directory.

        Returns:
            A new dict on every call, or None when there is no model directory or it has no
            ``config.json``.

        Raises:
            ModelSourceError: If ``config.json`` exists but is not a JSON object.
        """
        if self.model_dir is None:
            return None
        path = self.model_dir / _CONFIG_FILE
        if not path.is_file():
            return None
        config = _read_json(path, "config")
        if not isinstance(config, dict):
            raise ModelSourceError(
                f"{path} is not a JSON object. Restore the model's config.json, or pass the "
                f".safetensors file alone to quantize it without a config."
            )
        return config

    def fingerprint(self) -> list[dict[str, Any]]:
        """Identify the weight files cheaply, to detect a changed source on resume.

        Per file: its name relative to the model directory, its size, and the sha256 of its
        safetensors header (length prefix and JSON), of its first MiB and of its last MiB. At
        most ~2 MiB plus the header is read per file, so this takes milliseconds even for
        100 GB models. A change in the middle of a file that keeps its size and its header
        (the same tensors at the same offsets with other values) is **not** detected.

        Returns:
            One dict per weight file, in :attr:`files` order, JSON-serialisable.

        Raises:
            ModelSourceError: If a weight file cannot be read.
        """
        entries: list[dict[str, Any]] = []
        for file in self.files:
            try:
                size = file.stat().st_size
                with file.open("rb") as fh:
                    head = fh.read(_FINGERPRINT_BYTES)
                    fh.seek(max(0, size - _FINGERPRINT_BYTES))
                    tail = fh.read()
            except OSError as exc:
                raise ModelSourceError(
                    f"Cannot read {file} to fingerprint it: {exc}. Check that the model files "
                    f"are still in place and readable."
                ) from exc
            entries.append(
                {
                    "name": file.relative_to(self._root).as_posix(),
                    "size": size,
                    "sha256_header": hashlib.sha256(self._headers[file]).hexdigest(),
                    "sha256_first_mib": hashlib.sha256(head).hexdigest(),
                    "sha256_last_mib": hashlib.sha256(tail).hexdigest(),
                }
            )
        return entries

    def aux_files(self) -> tuple[Path, ...]:
        """Return the non-weight files to copy into an output model directory.

        Tokenizer files (``tokenizer*``, ``vocab.*``, ``merges.txt``, ``spiece.model``, ...),
        ``special_tokens_map.json``, ``added_tokens.json``, ``generation_config.json``, chat
        templates, processor configs and licence files found at the top of the model
        directory. ``config.json`` is not included: the output gets a new one.

        Returns:
            The files that exist, sorted; empty without a model directory.
        """
        if self.model_dir is None:
            return ()
        found = {
            path
            for pattern in _AUX_PATTERNS
            for path in self.model_dir.glob(pattern)
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES)
        }
        return tuple(sorted(found))


def open_source(path: str | Path) -> ModelSource:
    """Open a model on disk without reading its tensor data.

    Args:
        path: A Hugging Face model directory, a ``.safetensors`` file, a ``.gguf`` file, or a
            directory holding one ``.gguf`` file (see the module docstring).

    Returns:
        The source, with every safetensors header parsed and checked.

    Raises:
        ModelSourceError: If the path does not exist; if a directory holds no weights, only
            pickle weights, or several GGUF files; if a shard named by the index is missing or
            the index disagrees with the shards; if a header is corrupt or a file truncated;
            or if a GGUF file cannot be converted.
    """
    given = Path(path)
    # absolute(), not resolve(): in the Hugging Face cache, weight files are symlinks into a
    # blobs/ directory, and the model directory is where the links are.
    absolute = given.expanduser().absolute()
    if not absolute.exists():
        raise ModelSourceError(
            f"Model path {given} does not exist. Pass a Hugging Face model directory, a "
            f".safetensors file or a .gguf file."
        )
    if absolute.is_file():
        return _open_file(given, absolute)
    return _open_dir(given, absolute)


def _open_file(given: Path, file: Path) -> ModelSource:
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        model_dir = file.parent if (file.parent / _CONFIG_FILE).is_file() else None
        return _build(given, model_dir, file.parent, [file], index=None)
    if suffix == ".gguf":
        return _open_gguf(given, file)
    if suffix in _PICKLE_SUFFIXES:
        raise _pickle_error(file)
    raise ModelSourceError(
        f"{given} is neither a .safetensors nor a .gguf file, the two weight formats "
        f"dist-pgkm reads. Pass one of those, or the Hugging Face directory holding them."
    )


def _open_dir(given: Path, directory: Path) -> ModelSource:
    index = directory / _INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(
                f"{index} names {len(files)} weight file(s), but "
                f"{', '.join(f.name for f in missing)} {'is' if len(missing) == 1 else 'are'} "
                f"missing from {directory}: the download or copy is incomplete. Copy the "
                f"missing shard(s) again."
            )
        return _build(given, directory, directory, files, index=(index, weight_map))
    if (directory / _SINGLE_FILE).is_file():
        return _build(given, directory, directory, [directory / _SINGLE_FILE], index=None)
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return _build(given, directory, directory, safetensors, index=None)

    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return _open_gguf(given, ggufs[0])
    if len(ggufs) > 1:
        raise ModelSourceError(
            f"{directory} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}) "
            f"and no safetensors; it is not clear which one is the model. Pass the .gguf file "
            f"itself."
        )
    pickles = sorted(p for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(pickles[0])
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    shown = ", ".join(entries[:20]) + (
        f", ... ({len(entries)} entries)" if len(entries) > 20 else ""
    )
    raise ModelSourceError(
        f"{directory} holds no model weights: no {_SINGLE_FILE}, no {_INDEX_FILE}, no "
        f"*.safetensors and no *.gguf file. It contains: {shown or 'nothing'}. Pass the "
        f"directory the model was saved to, or the weight file itself."
    )


def _open_gguf(given: Path, gguf: Path) -> ModelSource:
    from dist_pgkm.models.offline import gguf_dir

    return _open_dir(given, gguf_dir(gguf))


def _pickle_error(file: Path) -> ModelSourceError:
    return ModelSourceError(
        f"{file} is a PyTorch pickle checkpoint, and dist-pgkm never loads pickle files: "
        f"unpickling can run arbitrary code. Convert the model once to safetensors, in an "
        f"environment you trust: `transformers.AutoModel.from_pretrained(src)"
        f".save_pretrained(dst)` writes safetensors with transformers >= 5 (pass "
        f"`safe_serialization=True` with 4.x); then pass dst."
    )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelSourceError(
            f"Cannot read the {what} file {path}: {exc}. The file is damaged or incomplete; "
            f"copy it again from the original model."
        ) from exc


def _read_index(index: Path) -> dict[str, str]:
    content = _read_json(index, "shard index")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelSourceError(
            f'{index} has no "weight_map" object from tensor names to file names, so the '
            f"shards cannot be located. Copy the index again from the original model."
        )
    return weight_map


def _build(
    given: Path,
    model_dir: Path | None,
    root: Path,
    files: list[Path],
    index: tuple[Path, dict[str, str]] | None,
) -> ModelSource:
    """Parse every header, check the files against each other and the index, and build."""
    headers: dict[Path, bytes] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in sorted(files):
        header, infos = _read_header(file)
        headers[file] = header
        for name, info in infos.items():
            other = tensors.get(name)
            if other is not None:
                raise ModelSourceError(
                    f"Tensor {name!r} is stored twice, in {other.file.name} and {file.name}, "
                    f"so which one the model uses is ambiguous. Remove the stray file from "
                    f"{root}, or add a {_INDEX_FILE} naming the files of the model."
                )
            tensors[name] = info
    if index is not None:
        index_path, weight_map = index
        for name, file_name in weight_map.items():
            found = tensors.get(name)
            if found is None or found.file != root / file_name:
                where = "in no file" if found is None else f"in {found.file.name}"
                raise ModelSourceError(
                    f"{index_path} places tensor {name!r} in {file_name}, but it is {where}: "
                    f"the index and the shards come from different saves. Copy the model "
                    f"directory again."
                )
        unindexed = len(tensors) - len(weight_map)
        if unindexed:
            logger.debug("%s: %d tensor(s) in the shards are not in the index", root, unindexed)
    logger.debug("Opened %s: %d tensors in %d file(s)", given, len(tensors), len(headers))
    return ModelSource(given, model_dir, root, tensors, headers)


def _read_header(file: Path) -> tuple[bytes, dict[str, TensorInfo]]:
    """Read and check a safetensors header without reading tensor data.

    Returns:
        The raw header bytes (8-byte length prefix and JSON) and the tensors, sorted by key.
    """
    try:
        header = read_header(file)
    except UnknownDtype as exc:
        raise ModelSourceError(
            f"Tensor {exc.key!r} in {file} has dtype {exc.dtype!r}, which dist-pgkm cannot read "
            f"(known: {', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to one of those "
            "dtypes."
        ) from exc
    except UnreadableFile as exc:
        if isinstance(exc.__cause__, OSError):
            raise ModelSourceError(
                f"Cannot read {file}: {exc.__cause__}. Check that the file exists and is readable."
            ) from exc
        raise _corrupt(file, exc.why) from exc
    infos = {
        name: TensorInfo(name, entry.shape, entry.torch_dtype, file)
        for name, entry in header.tensors.items()
    }
    return header.raw, infos


def _corrupt(file: Path, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"{file} is not a valid safetensors file: {why}. The file is corrupt or incompletely "
        f"copied; copy or download it again."
    )
