"""Per-method options of :func:`dist_pgkm.cluster`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["METHOD_OPTIONS", "FairseqEMOptions", "MethodOptions", "NoOptions", "PGKMOptions"]


class MethodOptions(BaseModel):
    """Base of every method's options: frozen, and unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(MethodOptions):
    """The method takes no options."""


class PGKMOptions(MethodOptions):
    """PG k-means switches (each component can be turned off for ablations).

    ``split_by="weight", cut="median"`` is DESIGN.md's literal reading (split the heaviest
    partition at its weighted median); the defaults split the partition with the largest SSE
    where the split minimises SSE, which leaves far fewer empty clusters (docs/architecture.md).
    """

    consolidate: bool = True
    radius: float = Field(0.0, ge=0.0)
    preassign: bool = True
    repair: bool = True
    split_by: Literal["weight", "sse"] = "sse"
    cut: Literal["median", "sse"] = "sse"
    init_sample_per_centroid: int = Field(64, ge=0)
    moves: float = Field(0.1, ge=0.0, le=0.25)


class FairseqEMOptions(MethodOptions):
    """iPQ's k-means settings (its defaults)."""

    eps: float = Field(1e-6, gt=0.0)
    max_tentatives: int = Field(100, ge=0)


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "pgkm": PGKMOptions,
    "fairseq-em": FairseqEMOptions,
    "faiss": NoOptions,
    "kmeans++": NoOptions,
}
"""Options model of every clustering method, by method name."""
