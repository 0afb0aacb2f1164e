"""Quant-Noise as pure functions of a weight (Fan et al. 2020; DESIGN.md §4).

A random fraction ``p`` of the weight's **blocks** is perturbed, the blocks being exactly the
iPQ sub-vectors of :func:`dist_pgkm.pq.to_subvectors` (``bs`` contiguous input weights of one
output row; Conv2d after flattening ``in/groups * kh * kw``; Embedding along the embedding dim):

* ``"drop"``: perturbed blocks become zero and the others are divided by ``1 - p``, so the noised
  weight is an unbiased estimate of the weight. Autograd differentiates exactly that function:
  the weight's gradient is the gradient w.r.t. the noised weight times ``keep / (1 - p)``
  (dropped blocks get none), as with dropout.
* ``"quantize"``: perturbed blocks are replaced by their codeword, the others are left as they
  are. Nothing is rescaled: a codeword approximates its block, so the noised weight already
  estimates the weight, and a ``1 / (1 - p)`` factor would inflate the kept blocks (fairseq's
  quantization noise does not rescale either). The gradient is passed straight through to every
  block (straight-through estimator, as fairseq's ``IntLinear``): the replacement's own
  derivative is zero almost everywhere, and the estimator lets the replaced weights learn in
  which direction their block should move. ``p = 1`` is allowed here (every block quantized:
  quantization-aware training), not in drop mode.

Every function returns a new tensor and never writes into its input; masks are ``(n_blocks,)``
bool tensors in :func:`~dist_pgkm.pq.to_subvectors` order, ``True`` for a perturbed block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.kmeans.assign import TorchAssigner
from dist_pgkm.pq.codec import from_subvectors, to_subvectors
from dist_pgkm.pq.layout import block_scales, book_index_at, outlier_mask_at

__all__ = [
    "NOISE_MODES",
    "BlockQuantizer",
    "Codebook",
    "NoiseMode",
    "apply_noise_mask",
    "check_layout",
    "check_p",
    "noise_mask",
    "quant_noise",
]

NoiseMode = Literal["drop", "quantize"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)


class BlockQuantizer(Protocol):
    """What replaces the perturbed blocks in ``"quantize"`` mode (e.g. a :class:`Codebook`)."""

    def __call__(self, blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Quantized values of some blocks of a weight.

        Args:
            blocks: ``(m, bs)`` blocks to replace (detached from autograd).
            index: ``(m,)`` int64 positions of these blocks in ``to_subvectors`` order.

        Returns:
            ``(m, bs)`` replacement values (cast to the weight's dtype by the caller).
        """
        ...


