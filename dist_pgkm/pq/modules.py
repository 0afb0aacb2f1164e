"""PQ modules: one small base class, thin Linear / Embedding / Conv2d forwards.

A PQ module's state dict *is* its checkpoint form (docs/format.md):

* ``centroids``: the codebook, a trainable ``Parameter``: ``(k, block_size)``, or
  ``(n_books, k, block_size)`` with one codebook per ``out / n_books`` output rows;
* ``codes``: a frozen ``uint8`` buffer, bit-packed at ``ceil(log2 k)`` bits
  (:mod:`dist_pgkm.pq.pack`), each code indexing its own book;
* ``scales`` (optional): ``(out, width / scale_group)``, a trainable ``Parameter`` like the
  codebook;
* ``outlier_idx``, ``outlier_val`` (optional): frozen buffers, ``int32`` sorted flat indices
  into the ``(out, width)`` weight and the values kept there exactly.

Any loader that fills these tensors (``load_state_dict``, transformers, DeepSpeed) yields a
working module; the unpacked ``int32`` ``index`` used by the forward (book offsets included) is
derived from ``codes`` and never saved. The dense weight is rebuilt on demand by the decode of
:mod:`dist_pgkm.pq.layout` (codeword gather, times the scales, outliers overwritten), the same
functions :func:`~dist_pgkm.pq.quantize.decode_weight` uses, so both give the same floats.
Autograd then gives every codeword the sum of its members' gradients (each times its scale),
and every scale the sum over its group of gradient times unscaled weight; :class:`PQConv2d`
divides a codeword's gradient by its member count (the mean, as iPQ does for convolutions:
DESIGN.md §4). Every backward is deterministic (see :func:`_gather`).

Outlier values do not train. They are the weights the quantizer chose to keep exactly; as
buffers they stay the original fp16 values the checkpoint documents, no optimizer or weight
decay group has to know about them, and no gradient reaches the codebook from their positions
(the decode overwrites those weights, so the codebook does not decide them).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.kmeans.result import KMeansStats
from dist_pgkm.pq import infer
from dist_pgkm.pq.codec import from_subvectors
from dist_pgkm.pq.layout import SideTensors, apply_outliers, apply_scales, book_index, side_problems
from dist_pgkm.pq.pack import bits_for, codes_at, pack_codes, packed_nbytes, unpack_codes
from dist_pgkm.pq.quantize import QuantizedWeight

__all__ = [
    "PQ_MODULES",
    "PQConv2d",
    "PQEmbedding",
    "PQLinear",
    "PQModule",
    "SideTensors",
    "pq_module_for",
]


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


def _check_packed(packed: torch.Tensor, k: int, n_blocks: int, shape: tuple[int, ...]) -> None:
    """:func:`_check_codes` on packed codes, a bounded chunk at a time.

    A module in code mode never unpacks all its codes: doing it once to check them would leave
    the allocator holding (and the process resident) several bytes per block after loading.
    """
    bits = bits_for(k)
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(n_blocks, bits):
        unpack_codes(packed, n_blocks, bits)  # raises the size error
    low, high = 0, 0
    step = 1 << 16
    for start in range(0, n_blocks, step):
        codes = codes_at(packed, torch.arange(start, min(n_blocks, start + step)), bits)
        low, high = min(low, int(codes.min())), max(high, int(codes.max()))
    if high >= k:
        raise InvalidInputError(
            f"codes range over [{low}, {high}] but the codebook has {k} codewords; the "
            "checkpoint is corrupt or was written for another codebook."
        )


def _check_side(shape: tuple[int, ...], side: SideTensors) -> None:
    problems = side_problems(shape, side.scales, side.outlier_idx, side.outlier_val)
    if problems:
        raise InvalidInputError(
            f"a weight of shape {shape}: {'; '.join(problems)}. The checkpoint is corrupt or was "
            "written for another layer."
        )


def _gather(centroids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``centroids[index]`` with a deterministic backward.

    Advanced indexing backpropagates through ``index_put_(accumulate=True)``, whose CPU kernel
    adds from several threads in no fixed order (measured on torch 2.13: 5 backward passes, 5
    different gradients), so fine-tuning would not be reproducible and a resumed run would not
    match an uninterrupted one. ``F.embedding``'s backward sorts the indices first.
    """
    return F.embedding(index, centroids)


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


