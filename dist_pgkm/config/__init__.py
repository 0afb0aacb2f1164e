"""Typed, validated configuration (pydantic; unknown keys are errors)."""

from dist_pgkm.config.kmeans import FairseqEMOptions, MethodOptions, NoOptions, PGKMOptions
from dist_pgkm.config.quantize import LayerRule, QuantizeConfig, load_config

__all__ = [
    "FairseqEMOptions",
    "LayerRule",
    "MethodOptions",
    "NoOptions",
    "PGKMOptions",
    "QuantizeConfig",
    "load_config",
]