@dataclass(frozen=True, eq=False)
class Codebook:
    """A PQ codebook used as a :class:`BlockQuantizer`.

    With only ``centroids`` (and ``codes``) it is plain product quantization. With per-row-group
    codebooks, scales or outliers (the layer options of docs/quantize.md) it replaces a block as
    the layer's decode would (:mod:`dist_pgkm.pq.layout`): codeword of the block's own book,
    times the block's scale; weights kept as outliers keep their current value. ``shape`` is
    then required, to place a block in its row and scale group.

    Attributes:
        centroids: ``(k, bs)`` codewords, or ``(n_books, k, bs)``: one book per ``out / n_books``
            output rows. Read at every call, so a codebook that is being trained (e.g. a
            ``PQModule``'s ``centroids``) gives its current values.
        codes: ``(n_blocks,)`` fixed codeword index of every block of the weight (in its book),
            or ``None`` to use each block's nearest codeword (squared Euclidean distance to the
            block divided by its scale, lowest index on ties) at the time of the call.
        scales: ``(out, width / scale_group)`` scales (a scale group holds whole blocks), or None.
        outlier_idx: ``(n,)`` flat indices into the ``(out, width)`` weight that are never
            replaced, or None.
        shape: The weight's shape; required with books, scales or outliers.
    """

    centroids: torch.Tensor
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    outlier_idx: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.centroids.dim() not in (2, 3) or 0 in self.centroids.shape:
            raise InvalidInputError(
                f"a codebook is a (k, block_size) or (n_books, k, block_size) tensor with k >= 1, "
                f"got shape {tuple(self.centroids.shape)}."
            )
        if self.codes is not None and (
            self.codes.dim() != 1 or self.codes.dtype.is_floating_point or self.codes.is_complex()
        ):
            raise InvalidInputError(
                f"codes must be a 1-D integer tensor (one codeword per block), got "
                f"{self.codes.dtype} of shape {tuple(self.codes.shape)}."
            )
        k = int(self.centroids.shape[-2])
        if self.codes is not None and self.codes.numel():
            low, high = int(self.codes.min()), int(self.codes.max())
            if low < 0 or high >= k:
                raise InvalidInputError(
                    f"codes range over [{low}, {high}] but the codebook has {k} codewords; they "
                    "were made for another codebook."
                )
        if self.shape is None:
            if not self.plain:
                raise InvalidInputError(
                    "a codebook with several books, scales or outliers needs the weight's shape "
                    "(shape=tuple(weight.shape)) to place every block in its row."
                )
            return
        out, width, bs = self.shape[0], math.prod(self.shape[1:]), self.block_size
        problems = []
        if width % bs or out % self.n_books:
            problems.append(f"{self.n_books} books of blocks of {bs} cannot tile it")
        if self.scales is not None and (
            self.scales.dim() != 2
            or self.scales.shape[0] != out
            or width % self.scales.shape[1]
            or (width // self.scales.shape[1]) % bs
        ):
            problems.append(f"scales {tuple(self.scales.shape)} do not hold whole blocks per row")
        if (
            self.outlier_idx is not None
            and self.outlier_idx.numel()
            and (
                self.outlier_idx.dim() != 1
                or int(self.outlier_idx.min()) < 0
                or int(self.outlier_idx.max()) >= out * width
            )
        ):
            problems.append("its outlier indices fall outside it")
        if problems:
            raise InvalidInputError(
                f"a codebook for a weight of shape {self.shape}: {'; '.join(problems)}."
            )

    @property
    def block_size(self) -> int:
        return int(self.centroids.shape[-1])

    @property
    def n_books(self) -> int:
        return 1 if self.centroids.dim() == 2 else int(self.centroids.shape[0])

    @property
    def plain(self) -> bool:
        """Plain product quantization: one codebook, no scales, no outliers."""
        return self.centroids.dim() == 2 and self.scales is None and self.outlier_idx is None

    def check(self, n_blocks: int, block_size: int, name: str = "weight") -> None:
        """Check that this codebook fits a weight of ``n_blocks`` blocks of ``block_size``.

        Raises:
            InvalidInputError: Another block size, or a code count (or shape) other than
                ``n_blocks`` blocks.
        """
        if self.block_size != block_size:
            raise InvalidInputError(
                f"{name}: the codebook has codewords of {self.block_size} weights but Quant-Noise "
                f"cuts the weight into blocks of {block_size}; use the same block size for both."
            )
        if self.codes is not None and self.codes.numel() != n_blocks:
            raise InvalidInputError(
                f"{name}: {self.codes.numel()} codes for a weight of {n_blocks} blocks; the codes "
                "belong to another layer or block size."
            )
        if self.shape is not None and math.prod(self.shape) != n_blocks * block_size:
            raise InvalidInputError(
                f"{name}: the codebook was made for a weight of shape {self.shape}, not one of "
                f"{n_blocks} blocks of {block_size}; it belongs to another layer."
            )

    def __call__(self, blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        centroids = self.centroids.detach().to(blocks.device)
        if self.plain:
            if self.codes is None:
                points = blocks.detach().to(torch.float32).contiguous()  # (m, bs)
                codes, _ = TorchAssigner(points).assign(centroids.to(torch.float32))
            else:
                codes = self.codes.to(index.device)[index]
            return centroids[codes]  # (m, bs)
        return self._decode(centroids.to(torch.float32), blocks, index.to(blocks.device))

    def _decode(self, c: torch.Tensor, blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Replacement of ``blocks`` with books, scales and outliers (float32), by the decode
        functions of :mod:`dist_pgkm.pq.layout` applied to these blocks only."""
        assert self.shape is not None
        bs, k = self.block_size, int(c.shape[-2])
        width = math.prod(self.shape[1:])
        n_blocks = self.shape[0] * width // bs
        points = blocks.detach().to(torch.float32)  # (m, bs)
        scale = None
        if self.scales is not None:
            scales = self.scales.detach().to(blocks.device, torch.float32)
            scale = block_scales(scales, index, width, bs)  # (m, 1)
            points = points / scale
        if self.codes is None:
            codes = self._nearest(c, points, index, n_blocks)
        else:
            codes = self.codes.to(index.device)[index]
        flat = book_index_at(codes, index, n_blocks, self.n_books, k)
        values = c.reshape(-1, bs)[flat]  # (m, bs), as the decode gathers
        if scale is not None:
            values = values * scale
        kept = outlier_mask_at(index, bs, self.outlier_idx)
        if kept is not None:
            values = torch.where(kept, blocks.detach().to(torch.float32), values)
        return values

    def _nearest(
        self, c: torch.Tensor, points: torch.Tensor, index: torch.Tensor, n_blocks: int
    ) -> torch.Tensor:
        """Each block's nearest codeword in its own book (lowest index on ties)."""
        book = index // (n_blocks // self.n_books)  # (m,)
        codes = torch.empty_like(index)
        for b in torch.unique(book).tolist():
            members = (book == b).nonzero().squeeze(1)
            book_c = c[b] if c.dim() == 3 else c  # (k, bs)
            codes[members], _ = TorchAssigner(points[members].contiguous()).assign(book_c)
        return codes


def check_p(p: float, mode: str = "drop") -> float:
    """Validate a noise rate: ``0 <= p < 1`` in drop mode, ``0 <= p <= 1`` in quantize mode.

    Returns:
        ``p`` as a float.

    Raises:
        InvalidInputError: ``p`` out of range (or NaN), or an unknown mode.
    """
    if mode not in NOISE_MODES:
        raise InvalidInputError(
            f"unknown Quant-Noise mode {mode!r}; use one of {', '.join(NOISE_MODES)}."
        )
    p = float(p)
    if mode == "drop" and not 0.0 <= p < 1.0:
        raise InvalidInputError(
            f"Quant-Noise rate p={p} is outside [0, 1) for mode 'drop' (the kept blocks are "
            "divided by 1 - p); typical values are 0.05-0.2."
        )
    if mode == "quantize" and not 0.0 <= p <= 1.0:
        raise InvalidInputError(
            f"Quant-Noise rate p={p} is outside [0, 1] for mode 'quantize' (p is the fraction "
            "of blocks replaced by their codeword)."
        )
    return p


def check_layout(shape: tuple[int, ...], block_size: int, name: str = "weight") -> int:
    """Check that blocks of ``block_size`` tile a weight of ``shape`` in the iPQ layout.

    Args:
        shape: ``(out, in)`` Linear/Embedding or ``(out, in/groups, kh, kw)`` Conv2d shape.
        block_size: Block length ``bs``.
        name: Layer name for error messages.

    Returns:
        The number of blocks.

    Raises:
        InvalidInputError: Not a 2-D or 4-D shape, ``block_size < 1``, or a row width that
            ``block_size`` does not divide (the message names the layer, its shape and the
            block sizes that would fit).
    """
    if len(shape) not in (2, 4):
        raise InvalidInputError(
            f"{name}: Quant-Noise needs a 2-D (Linear, Embedding) or 4-D (Conv2d) weight, got "
            f"shape {shape}."
        )
    if block_size < 1:
        raise InvalidInputError(f"{name}: block size must be >= 1, got {block_size}.")
    width = math.prod(shape[1:])
    if width % block_size:
        row = "in" if len(shape) == 2 else "in/groups * kh * kw"
        fits = [b for b in _BLOCK_SIZES if width % b == 0]
        raise InvalidInputError(
            f"{name}: weight of shape {shape} has rows of {width} ({row}) weights, which blocks "
            f"of {block_size} cannot tile. Use a block size that divides {width} (e.g. "
            f"{', '.join(map(str, fits))}) for this layer, or leave it out of Quant-Noise."
        )
    return shape[0] * (width // block_size)


def noise_mask(
    n_blocks: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw which blocks are perturbed: each independently with probability ``p``.

    Args:
        n_blocks: Number of blocks of the weight.
        p: Probability that a block is perturbed, in ``[0, 1]``.
        generator: Random source. The mask is drawn on the generator's device (a CPU generator
            gives the same masks on every device) and moved to ``device``; ``None`` draws from
            torch's global random state on ``device``, which activation checkpointing restores
            before recomputing a forward.
        device: Device of the returned mask (default: the generator's, else CPU).

    Returns:
        ``(n_blocks,)`` bool, ``True`` for a perturbed block.
    """
    if not 0.0 <= p <= 1.0:
        raise InvalidInputError(f"a block noise probability must be in [0, 1], got {p}.")
    if generator is not None:
        u = torch.rand(n_blocks, generator=generator, device=generator.device)
    else:
        u = torch.rand(n_blocks, device=device)
    return (u < p).to(device if device is not None else u.device)


def apply_noise_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    p: float,
    block_size: int,
    mode: NoiseMode = "drop",
    codebook: BlockQuantizer | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """The noised weight for a given mask (the deterministic half of :func:`quant_noise`).

    Args:
        weight: ``(out, in)`` or ``(out, in/groups, kh, kw)`` weight, any float dtype; only read.
        mask: ``(n_blocks,)`` bool, ``True`` for a perturbed block (see :func:`noise_mask`).
        p: Noise rate the mask was drawn with (drop mode divides kept blocks by ``1 - p``).
        block_size: Block length ``bs``.
        mode: ``"drop"`` or ``"quantize"`` (see the module docstring).
        codebook: Replacement values in quantize mode (e.g. :class:`Codebook`).
        name: Layer name for error messages.

    Returns:
        A new tensor of ``weight``'s shape, dtype and device, differentiable w.r.t. ``weight``.

    Raises:
        InvalidInputError: Bad ``p``/``mode``/block size, a mask of the wrong shape or dtype, or
            quantize mode without a fitting codebook.
    """
    p = check_p(p, mode)
    n_blocks = check_layout(tuple(weight.shape), block_size, name)
    if mask.dtype != torch.bool or tuple(mask.shape) != (n_blocks,):
        raise InvalidInputError(
            f"{name}: the noise mask must be a bool tensor of shape ({n_blocks},) (one entry per "
            f"block), got {mask.dtype} of shape {tuple(mask.shape)}."
        )
    blocks = to_subvectors(weight, block_size, name)  # (n_blocks, bs), a view of weight
    mask = mask.to(weight.device)
    if mode == "drop":
        if codebook is not None:
            raise InvalidInputError(
                f"{name}: a codebook is only used in mode 'quantize'; pass mode='quantize' or no "
                "codebook."
            )
        # A new tensor: zero where dropped, w / (1 - p) elsewhere.
        noised = torch.where(mask[:, None], 0.0, blocks / (1.0 - p))  # (n_blocks, bs)
    else:
        if codebook is None:
            raise InvalidInputError(
                f"{name}: Quant-Noise mode 'quantize' needs a codebook (e.g. Codebook(centroids) "
                "for nearest codewords, or Codebook(centroids, codes)) to replace blocks with."
            )
        if isinstance(codebook, Codebook):
            codebook.check(n_blocks, block_size, name)
        index = mask.nonzero().squeeze(1)  # (m,)
        if index.numel():
            values = codebook(blocks.detach()[index], index)  # (m, bs)
        else:
            values = blocks.new_empty((0, block_size))
        if tuple(values.shape) != (index.numel(), block_size):
            raise InvalidInputError(
                f"{name}: the codebook returned values of shape {tuple(values.shape)} for "
                f"{index.numel()} blocks of {block_size}."
            )
        replaced = blocks.detach().index_put((index,), values.to(weight.dtype))  # a copy
        # Straight-through: the value is exactly `replaced` (blocks - blocks.detach() is 0),
        # the gradient reaches every block of the weight unchanged.
        noised = replaced + (blocks - blocks.detach())
    return from_subvectors(noised, tuple(weight.shape))


def quant_noise(
    weight: torch.Tensor,
    p: float,
    block_size: int,
    mode: NoiseMode = "drop",
    generator: torch.Generator | None = None,
    codebook: BlockQuantizer | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Quant-Noise a weight: perturb a random fraction ``p`` of its iPQ blocks.

    Equivalent to ``apply_noise_mask(weight, noise_mask(n_blocks, p, generator, weight.device),
    p, block_size, mode, codebook, name)``; call those two to see the mask.

    Args:
        weight: ``(out, in)`` Linear/Embedding or ``(out, in/groups, kh, kw)`` Conv2d weight;
            only read, never written.
        p: Fraction of blocks perturbed: ``[0, 1)`` in drop mode, ``[0, 1]`` in quantize mode.
        block_size: Block length ``bs`` (must divide ``in``, resp. ``in/groups * kh * kw``).
        mode: ``"drop"`` (zero, rescale the rest by ``1/(1-p)``) or ``"quantize"`` (replace by
            the codeword, straight-through gradient).
        generator: Seeded generator for reproducible masks (``None``: torch's global RNG).
        codebook: Replacement values for quantize mode, e.g. ``Codebook(centroids)``.
        name: Layer name for error messages.

    Returns:
        A new tensor of ``weight``'s shape, dtype and device.

    Raises:
        InvalidInputError: ``p`` out of range, unknown mode, a block size that does not tile the
            weight, or quantize mode without a fitting codebook.
    """
    p = check_p(p, mode)
    n_blocks = check_layout(tuple(weight.shape), block_size, name)
    mask = noise_mask(n_blocks, p, generator, weight.device)
    return apply_noise_mask(weight, mask, p, block_size, mode, codebook, name)
