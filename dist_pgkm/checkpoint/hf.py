"""Load a dist-pgkm checkpoint (docs/format.md) as a transformers model.

Two doors, one mechanism: :func:`load` and ``transformers.AutoModel*.from_pretrained(DIR)``
(after ``import dist_pgkm``, see :mod:`dist_pgkm.checkpoint.hf_hook`) both run
transformers' own ``from_pretrained`` with the :class:`PGKMHfQuantizer` registered for
``quant_method: "pgkm"``. transformers builds the model on the meta device; the quantizer then

1. reads the safetensors headers (no tensor data) and swaps a PQ module
   (:mod:`dist_pgkm.pq.modules`) in for every layer of ``quantization_config.layers`` and for
   every tied layer of ``quantization_config.tied``;
2. rewrites transformers' tied-weight mapping from ``lm_head.weight`` (a property of a PQ
   module, which transformers cannot assign) to the codebook ``lm_head.centroids``, so that
   transformers ties the tied layer's codebook to the embedding's, and it checks every key
   (missing or unexpected), shape and dtype against the model before a byte is loaded;
3. after transformers has assigned the tensors (by ``setattr``, bypassing
   ``_load_from_state_dict``), unpacks every ``codes`` buffer into the ``index`` the forward
   uses, which checks that every code is below ``k_used`` and that the scales and outliers are
   well formed (finite; outliers sorted, distinct, inside the weight), and makes the tied layer
   share the embedding's ``codes``, ``index`` and outliers as well (its scales, a Parameter,
   are tied by transformers like the codebook).

Non-persistent buffers (rotary ``inv_freq``, BERT ``position_ids``) are initialised by
transformers as for any model. A bad checkpoint raises :class:`CheckpointError` naming the file,
the layer and the fix. ``load(DIR, dense=True)`` (and :func:`export_dense`) swap every PQ module
for its float module holding the decoded weight, giving a plain transformers model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dist_pgkm.checkpoint.spec import (
    CENTROID_DTYPES,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    REMERGE,
    TENSOR_SUFFIXES,
    LayerSpec,
)
from dist_pgkm.checkpoint.verify import verification, verify_enabled, verify_files
from dist_pgkm.errors import CheckpointError, InvalidInputError
from dist_pgkm.models.hf_keys import key_renamer
from dist_pgkm.pq.infer import Forward, forward_default
from dist_pgkm.pq.modules import PQConv2d, PQEmbedding, PQLinear, PQModule, pq_module_for
from dist_pgkm.utils.memory import release_freed_heap
from dist_pgkm.utils.safetensors_io import UnreadableFile, read_header

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "HEADER_METADATA",
    "KINDS",
    "QUANT_METHOD",
    "LayerSpec",
    "PGKMConfig",
    "PGKMHfQuantizer",
    "export_dense",
    "load",
    "register",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "pgkm"
"""``quantization_config.quant_method`` of a dist-pgkm checkpoint."""

HEADER_METADATA = {"quant_method": QUANT_METHOD, "dist_pgkm_format": FORMAT_VERSION}
"""Entries every model file's safetensors ``__metadata__`` carries (besides ``format: pt``);
``dist_pgkm_format`` is the file's format version, that of ``quantization_config``."""

KINDS: dict[str, type[PQModule]] = {
    "linear": PQLinear,
    "embedding": PQEmbedding,
    "conv2d": PQConv2d,
}
"""``quantization_config.layers[*].kind`` -> the PQ module that loads it."""

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_MAX_LISTED = 8  # problems listed in one error message
_REMERGE = REMERGE
_FIX = (
    "The weights do not match config.json: a file is truncated or was edited, or the two come "
    f"from different runs. To repair the checkpoint, {_REMERGE}."
)
# A PQ module's tensors besides its codebook that a tied layer shares after loading (only
# Parameters can be tied by transformers: the codebook and the scales).
_SHARED_BUFFERS = ("codes", "outlier_idx", "outlier_val")
# Files of a checkpoint directory that export_dense does not copy: save_pretrained writes its
# own, and the run's bookkeeping describes the quantized model, not the dense one.
_NOT_EXPORTED = {
    "config.json",
    "generation_config.json",
    "manifest.json",
    "report.json",
    "report",
    "shards",
}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".gguf")


