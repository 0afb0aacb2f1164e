"""Quant-Noise on a model's layers: wrap their forward, never touch their parameters.

:func:`add_quant_noise` replaces the ``forward`` of each selected ``nn.Linear``,
``nn.Embedding`` and ``nn.Conv2d`` (or subclass) by one that, in training mode, reads
``module.weight`` at that moment, builds the noised weight as a new tensor
(:func:`~dist_pgkm.noise.functional.quant_noise`) and calls the layer's functional op with the
module's own arguments. In eval mode (or at ``p = 0``) the class's own forward runs.

Nothing is cached and nothing is written into a parameter, so the module keeps its class, its
parameters, its state dict and its hooks: the override sits behind ``nn.Module.__call__``, so
hooks installed by DeepSpeed ZeRO-3 (which gather a partitioned weight before the forward and
release it after) run as before, and the weight read inside the forward is the gathered one.
Layer shapes are taken from the module's attributes (``in_features``, ...), never from
``weight.shape``, so wrapping also works on partitioned or meta weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise.functional import (
    BlockQuantizer,
    Codebook,
    NoiseMode,
    check_layout,
    check_p,
    quant_noise,
)
from dist_pgkm.utils.seeding import derive_seed

__all__ = [
    "NOISE_LAYERS",
    "LayerOps",
    "QuantNoise",
    "QuantNoiseHandle",
    "add_quant_noise",
    "layer_ops",
    "quant_noise_handle",
    "remove_quant_noise",
    "select_layers",
]


@dataclass(frozen=True)
class LayerOps:
    """How a weight wrapper (Quant-Noise, DKM) treats one module type."""

    shape: Callable[[nn.Module], tuple[int, ...]]  # weight shape from the module's attributes
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (mod, w, input)
    check: Callable[[nn.Module, str], None]  # refuses settings the functional forward cannot keep


def _linear_shape(module: nn.Module) -> tuple[int, ...]:
    assert isinstance(module, nn.Linear)
    return (module.out_features, module.in_features)


def _linear_forward(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Linear)
    return F.linear(x, weight, module.bias)


def _embedding_shape(module: nn.Module) -> tuple[int, ...]:
    assert isinstance(module, nn.Embedding)
    return (module.num_embeddings, module.embedding_dim)


def _embedding_forward(module: nn.Module, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Embedding)
    return F.embedding(
        ids, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq
    )


def _embedding_check(module: nn.Module, name: str) -> None:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None:
        raise InvalidInputError(
            f"{name}: Embedding with max_norm={module.max_norm} renormalises its weight in place "
            "at every lookup, which Quant-Noise would apply to the noised copy only. Leave this "
            "layer out of Quant-Noise or set max_norm=None."
        )
    if module.sparse:
        raise InvalidInputError(
            f"{name}: Embedding with sparse=True has sparse gradients, which cannot flow back "
            "through the noised weight. Leave this layer out of Quant-Noise or set sparse=False."
        )


def _conv2d_shape(module: nn.Module) -> tuple[int, ...]:
    assert isinstance(module, nn.Conv2d)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _conv2d_forward(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Conv2d)
    # nn.Conv2d's own helper: F.conv2d with the module's stride, padding (and padding_mode),
    # dilation and groups, on the weight it is given.
    out: torch.Tensor = module._conv_forward(x, weight, module.bias)
    return out


def _no_check(module: nn.Module, name: str) -> None:
    del module, name


NOISE_LAYERS: dict[type[nn.Module], LayerOps] = {
    nn.Linear: LayerOps(_linear_shape, _linear_forward, _no_check),
    nn.Embedding: LayerOps(_embedding_shape, _embedding_forward, _embedding_check),
    nn.Conv2d: LayerOps(_conv2d_shape, _conv2d_forward, _no_check),
}


def layer_ops(module: nn.Module) -> LayerOps | None:
    """The ops of ``module``'s type (or a base class of it), None when it is not supported."""
    for base in type(module).__mro__:
        ops = NOISE_LAYERS.get(base)
        if ops is not None:
            return ops
    return None


