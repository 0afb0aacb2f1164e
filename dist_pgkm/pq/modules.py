"""PQ modules: one small base class, thin Linear / Embedding / Conv2d forwards.

A PQ module's state dict *is* its checkpoint form: ``centroids`` (a trainable ``Parameter``,
``(k, block_size)``) and ``codes`` (a frozen ``uint8`` buffer, bit-packed at
``ceil(log2 k)`` bits, see :mod:`dist_pgkm.pq.pack`). Any loader that fills those two tensors
(``load_state_dict``, transformers, DeepSpeed) yields a working module; the unpacked ``int32``
``index`` used by the forward is derived from ``codes`` and never saved. The dense weight is
rebuilt on demand as ``centroids[index]`` in the iPQ layout, so autograd gives every centroid
the sum of its members' gradients; :class:`PQConv2d` divides that by the member count (the
mean, as iPQ does for convolutions: DESIGN.md §4).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.codec import from_subvectors
from dist_pgkm.pq.pack import bits_for, pack_codes, packed_nbytes, unpack_codes

__all__ = ["PQ_MODULES", "PQConv2d", "PQEmbedding", "PQLinear", "PQModule", "pq_module_for"]


def _check_codes(codes: torch.Tensor, k: int, n_blocks: int, shape: tuple[int, ...]) -> None:
    if codes.dim() != 1 or codes.numel() != n_blocks:
        raise InvalidInputError(
            f"{codes.numel()} codes cannot fill a weight of shape {shape} ({n_blocks} blocks)."
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise InvalidInputError(
            f"codes range over [{int(codes.min())}, {int(codes.max())}] but the codebook has "
            f"{k} codewords; the checkpoint is corrupt or was written for another codebook."
        )


def _gather(centroids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``centroids[index]`` with a deterministic backward.

    Advanced indexing backpropagates through ``index_put_(accumulate=True)``, whose CPU kernel
    adds from several threads in no fixed order (measured on torch 2.13: 5 backward passes, 5
    different gradients), so fine-tuning would not be reproducible and a resumed run would not
    match an uninterrupted one. ``F.embedding``'s backward sorts the indices first.
    """
    return F.embedding(index, centroids)