# --------------------------------------------------------------------------------------------
# quantization_config


class PGKMConfig(QuantizationConfigMixin):
    """transformers' view of ``config.json`` → ``quantization_config`` (docs/format.md).

    ``to_dict()`` gives back exactly the keys of the format, so ``save_pretrained`` writes a
    valid dist-pgkm config.

    Args:
        quant_method: Must be ``"pgkm"``.
        format_version: A format version this dist-pgkm reads (1 or 2); kept, so that a model
            loaded from a format-1 checkpoint saves as format 1 (which can hold it).
        centroid_dtype: ``float16``, ``bfloat16`` or ``float32``: dtype of every stored codebook.
        method: Clustering method that produced the codebooks (informative).
        layers: Quantized module name -> its :class:`LayerSpec` fields.
        tied: Tied module name -> quantized module whose codebook and codes it shares.

    Raises:
        CheckpointError: Another format version, an unknown key or an inconsistent entry.
    """

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format_version: int = int(FORMAT_VERSION),
        centroid_dtype: str = "float16",
        method: str = "pgkm",
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        tied: Mapping[str, str] | None = None,
        **unknown: Any,
    ) -> None:
        if type(format_version) is not int or str(format_version) not in READABLE_VERSIONS:
            raise CheckpointError(
                f"config.json: quantization_config.format_version is {format_version!r}; this "
                f"dist-pgkm reads formats {' and '.join(READABLE_VERSIONS)}. Load it with the "
                "dist-pgkm version that wrote it, or quantize the source model again with this one."
            )
        if unknown:
            raise CheckpointError(
                f"config.json: quantization_config has unknown keys {sorted(unknown)} for format "
                f"{format_version}. Remove them, or use the dist-pgkm version that wrote them."
            )
        if quant_method != QUANT_METHOD:
            raise CheckpointError(
                f"config.json: quantization_config.quant_method is {quant_method!r}, not "
                f"{QUANT_METHOD!r}: this is not a dist-pgkm checkpoint."
            )
        if centroid_dtype not in CENTROID_DTYPES:
            raise CheckpointError(
                f"config.json: quantization_config.centroid_dtype {centroid_dtype!r} is not one "
                f"of {sorted(CENTROID_DTYPES)}. To rewrite it, {_REMERGE}."
            )
        # transformers looks quantizers up by this string; its QuantizationMethod enum is closed.
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.format_version = format_version
        self.centroid_dtype = centroid_dtype
        self.method = method
        self.layers = {str(name): dict(raw) for name, raw in (layers or {}).items()}
        self.tied = {str(target): str(source) for target, source in (tied or {}).items()}
        self.specs()  # validate now, not halfway through loading
        for target, source in self.tied.items():
            if source not in self.layers or target in self.layers:
                raise CheckpointError(
                    f"config.json: quantization_config.tied maps {target!r} to {source!r}, but a "
                    "tied layer must be absent from `layers` and tied to a layer listed there. "
                    f"To rewrite the config, {_REMERGE}."
                )

    def specs(self) -> dict[str, LayerSpec]:
        """The validated :class:`LayerSpec` of every quantized layer, by checkpoint name.

        Raises:
            CheckpointError: A key is missing or unknown, or the numbers are inconsistent.
        """
        fix = f"The config was edited or written by another tool; to rewrite it, {_REMERGE}."
        return {
            name: LayerSpec.parse(
                raw,
                str(self.format_version),
                f"config.json: quantization_config.layers[{name!r}]",
                fix,
            )
            for name, raw in self.layers.items()
        }

    @property
    def header_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` entries of this checkpoint's model files."""
        return {"quant_method": QUANT_METHOD, "dist_pgkm_format": str(self.format_version)}

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "centroid_dtype": self.centroid_dtype,
            "method": self.method,
            "layers": {name: dict(raw) for name, raw in self.layers.items()},
            "tied": dict(self.tied),
        }


# --------------------------------------------------------------------------------------------
# safetensors headers


@dataclass(frozen=True)
class _TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, _TensorInfo]]:
    """The ``__metadata__`` and the tensors' dtypes and shapes of a safetensors file."""
    try:
        header = read_header(path)
    except UnreadableFile as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc.why}). The file is truncated or "
            f"corrupt; to rewrite it, {_REMERGE}."
        ) from exc
    tensors = {
        key: _TensorInfo(str(path), entry.dtype, entry.shape)
        for key, entry in header.tensors.items()
    }
    return header.metadata, tensors


def _read_headers(
    files: Iterable[str | os.PathLike[str]], expected: Mapping[str, str]
) -> dict[str, _TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint, after checking each file's metadata.

    Args:
        files: The model files.
        expected: The ``__metadata__`` entries each must carry (those of its config's format).
    """
    tensors: dict[str, _TensorInfo] = {}
    for file in files:
        path = Path(file)
        meta, infos = _read_header(path)
        wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise CheckpointError(
                f"{path}: the header metadata has {wrong}, a dist-pgkm checkpoint whose "
                f"config.json says format {expected.get('dist_pgkm_format')} has "
                f"{dict(expected)}. The file was written by another tool or version, or belongs "
                f"to another run; to rewrite it, {_REMERGE}."
            )
        tensors.update(infos)
    return tensors


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({path / str(name) for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc}). {_FIX}") from exc
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{path}: neither model.safetensors nor model.safetensors.index.json. The run did "
            "not finish: run the same `dist-pgkm quantize` command again to resume and merge."
        )
    return [single]


# --------------------------------------------------------------------------------------------
# the quantizer


def _exact(name: str) -> str:
    """A pattern matching exactly ``name`` (transformers reads tied keys as regexes)."""
    return "^" + re.escape(name) + "$"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def _resolve(name: str, modules: Mapping[str, nn.Module], prefix: str) -> str | None:
    """The model's name of a checkpoint module, adding or dropping the base-model prefix."""
    if name in modules:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in modules:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in modules:
        return f"{prefix}.{name}"
    return None


_UNSET = object()


class PGKMHfQuantizer(HfQuantizer):
    """Loads dist-pgkm checkpoints in ``from_pretrained`` (see the module docstring).

    Args:
        quantization_config: The checkpoint's :class:`PGKMConfig`.
        **kwargs: ``pre_quantized`` (must be true: this quantizer only loads).
    """

    requires_calibration = True  # loads quantized checkpoints; `dist-pgkm quantize` makes them
    quantization_config: PGKMConfig

    def __init__(self, quantization_config: PGKMConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.placed: dict[str, str] = {}  # model module name -> checkpoint layer name
        self.ties: dict[str, str] = {}  # tied PQ module -> the PQ module it shares
        self._files: dict[str, str] = {}  # checkpoint key -> file name
        self._where = "checkpoint"
        self._saved_tied_keys: list[tuple[Any, object]] = []
        self._ignored_missing: set[str] = set()

    # -- transformers hooks ------------------------------------------------------------------

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> PreTrainedModel:
        headers = None
        if checkpoint_files:
            directory = Path(checkpoint_files[0]).parent
            # Problems name the model file, or the directory when there are several files.
            self._where = str(checkpoint_files[0] if len(checkpoint_files) == 1 else directory)
            headers = _read_headers(checkpoint_files, self.quantization_config.header_metadata)
            self._files = {key: info.file for key, info in headers.items()}
            if verify_enabled():
                verify_files(directory, checkpoint_files)
        strict = self._strict(model)
        self._place_modules(model, strict)
        self._rewrite_ties(model)
        if headers is None:
            logger.debug("no checkpoint files (a state dict was passed): header checks skipped")
        else:
            self._check_tensors(model, headers, strict)
        return model

    def _process_model_after_weight_loading(
        self, model: PreTrainedModel, **kwargs: Any
    ) -> PreTrainedModel:
        for name, layer in self.placed.items():
            module = model.get_submodule(name)
            assert isinstance(module, PQModule), name
            file = self._files.get(f"{layer}.codes", self._where)
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if any(t.is_meta for t in tensors if t is not module.index):
                raise CheckpointError(f"{file}: layer {layer} was not loaded. {_FIX}")
            try:
                module.refresh_index()
            except InvalidInputError as exc:
                raise CheckpointError(f"{file}: layer {layer}: {exc} {_FIX}") from exc
        for target, source in self.ties.items():
            tied, shared = model.get_submodule(target), model.get_submodule(source)
            assert isinstance(tied, PQModule), target
            assert isinstance(shared, PQModule), source
            tied.tie_to(shared)
        # From now on the config describes this model, under this model's module names.
        config = self.quantization_config
        config.layers = {name: config.layers[layer] for name, layer in self.placed.items()}
        config.tied = dict(self.ties)
        return model

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> Any:
        from transformers import PreTrainedModel

        for name in self.placed:
            module = model.get_submodule(name)
            assert isinstance(module, PQModule), name
            _set_submodule(model, name, module.to_float(dtype))
        for target, source in self.ties.items():
            module = model.get_submodule(target)
            assert isinstance(module, PQModule), target
            dense = module.to_float(dtype)
            dense.weight = model.get_submodule(source).weight  # tied: the same Parameter
            _set_submodule(model, target, dense)
        for owner, saved in self._saved_tied_keys:
            if saved is _UNSET:
                del owner._tied_weights_keys
            else:
                owner._tied_weights_keys = saved
        ignored = set(model._keys_to_ignore_on_load_missing or ())
        model._keys_to_ignore_on_load_missing = ignored - self._ignored_missing
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
        model.tie_weights(recompute_mapping=False)
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and hasattr(module.config, "_is_quantized"):
                del module.config._is_quantized
        self.placed, self.ties = {}, {}
        return model

    def get_state_dict_and_metadata(
        self, model: PreTrainedModel
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The format's state dict: codebooks in ``centroid_dtype``, scales and outlier values
        in fp16, outlier indices int32, tied layers left out; the format of the loaded
        checkpoint (a format-1 model has nothing format 1 cannot hold)."""
        dtype = getattr(torch, self.quantization_config.centroid_dtype)
        stored = {"centroids": dtype, "scales": torch.float16, "outlier_val": torch.float16}
        stored["outlier_idx"] = torch.int32
        state: dict[str, torch.Tensor] = model.state_dict()
        for target in self.ties:
            for suffix in TENSOR_SUFFIXES:
                state.pop(f"{target}.{suffix}", None)
        for name in self.placed:
            for suffix, suffix_dtype in stored.items():
                if f"{name}.{suffix}" in state:
                    state[f"{name}.{suffix}"] = state[f"{name}.{suffix}"].to(suffix_dtype)
        return state, self.quantization_config.header_metadata

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # centroids are Parameters: fine-tuning moves the codebooks

    # -- steps -------------------------------------------------------------------------------

    @staticmethod
    def _strict(model: PreTrainedModel) -> bool:
        """Whether ``model`` is the architecture the checkpoint was written from.

        A checkpoint loaded into another class of its family (``AutoModel`` on a causal-LM
        checkpoint drops ``lm_head``) may leave tensors unused, as transformers allows.
        """
        architectures = getattr(model.config, "architectures", None) or []
        return not architectures or type(model).__name__ in architectures

    def _place_modules(self, model: PreTrainedModel, strict: bool) -> None:
        """Swap an empty (meta) PQ module in for every quantized and every tied layer."""
        modules = dict(model.named_modules())
        prefix = getattr(model, "base_model_prefix", "") or ""
        specs = self.quantization_config.specs()
        for layer, spec in specs.items():
            name = _resolve(layer, modules, prefix)
            if name is None:
                if strict:
                    raise CheckpointError(
                        f"{self._where}: layer {layer!r} of quantization_config is not a module "
                        f"of {type(model).__name__}. The config belongs to another model; to "
                        f"rewrite it, {_REMERGE}."
                    )
                logger.info("%s has no module %s: its tensors are not used", type(model), layer)
                continue
            self._swap(model, name, layer, spec, tied=False)
            self.placed[name] = layer
        for target_layer, source_layer in self.quantization_config.tied.items():
            target = _resolve(target_layer, modules, prefix)
            source = next((n for n, layer in self.placed.items() if layer == source_layer), None)
            if target is None or source is None:
                logger.info("%s: tied layer %s is not used", type(model).__name__, target_layer)
                continue
            self._swap(model, target, target_layer, specs[source_layer], tied=True)
            self.ties[target] = source

    def _pq_class(self, module: nn.Module, layer: str) -> type[PQModule]:
        try:
            cls = pq_module_for(module)
        except InvalidInputError as exc:
            raise CheckpointError(f"{self._where}: layer {layer}: {exc}") from exc
        if type(module).forward is not cls.float_type.forward:
            raise CheckpointError(
                f"{self._where}: layer {layer} is a {type(module).__name__}, whose forward "
                f"differs from {cls.float_type.__name__}.forward; a {cls.__name__} would not "
                "compute the same function. Quantize the model without this layer."
            )
        return cls

    def _swap(self, model: nn.Module, name: str, layer: str, spec: LayerSpec, tied: bool) -> None:
        """Put an empty PQ module for ``spec`` in place of ``name`` (of any kind if ``tied``)."""
        module = model.get_submodule(name)
        cls = self._pq_class(module, layer)
        weight = getattr(module, "weight", None)
        shape = None if weight is None else tuple(weight.shape)
        if shape != spec.shape or not (tied or cls is KINDS[spec.kind]):
            what = "the layer it is tied to is" if tied else "quantization_config describes"
            raise CheckpointError(
                f"{self._where}: layer {layer} is a {type(module).__name__} with a weight of "
                f"shape {shape}, but {what} a {spec.kind} of shape {spec.shape}. The config "
                f"belongs to another model; to rewrite it, {_REMERGE}."
            )
        assert weight is not None
        pq = cls.for_loading(
            module,
            spec.k_used,
            spec.block_size,
            codebook_rows=spec.codebook_rows,
            scale_group=spec.scale_group,
            n_outliers=spec.n_outliers,
        )
        # The codebook, scales and outlier values take the dtype the float weight has, so that
        # transformers casts them as it would have cast that weight: float32 models load fp16/
        # bf16 values exactly, and a half-precision model gets half-precision PQ outputs, as
        # its other layers expect.
        pq.centroids = nn.Parameter(
            torch.empty(pq.centroids.shape, dtype=weight.dtype, device="meta")
        )
        if pq.scales is not None:
            pq.scales = nn.Parameter(
                torch.empty(pq.scales.shape, dtype=weight.dtype, device="meta")
            )
        if pq.outlier_val is not None:
            pq.outlier_val = torch.empty(pq.outlier_val.shape, dtype=weight.dtype, device="meta")
        _set_submodule(model, name, pq)

    def _tied_keys(self, parameters: bool) -> dict[str, str]:
        """A tied PQ module's key -> the key it shares, for every tie: its Parameters (codebook
        and scales, which transformers ties) or its buffers (shared after loading)."""
        specs = self.quantization_config.specs()
        dtype = self.quantization_config.centroid_dtype
        keys: dict[str, str] = {}
        for target, source in self.ties.items():
            for suffix in specs[self.placed[source]].tensors(dtype):
                if (suffix in ("centroids", "scales")) == parameters:
                    keys[f"{target}.{suffix}"] = f"{source}.{suffix}"
        return keys

    def _rewrite_ties(self, model: PreTrainedModel) -> None:
        """Tie codebooks instead of ``weight`` properties, in transformers' own mapping."""
        from transformers import PreTrainedModel

        old: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
        pq_modules = set(self.placed) | set(self.ties)
        kept: dict[str, str] = {}
        for target, source in old.items():
            target_module, _, target_param = target.rpartition(".")
            source_module = source.rpartition(".")[0]
            if target_module not in pq_modules and source_module not in pq_modules:
                kept[target] = source
            elif self.ties.get(target_module) == source_module and target_param == "weight":
                continue  # becomes the codebook tie below
            elif target_module in self.placed:
                logger.warning(
                    "%s is quantized on its own in this checkpoint: it is not tied to %s",
                    target_module,
                    source_module,
                )
            else:
                raise CheckpointError(
                    f"{self._where}: {type(model).__name__} ties {target} to the quantized "
                    f"{source}, but quantization_config.tied does not name {target_module}. "
                    f"To rewrite the config, {_REMERGE}."
                )
        for target, source in self.ties.items():
            if old.get(f"{target}.weight") != f"{source}.weight":
                raise CheckpointError(
                    f"{self._where}: quantization_config.tied ties {target} to {source}, but "
                    f"{type(model).__name__} does not tie these weights (is tie_word_embeddings "
                    f"false in config.json?). To rewrite the config, {_REMERGE}."
                )
        if kept == old:
            return
        # Read while loading (`mark_tied_weights_as_initialized` asks for Parameters, so only the
        # codebook and scales go here; the tied buffers, `codes` and the outliers, are shared
        # after loading).
        tied = dict(kept) | self._tied_keys(parameters=True)
        model.all_tied_weights_keys = tied
        # Read by `tie_weights()` when it recomputes the mapping and by `save_pretrained`: the
        # whole mapping, at the top, as exact patterns (sub-models' entries are already in it).
        tied_and_codes = tied | self._tied_keys(parameters=False)
        for prefix, module in model.named_modules():
            if isinstance(module, PreTrainedModel):
                saved = module.__dict__.get("_tied_weights_keys", _UNSET)
                self._saved_tied_keys.append((module, saved))
                patterns = {_exact(t): _exact(s) for t, s in tied_and_codes.items()}
                module._tied_weights_keys = {} if prefix else patterns
        self._ignored_missing = {_exact(t) for t in self._tied_keys(parameters=False)}
        ignored = set(model._keys_to_ignore_on_load_missing or ())
        model._keys_to_ignore_on_load_missing = ignored | self._ignored_missing

    def _check_tensors(
        self, model: PreTrainedModel, headers: Mapping[str, _TensorInfo], strict: bool
    ) -> None:
        """Every key, shape and dtype of the files against the model, before loading.

        Checkpoint keys are mapped to the model's with transformers' own renaming rules, so
        the keys found here are the ones ``from_pretrained`` loads.
        """
        expected: dict[str, torch.Tensor] = model.state_dict()
        rename = key_renamer(model, self)
        prefix = getattr(model, "base_model_prefix", None)
        found: dict[str, str] = {}  # model key -> checkpoint key
        unexpected: list[str] = []
        converted: set[str] = set()
        for key in headers:
            renamed, by_converter = rename(key, prefix, expected)
            if renamed not in expected and key in expected:  # as transformers does
                renamed, by_converter = rename(key, prefix, expected, transforms=False)
            if renamed in expected:
                found[renamed] = key
                if by_converter:
                    converted.add(renamed)
            else:
                unexpected.append(key)

        problems: list[str] = []
        pq_keys: set[str] = set()
        specs = self.quantization_config.specs()
        centroid_dtype = self.quantization_config.centroid_dtype
        for name, layer in self.placed.items():
            spec = specs[layer]
            for param, (dtype, shape) in spec.tensors(centroid_dtype).items():
                pq_keys.add(f"{name}.{param}")
                stored = found.get(f"{name}.{param}")
                if stored is None:
                    continue  # reported as missing below
                info = headers[stored]
                if (info.dtype, info.shape) != (dtype, shape):
                    problems.append(
                        f"{info.file}: {stored} is {info.dtype} {list(info.shape)}, but layer "
                        f"{layer} (k_used={spec.k_used}, block_size={spec.block_size}, "
                        f"bits={spec.bits}, codebook_rows={spec.codebook_rows}, scale_group="
                        f"{spec.scale_group}, n_outliers={spec.n_outliers}) needs {dtype} "
                        f"{list(shape)}"
                    )
        for model_key, key in found.items():
            info, ref = headers[key], expected[model_key]
            if model_key in pq_keys or model_key in converted:
                continue
            if info.shape != tuple(ref.shape):
                problems.append(
                    f"{info.file}: {key} has shape {list(info.shape)}, the model's "
                    f"{model_key} has {list(ref.shape)}"
                )
            elif (info.dtype in _FLOAT_DTYPES) != ref.is_floating_point():
                problems.append(f"{info.file}: {key} is {info.dtype}, the model holds {ref.dtype}")

        missing = self._missing(model, set(expected) - set(found), set(found))
        quantized_missing = {key for key in missing if key in pq_keys}
        if strict or quantized_missing:
            problems += [f"missing {self._layer_key(key)}" for key in sorted(missing)]
        elif missing:
            logger.warning("%s: %d keys are missing: %s", self._where, len(missing), missing)
        unexpected = [key for key in unexpected if not self._ignored_unexpected(model, key)]
        if strict:
            problems += [self._unexpected(key, headers[key].file) for key in sorted(unexpected)]
        elif unexpected:
            logger.info("%s does not use %d tensors: %s", type(model), len(unexpected), unexpected)
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED])
            extra = len(problems) - _MAX_LISTED
            more = f" (and {extra} more)" if extra > 0 else ""
            raise CheckpointError(f"{self._where}: {listed}{more}. {_FIX}")

    def _missing(self, model: PreTrainedModel, absent: set[str], present: set[str]) -> set[str]:
        """Absent keys that are neither tied to a present one nor ignored by the model."""
        ties = dict(model.all_tied_weights_keys)
        ties |= self._tied_keys(parameters=False)
        ignored = getattr(model, "_keys_to_ignore_on_load_missing", None) or set()
        pattern = re.compile("|".join(f"({p})" for p in ignored)) if ignored else None
        missing = set()
        for key in absent:
            partner: str | None = ties.get(key)
            partner = partner or next((t for t, s in ties.items() if s == key), None)
            if partner in present:
                continue  # tying fills it
            if pattern is not None and pattern.search(key):
                continue
            missing.add(key)
        return missing

    @staticmethod
    def _ignored_unexpected(model: PreTrainedModel, key: str) -> bool:
        # The exceptions transformers makes too (modeling_utils._adjust_missing_and_unexpected_keys)
        patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        buffers = [name for name, _ in model.named_buffers()]
        if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
            patterns.add(r"rotary_emb\.inv_freq")
        if any(name.endswith("position_ids") for name in buffers):
            patterns.add(r"(^|\.)position_ids$")
        return any(re.search(p, key) for p in patterns)

    def _layer_key(self, model_key: str) -> str:
        module, _, param = model_key.rpartition(".")
        layer = self.placed.get(module)
        return model_key if layer is None else f"{layer}.{param} of quantized layer {layer}"

    def _unexpected(self, key: str, file: str) -> str:
        module, _, param = key.rpartition(".")
        if module in self.quantization_config.layers and param == "weight":
            return (
                f"{file}: unexpected {key}: {module} is quantized, its float weight is not stored"
            )
        return f"{file}: unexpected {key}"


# --------------------------------------------------------------------------------------------
# public API


def register() -> None:
    """Register :class:`PGKMConfig` and :class:`PGKMHfQuantizer` with transformers.

    Idempotent; a re-imported dist-pgkm replaces its own earlier registration.

    Raises:
        CheckpointError: Another package already registered a ``pgkm`` quantizer.
    """
    for mapping, cls, decorate in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, PGKMConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, PGKMHfQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            if (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
                raise CheckpointError(
                    f"transformers already has a {QUANT_METHOD!r} quantizer ({current.__module__}."
                    f"{current.__qualname__}), so it cannot load dist-pgkm checkpoints. Do not "
                    "import the other package in the same process."
                )
            del mapping[QUANT_METHOD]  # our own, from an earlier import of this module
        decorate(QUANT_METHOD)(cls)


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{path}: no config.json, so this is not a model directory. Point at the output "
            "directory of `dist-pgkm quantize`."
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc}). {_FIX}") from exc
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{config_path}: no quantization_config with quant_method {QUANT_METHOD!r}, so this "
            "is not a dist-pgkm checkpoint. Load plain models with transformers directly."
        )
    try:
        PGKMConfig(**raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}/{exc}") from exc  # messages start with "config.json: "
    return dict(config)


def _default_dtype(config: Mapping[str, Any], files: list[Path]) -> torch.dtype:
    """The source's dtype: config.json's, else that of most float tensors besides the quantized
    layers' (codebooks, scales, outlier values).

    (transformers' ``dtype="auto"`` would take the first float tensor, maybe a codebook.)
    """
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # type: ignore[no-any-return]
    qconfig = config["quantization_config"]
    expected = {"quant_method": QUANT_METHOD, "dist_pgkm_format": str(qconfig["format_version"])}
    quantized = {f"{layer}.{suffix}" for layer in qconfig["layers"] for suffix in TENSOR_SUFFIXES}
    counts: dict[str, int] = {}
    for key, info in _read_headers(files, expected).items():
        if info.dtype in _FLOAT_DTYPES and key not in quantized:
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    if not counts:
        return torch.float32
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return names.get(max(counts, key=counts.__getitem__), torch.float32)


def load(
    path: str | os.PathLike[str],
    dense: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool | None = None,
    forward: Forward = "codes",
) -> PreTrainedModel:
    """Load a dist-pgkm checkpoint directory as its transformers model.

    Args:
        path: Output directory of ``dist-pgkm quantize`` (docs/format.md).
        dense: Replace every PQ module by its float module holding the decoded weight, and
            drop the quantization config: a plain transformers model.
        dtype: dtype of the model (default: the source's, from config.json or the weights).
            Codebooks are cast to it like any weight: a float32 model holds fp16/bf16
            codebooks exactly.
        device: Device to load on.
        verify: Check every model file's sha256 against the one its run recorded
            (``manifest.json``) before loading; reads every byte once. Default: on, unless
            ``$DIST_PGKM_VERIFY`` is ``0`` (:mod:`dist_pgkm.checkpoint.verify`).
        forward: ``"codes"``: the PQ modules compute from their codes (lookup tables for a
            few tokens, decoded tiles for many; docs/inference.md) and hold no unpacked index;
            ``"decode"``: they decode their whole weight in every forward. Switch later with
            :func:`dist_pgkm.pq.infer.use_forward`.

    Returns:
        The model of the class named in config.json ``architectures``, in eval mode, with
        :class:`~dist_pgkm.pq.PQLinear` / ``PQEmbedding`` / ``PQConv2d`` modules in place of
        the quantized layers (unless ``dense``).

    Raises:
        CheckpointError: The directory is not a valid dist-pgkm checkpoint of this format
            version, a model file differs from the sha256 its run recorded, or its
            architecture is unknown to the installed transformers.
    """
    import transformers

    register()
    path = Path(path)
    config = _read_config(path)
    files = _checkpoint_files(path)
    architectures = config.get("architectures") or []
    try:
        cls = getattr(transformers, str(architectures[0])) if architectures else None
    except (AttributeError, ImportError):
        cls = None
    if cls is None:
        raise CheckpointError(
            f"{path}/config.json: architectures {architectures} names no class of transformers "
            f"{transformers.__version__}. Upgrade transformers, or load the directory with "
            "transformers.AutoModel*.from_pretrained after `import dist_pgkm`."
        )
    # Every header checked here, before transformers opens a file: a damaged one is named.
    version = str(config["quantization_config"]["format_version"])
    _read_headers(files, {"quant_method": QUANT_METHOD, "dist_pgkm_format": version})
    kwargs: dict[str, Any] = {"dtype": dtype or _default_dtype(config, files)}
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    with verification(verify), forward_default("decode" if dense else forward):
        model = cls.from_pretrained(path, **kwargs)
    if dense:
        model = model.dequantize()
    # Loading frees ~20 MB of temporaries (transformers' loading state, codebook casts, code
    # checks) that glibc would keep resident: a third of a model loaded from its codes.
    release_freed_heap()
    return model  # type: ignore[no-any-return]


def export_dense(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the decoded float model of a checkpoint as a plain Hugging Face directory.

    ``out`` then loads with transformers alone (no dist-pgkm): ``config.json`` without
    ``quantization_config``, ``model.safetensors`` with the decoded weights, and the tokenizer
    and other files of ``path``. It is built next to ``out`` and renamed into place.

    Args:
        path: dist-pgkm checkpoint directory.
        out: Directory to create (it may exist if empty).

    Returns:
        ``out``.

    Raises:
        CheckpointError: ``path`` is not a valid checkpoint.
        InvalidInputError: ``out`` exists and is not an empty directory.
    """
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"{out} exists and is not an empty directory; export_dense does not overwrite. "
            "Choose a new directory or remove it."
        )
    model = load(path, dense=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    try:
        model.save_pretrained(tmp)
        written = {p.name for p in tmp.iterdir()}
        for item in sorted(path.iterdir()):
            name = item.name
            if (
                name in written
                or name in _NOT_EXPORTED
                or name.startswith(".")
                or name.endswith(_WEIGHT_SUFFIXES)
            ):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / name)
            else:
                shutil.copy2(item, tmp / name)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported the dense model of %s to %s", path, out)
    return out


# Importing this module imports transformers' quantizer registry, which the import hook watches;
# the hook finds this module half-imported then, so the module registers itself.
register()
