"""DKM, IDKM, IDKM-JFB and LR²VQ on a model's layers: the weight is clustered in the forward.

:func:`add_dkm` replaces the ``forward`` of each selected ``nn.Linear``, ``nn.Embedding`` or
``nn.Conv2d`` (as Quant-Noise does, see :mod:`dist_pgkm.noise.wrap`: the module keeps its
class and parameters, hooks such as DeepSpeed ZeRO-3's still run). In training mode the forward
cuts ``module.weight`` into sub-vectors in the PQ layout, runs ``iters`` soft k-means steps from
the centroids the previous step ended with (a ``dkm_centroids`` buffer on the module, so it is
checkpointed with the model) and uses the soft weight ``A c``; the gradient reaches the float
weight through the chosen method. In eval mode it uses the hard assignment: every sub-vector
replaced by its nearest centroid, which is exactly what :meth:`DKMLayer.export` writes as
codebook and codes (the PQ format, loadable by ``dist_pgkm.load``).

With ``DKMOptions.rank = d`` the layer is LR²VQ (:mod:`dist_pgkm.dkm.lr2vq`): its sub-vectors
are re-parametrised as ``R P`` (two new parameters, ``lr2vq_r`` ``(n, d)`` and ``lr2vq_p``
``(d, m)``, started from the truncated SVD; the float weight is frozen and no longer used),
``R``'s rows are soft-clustered in ``d`` dimensions, and the layer's weight is the clustered
``R`` times ``P``. Export writes the codebook ``C P``, so the checkpoint is the same PQ format
with block size ``m``.

A module sharing the layer's weight (an LM head tied to the embedding) is passed in ``tied``:
its forward is replaced too and uses the same clustered weight. The first of them to run in a
forward pass clusters (and moves the warm start once); the others reuse that weight, so the
gradients of both uses meet in one graph, as they do for the tied float weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from dist_pgkm.dkm.functional import (
    Method,
    SolverStats,
    hard_assign,
    soft_kmeans,
    soft_weight,
    sq_distances,
)
from dist_pgkm.dkm.lr2vq import low_rank
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise.functional import check_layout
from dist_pgkm.noise.wrap import NOISE_LAYERS, LayerOps, layer_ops, select_layers
from dist_pgkm.pq.codec import from_subvectors, to_subvectors

__all__ = ["BUFFER", "DKM", "DKMLayer", "DKMOptions", "LR2VQLayer", "add_dkm"]

BUFFER = "dkm_centroids"
"""Name of the buffer holding a wrapped layer's current centroids (its warm start)."""
LR2VQ_R = "lr2vq_r"
"""Name of an LR²VQ layer's low-rank representation parameter ``R`` ``(n, d)``."""
LR2VQ_P = "lr2vq_p"
"""Name of an LR²VQ layer's up-projection parameter ``P`` ``(d, m)``."""


@dataclass(frozen=True)
class DKMOptions:
    """How a layer is clustered during training.

    Attributes:
        method: ``dkm``, ``idkm`` or ``idkm-jfb`` (see :mod:`dist_pgkm.dkm.functional`).
        tau: Attention temperature, relative to the mean squared distance of a sub-vector to
            its nearest initial centroid (so one value fits layers of any scale).
        iters: Soft k-means steps per forward.
        chunk: Sub-vectors per piece of the attention (None: all at once).
        rank: None: cluster the sub-vectors themselves (DKM, IDKM, IDKM-JFB). An int ``d``:
            LR²VQ, cluster a learned rank-``d`` representation of them with ``method``.
        solver_iters: ``idkm`` only: most fixed-point iterations of the backward solve.
    """

    method: Method = "idkm"
    tau: float = 1.0
    iters: int = 5
    chunk: int | None = 65536
    rank: int | None = None
    solver_iters: int = 50

    def __post_init__(self) -> None:
        if self.method not in ("dkm", "idkm", "idkm-jfb"):
            raise InvalidInputError(f"method {self.method!r}: choose dkm, idkm or idkm-jfb.")
        if self.tau <= 0 or self.iters < 1 or (self.chunk is not None and self.chunk < 1):
            raise InvalidInputError(
                f"DKM needs tau > 0, iters >= 1 and chunk >= 1 (got tau={self.tau}, "
                f"iters={self.iters}, chunk={self.chunk})."
            )
        if self.rank is not None and self.rank < 1:
            raise InvalidInputError(f"LR²VQ rank {self.rank}: it must be at least 1.")
        if self.solver_iters < 1:
            raise InvalidInputError(
                f"solver_iters {self.solver_iters}: IDKM's solve needs at least 1 iteration."
            )


