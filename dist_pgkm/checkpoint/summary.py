"""What a quantized checkpoint holds and costs, read from headers only (no tensor data).

One source of truth for every size a user sees: ``dist-pgkm inspect``, the run report and the
benchmarks all call :func:`describe`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_pgkm.checkpoint.manifest import MANIFEST_NAME, Manifest
from dist_pgkm.checkpoint.merge import read_shard_header
from dist_pgkm.checkpoint.shard import layer_spec
from dist_pgkm.checkpoint.spec import CENTROID_DTYPES, REMERGE, TENSOR_SUFFIXES, LayerSpec
from dist_pgkm.checkpoint.verify import verify_files
from dist_pgkm.errors import CheckpointError
from dist_pgkm.utils.dtypes import element_bytes
from dist_pgkm.utils.safetensors_io import UnreadableFile, read_header

__all__ = ["CheckpointSummary", "LayerSummary", "describe"]


@dataclass(frozen=True)
class LayerSummary:
    """One quantized layer: its layout, its cost in bits, and how its clustering went."""

    name: str
    kind: str
    shape: tuple[int, ...]
    block_size: int
    k: int
    k_used: int
    bits: int
    n_weights: int
    code_bytes: int
    codebook_bytes: int
    bits_per_weight: float
    codebook_rows: int
    scale_group: int
    n_outliers: int
    side_bytes: int  # scales and outliers
    metric: str
    sse: float | None
    weight_sq: float | None
    empty_after_init: int | None
    empty_total: int | None
    empty_final: int | None
    seconds: float | None
    tied: tuple[str, ...] = ()

    @property
    def rel_sse(self) -> float | None:
        """SSE relative to the weight's squared norm (``||W - Ŵ||² / ||W||²``)."""
        if self.sse is None or not self.weight_sq:
            return None
        return self.sse / self.weight_sq

    @property
    def extras(self) -> str:
        """The layer's options beyond one codebook, for tables: books, scales, outliers."""
        parts = []
        if self.codebook_rows:
            parts.append(f"book per {self.codebook_rows} rows")
        if self.scale_group:
            width = self.n_weights // self.shape[0]
            parts.append(
                "row scales" if self.scale_group == width else f"scale per {self.scale_group}"
            )
        if self.n_outliers:
            parts.append(f"{self.n_outliers} outliers")
        return ", ".join(parts) or "-"

    @property
    def codeword_use(self) -> float:
        return self.k_used / self.k


@dataclass
class CheckpointSummary:
    """Totals over a checkpoint, and its quantized layers."""

    path: Path
    method: str
    layers: list[LayerSummary] = field(default_factory=list)
    float_params: int = 0  # floating-point tensors stored as they are
    float_bytes: int = 0  # every unquantized tensor, integer buffers included
    checkpoint_bytes: int = 0
    verified: bool | None = None  # sha256 checked against the run's record (None: not asked)

    @property
    def quantized_params(self) -> int:
        return sum(layer.n_weights for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the quantized layers: codes, codebooks, scales and outliers."""
        return sum(
            layer.code_bytes + layer.codebook_bytes + layer.side_bytes for layer in self.layers
        )

    @property
    def params(self) -> int:
        return self.quantized_params + self.float_params

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, codebooks, scales and outliers included: the layers'
        :attr:`LayerSummary.bits_per_weight` averaged over their weights."""
        bits = sum(layer.bits_per_weight * layer.n_weights for layer in self.layers)
        return bits / max(1, self.quantized_params)

    @property
    def model_bits_per_param(self) -> float:
        """Bits per parameter over the whole checkpoint (float tensors as stored)."""
        return 8 * self.checkpoint_bytes / max(1, self.params)

    @property
    def compression_vs_fp16(self) -> float:
        """Size of the model in fp16 over the checkpoint's size."""
        return 2 * self.params / max(1, self.checkpoint_bytes)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "path": str(self.path),
            "method": self.method,
            "params": self.params,
            "quantized_params": self.quantized_params,
            "float_params": self.float_params,
            "quantized_bytes": self.quantized_bytes,
            "float_bytes": self.float_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "bits_per_weight": self.bits_per_weight,
            "model_bits_per_param": self.model_bits_per_param,
            "compression_vs_fp16": self.compression_vs_fp16,
            "verified": self.verified,
            "empty_final": sum(layer.empty_final or 0 for layer in self.layers),
            "empty_total": sum(layer.empty_total or 0 for layer in self.layers),
            "layers": [
                {**asdict(layer), "rel_sse": layer.rel_sse, "codeword_use": layer.codeword_use}
                for layer in self.layers
            ],
        }
        return out


def _natural(name: str) -> list[int | str]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable ({exc}); it was damaged or edited. To rewrite it, {REMERGE}."
        ) from exc
    return data


_STATS = ("sse", "weight_sq", "empty_after_init", "empty_total", "empty_final")


