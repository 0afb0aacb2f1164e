"""Quant-Noise (DESIGN.md §4): perturb random iPQ blocks of weights in the forward, functionally.

Pure functions of a weight live in :mod:`dist_pgkm.noise.functional`; installing them on a
model's layers (and removing them) in :mod:`dist_pgkm.noise.wrap`. See docs/finetune.md.
"""

from dist_pgkm.noise.functional import (
    NOISE_MODES,
    BlockQuantizer,
    Codebook,
    NoiseMode,
    apply_noise_mask,
    noise_mask,
    quant_noise,
)
from dist_pgkm.noise.wrap import (
    NOISE_LAYERS,
    QuantNoise,
    QuantNoiseHandle,
    add_quant_noise,
    quant_noise_handle,
    remove_quant_noise,
)

__all__ = [
    "NOISE_LAYERS",
    "NOISE_MODES",
    "BlockQuantizer",
    "Codebook",
    "NoiseMode",
    "QuantNoise",
    "QuantNoiseHandle",
    "add_quant_noise",
    "apply_noise_mask",
    "noise_mask",
    "quant_noise",
    "quant_noise_handle",
    "remove_quant_noise",
]