class PQModule(nn.Module):
    """A layer whose weight is decoded from codebook(s), codes, scales and outliers.

    Args:
        centroids: ``(k, block_size)`` codebook, or ``(n_books, k, block_size)``: one codebook
            per ``out / n_books`` output rows (``codebook_rows``).
        codes: ``(n_blocks,)`` integer codeword of every block in its book, ``n_blocks *
            block_size`` = weight size; a meta tensor for an empty module (:meth:`for_loading`).
        weight_shape: Shape of the dense weight.
        bias: Optional bias, kept as a float parameter.
        side: Scales and outliers (see :mod:`dist_pgkm.pq.layout`); empty outliers are none.

    Raises:
        InvalidInputError: The codes do not fill ``weight_shape`` or exceed the codebook, the
            books do not share the rows evenly, or the scales or outliers are malformed.
    """

    float_type: ClassVar[type[nn.Module]]
    codes: torch.Tensor  # persistent buffer: packed uint8
    index: torch.Tensor  # non-persistent buffer: unpacked int32 + book offsets, from codes
    scales: nn.Parameter | None  # trainable like the codebook
    outlier_idx: torch.Tensor | None  # persistent buffer: int32 sorted flat indices
    outlier_val: torch.Tensor | None  # persistent buffer: the kept values (not trained)

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None = None,
        side: SideTensors | None = None,
    ) -> None:
        super().__init__()
        if centroids.dim() not in (2, 3) or 0 in centroids.shape:
            raise InvalidInputError(
                f"a codebook is (k, block_size) or (n_books, k, block_size) with k >= 1, got "
                f"{tuple(centroids.shape)}."
            )
        block_size, k = int(centroids.shape[-1]), int(centroids.shape[-2])
        n_books = 1 if centroids.dim() == 2 else int(centroids.shape[0])
        self.weight_shape = tuple(int(s) for s in weight_shape)
        n_weights = math.prod(self.weight_shape)
        out = self.weight_shape[0]
        if (n_weights // out) % block_size:
            raise InvalidInputError(
                f"blocks of {block_size} cannot tile the rows of a weight of shape "
                f"{self.weight_shape}."
            )
        if out % n_books:
            raise InvalidInputError(
                f"{n_books} codebooks cannot share the {out} output rows of a weight of shape "
                f"{self.weight_shape} evenly."
            )
        self.n_blocks = n_weights // block_size
        self.centroids = nn.Parameter(centroids.detach().to(torch.float32).clone())
        side = side or SideTensors()
        outlier_idx, outlier_val = side.outlier_idx, side.outlier_val
        if outlier_idx is not None and outlier_idx.numel() == 0 and not outlier_idx.is_meta:
            outlier_idx = outlier_val = None  # none kept: the checkpoint stores no tensor
        side = SideTensors(side.scales, outlier_idx, outlier_val)
        if not codes.is_meta:
            _check_codes(codes, k, self.n_blocks, self.weight_shape)
            _check_side(self.weight_shape, side)
        if side.scales is None:
            self.register_parameter("scales", None)
        else:
            self.scales = nn.Parameter(side.scales.detach().to(torch.float32).clone())
        if codes.is_meta:  # an empty module waiting for a state dict (see for_loading)
            packed = torch.empty(packed_nbytes(self.n_blocks, bits_for(k)), dtype=torch.uint8)
            self.register_buffer("codes", packed.to("meta"))
            index = torch.empty(self.n_blocks, dtype=torch.int32, device="meta")
            self.register_buffer("index", index, persistent=False)
        else:
            self.register_buffer("codes", pack_codes(codes, bits_for(k)))
            self.register_buffer("index", self._flat_index(codes), persistent=False)
        self.forward_mode: infer.Forward = infer.default_forward()
        self._outlier_delta: torch.Tensor | None = None  # cache of the code forward
        if self.forward_mode == "codes" and not codes.is_meta:
            self.index = self._no_index()
        idx = None if outlier_idx is None else outlier_idx.detach().to(torch.int32).clone()
        val = None if outlier_val is None else outlier_val.detach().to(torch.float32).clone()
        self.register_buffer("outlier_idx", idx)
        self.register_buffer("outlier_val", val)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def k(self) -> int:
        """Codewords per codebook."""
        return int(self.centroids.shape[-2])

    @property
    def block_size(self) -> int:
        """Sub-vector length."""
        return int(self.centroids.shape[-1])

    @property
    def n_books(self) -> int:
        """Number of codebooks (1 unless the layer has one per ``codebook_rows`` rows)."""
        return 1 if self.centroids.dim() == 2 else int(self.centroids.shape[0])

    @property
    def codebook_rows(self) -> int:
        """Output rows per codebook; 0 for a single ``(k, block_size)`` codebook."""
        return 0 if self.centroids.dim() == 2 else self.weight_shape[0] // self.n_books

    @property
    def scale_group(self) -> int:
        """Input features per scale; 0 without scales."""
        if self.scales is None:
            return 0
        width = math.prod(self.weight_shape[1:])
        return width // int(self.scales.shape[1])

    @property
    def n_outliers(self) -> int:
        """Weights kept exactly."""
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decoded (differentiable in the centroids and the scales)."""
        return self._decode(self.centroids)

    def _decode(self, centroids: torch.Tensor) -> torch.Tensor:
        """The dense weight from ``centroids`` (this module's, or a re-weighted copy of them)."""
        index = self._full_index()
        blocks = _gather(centroids.reshape(-1, self.block_size), index)  # (n_blocks, bs)
        w = apply_scales(blocks.reshape(self.weight_shape[0], -1), self.scales)  # (out, width)
        w = apply_outliers(w, self.outlier_idx, self.outlier_val)
        return from_subvectors(w.reshape(-1, self.block_size), self.weight_shape)

    def _no_index(self) -> torch.Tensor:
        """The empty ``index`` of a module in code mode (it reads the packed codes)."""
        return torch.empty(0, dtype=torch.int32, device=self.codes.device)

    def _full_index(self) -> torch.Tensor:
        """``index``, or in code mode the same values derived from the codes for this call."""
        if self.index.numel() == self.n_blocks:
            return self.index
        codes = unpack_codes(self.codes.detach().to("cpu"), self.n_blocks, bits_for(self.k))
        return self._flat_index(codes)

    def _reads_codes(self) -> bool:
        """Whether this call takes the code forward: code mode, and no gradient wanted."""
        if self.forward_mode != "codes":
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def set_forward(self, forward: infer.Forward) -> None:
        """Use the code forward (``"codes"``) or the decoding forward (``"decode"``).

        ``"codes"`` frees the unpacked ``index`` (the packed codes are read instead), and a
        call that needs a gradient still decodes the weight (deriving the index for that call).
        ``"decode"`` derives the index again. See :mod:`dist_pgkm.pq.infer`.

        Raises:
            InvalidInputError: ``forward`` is neither ``"codes"`` nor ``"decode"``.
        """
        if forward not in infer.FORWARDS:
            raise InvalidInputError(f"forward must be one of {infer.FORWARDS}, got {forward!r}.")
        self.forward_mode = forward
        self._outlier_delta = None
        if self.codes.is_meta:
            return
        if forward == "codes":
            self.index = self._no_index()
        elif self.index.numel() != self.n_blocks:
            self.index = self._full_index()

    def _flat_index(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-book codes as ``int32`` rows of ``centroids.reshape(-1, block_size)``."""
        flat = book_index(codes.to(torch.int64), self.n_books, self.k)
        return flat.to(device=self.centroids.device, dtype=torch.int32)

    def refresh_index(self) -> None:
        """Re-derive the unpacked ``index`` from the packed ``codes`` (after they were loaded).

        It checks the loaded tensors first: every code inside its book, the scales' shape and
        values, the outliers sorted, unique, inside the weight and finite.

        Raises:
            InvalidInputError: ``codes`` has the wrong size or holds a code outside the
                codebook, or the scales or outliers are malformed.
        """
        packed = self.codes.detach().to("cpu")
        if self.forward_mode == "codes":
            _check_packed(packed, self.k, self.n_blocks, self.weight_shape)
        else:
            codes = unpack_codes(packed, self.n_blocks, bits_for(self.k))
            _check_codes(codes, self.k, self.n_blocks, self.weight_shape)
        scales = None if self.scales is None else self.scales.detach()
        _check_side(self.weight_shape, SideTensors(scales, self.outlier_idx, self.outlier_val))
        self._outlier_delta = None
        if self.forward_mode == "codes":
            self.index = self._no_index()
        else:
            self.index = self._flat_index(codes)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not self.codes.is_meta and not self.centroids.is_meta:
            self.refresh_index()

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        side: SideTensors | None = None,
    ) -> PQModule:
        """Build the PQ version of ``module`` (its non-weight attributes are copied)."""
        raise NotImplementedError

    @classmethod
    def from_quantized(cls, module: nn.Module, q: QuantizedWeight) -> PQModule:
        """The PQ version of ``module`` holding ``q`` (codebooks, codes, scales, outliers).

        Raises:
            InvalidInputError: ``q`` does not fit ``module``'s weight.
        """
        if tuple(q.shape) != tuple(getattr(module, "weight", torch.empty(0)).shape):
            raise InvalidInputError(
                f"a quantized weight of shape {tuple(q.shape)} cannot stand for a "
                f"{type(module).__name__} whose weight has shape "
                f"{tuple(getattr(module, 'weight', torch.empty(0)).shape)}."
            )
        side = SideTensors(q.scales, q.outlier_idx, q.outlier_val)
        return cls.from_float(module, q.centroids, q.codes, side)

    @classmethod
    def for_loading(
        cls,
        module: nn.Module,
        k: int,
        block_size: int,
        *,
        codebook_rows: int = 0,
        scale_group: int = 0,
        n_outliers: int = 0,
    ) -> PQModule:
        """An empty PQ version of ``module`` (on the meta device) with the checkpoint's layout.

        Its ``centroids`` (``k`` codewords per book), ``codes``, ``scales``, ``outlier_idx``,
        ``outlier_val`` and bias have the checkpoint's shapes; fill them with
        ``load_state_dict(..., assign=True)`` (which re-derives the index) or assign them and
        call :meth:`refresh_index`.

        Args:
            module: The float layer it replaces.
            k: Codewords per codebook (``k_used`` of the format).
            block_size: Sub-vector length.
            codebook_rows: Output rows per codebook (0: one codebook).
            scale_group: Input features per scale (0: no scales).
            n_outliers: Weights kept exactly.

        Raises:
            InvalidInputError: ``codebook_rows`` or ``scale_group`` does not divide the weight.
        """
        weight = getattr(module, "weight", None)
        assert isinstance(weight, torch.Tensor), type(module)
        out = int(weight.shape[0])
        width = weight.numel() // out
        if (codebook_rows and out % codebook_rows) or (scale_group and width % scale_group):
            raise InvalidInputError(
                f"codebook_rows {codebook_rows} / scale_group {scale_group} do not divide the "
                f"{out} rows / {width} inputs of a weight of shape {tuple(weight.shape)}."
            )
        with torch.device("meta"):
            if codebook_rows:
                centroids = torch.empty(out // codebook_rows, k, block_size)
            else:
                centroids = torch.empty(k, block_size)
            side = SideTensors(
                torch.empty(out, width // scale_group) if scale_group else None,
                torch.empty(n_outliers, dtype=torch.int32) if n_outliers else None,
                torch.empty(n_outliers) if n_outliers else None,
            )
            codes = torch.empty(0, dtype=torch.int64)
            return cls.from_float(module.to("meta"), centroids, codes, side)

    def quantized(
        self, stats: KMeansStats | None = None, metric: str = "weight"
    ) -> QuantizedWeight:
        """This module's weight as a :class:`QuantizedWeight` (float32 copies, on the CPU).

        Args:
            stats: Statistics of the clustering run to attach (None: a trained codebook).
            metric: The metric the codebook was fitted with, recorded in the checkpoint.
        """
        codes = unpack_codes(self.codes.detach().to("cpu"), self.n_blocks, bits_for(self.k))

        def copy(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", dtype).clone()

        return QuantizedWeight(
            centroids=self.centroids.detach().to("cpu", torch.float32).clone(),
            codes=codes,
            shape=self.weight_shape,
            stats=stats,
            scales=copy(self.scales, torch.float32),
            scale_group=self.scale_group,
            codebook_rows=self.codebook_rows,
            outlier_idx=copy(self.outlier_idx, torch.int64),
            outlier_val=copy(self.outlier_val, torch.float32),
            metric=metric,
        )

    def tie_to(self, source: PQModule) -> None:
        """Share ``source``'s codebook, codes, index, scales and outliers (the same objects).

        Used for an output projection tied to a quantized input embedding: both layers then
        decode the same weight, and a gradient step on the codebook or scales moves both.

        Raises:
            InvalidInputError: ``source`` decodes a weight of another shape or layout.
        """
        mine = (
            self.weight_shape,
            tuple(self.centroids.shape),
            _shape(self.scales),
            self.n_outliers,
        )
        theirs = (
            source.weight_shape,
            tuple(source.centroids.shape),
            _shape(source.scales),
            source.n_outliers,
        )
        if mine != theirs:
            raise InvalidInputError(
                f"cannot tie a {mine[0]} weight with codebook {mine[1]}, scales {mine[2]} and "
                f"{mine[3]} outliers to a {theirs[0]} weight with codebook {theirs[1]}, scales "
                f"{theirs[2]} and {theirs[3]} outliers; tied layers must have the same shape "
                "and layout."
            )
        self.centroids = source.centroids
        self.codes = source.codes
        self.index = source.index
        if source.scales is not None:
            self.scales = source.scales
        self.outlier_idx = source.outlier_idx
        self.outlier_val = source.outlier_val

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The float layer this module stands for, holding the decoded weight.

        Args:
            dtype: dtype of the decoded weight (default: the codebook's, which makes it
                exact); the weight is decoded in the codebook's dtype, then cast.

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
        text = f"weight_shape={self.weight_shape}, k={self.k}, block_size={self.block_size}"
        if self.codebook_rows:
            text += f", codebook_rows={self.codebook_rows}"
        if self.scales is not None:
            text += f", scale_group={self.scale_group}"
        if self.n_outliers:
            text += f", n_outliers={self.n_outliers}"
        return text


class PQLinear(PQModule):
    """Product-quantized ``nn.Linear``."""

    float_type = nn.Linear

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        side: SideTensors | None = None,
    ) -> PQLinear:
        assert isinstance(module, nn.Linear)
        return cls(centroids, codes, tuple(module.weight.shape), module.bias, side)

    def _empty_float(self) -> nn.Module:
        out_features, in_features = self.weight_shape
        return nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._reads_codes():
            return infer.linear_from_codes(self, x)
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
        side: SideTensors | None = None,
    ) -> None:
        super().__init__(centroids, codes, weight_shape, side=side)
        self.padding_idx = padding_idx

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        side: SideTensors | None = None,
    ) -> PQEmbedding:
        assert isinstance(module, nn.Embedding)
        return cls(centroids, codes, tuple(module.weight.shape), module.padding_idx, side)

    def _empty_float(self) -> nn.Module:
        num, dim = self.weight_shape
        return nn.Embedding(num, dim, padding_idx=self.padding_idx, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._reads_codes():
            return infer.embedding_from_codes(self, ids)
        if self.outlier_idx is not None:
            # An outlier may sit in any looked-up row: decode the whole table (same values).
            return F.embedding(ids, self.weight, self.padding_idx)
        # Decode only the looked-up rows, not the whole table: the same values and gradients
        # as F.embedding(ids, self.weight, padding_idx), whose padding row gets no gradient.
        num, dim = self.weight_shape
        rows = self._full_index().view(num, dim // self.block_size)[ids]  # (*ids, dim / bs)
        codebook = self.centroids.reshape(-1, self.block_size)  # books stacked
        out = _gather(codebook, rows).flatten(-2)  # (*ids, dim)
        if self.scales is not None:
            out = apply_scales(out, F.embedding(ids, self.scales))  # rows' scales (*ids, groups)
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
        side: SideTensors | None = None,
    ) -> None:
        super().__init__(centroids, codes, weight_shape, bias, side)
        self.conv = dict(conv)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        side: SideTensors | None = None,
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
        return cls(centroids, codes, tuple(module.weight.shape), module.bias, conv, side)

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
        if self._reads_codes():
            return infer.conv2d_from_codes(self, x)
        centroids: torch.Tensor = self.centroids
        if centroids.requires_grad and torch.is_grad_enabled():
            # Same values; each codeword's gradient becomes the mean of its members' (not the
            # sum): c + (c - c.detach()) * (1/n - 1) has value c and derivative 1/n.
            # With several books, the index counts (book, codeword) pairs: each book's own mean.
            index = self._full_index()
            counts = torch.bincount(index, minlength=self.n_books * self.k).clamp_(min=1)
            scale = counts.reciprocal().to(centroids.dtype).reshape(*centroids.shape[:-1], 1)
            centroids = centroids.detach() + (centroids - centroids.detach()) * scale
        weight = self._decode(centroids)
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
