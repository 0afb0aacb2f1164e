"""A tiny Llama with PQ layers, a tied PQ codebook and Quant-Noise, for real DeepSpeed engines.

Shared by the pytest tests and by ``_zero3_worker.py`` (run under torchrun).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_pgkm.config.finetune import DeepSpeedOptions, TrainOptions
from dist_pgkm.noise import QuantNoise, add_quant_noise
from dist_pgkm.pq import PQEmbedding, PQLinear, PQModule, to_subvectors

VOCAB, SEQ, BS, K = 128, 16, 8, 16
NOISED = r"re:model\.layers\.1\.mlp\..*"  # float layers under Quant-Noise
QUANTIZED = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj")


def _pq(module: nn.Module, seed: int) -> PQModule:
    """A PQ version of a float layer: K of its own blocks as codebook, nearest-codeword codes."""
    blocks = to_subvectors(module.weight.detach(), BS)  # (n_blocks, BS)
    g = torch.Generator().manual_seed(seed)
    centroids = blocks[torch.randperm(blocks.shape[0], generator=g)[:K]].clone()
    codes = torch.cdist(blocks, centroids).argmin(1)
    cls = PQEmbedding if isinstance(module, nn.Embedding) else PQLinear
    return cls.from_float(module, centroids, codes)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def tiny_llama(seed: int = 0, noise_p: float = 0.5) -> tuple[nn.Module, QuantNoise]:
    """2-layer Llama (hidden 32): layer-0 MLP quantized, embeddings quantized and tied to the LM
    head (one centroids Parameter), layer-1 MLP in float under seeded Quant-Noise (bs 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    for i, name in enumerate(QUANTIZED):
        _swap(model, name, _pq(model.get_submodule(name), seed + i))
    embed = _pq(model.model.embed_tokens, seed + 10)
    head = PQLinear.from_float(model.lm_head, embed.centroids, embed.index)
    head.tie_to(embed)
    model.model.embed_tokens, model.lm_head = embed, head
    noise = add_quant_noise(model, NOISED, noise_p, BS, seed=seed)
    model.train()
    return model, noise


def groups(model: nn.Module, lr: float, centroid_lr: float) -> list[dict[str, object]]:
    """Float parameters and codebooks in two groups (the tied codebook listed twice)."""
    centroids = [m.centroids for m in model.modules() if isinstance(m, PQModule)]
    ids = {id(c) for c in centroids}
    floats = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": floats, "lr": lr},
        {"params": centroids, "lr": centroid_lr, "weight_decay": 0.0},
    ]


def batch(step: int, rank: int = 0, size: int = 2) -> torch.Tensor:
    """Fixed random token ids for a step (and rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g)


def train_steps(engine: object, start: int, n: int, rank: int = 0) -> list[float]:
    """``n`` optimizer steps on the fixed batches ``start .. start + n - 1``."""
    losses = []
    for step in range(start, start + n):
        ids = batch(step, rank)
        loss = engine(input_ids=ids, labels=ids).loss  # type: ignore[operator]
        engine.backward(loss)  # type: ignore[attr-defined]
        engine.step()  # type: ignore[attr-defined]
        losses.append(float(loss.detach()))
    return losses


def options(
    stage: int, dtype: str = "fp32", **train: object
) -> tuple[DeepSpeedOptions, TrainOptions]:
    ds = DeepSpeedOptions.model_validate(
        {"zero_stage": stage, "dtype": dtype, "keep_checkpoints": 2}
    )
    return ds, TrainOptions.model_validate({"batch_size": 2, "lr": 1e-2, **train})