def _shard_stats(meta: dict[str, str], shard: Path) -> dict[str, float | int | None]:
    """The clustering statistics a shard's header records (informative: a value that is not
    a number is left out)."""
    try:
        raw = json.loads(meta.get("stats", "{}"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CheckpointError(
            f"{shard}: header entry 'stats' is malformed ({exc}). The shard is corrupt; delete "
            "it and run the same `dist-pgkm quantize` command again to redo the layer."
        ) from exc
    return {
        key: value
        for key in _STATS
        if isinstance(value := raw.get(key), int | float) and not isinstance(value, bool)
    }


def _model_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: no weight_map of file names. To rewrite it, {REMERGE}."
            )
        return [path / name for name in sorted(set(weight_map.values()))]
    return [path / "model.safetensors"]


def describe(path: str | Path, verify: bool = False) -> CheckpointSummary:
    """Summarise a merged checkpoint directory (or, before the merge, a run's shards).

    Args:
        path: The checkpoint or run directory.
        verify: Also check the model files' sha256 against the run's record
            (:func:`~dist_pgkm.checkpoint.verify.verify_files`; ``dist-pgkm inspect`` does).

    Raises:
        CheckpointError: ``path`` is not a dist-pgkm checkpoint or run directory, a file is
            unreadable, or (with ``verify``) a model file differs from its recorded sha256.
    """
    path = Path(path)
    config_path = path / "config.json"
    manifest = Manifest.read(path)
    if not config_path.is_file() and manifest is None:
        raise CheckpointError(
            f"{path}: neither config.json nor {MANIFEST_NAME} found; not a dist-pgkm checkpoint. "
            "Pass the --out directory of `dist-pgkm quantize`."
        )
    qconfig: dict[str, Any] = {}
    if config_path.is_file():
        qconfig = _read_json(config_path).get("quantization_config", {})
    if config_path.is_file() and qconfig.get("quant_method") != "pgkm":
        raise CheckpointError(
            f"{config_path}: no pgkm quantization_config; this is not a dist-pgkm checkpoint."
        )
    records = manifest.layers if manifest is not None else {}
    centroid_dtype = qconfig.get(
        "centroid_dtype", manifest.run_option("centroid_dtype") if manifest is not None else None
    )
    if centroid_dtype not in CENTROID_DTYPES:
        raise CheckpointError(
            f"{path}: centroid_dtype {centroid_dtype!r} is not one of {sorted(CENTROID_DTYPES)}; "
            f"config.json or {MANIFEST_NAME} was edited. To rewrite them, {REMERGE}."
        )
    version = str(qconfig.get("format_version", ""))
    summary = CheckpointSummary(path, qconfig.get("method", "?"))
    tied = qconfig.get("tied", {})
    for name in sorted(set(qconfig.get("layers", {})) | set(records), key=_natural):
        raw = qconfig.get("layers", {}).get(name)
        spec: LayerSpec | None = None
        if raw is not None:
            where = f"{config_path}: quantization_config.layers[{name!r}]"
            spec = LayerSpec.parse(raw, version, where, f"To rewrite it, {REMERGE}.")
        stats: dict[str, Any] = {}
        record = records.get(name)
        if record is not None and (path / record.shard).is_file():
            meta, _ = read_shard_header(path / record.shard)
            stats = _shard_stats(meta, path / record.shard)
            if spec is None:
                spec = layer_spec(meta, str(path / record.shard))
        if spec is None:
            continue
        summary.layers.append(
            LayerSummary(
                name=name,
                kind=spec.kind,
                shape=spec.shape,
                block_size=spec.block_size,
                k=spec.k,
                k_used=spec.k_used,
                bits=spec.bits,
                n_weights=spec.n_weights,
                code_bytes=spec.code_bytes(),
                codebook_bytes=spec.codebook_bytes(centroid_dtype),
                bits_per_weight=spec.bits_per_weight(centroid_dtype),
                codebook_rows=spec.codebook_rows,
                scale_group=spec.scale_group,
                n_outliers=spec.n_outliers,
                side_bytes=spec.side_bytes(),
                metric=spec.metric,
                sse=stats.get("sse"),
                weight_sq=stats.get("weight_sq"),
                empty_after_init=stats.get("empty_after_init"),
                empty_total=stats.get("empty_total"),
                empty_final=stats.get("empty_final"),
                seconds=record.seconds if record else None,
                tied=tuple(t for t, owner in tied.items() if owner == name),
            )
        )
    files = _model_files(path)
    if all(f.is_file() for f in files) and config_path.is_file():
        quantized_keys = {
            f"{layer.name}.{suffix}" for layer in summary.layers for suffix in TENSOR_SUFFIXES
        }
        if verify:
            summary.verified = verify_files(path, files)
        for file in files:
            try:
                header = read_header(file)
            except UnreadableFile as exc:
                raise CheckpointError(
                    f"{file}: not a readable safetensors file ({exc.why}). The file is "
                    f"truncated or corrupt; to rewrite it, {REMERGE}."
                ) from exc
            summary.checkpoint_bytes += header.size
            for key, entry in header.tensors.items():
                if key in quantized_keys:
                    continue
                numel = math.prod(entry.shape)
                summary.float_bytes += numel * element_bytes(entry.dtype)
                if entry.dtype.startswith(("F", "BF")):  # integer buffers are not parameters
                    summary.float_params += numel
    return summary
