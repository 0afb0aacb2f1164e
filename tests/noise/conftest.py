"""Real weights for the Quant-Noise tests: a few MiniLM tensors (all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import pytest
import torch

MINILM_TENSORS = (
    "encoder.layer.0.attention.self.query.weight",  # (384, 384)
    "encoder.layer.0.intermediate.dense.weight",  # (1536, 384)
    "embeddings.position_embeddings.weight",  # (512, 384)
)


@pytest.fixture(scope="session")
def minilm() -> dict[str, torch.Tensor]:
    """Three real MiniLM weights (float32), read with safetensors."""
    from safetensors import safe_open

    from dist_pgkm.models.offline import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in MINILM_TENSORS}
