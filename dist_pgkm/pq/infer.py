"""Forwards that read the codes, not a dense weight (docs/inference.md).

A PQ module's decoding forward rebuilds its whole dense weight on every call. The *code
forward* here never holds it:

* **lookup tables** (few tokens, e.g. decoding one token at a time): for every input block
  group ``g`` the products of the input block ``x[g*bs:(g+1)*bs]`` with every codeword form a
  table ``T[g, c]``; output ``o`` is the sum of the entries its codes pick,
  ``sum_g T[g, code[o, g]]``, times the scales group by group (:func:`~.layout.apply_scales`,
  as the decode does); outliers add ``x_j * (value - decoded value)``, the decoded value taken
  from the decode itself (:func:`decode_rows`) once per module;
* **tiles** (many tokens, e.g. a prefill): a bounded number of output rows is decoded at a
  time (:func:`decode_rows`: the codeword gather, the scales and the outlier overwrite of
  :mod:`dist_pgkm.pq.layout`) and multiplied, so at most ``TILE_WEIGHTS`` decoded floats exist.

The codes are read from the packed stream as the checkpoint stores it
(:func:`~.pack.codes_at`), so a module in code mode holds no unpacked index at all.
The table sums run in a numba kernel when numba is installed (``pip install
'dist-pgkm[infer]'``), otherwise in chunked torch ops (same numbers up to float32 round-off,
several times slower); on a GPU the torch ops run there.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.pq.layout import apply_outliers, apply_scales, book_index_at
from dist_pgkm.pq.pack import bits_for, codes_at

if TYPE_CHECKING:
    from dist_pgkm.pq.modules import PQConv2d, PQEmbedding, PQLinear, PQModule

__all__ = [
    "FORWARDS",
    "LUT_MAX_TOKENS",
    "TILE_WEIGHTS",
    "Forward",
    "conv2d_from_codes",
    "decode_rows",
    "embedding_from_codes",
    "forward_default",
    "linear_from_codes",
    "lut_backend",
    "use_forward",
]

Forward = Literal["codes", "decode"]
FORWARDS: tuple[Forward, ...] = ("codes", "decode")

LUT_MAX_TOKENS = 8
"""Inputs of at most this many tokens use lookup tables, larger ones decoded tiles."""

TILE_WEIGHTS = 1 << 20
"""Decoded floats per tile (4 MiB in float32)."""

_LUT_CHUNK = 1 << 18  # blocks per chunk of the torch table gather (its temporaries: ~6 MiB)

_DEFAULT: ContextVar[Forward] = ContextVar("dist_pgkm_forward", default="decode")


def _check(forward: str) -> Forward:
    if forward not in FORWARDS:
        raise InvalidInputError(f"forward must be one of {FORWARDS}, got {forward!r}.")
    return forward


@contextlib.contextmanager
def forward_default(forward: Forward) -> Iterator[None]:
    """PQ modules built inside this context start with ``forward`` (default: ``"decode"``).

    A module built for ``"codes"`` never derives its unpacked index when its codes are loaded,
    so loading a checkpoint does not allocate it either.

    Raises:
        InvalidInputError: ``forward`` is not in :data:`FORWARDS`.
    """
    token = _DEFAULT.set(_check(forward))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def default_forward() -> Forward:
    """The forward a PQ module built now starts with (see :func:`forward_default`)."""
    return _DEFAULT.get()


def use_forward(model: nn.Module, forward: Forward) -> int:
    """Switch every PQ module of ``model`` to the code forward or the decoding forward.

    ``"codes"`` frees the modules' unpacked index; ``"decode"`` derives it again (what
    training wants: the decoding forward is the one with a gradient).

    Args:
        model: Any module; its PQ submodules are switched.
        forward: ``"codes"`` or ``"decode"``.

    Returns:
        The number of PQ modules switched.

    Raises:
        InvalidInputError: ``forward`` is not in :data:`FORWARDS`.
    """
    from dist_pgkm.pq.modules import PQModule

    _check(forward)
    n = 0
    shared: dict[int, torch.Tensor] = {}  # id of packed codes -> index: tied layers share it
    for module in model.modules():
        if isinstance(module, PQModule):
            index = shared.get(id(module.codes))
            if index is None:
                module.set_forward(forward)
                shared[id(module.codes)] = module.index
            else:
                module.forward_mode = forward
                module._outlier_delta = None
                module.index = index
            n += 1
    return n


# -- decoding some rows -----------------------------------------------------------------------


def _row_blocks(module: PQModule, rows: torch.Tensor) -> torch.Tensor:
    """Indices into the stacked books of the blocks of ``rows``: ``(R, width / bs)``."""
    per_row = module.n_blocks // module.weight_shape[0]
    device = module.codes.device
    blocks = rows.to(device)[:, None] * per_row + torch.arange(per_row, device=device)  # (R, G)
    codes = codes_at(module.codes, blocks, bits_for(module.k))
    return book_index_at(codes, blocks, module.n_blocks, module.n_books, module.k)


def _outliers_of(
    module: PQModule, rows: torch.Tensor, contiguous: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The outliers in ``rows`` (sorted, unique): flat indices into those rows, values."""
    idx, val = module.outlier_idx, module.outlier_val
    if idx is None or val is None or idx.numel() == 0 or rows.numel() == 0:
        return None
    width = module.n_blocks * module.block_size // module.weight_shape[0]
    if contiguous:  # rows r0..r1-1: one slice of the sorted indices
        first = int(rows[0]) * width
        bounds = torch.tensor([first, (int(rows[-1]) + 1) * width], dtype=idx.dtype)
        lo, hi = torch.searchsorted(idx, bounds.to(idx.device)).tolist()
        return idx[lo:hi].to(torch.int64) - first, val[lo:hi]
    flat = idx.to(torch.int64)
    orow = flat // width
    rows = rows.to(flat.device)
    pos = torch.searchsorted(rows, orow).clamp_(max=rows.numel() - 1)
    hit = rows[pos] == orow
    return pos[hit] * width + flat[hit] % width, val[hit]  # still sorted


