"""Checks on what users hand to the clustering engine, with errors that say how to fix them."""

from __future__ import annotations

from typing import Any

import torch

from dist_pgkm.errors import InvalidInputError

__all__ = ["check_k", "check_points", "check_weights"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_points(x: Any, name: str = "x") -> torch.Tensor:
    """Validate an ``(n, d)`` point matrix and return it as a tensor (dtype unchanged).

    Args:
        x: A tensor (or anything ``torch.as_tensor`` accepts) of floating dtype.
        name: How the argument is called in error messages.

    Returns:
        The points as a contiguous tensor of the original floating dtype.

    Raises:
        InvalidInputError: Wrong type, rank or dtype, empty, or containing NaN/Inf.
    """
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(
                f"{name} must be a 2-D float tensor of shape (n, d), got {type(x).__name__}. "
                "Pass a torch.Tensor or a numpy array."
            ) from exc
    if x.dim() != 2:
        raise InvalidInputError(
            f"{name} must have shape (n, d) (one sub-vector per row), got {x.dim()}-D shape "
            f"{tuple(x.shape)}. Reshape it first, e.g. x.reshape(-1, block_size)."
        )
    n, d = x.shape
    if n == 0 or d == 0:
        raise InvalidInputError(
            f"{name} is empty (shape {tuple(x.shape)}): there is nothing to cluster. "
            "Check that the layer or slice you selected is not empty."
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise InvalidInputError(
            f"{name} has dtype {x.dtype}; clustering needs float16, bfloat16, float32 or float64 "
            f"values. Convert it with {name}.float() if the integers are the real values."
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).any(dim=1).nonzero().flatten()
        raise InvalidInputError(
            f"{name} contains NaN or Inf in {bad.numel()} of {n} rows (first: row {int(bad[0])}). "
            "k-means cannot place centroids among non-finite values; fix or drop those weights "
            "(a diverged checkpoint often shows this)."
        )
    points: torch.Tensor = x.contiguous()
    return points


def check_k(k: Any, n: int) -> int:
    """Validate the number of centroids against the number of points.

    Raises:
        InvalidInputError: ``k`` is not an integer >= 2, or exceeds ``n``.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInputError(f"k must be an integer number of centroids, got {k!r}.")
    if k < 2:
        raise InvalidInputError(
            f"k={k} centroids cannot quantize anything (at least 2 are needed). Use k >= 2; "
            "typical values are 256 (8-bit codes) up to 65536 (16-bit codes)."
        )
    if n < k:
        raise InvalidInputError(
            f"cannot learn k={k} centroids from only n={n} points: k-means needs n >= k. "
            f"Use k <= {n}, a smaller block size (more sub-vectors per layer), or leave this "
            "layer unquantized."
        )
    return k


def check_weights(weights: Any, n: int) -> torch.Tensor | None:
    """Validate optional per-point weights and return them as float32.

    Raises:
        InvalidInputError: Wrong shape, negative, non-finite, or all zero.
    """
    if weights is None:
        return None
    w = torch.as_tensor(weights)
    if w.shape != (n,):
        raise InvalidInputError(
            f"weights must have shape ({n},), one per point, got {tuple(w.shape)}."
        )
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InvalidInputError(
            "weights must be finite and >= 0; found negative or non-finite values. "
            "Clip them (e.g. weights.clamp(min=0)) or drop those points."
        )
    if float(w.sum()) <= 0:
        raise InvalidInputError("weights sum to 0: give at least one point a positive weight.")
    return w.contiguous()
