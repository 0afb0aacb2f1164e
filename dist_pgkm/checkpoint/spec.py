"""One quantized layer in the checkpoint format: its entries, its tensors, its size in bits.

docs/format.md describes a layer by a few numbers, found in two places: the string header of
its shard and its entry in ``config.json`` → ``quantization_config.layers``. :class:`LayerSpec`
is that description, validated once, and everything derived from it: the tensors a checkpoint
must hold for the layer (names, dtypes, shapes), their bytes, and the bits per weight (through
:func:`dist_pgkm.pq.quantize.bits_per_weight`, the one formula for it). The shard reader, the
merge, the transformers loader and ``describe()`` all use it. No transformers, no safetensors.

Versions: format 2 (written) adds codebooks per row group, scales and outliers to format 1
(still read: its layers are format-2 layers without them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dist_pgkm.errors import CheckpointError, InvalidInputError
from dist_pgkm.pq.layout import MAX_OUTLIER_WEIGHTS
from dist_pgkm.pq.pack import bits_for, packed_nbytes
from dist_pgkm.pq.quantize import OUTLIER_BITS, SCALE_BITS, bits_per_weight

__all__ = [
    "CENTROID_BITS",
    "CENTROID_DTYPES",
    "FORMAT_VERSION",
    "KINDS",
    "LAYER_KEYS",
    "READABLE_VERSIONS",
    "REMERGE",
    "TENSOR_SUFFIXES",
    "LayerSpec",
]

FORMAT_VERSION = "2"
"""The format this dist-pgkm writes (header ``dist_pgkm_format``, ``format_version``)."""

READABLE_VERSIONS = ("1", "2")
"""The formats this dist-pgkm reads."""

KINDS = ("linear", "embedding", "conv2d")
"""``kind`` of a quantized layer."""

CENTROID_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
"""``centroid_dtype`` -> safetensors dtype of the codebooks."""

CENTROID_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
"""``centroid_dtype`` -> bits per stored codebook value."""

_V1_KEYS = ("kind", "shape", "block_size", "k", "k_used", "bits")
LAYER_KEYS = {
    "1": _V1_KEYS,
    "2": (*_V1_KEYS, "codebook_rows", "scale_group", "n_outliers", "metric"),
}
"""The keys of a ``quantization_config.layers`` entry, by format version."""

TENSOR_SUFFIXES = ("centroids", "codes", "scales", "outlier_idx", "outlier_val")
"""Every tensor a quantized layer ``M`` may store, as ``M.<suffix>``."""

REMERGE = (
    "delete the directory's model*.safetensors files and run the same `dist-pgkm quantize` "
    "command again: it rewrites them and config.json from its verified per-layer shards"
)
"""How to rebuild a merged checkpoint whose files are bad (said by every loader error)."""

_SIDE_DTYPES = {"scales": "F16", "outlier_idx": "I32", "outlier_val": "F16"}
# Shard header entries that are not integers: what they are, and how to read them.
_HEADER_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "shape": ("JSON", json.loads),
    "kind": ("text", str),
    "metric": ("text", str),
}


@dataclass(frozen=True)
class LayerSpec:
    """A quantized layer as the format describes it (docs/format.md), validated.

    Attributes:
        kind: ``linear``, ``embedding`` or ``conv2d``.
        shape: Shape of the dense weight.
        block_size: Sub-vector length.
        k: Requested codebook size.
        k_used: Codewords stored per codebook (after compaction; with several books, the
            largest book's, the others zero-padded to it).
        bits: Bits per packed code, ``max(1, ceil(log2 k_used))``.
        codebook_rows: Output rows per codebook (0: one codebook for the layer).
        scale_group: Input features per scale (0: no scales).
        n_outliers: Weights kept exactly (0: none).
        metric: The k-means metric the codebook was fitted with (informative).
    """

    kind: str
    shape: tuple[int, ...]
    block_size: int
    k: int
    k_used: int
    bits: int
    codebook_rows: int = 0
    scale_group: int = 0
    n_outliers: int = 0
    metric: str = "weight"

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def out(self) -> int:
        """Output rows."""
        return self.shape[0]

    @property
    def width(self) -> int:
        """Weights per output row (``in * kh * kw``)."""
        return self.n_weights // self.out

    @property
    def n_blocks(self) -> int:
        """Number of codes."""
        return self.n_weights // self.block_size

    @property
    def n_books(self) -> int:
        return self.out // self.codebook_rows if self.codebook_rows else 1

    @property
    def n_scales(self) -> int:
        return self.out * (self.width // self.scale_group) if self.scale_group else 0

    @property
    def packed_bytes(self) -> int:
        """Length of the packed ``codes`` tensor."""
        return packed_nbytes(self.n_blocks, self.bits)

    @property
    def extras(self) -> bool:
        """Whether the layer has anything format 1 cannot hold (books, scales, outliers)."""
        return bool(self.codebook_rows or self.scale_group or self.n_outliers)

    def tensors(self, centroid_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The layer's tensors: suffix -> (safetensors dtype, shape), in the stored order."""
        centroids: tuple[int, ...] = (self.k_used, self.block_size)
        if self.codebook_rows:
            centroids = (self.n_books, *centroids)
        out: dict[str, tuple[str, tuple[int, ...]]] = {
            "centroids": (CENTROID_DTYPES[centroid_dtype], centroids),
            "codes": ("U8", (self.packed_bytes,)),
        }
        if self.scale_group:
            out["scales"] = (_SIDE_DTYPES["scales"], (self.out, self.width // self.scale_group))
        if self.n_outliers:
            out["outlier_idx"] = (_SIDE_DTYPES["outlier_idx"], (self.n_outliers,))
            out["outlier_val"] = (_SIDE_DTYPES["outlier_val"], (self.n_outliers,))
        return out

    def code_bytes(self) -> int:
        return self.packed_bytes

    def codebook_bytes(self, centroid_dtype: str) -> int:
        return self.n_books * self.k_used * self.block_size * CENTROID_BITS[centroid_dtype] // 8

    def side_bytes(self) -> int:
        """Bytes of the scales and outliers."""
        return (self.n_scales * SCALE_BITS + self.n_outliers * OUTLIER_BITS) // 8

    def bits_per_weight(self, centroid_dtype: str) -> float:
        """Bits per weight, codebooks, scales and outliers included (the one formula)."""
        return bits_per_weight(
            self.n_blocks,
            self.k_used,
            self.block_size,
            CENTROID_BITS[centroid_dtype],
            n_books=self.n_books,
            n_scales=self.n_scales,
            n_outliers=self.n_outliers,
        )

    def to_config(self, version: str = FORMAT_VERSION) -> dict[str, Any]:
        """The ``quantization_config.layers`` entry of format ``version``.

        Raises:
            InvalidInputError: Format 1 cannot hold this layer (it has books, scales or
                outliers).
        """
        if version == "1" and self.extras:
            raise InvalidInputError(
                "a layer with per-row-group codebooks, scales or outliers needs format 2; "
                "format 1 cannot describe it."
            )
        entry: dict[str, Any] = {
            "kind": self.kind,
            "shape": list(self.shape),
            "block_size": self.block_size,
            "k": self.k,
            "k_used": self.k_used,
            "bits": self.bits,
            "codebook_rows": self.codebook_rows,
            "scale_group": self.scale_group,
            "n_outliers": self.n_outliers,
            "metric": self.metric,
        }
        return {key: entry[key] for key in LAYER_KEYS[version]}

    def to_header(self) -> dict[str, str]:
        """The shard header entries describing the layer (strings, docs/format.md)."""
        return {
            "kind": self.kind,
            "k": str(self.k),
            "shape": json.dumps(list(self.shape)),
            "block_size": str(self.block_size),
            "k_used": str(self.k_used),
            "bits": str(self.bits),
            "n_blocks": str(self.n_blocks),
            "codebook_rows": str(self.codebook_rows),
            "scale_group": str(self.scale_group),
            "n_outliers": str(self.n_outliers),
            "metric": self.metric,
        }

    @classmethod
    def parse(cls, raw: object, version: str, where: str, fix: str) -> LayerSpec:
        """Validate a ``quantization_config.layers`` entry of format ``version``.

        Args:
            raw: The entry (a JSON object).
            version: Its format version (``"1"`` or ``"2"``).
            where: Start of an error message (the file and the entry).
            fix: End of an error message (how to repair).

        Raises:
            CheckpointError: A key is missing or unknown, or the numbers are inconsistent.
        """

        def fail(problem: str) -> CheckpointError:
            return CheckpointError(f"{where}: {problem}. {fix}")

        keys = LAYER_KEYS.get(version)
        if keys is None:
            raise fail(f"format version {version!r} is not one of {list(READABLE_VERSIONS)}")
        if not isinstance(raw, Mapping) or set(raw) != set(keys):
            found = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise fail(f"expected the keys {list(keys)} (format {version}), found {found}")
        positive = {key: raw[key] for key in ("block_size", "k", "k_used", "bits")}
        if any(type(v) is not int or v < 1 for v in positive.values()):
            raise fail(f"block_size, k, k_used and bits must be positive integers, got {positive}")
        counts = {key: raw.get(key, 0) for key in ("codebook_rows", "scale_group", "n_outliers")}
        if any(type(v) is not int or v < 0 for v in counts.values()):
            raise fail(
                f"codebook_rows, scale_group and n_outliers must be integers >= 0, got {counts}"
            )
        metric = raw.get("metric", "weight")
        if not isinstance(metric, str) or not metric:
            raise fail(f"metric must be a non-empty string, got {metric!r}")
        shape = raw["shape"]
        if not isinstance(shape, list) or any(type(s) is not int or s < 1 for s in shape):
            raise fail(f"shape must be a list of positive integers, got {shape!r}")
        kind = raw["kind"]
        if kind not in KINDS:
            raise fail(f"kind {kind!r} is not one of {sorted(KINDS)}")
        if len(shape) != (4 if kind == "conv2d" else 2):
            raise fail(f"a {kind} weight cannot have shape {shape}")
        spec = cls(kind, tuple(shape), **positive, **counts, metric=metric)
        if spec.width % spec.block_size:
            raise fail(f"blocks of {spec.block_size} cannot tile rows of {spec.width} weights")
        if spec.k_used > spec.k:
            raise fail(f"k_used {spec.k_used} exceeds k {spec.k}")
        try:
            bits = bits_for(spec.k_used)
        except InvalidInputError as exc:
            raise fail(str(exc)) from exc
        if spec.bits != bits:
            raise fail(f"bits is {spec.bits}, but codes of {spec.k_used} codewords take {bits}")
        if spec.codebook_rows and spec.out % spec.codebook_rows:
            raise fail(f"codebook_rows {spec.codebook_rows} does not divide the {spec.out} rows")
        if spec.scale_group and spec.width % spec.scale_group:
            raise fail(f"scale_group {spec.scale_group} does not divide the width {spec.width}")
        if spec.n_outliers > spec.n_weights:
            raise fail(f"{spec.n_outliers} outliers in a weight of {spec.n_weights} values")
        if spec.n_outliers and spec.n_weights > MAX_OUTLIER_WEIGHTS:
            raise fail(f"a weight of {spec.n_weights} values cannot have int32 outlier indices")
        return spec

    @classmethod
    def from_header(cls, meta: Mapping[str, str], where: str, fix: str) -> LayerSpec:
        """The spec of a shard from its header entries (format 1 or 2).

        Raises:
            CheckpointError: Another format version, or a missing or malformed entry.
        """
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"{where}: format version {version!r}, this dist-pgkm reads "
                f"{' and '.join(repr(v) for v in READABLE_VERSIONS)}. Re-quantize with this "
                "version, or install the one that wrote it."
            )
        raw: dict[str, Any] = {}
        for key in (*LAYER_KEYS[version], "n_blocks"):
            what, parse = _HEADER_PARSERS.get(key, ("an integer", int))
            text = meta.get(key)
            try:
                if text is None:
                    raise ValueError("missing")
                raw[key] = parse(text)
            except ValueError as exc:
                raise CheckpointError(
                    f"{where}: header entry {key!r} is missing or not {what} ({text!r}). {fix}"
                ) from exc
        n_blocks = raw.pop("n_blocks")
        shape = raw["shape"]
        ints = isinstance(shape, list) and all(type(size) is int for size in shape)
        n_weights = math.prod(shape) if ints else None
        if n_weights is not None and n_blocks * raw["block_size"] != n_weights:
            raise CheckpointError(
                f"{where}: {n_blocks} blocks of {raw['block_size']} != {n_weights} weights of "
                f"{shape}. {fix}"
            )
        return cls.parse(raw, version, where, fix)