def _codewords(module: PQModule, rows: torch.Tensor) -> torch.Tensor:
    """The codewords of ``rows`` (before scales and outliers): ``(R, width)``."""
    codebook = module.centroids.detach()
    width = module.n_blocks * module.block_size // module.weight_shape[0]
    if codebook.dtype == torch.float32 and lut_backend(codebook.device) == "numba":
        w = torch.empty(rows.numel(), width)
        _numba_module().decode_rows(
            codebook.reshape(module.n_books, module.k, module.block_size).contiguous().numpy(),
            module.codes.contiguous().numpy(),
            bits_for(module.k),
            rows.to(torch.int64).contiguous().numpy(),
            module.weight_shape[0] // module.n_books,
            w.numpy(),
        )
        return w
    index = _row_blocks(module, rows)  # (R, G)
    return F.embedding(index, codebook.reshape(-1, module.block_size)).reshape(-1, width)


def decode_rows(
    module: PQModule, rows: torch.Tensor, *, outliers: bool = True, contiguous: bool = False
) -> torch.Tensor:
    """Rows of a PQ module's dense weight, decoded as its whole weight would be.

    The codeword gather, the scales and the outlier overwrite of :mod:`dist_pgkm.pq.layout`
    applied to these rows only: the same floats as the same rows of ``module.weight``.

    Args:
        module: The PQ module.
        rows: ``(R,)`` sorted, unique output rows.
        outliers: Overwrite the outliers (False: the codebook's values there).
        contiguous: ``rows`` is ``arange(r0, r1)`` (finds the outliers by one slice).

    Returns:
        ``(R, width)`` weights in the codebook's dtype.
    """
    w = _codewords(module, rows)  # (R, width)
    scales = module.scales
    w = apply_scales(w, None if scales is None else scales.detach()[rows])
    found = _outliers_of(module, rows, contiguous) if outliers else None
    if found is not None:
        w = apply_outliers(w, found[0], found[1])
    return w


