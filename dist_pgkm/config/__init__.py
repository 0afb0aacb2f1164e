"""Typed, validated configuration (pydantic; unknown keys are errors)."""

from dist_pgkm.config.kmeans import FairseqEMOptions, MethodOptions, NoOptions, PGKMOptions

__all__ = ["FairseqEMOptions", "MethodOptions", "NoOptions", "PGKMOptions"]