class QuantNoiseHandle:
    """Quant-Noise installed on one module; :meth:`remove` restores the module's forward.

    Attributes:
        name: The module's name in the model.
        module: The module.
        block_size: Block length ``bs`` (the iPQ layout of the layer).
        mode: ``"drop"`` or ``"quantize"``.
        codebook: Replacement values in quantize mode.
        generator: The layer's own seeded generator, or ``None`` for torch's global RNG.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ops: LayerOps,
        p: float,
        block_size: int,
        mode: NoiseMode,
        codebook: BlockQuantizer | None,
        generator: torch.Generator | None,
    ) -> None:
        self.name = name
        self.module = module
        self.block_size = block_size
        self.mode: NoiseMode = mode
        self.codebook = codebook
        self.generator = generator
        self._ops = ops
        self._p = check_p(p, mode)

    @property
    def p(self) -> float:
        """The noise rate; may be changed between steps (a schedule), validated on assignment."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_p(value, self.mode)

    @property
    def installed(self) -> bool:
        """Whether the module's forward is still this handle's."""
        return quant_noise_handle(self.module) is self

    def noised_weight(self) -> torch.Tensor:
        """A freshly noised copy of ``module.weight`` as it is now (draws a new mask)."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        label = self.name or type(self.module).__name__
        return quant_noise(
            weight, self._p, self.block_size, self.mode, self.generator, self.codebook, label
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The module's forward with Quant-Noise in training mode (installed as ``forward``)."""
        module = self.module
        if not module.training or self._p == 0.0:
            plain: torch.Tensor = type(module).forward(module, input)
            return plain
        return self._ops.forward(module, self.noised_weight(), input)

    def remove(self) -> None:
        """Give the module back its class's forward (no-op if already removed)."""
        if self.installed:
            del vars(self.module)["forward"]

    def __repr__(self) -> str:
        seeded = "seeded" if self.generator is not None else "global RNG"
        return (
            f"QuantNoiseHandle({self.name!r}, {type(self.module).__name__}, p={self._p}, "
            f"block_size={self.block_size}, mode={self.mode!r}, {seeded})"
        )


def quant_noise_handle(module: nn.Module) -> QuantNoiseHandle | None:
    """The Quant-Noise handle installed on ``module``, if any."""
    owner = getattr(vars(module).get("forward"), "__self__", None)
    return owner if isinstance(owner, QuantNoiseHandle) else None


class QuantNoise:
    """The handles :func:`add_quant_noise` installed, by layer name.

    Iterating yields the handles in model order. :meth:`state_dict` holds the state of every
    seeded layer's generator: save it with the training checkpoint and :meth:`load_state_dict`
    it after wrapping the same layers again to resume with the same masks.
    """

    def __init__(self, handles: Sequence[QuantNoiseHandle]) -> None:
        self._handles = {h.name: h for h in handles}

    def __iter__(self) -> Iterator[QuantNoiseHandle]:
        return iter(self._handles.values())

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, name: str) -> QuantNoiseHandle:
        return self._handles[name]

    @property
    def names(self) -> list[str]:
        """Names of the wrapped modules, in model order."""
        return list(self._handles)

    def set_p(self, p: float) -> None:
        """Set the noise rate of every layer (validated for each layer's mode first)."""
        for handle in self:
            check_p(p, handle.mode)
        for handle in self:
            handle.p = p

    def remove(self) -> None:
        """Remove Quant-Noise from every layer of this group."""
        for handle in self:
            handle.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{layer name: generator state}`` of the seeded layers (empty with the global RNG)."""
        return {h.name: h.generator.get_state() for h in self if h.generator is not None}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the generators saved by :meth:`state_dict`.

        Raises:
            InvalidInputError: The state names layers that are not wrapped with a seed here, or
                misses some that are.
        """
        seeded = {h.name for h in self if h.generator is not None}
        unknown, missing = sorted(set(state) - seeded), sorted(seeded - set(state))
        if unknown or missing:
            raise InvalidInputError(
                "the Quant-Noise state does not match the wrapped layers "
                f"(in the state only: {unknown[:3]}; wrapped with a seed but not in the state: "
                f"{missing[:3]}); wrap the same layers with a seed as in the saved run."
            )
        for name, generator_state in state.items():
            generator = self._handles[name].generator
            assert generator is not None
            generator.set_state(generator_state)

    def __repr__(self) -> str:
        more = ", ..." if len(self) > 4 else ""
        return f"QuantNoise({len(self)} layers: {', '.join(self.names[:4])}{more})"


