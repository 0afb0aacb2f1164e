"""The levers beyond plain product quantization, as pure functions on one weight.

* :func:`hessian_metric`: the per-block metric ``H_b`` (damped, normalised) from a layer's
  calibration second moment, for activation-aware k-means;
* :func:`select_outliers`: the most sensitive weights, kept exactly in fp16;
* :func:`fit_scales` / :func:`refit_scales`: per-row or per-group fp16 scales, chosen before
  clustering and refitted (least squares under the metric) once the codes are known.

Weights are handled as ``(out, width)`` matrices (a Conv2d weight flattened per output channel),
so block ``i`` of the iPQ layout is ``(i // (width / bs), i % (width / bs))``.
"""

from __future__ import annotations

import logging

import torch

from dist_pgkm.errors import InvalidInputError

__all__ = ["fit_scales", "fp16_exact", "hessian_metric", "refit_scales", "select_outliers"]

logger = logging.getLogger(__name__)

_FP16_TINY = float(torch.finfo(torch.float16).tiny)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest fp16 value, as float32 (what the checkpoint will hold)."""
    return x.to(torch.float16).to(torch.float32)


def hessian_metric(
    hessian: torch.Tensor, block_size: int, damp: float, diagonal: bool, name: str = "weight"
) -> torch.Tensor | None:
    """The per-block metric of a layer from its calibration second moment.

    Args:
        hessian: ``(width / bs, bs, bs)`` diagonal blocks of ``H = X^T X`` (any positive
            multiple of it: only ratios matter).
        block_size: The layer's block size ``bs``.
        damp: Added to every diagonal entry: ``damp`` times the mean of ``diag(H)``, so that a
            block whose inputs never vary (a constant-zero input channel) is still a metric.
        diagonal: Keep only the diagonal of every block (``metric: hessian-diag``).
        name: Layer name for messages.

    Returns:
        ``(width / bs, bs, bs)`` float32 symmetric positive definite matrices, scaled so that
        their mean diagonal entry is 1; None when ``H`` is all zero (the layer's inputs were
        always zero: there is nothing to weight by, the caller falls back to the weight
        metric).

    Raises:
        InvalidInputError: ``hessian`` has the wrong shape, holds NaN or infinity, or has a
            negative diagonal entry (it is not a second moment).
    """
    if hessian.dim() != 3 or hessian.shape[1:] != (block_size, block_size):
        raise InvalidInputError(
            f"{name}: calibration second moment has shape {tuple(hessian.shape)}, expected "
            f"(width / {block_size}, {block_size}, {block_size}): the diagonal blocks of X^T X "
            "for this block size. Calibrate again with this config."
        )
    h = hessian.to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise InvalidInputError(
            f"{name}: its calibration second moment X^T X holds NaN or infinity (the layer's "
            "inputs overflowed during calibration). Calibrate in float32 with shorter windows, "
            "or quantize this layer with `metric: weight`."
        )
    diag = h.diagonal(dim1=1, dim2=2)  # (G, bs)
    if bool((diag < 0).any()):
        raise InvalidInputError(
            f"{name}: its calibration second moment has a negative diagonal entry, so it is not "
            "X^T X. The calibration file is corrupt; delete the run's calib/ folder and run again."
        )
    mean = float(diag.mean())
    if mean <= 0.0:
        logger.warning(
            "%s: its inputs were zero on all calibration tokens; quantized with the weight metric",
            name,
        )
        return None
    h = (h + h.transpose(1, 2)) / 2  # exact symmetry for the Cholesky factor
    if diagonal:
        h = torch.diag_embed(diag)
    eye = torch.eye(block_size, dtype=torch.float64)
    # A small floor keeps an undamped (damp = 0) rank-deficient block factorisable.
    h = h + max(damp, 1e-6) * mean * eye
    return (h / mean).to(torch.float32)


def select_outliers(
    w: torch.Tensor, fraction: float, input_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fraction`` of the weights with the largest ``w^2 * H_jj`` (or ``w^2``).

    Args:
        w: ``(out, width)`` float32 weight.
        fraction: Share of the weights to keep (rounded to a whole number of weights).
        input_weight: ``(width,)`` diagonal of ``H`` (the input features' second moment), or
            None to rank by ``w^2`` alone.

    Returns:
        ``(idx, val)``: sorted int64 indices into ``w.view(-1)`` and their fp16-exact values.
    """
    n = round(fraction * w.numel())
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, torch.empty(0, dtype=torch.float32)
    sensitivity = w * w
    if input_weight is not None:
        sensitivity = sensitivity * input_weight.to(torch.float32)[None, :]
    idx = torch.topk(sensitivity.reshape(-1), n, sorted=False).indices.sort().values
    return idx, fp16_exact(w.reshape(-1)[idx])


def fit_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """fp16-exact RMS of every row's groups of ``group`` input features, ``(out, width / group)``.

    A group whose RMS is zero (or below fp16's range) gets scale 1: its weights are all zero
    or negligible, and dividing by 1 keeps them so.
    """
    out, width = w.shape
    rms = w.reshape(out, width // group, group).pow(2).mean(dim=2).sqrt()
    s = fp16_exact(rms)
    return torch.where(s >= _FP16_TINY, s, torch.ones_like(s))


def refit_scales(
    w: torch.Tensor,
    decoded: torch.Tensor,
    scales: torch.Tensor,
    metric: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """Least-squares scales for fixed codes: ``s = <u, w>_M / <u, u>_M`` per scale group.

    Args:
        w: ``(out, width)`` float32 target weight (outliers zeroed).
        decoded: ``(out, width)`` unscaled decode ``centroids[codes]``.
        scales: ``(out, width / group)`` current scales, kept where the fit is degenerate.
        metric: ``(width / bs, bs, bs)`` per-block metric, or None for the identity.
        block_size: ``bs``.

    Returns:
        New fp16-exact scales: each minimises the metric error of its group for the given
        decode (never worse than the current scale, up to fp16 rounding).
    """
    out, width = w.shape
    n_groups = scales.shape[1]
    u = decoded
    if metric is not None:  # M u per block: (out, G, bs) @ (G, bs, bs)
        mu = torch.einsum("ogi,gij->ogj", u.reshape(out, -1, block_size), metric)
        mu = mu.reshape(out, width)
    else:
        mu = u
    num = (mu * w).reshape(out, n_groups, -1).sum(dim=2, dtype=torch.float64)
    den = (mu * u).reshape(out, n_groups, -1).sum(dim=2, dtype=torch.float64)
    fitted = fp16_exact((num / den.clamp(min=1e-300)).to(torch.float32))
    ok = (den > 0) & torch.isfinite(fitted) & (fitted.abs() >= _FP16_TINY)
    return torch.where(ok, fitted, scales)