def _tiles(module: PQModule) -> Iterator[tuple[int, int]]:
    out = module.weight_shape[0]
    width = module.n_blocks * module.block_size // out
    step = max(1, TILE_WEIGHTS // width)
    for r0 in range(0, out, step):
        yield r0, min(out, r0 + step)


def _tile(module: PQModule, r0: int, r1: int) -> torch.Tensor:
    rows = torch.arange(r0, r1, device=module.codes.device)
    return decode_rows(module, rows, contiguous=True)


# -- lookup tables ----------------------------------------------------------------------------


@cache
def _numba_module() -> Any:
    try:
        return importlib.import_module("dist_pgkm.pq._lut_numba")
    except ImportError:
        return None


def _numba_kernel() -> Callable[..., None] | None:
    """The numba table-sum kernel for torch's current thread count, or None without numba.

    One thread: the serial kernel. More: the parallel one on as many threads (on a busy
    machine one thread is faster: see docs/inference.md).
    """
    module = _numba_module()
    if module is None:
        return None
    threads = torch.get_num_threads()
    if threads == 1:
        return module.lut_sums  # type: ignore[no-any-return]
    module.set_threads(threads)
    return module.lut_sums_parallel  # type: ignore[no-any-return]


def lut_backend(device: torch.device | str = "cpu") -> str:
    """The table-sum backend on ``device``: ``"numba"`` (CPU, numba installed) or ``"torch"``."""
    if torch.device(device).type == "cpu" and _numba_module() is not None:
        return "numba"
    return "torch"


def _tables(module: PQModule, x: torch.Tensor) -> torch.Tensor:
    """``T[book, g, c, n] = <x[n, g-th block], codeword c of book>``: ``(n_books, G, K, N)``."""
    bs = module.block_size
    blocks = x.reshape(x.shape[0], -1, bs)  # (N, G, bs)
    books = module.centroids.detach().to(torch.float32).reshape(module.n_books, -1, bs)
    return torch.einsum("ngs,bks->bgkn", blocks, books).contiguous()  # (n_books, G, K, N)


def _sums_torch(module: PQModule, table: torch.Tensor) -> torch.Tensor:
    """Table sums with torch ops, a chunk of rows at a time: ``(N, out)``."""
    groups, k, n = table.shape[1:]
    out = module.weight_shape[0]
    flat_table = table.reshape(-1, n)  # (n_books * G * K, N)
    result = table.new_empty(n, out)
    step = max(1, _LUT_CHUNK // groups)
    scales = module.scales
    g_base = torch.arange(groups, device=table.device) * k  # (G,)
    for r0 in range(0, out, step):
        rows = torch.arange(r0, min(out, r0 + step), device=module.codes.device)
        index = _row_blocks(module, rows).to(table.device)  # (R, G), book offsets included
        book, code = index // k, index % k
        picked = flat_table[book * groups * k + g_base + code]  # (R, G, N)
        picked = picked.permute(2, 0, 1)  # (N, R, G)
        scaled = apply_scales(picked, None if scales is None else scales.detach()[rows])
        result[:, r0 : r0 + rows.numel()] = scaled.sum(-1)
    return result


def _sums_numba(module: PQModule, table: torch.Tensor) -> torch.Tensor:
    kernel = _numba_kernel()
    assert kernel is not None
    out = module.weight_shape[0]
    n = table.shape[-1]
    groups = table.shape[1]
    scales = module.scales
    if scales is None:
        scale_arr = torch.ones(1, 1)
        per_group = groups
    else:
        scale_arr = scales.detach().to(torch.float32).contiguous()
        per_group = groups // int(scale_arr.shape[1])
    result = torch.empty(out, n)
    kernel(
        table.numpy(),
        module.codes.contiguous().numpy(),
        bits_for(module.k),
        out // module.n_books,
        scale_arr.numpy(),
        scales is not None,
        per_group,
        result.numpy(),
    )
    return result.t()  # (N, out)


def _outlier_delta(module: PQModule) -> torch.Tensor | None:
    """``value - decoded value`` at every outlier (the codebook's value there), cached."""
    idx = module.outlier_idx
    if idx is None or idx.numel() == 0:
        return None
    cached: torch.Tensor | None = getattr(module, "_outlier_delta", None)
    if cached is not None:
        return cached
    width = module.n_blocks * module.block_size // module.weight_shape[0]
    flat = idx.to(torch.int64)
    rows = torch.unique(flat // width)
    decoded = []
    step = max(1, TILE_WEIGHTS // width)
    for s in range(0, rows.numel(), step):
        part = rows[s : s + step]
        w = decode_rows(module, part, outliers=False)  # (R, width)
        lo, hi = int(part[0]) * width, (int(part[-1]) + 1) * width
        inside = flat[(flat >= lo) & (flat < hi)]
        local = torch.searchsorted(part, inside // width) * width + inside % width
        decoded.append(w.reshape(-1)[local])
    assert module.outlier_val is not None
    delta = module.outlier_val.to(torch.float32) - torch.cat(decoded).to(torch.float32)
    module._outlier_delta = delta
    return delta


def _lut_linear(module: PQModule, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for ``(N, in)`` float32 ``x`` by table sums: ``(N, out)`` float32."""
    table = _tables(module, x)
    if lut_backend(x.device) == "numba":
        y = _sums_numba(module, table)
    else:
        y = _sums_torch(module, table)
    delta = _outlier_delta(module)
    if delta is not None:
        assert module.outlier_idx is not None
        width = x.shape[1]
        flat = module.outlier_idx.to(device=x.device, dtype=torch.int64)
        y = y.index_add(1, flat // width, x[:, flat % width] * delta.to(x.device))
    return y


def _tiled_linear(module: PQModule, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with ``W`` decoded tile by tile: ``(N, out)`` in ``x``'s dtype."""
    y = x.new_empty(x.shape[0], module.weight_shape[0])
    for r0, r1 in _tiles(module):
        y[:, r0:r1] = x @ _tile(module, r0, r1).to(x.dtype).t()
    return y


# -- layer forwards ---------------------------------------------------------------------------


def linear_from_codes(module: PQLinear, x: torch.Tensor) -> torch.Tensor:
    """The code forward of a :class:`~dist_pgkm.pq.PQLinear` (no gradient).

    Args:
        module: The layer.
        x: ``(..., in)`` input.

    Returns:
        ``(..., out)``, equal to ``F.linear(x, module.weight, module.bias)`` up to float32
        round-off.
    """
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    if flat.shape[0] <= LUT_MAX_TOKENS:
        y = _lut_linear(module, flat.to(torch.float32)).to(x.dtype)
    else:
        y = _tiled_linear(module, flat)
    if module.bias is not None:
        y = y + module.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)  # (..., out)


def embedding_from_codes(module: PQEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """The code forward of a :class:`~dist_pgkm.pq.PQEmbedding`: decodes the looked-up rows.

    Args:
        module: The layer.
        ids: Integer ids, any shape.

    Returns:
        ``(*ids, dim)``, the same floats as ``F.embedding(ids, module.weight)``.
    """
    rows, inverse = torch.unique(ids, return_inverse=True)  # sorted (U,), ids' shape
    return F.embedding(inverse, decode_rows(module, rows))  # (*ids, dim)


def conv2d_from_codes(module: PQConv2d, x: torch.Tensor) -> torch.Tensor:
    """The code forward of a :class:`~dist_pgkm.pq.PQConv2d`: output channels by tiles.

    A convolution reuses every weight at every output position, so it is a tiled decode, not
    a table lookup. With ``groups > 1`` the tiles would have to follow the groups; such layers
    (depthwise convolutions) are small, and their weight is decoded whole.

    Args:
        module: The layer.
        x: ``(N, C, H, W)`` input.

    Returns:
        The convolution, equal to the decoding forward's up to float32 round-off.
    """
    conv: dict[str, Any] = module.conv
    bias = module.bias
    if int(conv["groups"]) != 1:
        weight = module._decode(module.centroids.detach())
        return F.conv2d(x, weight.to(x.dtype), bias, **conv)
    parts = []
    for r0, r1 in _tiles(module):
        tile = _tile(module, r0, r1).reshape(r1 - r0, *module.weight_shape[1:])  # (R, in, kh, kw)
        part_bias = None if bias is None else bias[r0:r1].to(x.dtype)
        parts.append(F.conv2d(x, tile.to(x.dtype), part_bias, **conv))
    return torch.cat(parts, dim=1)