class PQModule(nn.Module):
    """A layer whose weight is ``centroids[codes]`` reshaped to ``weight_shape``.

    Args:
        centroids: ``(k, block_size)`` codebook.
        codes: ``(n_blocks,)`` integer codeword of every block, ``n_blocks * block_size`` =
            weight size.
        weight_shape: Shape of the dense weight.
        bias: Optional bias, kept as a float parameter.

    Raises:
        InvalidInputError: The codes do not fill ``weight_shape`` or exceed the codebook.
    """

    float_type: ClassVar[type[nn.Module]]
    codes: torch.Tensor  # persistent buffer: packed uint8
    index: torch.Tensor  # non-persistent buffer: unpacked int32, derived from codes

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        k, block_size = centroids.shape
        self.weight_shape = tuple(int(s) for s in weight_shape)
        n_blocks = math.prod(self.weight_shape) // block_size
        if n_blocks * block_size != math.prod(self.weight_shape):
            raise InvalidInputError(
                f"blocks of {block_size} cannot tile a weight of shape {self.weight_shape}."
            )
        self.n_blocks = n_blocks
        self.centroids = nn.Parameter(centroids.detach().to(torch.float32).clone())
        if codes.is_meta:  # an empty module waiting for a state dict (see for_loading)
            packed = torch.empty(packed_nbytes(n_blocks, bits_for(k)), dtype=torch.uint8)
            index = torch.empty(n_blocks, dtype=torch.int32)
            self.register_buffer("codes", packed.to("meta"))
            self.register_buffer("index", index.to("meta"), persistent=False)
        else:
            _check_codes(codes, k, n_blocks, self.weight_shape)
            self.register_buffer("codes", pack_codes(codes, bits_for(k)))
            self.register_buffer("index", codes.detach().to(torch.int32).clone(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def k(self) -> int:
        """Codebook size."""
        return int(self.centroids.shape[0])

    @property
    def block_size(self) -> int:
        """Sub-vector length."""
        return int(self.centroids.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the codebook (differentiable in the centroids)."""
        return from_subvectors(_gather(self.centroids, self.index), self.weight_shape)

    def refresh_index(self) -> None:
        """Re-derive the unpacked ``index`` from the packed ``codes`` (after they were loaded).

        Raises:
            InvalidInputError: ``codes`` has the wrong size or holds a code outside the codebook.
        """
        bits = bits_for(self.k)
        packed = self.codes.detach().to("cpu")
        index = unpack_codes(packed, self.n_blocks, bits)
        _check_codes(index, self.k, self.n_blocks, self.weight_shape)
        self.index = index.to(device=self.centroids.device, dtype=torch.int32)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not self.codes.is_meta and not self.centroids.is_meta:
            self.refresh_index()

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQModule:
        """Build the PQ version of ``module`` (its non-weight attributes are copied)."""
        raise NotImplementedError

    @classmethod
    def for_loading(cls, module: nn.Module, k: int, block_size: int) -> PQModule:
        """An empty PQ version of ``module`` (on the meta device) with a ``k``-word codebook.

        Its ``centroids``, ``codes`` and bias have the checkpoint's shapes; fill them with
        ``load_state_dict(..., assign=True)`` (which re-derives the index) or assign them and
        call :meth:`refresh_index`.
        """
        with torch.device("meta"):
            centroids = torch.empty(k, block_size)
            codes = torch.empty(0, dtype=torch.int64)
            return cls.from_float(module.to("meta"), centroids, codes)

    def tie_to(self, source: PQModule) -> None:
        """Share ``source``'s codebook, codes and index (the same objects), as tied weights do.

        Used for an output projection tied to a quantized input embedding: both layers then
        decode the same weight, and a gradient step on the codebook moves both.

        Raises:
            InvalidInputError: ``source`` decodes a weight of another shape or block size.
        """
        if source.weight_shape != self.weight_shape or source.block_size != self.block_size:
            raise InvalidInputError(
                f"cannot tie a {self.weight_shape} weight in blocks of {self.block_size} to a "
                f"{source.weight_shape} weight in blocks of {source.block_size}; tied layers must "
                "have the same shape and block size."
            )
        self.centroids = source.centroids
        self.codes = source.codes
        self.index = source.index

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The float layer this module stands for, holding the decoded weight.

        Args:
            dtype: dtype of the decoded weight (default: the codebook's, which makes it
                exact); ``centroids[index]`` is gathered first, then cast.

        Returns:
            A new ``float_type`` module (``nn.Linear``, ...) whose ``weight`` is a new
            ``Parameter`` and whose ``bias`` is this module's ``bias`` (the same object).
        """
        module = self._empty_float()
        weight = self.weight.detach().to(dtype or self.centroids.dtype).contiguous()
        module.weight = nn.Parameter(weight, requires_grad=self.centroids.requires_grad)
        if self.bias is not None:
            module.bias = self.bias
        return module

    def _empty_float(self) -> nn.Module:
        """A ``float_type`` module of this shape on the meta device (weight to be assigned)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, k={self.k}, block_size={self.block_size}"


class PQLinear(PQModule):
    """Product-quantized ``nn.Linear``."""

    float_type = nn.Linear

    @classmethod
    def from_float(
        cls, module: nn.Module, centroids: torch.Tensor, codes: torch.Tensor
    ) -> PQLinear:
        assert isinstance(module, nn.Linear)
        return cls(centroids, codes, tuple(module.weight.shape), module.bias)

    def _empty_float(self) -> nn.Module:
        out_features, in_features = self.weight_shape
        return nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta")

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

    def _empty_float(self) -> nn.Module:
        num, dim = self.weight_shape
        return nn.Embedding(num, dim, padding_idx=self.padding_idx, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Decode only the looked-up rows, not the whole table: the same values and gradients
        # as F.embedding(ids, self.weight, padding_idx), whose padding row gets no gradient.
        num, dim = self.weight_shape
        rows = self.index.view(num, dim // self.block_size)[ids]  # (*ids, dim / bs)
        out = _gather(self.centroids, rows).flatten(-2)  # (*ids, dim)
        if self.padding_idx is not None and out.requires_grad:
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out


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

    def _empty_float(self) -> nn.Module:
        out_channels, in_per_group, kh, kw = self.weight_shape
        in_channels = in_per_group * int(self.conv["groups"])
        return nn.Conv2d(
            in_channels,
            out_channels,
            (kh, kw),
            bias=self.bias is not None,
            device="meta",
            **self.conv,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centroids: torch.Tensor = self.centroids
        if centroids.requires_grad and torch.is_grad_enabled():
            # Same values; each codeword's gradient becomes the mean of its members' (not the
            # sum): c + (c - c.detach()) * (1/n - 1) has value c and derivative 1/n.
            counts = torch.bincount(self.index, minlength=centroids.shape[0]).clamp_(min=1)
            scale = counts.reciprocal().to(centroids.dtype)[:, None]
            centroids = centroids.detach() + (centroids - centroids.detach()) * scale
        weight = from_subvectors(_gather(centroids, self.index), self.weight_shape)
        return F.conv2d(x, weight.to(x.dtype), self.bias, **self.conv)


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
