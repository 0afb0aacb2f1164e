"""DKM / IDKM / IDKM-JFB on a model's layers: the weight stays float, its forward is clustered.

:func:`add_dkm` replaces the ``forward`` of each selected ``nn.Linear``, ``nn.Embedding`` or
``nn.Conv2d`` (as Quant-Noise does, see :mod:`dist_pgkm.noise.wrap`: the module keeps its
class and parameters, hooks such as DeepSpeed ZeRO-3's still run). In training mode the forward
cuts ``module.weight`` into sub-vectors in the PQ layout, runs ``iters`` soft k-means steps from
the centroids the previous step ended with (a ``dkm_centroids`` buffer on the module, so it is
checkpointed with the model) and uses the soft weight ``A c``; the gradient reaches the float
weight through the chosen method. In eval mode it uses the hard assignment: every sub-vector
replaced by its nearest centroid, which is exactly what :meth:`DKMLayer.export` writes as
codebook and codes (the PQ format, loadable by ``dist_pgkm.load``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dist_pgkm.dkm.functional import Method, hard_assign, soft_kmeans, soft_weight, sq_distances
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.noise.functional import check_layout
from dist_pgkm.noise.wrap import LayerOps, layer_ops, select_layers
from dist_pgkm.pq.codec import from_subvectors, to_subvectors

__all__ = ["BUFFER", "DKM", "DKMLayer", "DKMOptions", "add_dkm"]

BUFFER = "dkm_centroids"
"""Name of the buffer holding a wrapped layer's current centroids (its warm start)."""


@dataclass(frozen=True)
class DKMOptions:
    """How a layer is clustered during training.

    Attributes:
        method: ``dkm``, ``idkm`` or ``idkm-jfb`` (see :mod:`dist_pgkm.dkm.functional`).
        tau: Attention temperature, relative to the mean squared distance of a sub-vector to
            its nearest initial centroid (so one value fits layers of any scale).
        iters: Soft k-means steps per forward.
        chunk: Sub-vectors per piece of the attention (None: all at once).
    """

    method: Method = "idkm"
    tau: float = 1.0
    iters: int = 5
    chunk: int | None = 65536

    def __post_init__(self) -> None:
        if self.method not in ("dkm", "idkm", "idkm-jfb"):
            raise InvalidInputError(f"method {self.method!r}: choose dkm, idkm or idkm-jfb.")
        if self.tau <= 0 or self.iters < 1 or (self.chunk is not None and self.chunk < 1):
            raise InvalidInputError(
                f"DKM needs tau > 0, iters >= 1 and chunk >= 1 (got tau={self.tau}, "
                f"iters={self.iters}, chunk={self.chunk})."
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
        self._ops = ops
        self.shape = ops.shape(module)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            sub = to_subvectors(weight.detach().float(), block_size, name)
            init = centroids.detach().to(torch.float32)
            pieces = torch.split(sub, options.chunk or sub.shape[0])
            error = sum(float(sq_distances(xs, init).amin(1).sum()) for xs in pieces)
        # The temperature in units of this layer's mean squared quantization error at the start.
        self.tau = options.tau * max(error / max(sub.shape[0], 1), 1e-30)
        module.register_buffer(BUFFER, init.clone().to(weight.device), persistent=True)

    @property
    def centroids(self) -> torch.Tensor:
        """The current centroids ``(k, block_size)``."""
        buffer = getattr(self.module, BUFFER)
        assert isinstance(buffer, torch.Tensor)
        return buffer

    def _subvectors(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return to_subvectors(weight.float(), self.block_size, self.name)

    def hard_weight(self) -> torch.Tensor:
        """The weight every sub-vector's nearest centroid makes (what export writes)."""
        with torch.no_grad():
            sub, c = self._subvectors(), self.centroids.float()
            return from_subvectors(c[hard_assign(sub, c)], self.shape)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Soft-clustered weight in training, hard-assigned in eval (installed as ``forward``)."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        if not self.module.training:
            return self._ops.forward(self.module, self.hard_weight().to(weight.dtype), input)
        opts = self.options
        sub = self._subvectors()
        # float32 whatever the training dtype (DeepSpeed's bf16 casts buffers too).
        start = self.centroids.float()
        c = soft_kmeans(sub, start, self.tau, opts.iters, opts.method, chunk=opts.chunk)
        with torch.no_grad():
            self.centroids.copy_(c.detach())  # the next step's warm start
        soft = from_subvectors(soft_weight(sub, c, self.tau, opts.chunk), self.shape)
        return self._ops.forward(self.module, soft.to(weight.dtype), input)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centroids, codes)`` of the hard assignment: float32 ``(k, bs)``, int64 ``(n,)``."""
        with torch.no_grad():
            c = self.centroids.detach().float().clone()
            return c, hard_assign(self._subvectors(), c)

    @property
    def installed(self) -> bool:
        return vars(self.module).get("forward") == self.forward

    def remove(self) -> None:
        """Give the module back its class's forward and drop the centroid buffer."""
        if self.installed:
            del vars(self.module)["forward"]
        if BUFFER in self.module._buffers:
            del self.module._buffers[BUFFER]


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
    """Wrap the selected layers of ``model`` with differentiable k-means.

    Args:
        model: The model (changed in place: forwards replaced, a buffer added per layer).
        match: Exact module names or ``re:`` patterns (full match).
        block_size: Sub-vector length (the PQ layout).
        centroids: Initial ``(k, block_size)`` codebook of every selected layer, by name
            (e.g. from PG k-means): DKM refines a codebook, it does not invent one.
        options: Method, temperature, steps per forward, chunk size.

    Raises:
        InvalidInputError: A bad selection, a layer without initial centroids, a layout the
            block size does not divide, or a layer wrapped already.
    """
    options = options or DKMOptions()
    patterns = [match] if isinstance(match, str) else list(match)
    selected = select_layers(model, patterns)
    layers = []
    for name, module in selected.items():
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
        layers.append(DKMLayer(name, module, ops, block_size, centroids[name], options))
    for layer in layers:
        vars(layer.module)["forward"] = layer.forward
    return DKM(layers)
