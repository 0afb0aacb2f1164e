"""PQ modules: one small base class, thin Linear / Embedding / Conv2d forwards.

Centroids are a trainable ``Parameter`` (fp32), codes a frozen ``int64`` buffer, and the dense
weight is rebuilt on demand as ``centroids[codes]`` in the iPQ layout, so autograd gives every
centroid the sum of its members' gradients.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.codec import from_subvectors

__all__ = ["PQ_MODULES", "PQConv2d", "PQEmbedding", "PQLinear", "PQModule", "pq_module_for"]


class PQModule(nn.Module):
    """A layer whose weight is ``centroids[codes]`` reshaped to ``weight_shape``.

    Args:
        centroids: ``(k, block_size)`` codebook.
        codes: ``(n_blocks,)`` codeword of every block, ``n_blocks * block_size`` = weight size.
        weight_shape: Shape of the dense weight.
        bias: Optional bias, kept as a float parameter.
    """

    float_type: ClassVar[type[nn.Module]]
    codes: torch.Tensor  # registered buffer

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        k, block_size = centroids.shape
        n_weights = 1
        for size in weight_shape:
            n_weights *= size
        if codes.dim() != 1 or codes.numel() * block_size != n_weights:
            raise InvalidInputError(
                f"{codes.numel()} codes of blocks of {block_size} cannot fill a weight of shape "
                f"{tuple(weight_shape)} ({n_weights} values)."
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise InvalidInputError(
                f"codes range over [{int(codes.min())}, {int(codes.max())}] but the codebook has "
                f"{k} codewords; the checkpoint is corrupt or was written for another codebook."
            )
        self.centroids = nn.Parameter(centroids.detach().to(torch.float32).clone())
        self.register_buffer("codes", codes.detach().to(torch.int64).clone())
        self.weight_shape = tuple(weight_shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the codebook (differentiable in the centroids)."""
        return from_subvectors(self.centroids[self.codes], self.weight_shape)

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQModule:
        """Build the PQ version of ``module`` (its non-weight attributes are copied)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        k, bs = self.centroids.shape
        return f"weight_shape={self.weight_shape}, k={k}, block_size={bs}"


class PQLinear(PQModule):
    """Product-quantized ``nn.Linear``."""

    float_type = nn.Linear

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQLinear:
        assert isinstance(module, nn.Linear)
        return cls(centroids, codes, tuple(module.weight.shape), module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class PQEmbedding(PQModule):
    """Product-quantized ``nn.Embedding`` (blocks along the embedding dim)."""

    float_type = nn.Embedding

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        weight_shape: tuple[int, ...],
        padding_idx: int | None = None,
    ) -> None:
        super().__init__(centroids, codes, weight_shape)
        self.padding_idx = padding_idx

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQEmbedding:
        assert isinstance(module, nn.Embedding)
        return cls(centroids, codes, tuple(module.weight.shape), module.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


class PQConv2d(PQModule):
    """Product-quantized ``nn.Conv2d`` (blocks of the flattened ``in * kh * kw`` per channel)."""

    float_type = nn.Conv2d

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None,
        conv: dict[str, Any],
    ) -> None:
        super().__init__(centroids, codes, weight_shape, bias)
        self.conv = dict(conv)

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQConv2d:
        assert isinstance(module, nn.Conv2d)
        if module.padding_mode != "zeros":
            raise InvalidInputError(
                f"Conv2d with padding_mode={module.padding_mode!r} is not supported; only "
                "'zeros'. Leave this layer unquantized."
            )
        conv = {
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
        }
        return cls(centroids, codes, tuple(module.weight.shape), module.bias, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias, **self.conv)


PQ_MODULES: dict[type[nn.Module], type[PQModule]] = {
    nn.Linear: PQLinear,
    nn.Embedding: PQEmbedding,
    nn.Conv2d: PQConv2d,
}


def pq_module_for(module: nn.Module) -> type[PQModule]:
    """The PQ class for ``module``'s type (exact type, then its bases).

    Raises:
        InvalidInputError: No PQ version of this module type exists.
    """
    for base in type(module).__mro__:
        if base in PQ_MODULES:
            return PQ_MODULES[base]
    raise InvalidInputError(
        f"no PQ version of {type(module).__name__}; supported: "
        f"{', '.join(t.__name__ for t in PQ_MODULES)}. Exclude this layer in the config."
    )