@dataclass
class _PassWeight:
    """The weight one forward pass computed, and the modules (by id) that have used it."""

    weight: torch.Tensor
    training: bool
    used: set[int] = field(default_factory=set)


class DKMLayer:
    """DKM installed on one module (and the modules tied to it); :meth:`remove` restores their
    forwards and drops the buffer."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ops: LayerOps,
        block_size: int,
        centroids: torch.Tensor,
        options: DKMOptions,
        tied: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.block_size = block_size
        self.options = options
        self.tied = dict(tied or {})  # name -> module sharing this layer's weight
        self.stats = SolverStats()  # IDKM's backward solves on this layer (idkm only)
        self._ops = ops
        self._pass: _PassWeight | None = None  # shared by the tied modules within a pass
        self.shape = ops.shape(module)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            init = self._setup(centroids.detach().to(torch.float32))
            points = self._points().detach()
            pieces = torch.split(points, options.chunk or points.shape[0])
            error = sum(float(sq_distances(xs, init).amin(1).sum()) for xs in pieces)
        # The temperature in units of this layer's mean squared quantization error at the start.
        self.tau = options.tau * max(error / max(points.shape[0], 1), 1e-30)
        module.register_buffer(BUFFER, init.clone().to(weight.device), persistent=True)

    # What is clustered and how it becomes the weight's sub-vectors (LR2VQLayer overrides).
    def _setup(self, centroids: torch.Tensor) -> torch.Tensor:
        """The starting centroids in the clustered space, given PG k-means' ``(k, m)`` codebook."""
        return centroids

    def _points(self) -> torch.Tensor:
        """The ``(n, ·)`` points clustered: here the weight's sub-vectors, float32."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return to_subvectors(weight.float(), self.block_size, self.name)

    def _decode(self, points: torch.Tensor) -> torch.Tensor:
        """Points of the clustered space as ``(·, m)`` sub-vectors of the weight."""
        return points

    @property
    def centroids(self) -> torch.Tensor:
        """The current centroids ``(k, block_size)``."""
        buffer = getattr(self.module, BUFFER)
        assert isinstance(buffer, torch.Tensor)
        return buffer

    def hard_weight(self) -> torch.Tensor:
        """The weight every sub-vector's nearest centroid makes (what export writes)."""
        codebook, codes = self.export()
        return from_subvectors(codebook[codes], self.shape)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Soft-clustered weight in training, hard-assigned in eval (installed as ``forward``)."""
        return self._forward(self.module, self._ops, input)

    def _forward(self, caller: nn.Module, ops: LayerOps, input: torch.Tensor) -> torch.Tensor:
        """``caller``'s forward (this layer's module or one tied to it) with the weight made."""
        weight = caller.weight
        assert isinstance(weight, torch.Tensor)
        return ops.forward(caller, self._pass_weight(caller).to(weight.dtype), input)

    def _pass_weight(self, caller: nn.Module) -> torch.Tensor:
        """The weight of this forward pass. Untied: made at every call. Tied: the first module
        to run makes it; a module asking again starts the next pass."""
        training = self.module.training
        shared = self._pass
        if (
            self.tied
            and shared is not None
            and shared.training == training
            and id(caller) not in shared.used
        ):
            shared.used.add(id(caller))
            return shared.weight
        weight = self._soft_weight() if training else self.hard_weight()
        if self.tied:
            self._pass = _PassWeight(weight, training, {id(caller)})
        return weight

    def _soft_weight(self) -> torch.Tensor:
        """The soft-clustered weight (float32, with its graph); moves the warm start."""
        opts = self.options
        points = self._points()
        # float32 whatever the training dtype (DeepSpeed's bf16 casts buffers too).
        start = self.centroids.float()
        c = soft_kmeans(
            points, start, self.tau, opts.iters, opts.method, chunk=opts.chunk,
            solver_iters=opts.solver_iters, stats=self.stats,
        )  # fmt: skip
        with torch.no_grad():
            self.centroids.copy_(c.detach())  # the next step's warm start
        soft = self._decode(soft_weight(points, c, self.tau, opts.chunk))
        return from_subvectors(soft, self.shape)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codebook, codes)`` of the hard assignment: float32 ``(k, bs)``, int64 ``(n,)``."""
        with torch.no_grad():
            c = self.centroids.detach().float()
            return self._decode(c).clone(), hard_assign(self._points(), c)

    def install(self) -> None:
        """Replace the forwards of the module and of the modules tied to it."""
        vars(self.module)["forward"] = self.forward
        for module in self.tied.values():
            ops = layer_ops(module)
            assert ops is not None
            vars(module)["forward"] = partial(self._forward, module, ops)

    @property
    def installed(self) -> bool:
        return vars(self.module).get("forward") == self.forward

    def remove(self) -> None:
        """Give the modules back their class's forward and drop the centroid buffer."""
        if self.installed:
            del vars(self.module)["forward"]
        for module in self.tied.values():
            installed = vars(module).get("forward")
            if isinstance(installed, partial) and installed.func == self._forward:
                del vars(module)["forward"]
        self._pass = None
        if BUFFER in self.module._buffers:
            del self.module._buffers[BUFFER]