def select_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Modules named exactly, or supported modules fully matching a ``re:`` pattern, in model
    order.

    Raises:
        InvalidInputError: A bad regex, a pattern matching nothing, a missing or unsupported
            module.
    """
    modules = dict(model.named_modules())
    selected: dict[str, nn.Module] = {}
    supported = ", ".join(t.__name__ for t in NOISE_LAYERS)
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise InvalidInputError(
                    f"{pattern!r} is not a valid regular expression: {exc}"
                ) from None
            hits = {
                name: module
                for name, module in modules.items()
                if regex.fullmatch(name) and layer_ops(module) is not None
            }
            if not hits:
                raise InvalidInputError(
                    f"{pattern!r} matches no {supported} module of {type(model).__name__} (the "
                    "pattern must match the whole module name, e.g. 're:.*\\.mlp\\..*')."
                )
            selected.update(hits)
        elif pattern not in modules:
            raise InvalidInputError(
                f"{type(model).__name__} has no module named {pattern!r}; give exact names as in "
                "model.named_modules(), or 're:' + a regular expression."
            )
        elif layer_ops(modules[pattern]) is None:
            raise InvalidInputError(
                f"{pattern} is a {type(modules[pattern]).__name__}; only {supported} (and their "
                "subclasses) can be wrapped. Leave it out of the selection."
            )
        else:
            selected[pattern] = modules[pattern]
    order = {name: i for i, name in enumerate(modules)}
    return dict(sorted(selected.items(), key=lambda item: order[item[0]]))


def add_quant_noise(
    model: nn.Module,
    match: str | Sequence[str],
    p: float,
    block_size: int,
    *,
    mode: NoiseMode = "drop",
    codebooks: Mapping[str, BlockQuantizer] | None = None,
    seed: int | None = None,
) -> QuantNoise:
    """Install Quant-Noise on the selected layers of ``model``.

    All checks run before anything is installed: on an error the model is left as it was.

    Args:
        model: The model (not modified except for the selected modules' ``forward``).
        match: Exact module name(s), or ``re:`` patterns matched against the whole name (which
            select only the Linear / Embedding / Conv2d modules among their matches).
        p: Noise rate: ``[0, 1)`` in drop mode, ``[0, 1]`` in quantize mode.
        block_size: Block length ``bs`` of these layers' iPQ layout.
        mode: ``"drop"`` or ``"quantize"`` (see :mod:`dist_pgkm.noise.functional`).
        codebooks: Quantize mode: ``{layer name: BlockQuantizer}`` for every selected layer,
            e.g. ``Codebook(centroids)`` (nearest codeword) or ``Codebook(centroids, codes)``.
        seed: Run seed for reproducible masks: each layer gets its own CPU ``torch.Generator``
            seeded from (seed, layer name), so a layer's masks depend neither on the other
            layers nor on the device. ``None`` draws from torch's global RNG, whose state
            training frameworks checkpoint and activation checkpointing restores before it
            recomputes a forward; use ``None`` with activation checkpointing (a recompute would
            otherwise draw a different mask than the forward it replays).

    Returns:
        The installed handles (remove them with ``.remove()`` or :func:`remove_quant_noise`).

    Raises:
        InvalidInputError: ``p`` out of range, unknown mode, a name or pattern that selects
            nothing, an unsupported module type, a block size that does not tile a layer, a
            layer already wrapped, or a missing or unfitting codebook in quantize mode.
    """
    p = check_p(p, mode)
    patterns = [match] if isinstance(match, str) else list(match)
    if not patterns:
        raise InvalidInputError("add_quant_noise needs at least one module name or re: pattern.")
    selected = select_layers(model, patterns)
    if mode != "quantize" and codebooks is not None:
        raise InvalidInputError(
            f"codebooks are only used in mode 'quantize', not {mode!r}; pass mode='quantize' "
            "or drop the codebooks."
        )
    if mode == "quantize":
        missing = [name for name in selected if codebooks is None or name not in codebooks]
        if missing:
            raise InvalidInputError(
                f"Quant-Noise mode 'quantize' needs a codebook for every selected layer; none "
                f"for {', '.join(missing[:5])}{', ...' * (len(missing) > 5)}. Pass "
                "codebooks={name: Codebook(centroids[, codes])}."
            )
    handles: list[QuantNoiseHandle] = []
    for name, module in selected.items():
        ops = layer_ops(module)
        assert ops is not None
        label = name or type(module).__name__  # "" is the model itself
        ops.check(module, label)
        n_blocks = check_layout(ops.shape(module), block_size, label)
        codebook = None if codebooks is None else codebooks[name]
        if isinstance(codebook, Codebook):
            codebook.check(n_blocks, block_size, label)
        if quant_noise_handle(module) is not None:
            raise InvalidInputError(
                f"{label} already has Quant-Noise; remove it first (handle.remove() or "
                "remove_quant_noise(model)) to change its settings."
            )
        if "forward" in vars(module):
            raise InvalidInputError(
                f"{label}: its forward is already replaced on the instance (by another wrapper, "
                "e.g. accelerate hooks); Quant-Noise would bypass it. Add Quant-Noise first."
            )
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(derive_seed(seed, name))
        handles.append(
            QuantNoiseHandle(name, module, ops, p, block_size, mode, codebook, generator)
        )
    for handle in handles:
        vars(handle.module)["forward"] = handle.forward
    return QuantNoise(handles)


def remove_quant_noise(model: nn.Module) -> list[str]:
    """Remove every Quant-Noise wrapper from ``model``.

    Returns:
        The names of the modules it was removed from.
    """
    removed = []
    for name, module in model.named_modules():
        handle = quant_noise_handle(module)
        if handle is not None:
            handle.remove()
            removed.append(name)
    return removed
