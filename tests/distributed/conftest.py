"""Shared by the quantize tests: a small real job on MiniLM and its in-process reference.

The reference checkpoint is built once per session; every executor (in-process, Ray, resumed
after a kill) must reproduce its bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_pgkm.config import load_config
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.models.offline import minilm_dir

# Every Linear of the first two blocks at bs 4, K 64, the word embeddings at bs 8, K 256; a
# skipped layer (token types: 2 x 384 = 96 blocks of 8 < 256) and a rule-level skip.
CONFIG = {
    "n_iter": 4,
    "rules": [
        {"match": "encoder.layer.1.attention.self.query", "skip": True},
        {"match": "re:encoder\\.layer\\.[01]\\..*", "block_size": 4, "k": 64},
        {"match": "re:embeddings\\.(word|token_type)_embeddings", "block_size": 8, "k": 256},
    ],
}
N_JOBS = 12  # 2 blocks x 6 Linear - 1 skipped by rule + word embeddings
CHECKPOINT_FILES = ("model.safetensors", "config.json")


@pytest.fixture(scope="session")
def model() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def config() -> QuantizeConfig:
    return load_config(CONFIG)


@pytest.fixture(scope="session")
def reference(
    tmp_path_factory: pytest.TempPathFactory, model: Path, config: QuantizeConfig
) -> Path:
    out = tmp_path_factory.mktemp("reference")
    quantize_model(model, config, out)
    return out


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    """The bytes of the files that make the checkpoint (report and manifest excluded)."""
    return {name: (out / name).read_bytes() for name in CHECKPOINT_FILES}