class LR2VQLayer(DKMLayer):
    """LR²VQ on one module: the sub-vectors are ``R P``; ``R``'s rows are soft-clustered."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ops: LayerOps,
        block_size: int,
        centroids: torch.Tensor,
        options: DKMOptions,
        tied: Mapping[str, nn.Module] | None = None,
    ) -> None:
        assert options.rank is not None
        self.rank = options.rank
        super().__init__(name, module, ops, block_size, centroids, options, tied)

    def _setup(self, centroids: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        factor = low_rank(
            to_subvectors(weight.detach().float(), self.block_size, self.name), self.rank
        )
        self._weight_trained = weight.requires_grad
        weight.requires_grad_(False)  # the layer is R P from here on
        self.module.register_parameter(LR2VQ_R, nn.Parameter(factor.r.to(weight.device)))
        self.module.register_parameter(LR2VQ_P, nn.Parameter(factor.p.to(weight.device)))
        # PG k-means' codebook projected into the rank-d space (P has orthonormal rows).
        return centroids @ factor.p.T

    def _points(self) -> torch.Tensor:
        r = getattr(self.module, LR2VQ_R)
        assert isinstance(r, torch.Tensor)
        return r.float()

    def _decode(self, points: torch.Tensor) -> torch.Tensor:
        p = getattr(self.module, LR2VQ_P)
        assert isinstance(p, torch.Tensor)
        return points @ p.float()

    def remove(self) -> None:
        super().remove()
        for name in (LR2VQ_R, LR2VQ_P):
            self.module._parameters.pop(name, None)
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        weight.requires_grad_(self._weight_trained)


class DKM:
    """The layers :func:`add_dkm` wrapped, by name."""

    def __init__(self, layers: Sequence[DKMLayer]) -> None:
        self.layers = {layer.name: layer for layer in layers}

    def __iter__(self) -> Iterator[DKMLayer]:
        return iter(self.layers.values())

    def __getitem__(self, name: str) -> DKMLayer:
        return self.layers[name]

    def __len__(self) -> int:
        return len(self.layers)

    def remove(self) -> None:
        for layer in self:
            layer.remove()


def add_dkm(
    model: nn.Module,
    match: str | Sequence[str],
    block_size: int,
    centroids: dict[str, torch.Tensor],
    options: DKMOptions | None = None,
    tied: Mapping[str, Sequence[str]] | None = None,
) -> DKM:
    """Wrap the selected layers of ``model`` with differentiable k-means (or LR²VQ).

    Args:
        model: The model (changed in place: forwards replaced, a buffer added per layer).
        match: Exact module names or ``re:`` patterns (full match).
        block_size: Sub-vector length (the PQ layout).
        centroids: Initial ``(k, block_size)`` codebook of every selected layer, by name
            (e.g. from PG k-means): DKM refines a codebook, it does not invent one.
        options: Method, temperature, steps per forward, chunk size; ``rank`` for LR²VQ.
        tied: For a selected layer, the names of the modules sharing its weight (e.g.
            ``{"model.embed_tokens": ["lm_head"]}``): they use the same clustered weight.

    Raises:
        InvalidInputError: A bad selection, a layer without initial centroids, a layout the
            block size does not divide, a layer wrapped already, or a shared weight that is
            not declared in ``tied`` (or declared there but not shared).
    """
    options = options or DKMOptions()
    patterns = [match] if isinstance(match, str) else list(match)
    selected = select_layers(model, patterns)
    ties = _tied_modules(model, selected, tied or {})
    if options.rank is not None and options.rank > block_size:
        raise InvalidInputError(
            f"LR²VQ rank {options.rank} exceeds the sub-vector size {block_size}; choose d in "
            f"1..{block_size} (`dist-pgkm lr2vq-rank` suggests one)."
        )
    for name, module in selected.items():  # check everything before changing anything
        ops = layer_ops(module)
        assert ops is not None
        for each in (name, *ties[name]):
            if "forward" in vars(model.get_submodule(each)):
                raise InvalidInputError(
                    f"{each} already has its forward replaced (Quant-Noise or DKM); remove that "
                    "first."
                )
        if name not in centroids:
            raise InvalidInputError(
                f"no initial centroids for {name}; pass a (k, {block_size}) codebook for every "
                "selected layer (e.g. from quantize_weight)."
            )
        check_layout(ops.shape(module), block_size, name)
        if centroids[name].dim() != 2 or centroids[name].shape[1] != block_size:
            raise InvalidInputError(
                f"{name}: initial centroids of shape {tuple(centroids[name].shape)}; expected "
                f"(k, {block_size})."
            )
    kind = DKMLayer if options.rank is None else LR2VQLayer
    layers = [
        kind(name, module, layer_ops(module), block_size, centroids[name], options, ties[name])  # type: ignore[arg-type]
        for name, module in selected.items()
    ]
    for layer in layers:
        layer.install()
    return DKM(layers)


def _tied_modules(
    model: nn.Module, selected: Mapping[str, nn.Module], tied: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, nn.Module]]:
    """Each selected layer's tied modules by name, checked: they exist, hold the very same
    weight with the same layout, and every module sharing a selected weight is declared."""
    if unknown := sorted(set(tied) - set(selected)):
        raise InvalidInputError(
            f"tied names {unknown}, which are not selected layers; key `tied` by a selected "
            "layer (the one that owns the clustering), e.g. {'model.embed_tokens': ['lm_head']}."
        )
    modules = dict(model.named_modules())
    out: dict[str, dict[str, nn.Module]] = {}
    for name, module in selected.items():
        ops = layer_ops(module)
        assert ops is not None
        out[name] = {}
        for other in tied.get(name, ()):
            target = modules.get(other)
            other_ops = None if target is None else layer_ops(target)
            if target is None or other_ops is None:
                supported = ", ".join(t.__name__ for t in NOISE_LAYERS)
                raise InvalidInputError(
                    f"{other} (tied to {name}) is not a {supported} module of "
                    f"{type(model).__name__}."
                )
            if other in selected:
                raise InvalidInputError(
                    f"{other} is both selected and tied to {name}; select only {name}."
                )
            if target.weight is not module.weight or other_ops.shape(target) != ops.shape(module):
                raise InvalidInputError(
                    f"{other} does not share {name}'s weight (the same Parameter, the same "
                    "shape); only modules tied to it can be listed in `tied`."
                )
            out[name][other] = target
    # A module sharing a selected weight but left undeclared would keep the float weight.
    declared = {id(m) for group in out.values() for m in group.values()}
    by_weight = {id(m.weight): n for n, m in selected.items()}
    for other, target in modules.items():
        weight = getattr(target, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and id(weight) in by_weight
            and other not in selected
            and id(target) not in declared
            and layer_ops(target) is not None
        ):
            owner = by_weight[id(weight)]
            raise InvalidInputError(
                f"{other} shares its weight with {owner}; pass tied={{{owner!r}: [{other!r}]}} "
                "so that it uses the clustered weight too."
            )
    shared = [n for n, m in selected.items() if by_weight[id(m.weight)] != n]
    if shared:
        raise InvalidInputError(
            f"{shared[0]} shares its weight with {by_weight[id(selected[shared[0]].weight)]}; "
            "select one of them and list the other in `tied`."
        )
    return out
