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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
from dist_pgkm.noise.wrap import LayerOps, layer_ops, select_layers
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


class DKMLayer:
    """DKM installed on one module; :meth:`remove` restores its forward and drops the buffer."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ops: LayerOps,
        block_size: int,
        centroids: torch.Tensor,
        options: DKMOptions,
    ) -> None:
        self.name = name
        self.module = module
        self.block_size = block_size
        self.options = options
        self.stats = SolverStats()  # IDKM's backward solves on this layer (idkm only)
        self._ops = ops
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
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        if not self.module.training:
            return self._ops.forward(self.module, self.hard_weight().to(weight.dtype), input)
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
        return self._ops.forward(
            self.module, from_subvectors(soft, self.shape).to(weight.dtype), input
        )

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codebook, codes)`` of the hard assignment: float32 ``(k, bs)``, int64 ``(n,)``."""
        with torch.no_grad():
            c = self.centroids.detach().float()
            return self._decode(c).clone(), hard_assign(self._points(), c)

    @property
    def installed(self) -> bool:
        return vars(self.module).get("forward") == self.forward

    def remove(self) -> None:
        """Give the module back its class's forward and drop the centroid buffer."""
        if self.installed:
            del vars(self.module)["forward"]
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
    ) -> None:
        assert options.rank is not None
        self.rank = options.rank
        super().__init__(name, module, ops, block_size, centroids, options)

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
) -> DKM:
    """Wrap the selected layers of ``model`` with differentiable k-means (or LR²VQ).

    Args:
        model: The model (changed in place: forwards replaced, a buffer added per layer).
        match: Exact module names or ``re:`` patterns (full match).
        block_size: Sub-vector length (the PQ layout).
        centroids: Initial ``(k, block_size)`` codebook of every selected layer, by name
            (e.g. from PG k-means): DKM refines a codebook, it does not invent one.
        options: Method, temperature, steps per forward, chunk size; ``rank`` for LR²VQ.

    Raises:
        InvalidInputError: A bad selection, a layer without initial centroids, a layout the
            block size does not divide, or a layer wrapped already.
    """
    options = options or DKMOptions()
    patterns = [match] if isinstance(match, str) else list(match)
    selected = select_layers(model, patterns)
    if options.rank is not None and options.rank > block_size:
        raise InvalidInputError(
            f"LR²VQ rank {options.rank} exceeds the sub-vector size {block_size}; choose d in "
            f"1..{block_size} (`dist-pgkm lr2vq-rank` suggests one)."
        )
    for name, module in selected.items():  # check everything before changing anything
        ops = layer_ops(module)
        assert ops is not None
        if "forward" in vars(module):
            raise InvalidInputError(
                f"{name} already has its forward replaced (Quant-Noise or DKM); remove that first."
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
        kind(name, module, layer_ops(module), block_size, centroids[name], options)  # type: ignore[arg-type]
        for name, module in selected.items()
    ]
    for layer in layers:
        vars(layer.module)["forward"] = layer.forward
    return DKM(layers)
