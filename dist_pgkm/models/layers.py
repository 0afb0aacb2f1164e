"""Which layers of a model can be quantized, and which checkpoint tensor holds each weight.

With a ``config.json``, the model class named in its ``architectures`` is built on the meta
device (no memory, no random init) and its modules are matched against the checkpoint: the
architecture, not a per-model table, says what is a Linear, an Embedding or a Conv2d and which
weights are tied. Without a config, tensor shapes are the only evidence.

transformers is imported on first use, never by ``import dist_pgkm``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dist_pgkm.errors import ModelSourceError
from dist_pgkm.models.hf_keys import key_renamer
from dist_pgkm.models.source import ModelSource, TensorInfo

__all__ = ["LayerInfo", "LayerKind", "build_meta_model", "checkpoint_keys", "find_layers"]

logger = logging.getLogger(__name__)

LayerKind = Literal["linear", "embedding", "conv2d"]

# Module types whose weight can be product-quantized. Subclasses count (looked up along the MRO):
# e.g. nn.MultiheadAttention's NonDynamicallyQuantizableLinear is a Linear.
_LAYER_KINDS: dict[type[nn.Module], LayerKind] = {
    nn.Linear: "linear",
    nn.Embedding: "embedding",
    nn.Conv2d: "conv2d",
}
# Without a config: the kind a weight of this rank would have.
_KIND_BY_RANK: dict[int, LayerKind] = {2: "linear", 4: "conv2d"}


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer of a source.

    Attributes:
        name: Module path in the model, e.g. ``"model.layers.0.mlp.down_proj"``.
        kind: ``"linear"``, ``"embedding"`` or ``"conv2d"``.
        tensor: Checkpoint key of its weight, e.g. ``"model.layers.0.mlp.down_proj.weight"``.
            It differs from ``f"{name}.weight"`` when the checkpoint was saved from the base
            model of the class in ``architectures`` (or the other way round), or when
            transformers renames the key on load (ViT's ``...attention.attention.query``).
        shape: Weight shape as stored: ``(out, in)``, ``(num, dim)`` or ``(out, in/g, kh, kw)``.
        tied: Other modules whose weight *is* this tensor, e.g. ``("lm_head",)`` for
            ``model.embed_tokens`` with ``tie_word_embeddings``.
    """

    name: str
    kind: LayerKind
    tensor: str
    shape: tuple[int, ...]
    tied: tuple[str, ...] = ()


def find_layers(source: ModelSource) -> list[LayerInfo]:
    """List the quantizable layers of a source, in the order of their weights in the files.

    With a ``config.json``: the model of ``config["architectures"][0]`` is built on the meta
    device; every ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d`` (or subclass) whose weight is
    in the checkpoint with the module's shape is a layer. Checkpoint keys are matched as
    ``from_pretrained`` matches them: renamed by transformers' checkpoint conversion mapping,
    with the base-model prefix added or removed. Modules sharing one weight Parameter are
    reported once, by the module whose key the checkpoint holds, with the others in
    :attr:`LayerInfo.tied`. Modules whose weight the checkpoint lacks (a head the checkpoint was
    not saved with), or stores in a form transformers converts on load (fused, split,
    transposed), are skipped and logged. Layers of other types (e.g. transformers' ``Conv1D``
    in GPT-2) are not found.

    Without a config (a bare ``.safetensors`` file): every floating-point tensor whose key ends
    in ``.weight`` is a layer, ``"linear"`` if it is 2-D and ``"conv2d"`` if 4-D; others are
    ignored. An embedding table is stored like a Linear weight, ``(num, dim)``, so it is
    reported as ``"linear"``: its sub-vectors are cut along the same last dimension either way.
    Tied weights cannot be seen without the architecture.

    Args:
        source: The opened model.

    Returns:
        The layers, ordered by the position of their weight in :meth:`ModelSource.tensors`.

    Raises:
        ModelSourceError: If the config names no architecture or one transformers does not
            have, if transformers is not installed, if a module's weight is stored with another
            shape, or if the config matches none of the checkpoint's tensors.
    """
    tensors = source.tensors()
    config = source.config()
    if config is None:
        layers = _layers_from_shapes(tensors)
    else:
        layers = _layers_from_architecture(build_meta_model(config), tensors, source)
    position = {key: i for i, key in enumerate(tensors)}
    layers.sort(key=lambda layer: position[layer.tensor])
    counts = collections.Counter(layer.kind for layer in layers)
    logger.info(
        "%s: %d quantizable layers (%s)",
        source.path,
        len(layers),
        ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none",
    )
    return layers


def build_meta_model(config: dict[str, Any], *, real_buffers: bool = False) -> nn.Module:
    """Build the transformers model a config describes, on the meta device.

    No weight memory is allocated and no random initialisation is paid for: SmolLM2-135M builds
    in ~40 ms once transformers has imported its modeling code (~2-3 s on the first call).
    Tied weights are tied as transformers ties them.

    Args:
        config: A parsed ``config.json``; ``config["architectures"][0]`` names the class.
        real_buffers: Build the buffers on the CPU, as the model's constructor computes them
            (rotary frequencies, position ids: small, and absent from checkpoints), so that the
            model can run once its parameters are filled in. Needs ``accelerate``.

    Returns:
        The model, every parameter (and, unless ``real_buffers``, every buffer) on the meta
        device.

    Raises:
        ModelSourceError: If the config names no architecture, if transformers (or, with
            ``real_buffers``, accelerate) is not installed or has no class of that name.
    """
    architectures = config.get("architectures")
    if not (
        isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
    ):
        raise ModelSourceError(
            'config.json has no "architectures" list naming the model class, so the model '
            'cannot be built to find its layers. Add it (e.g. "architectures": '
            '["LlamaForCausalLM"]), or quantize the bare .safetensors file, whose layers are '
            "then found from tensor shapes."
        )
    name = architectures[0]
    try:
        import transformers
    except ImportError as exc:
        raise ModelSourceError(
            f"Finding the layers of a {name} model needs transformers, which is not installed. "
            f"Install the model extras: `pip install 'dist-pgkm[models]'`."
        ) from exc
    found = getattr(transformers, name, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ModelSourceError(
            f"transformers {transformers.__version__} has no model class {name!r} (named by "
            f'config.json\'s "architectures"); models that need trust_remote_code are not '
            f"supported. Upgrade transformers if {name} is newer than it, or quantize the bare "
            f".safetensors file instead, whose layers are found from tensor shapes."
        )
    # transformers' model classes are only partly typed; treat the class as dynamic.
    model_class: Any = found
    model_config = model_class.config_class.from_dict(config)
    if not real_buffers:
        with torch.device("meta"):
            model: nn.Module = model_class(model_config)
        return model
    try:
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise ModelSourceError(
            f"Running a {name} model layer by layer needs accelerate, which is not installed. "
            "Install the model extras: `pip install 'dist-pgkm[models]'`."
        ) from exc
    # Parameters go to the meta device as they are registered; buffers stay where the
    # constructor computed them.
    with init_empty_weights(include_buffers=False):
        model = model_class(model_config)
    # Inside the context a tie registers a copy of the tied parameter; tie again outside it.
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model


def checkpoint_keys(model: nn.Module, source: ModelSource) -> dict[str, str]:
    """Map the parameter names of a model built by :func:`build_meta_model` to checkpoint keys.

    Keys are matched as :func:`find_layers` matches them (transformers' renaming, base-model
    prefix). A parameter the checkpoint does not store as is (missing, or converted on load)
    has no entry.

    Args:
        model: The model, e.g. from :func:`build_meta_model`.
        source: The opened checkpoint.

    Returns:
        ``{parameter name: checkpoint key}``.
    """
    return _checkpoint_keys(model, source.tensors(), source)


def _layers_from_shapes(tensors: dict[str, TensorInfo]) -> list[LayerInfo]:
    layers: list[LayerInfo] = []
    for key, info in tensors.items():
        kind = _KIND_BY_RANK.get(len(info.shape))
        if kind is not None and key.endswith(".weight") and info.dtype.is_floating_point:
            layers.append(LayerInfo(key.removesuffix(".weight"), kind, key, info.shape))
    return layers


def _layers_from_architecture(
    model: nn.Module, tensors: dict[str, TensorInfo], source: ModelSource
) -> list[LayerInfo]:
    """Match the meta model's quantizable modules with the checkpoint's tensors."""
    stored_as = _checkpoint_keys(model, tensors, source)
    # Modules sharing one weight Parameter, in module order: {id(weight): [(name, kind)]}.
    groups: dict[int, list[tuple[str, LayerKind]]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        kind = _kind_of(module)
        weight = getattr(module, "weight", None)
        if kind is not None and isinstance(weight, torch.Tensor):
            groups.setdefault(id(weight), []).append((name, kind))
            shapes[id(weight)] = tuple(weight.shape)
    tie_sources = _tie_sources(model)
    position = {key: i for i, key in enumerate(tensors)}

    layers: list[LayerInfo] = []
    absent: list[str] = []
    for weight_id, members in groups.items():
        stored = [(name, kind) for name, kind in members if f"{name}.weight" in stored_as]
        if not stored:
            absent.extend(name for name, _ in members)
            continue
        # With several stored copies of a tied weight, transformers keeps the tie's source;
        # otherwise the first in the files owns it.
        owner, kind = min(
            stored,
            key=lambda m: (
                f"{m[0]}.weight" not in tie_sources,
                position[stored_as[f"{m[0]}.weight"]],
            ),
        )
        if len(stored) > 1:
            logger.warning(
                "%s: %s share one weight in %s but the checkpoint stores %d copies; %s's is used",
                source.path,
                ", ".join(name for name, _ in stored),
                type(model).__name__,
                len(stored),
                owner,
            )
        key = stored_as[f"{owner}.weight"]
        expected = shapes[weight_id]
        if tensors[key].shape != expected:
            raise ModelSourceError(
                f"{source.path}: tensor {key!r} has shape {tensors[key].shape}, but "
                f"config.json describes {owner} ({type(model).__name__}) with a weight of shape "
                f"{expected}. The config belongs to another model or size; put the model's own "
                f"config.json next to its weights."
            )
        tied = tuple(name for name, _ in members if name != owner)
        layers.append(LayerInfo(owner, kind, key, tensors[key].shape, tied))
    if absent:
        logger.info(
            "%s: %d module(s) of %s have no weight stored as is in the checkpoint and are left "
            "as they are: %s",
            source.path,
            len(absent),
            type(model).__name__,
            ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else ""),
        )
    if groups and not layers:
        example = next(iter(groups.values()))[0][0]
        raise ModelSourceError(
            f"{source.path}: none of the {len(groups)} Linear/Embedding/Conv2d weights of "
            f"{type(model).__name__} (e.g. {example}.weight) is in the checkpoint. config.json "
            f"does not describe these weights; put the model's own config.json next to them, "
            f"or pass the bare .safetensors file."
        )
    return layers


def _kind_of(module: nn.Module) -> LayerKind | None:
    for cls in type(module).__mro__:
        kind = _LAYER_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def _checkpoint_keys(
    model: nn.Module, tensors: dict[str, TensorInfo], source: ModelSource
) -> dict[str, str]:
    """Map the model's parameter names to the checkpoint keys of the tensors stored as they are.

    Keys are renamed as ``from_pretrained`` renames them: first by transformers' checkpoint
    conversion mapping (transformers 5 renamed modules of some models, e.g. ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj`` of the
    model), then by adding or removing the base-model prefix (``bert.`` in
    ``BertForMaskedLM``) when only that makes the key a parameter of the model. Tensors that
    transformers *converts* on load (fuses, splits, transposes, permutes) are not the model's
    parameters as stored; they are left out, so their modules are not reported.
    """
    rename = _transformers_renaming(model)
    params = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    head = f"{prefix}." if isinstance(prefix, str) and prefix else None
    stored_as: dict[str, str] = {}
    converted: list[str] = []
    for key in tensors:
        name = rename(key)
        if name is None:
            converted.append(key)
            continue
        if head is not None and name not in params:
            if name.startswith(head) and name.removeprefix(head) in params:
                name = name.removeprefix(head)
            elif f"{head}{name}" in params:
                name = f"{head}{name}"
        stored_as.setdefault(name, key)
    if converted:
        logger.info(
            "%s: %d tensor(s) are converted by transformers on load, not used as stored: %s",
            source.path,
            len(converted),
            ", ".join(converted[:5]) + (", ..." if len(converted) > 5 else ""),
        )
    return stored_as


def _transformers_renaming(model: nn.Module) -> Callable[[str], str | None]:
    """Return checkpoint key -> model key per transformers' conversion mapping.

    The callable returns None for a key that a WeightConverter transforms (not a pure
    rename). The base-model prefix is handled by the caller, version-independently.
    """
    renamer = key_renamer(model)

    def rename(key: str) -> str | None:
        name, converted = renamer(key)
        return None if converted else name

    return rename


def _tie_sources(model: nn.Module) -> set[str]:
    """Parameter names that transformers ties others to (the input embedding, usually)."""
    mapping = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(mapping, dict):
        mapping = getattr(model, "_tied_weights_keys", None)
    if not isinstance(mapping, dict):
        return set()
    return {value for value in mapping.values() if isinstance(value, str)}
