"""``cluster()``: the one entry point to every clustering method."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from dist_pgkm.config.kmeans import METHOD_OPTIONS, MethodOptions
from dist_pgkm.errors import ConfigError, InvalidInputError
from dist_pgkm.kmeans.assign import BACKENDS
from dist_pgkm.kmeans.baselines import fairseq_em, faiss_kmeans, kmeanspp_kmeans
from dist_pgkm.kmeans.block_metric import BlockMetric, check_metric
from dist_pgkm.kmeans.compact import compact as compact_result
from dist_pgkm.kmeans.metrics import sse_of
from dist_pgkm.kmeans.result import ClusterInput, KMeansResult
from dist_pgkm.kmeans.validate import check_k, check_points, check_weights
from dist_pgkm.pgkm.pgkm import pg_kmeans

__all__ = ["METHODS", "MethodSpec", "cluster"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered clustering method: its function and its options model."""

    run: Callable[..., KMeansResult]
    options: type[MethodOptions]


METHODS: dict[str, MethodSpec] = {
    "pgkm": MethodSpec(pg_kmeans, METHOD_OPTIONS["pgkm"]),
    "fairseq-em": MethodSpec(fairseq_em, METHOD_OPTIONS["fairseq-em"]),
    "faiss": MethodSpec(faiss_kmeans, METHOD_OPTIONS["faiss"]),
    "kmeans++": MethodSpec(kmeanspp_kmeans, METHOD_OPTIONS["kmeans++"]),
}


def _options(method: str, spec: MethodSpec, options: dict[str, Any]) -> MethodOptions:
    try:
        return spec.options.model_validate(options)
    except ValidationError as exc:
        allowed = sorted(spec.options.model_fields) or ["(none)"]
        raise ConfigError(
            f"invalid option for method {method!r}: {exc.errors()[0]['msg']} "
            f"(got {options}). Options it accepts: {', '.join(allowed)}."
        ) from exc


def cluster(
    x: torch.Tensor,
    k: int,
    method: str = "pgkm",
    n_iter: int = 15,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    backend: str = "auto",
    compact: bool = False,
    compact_tol: float = 0.0,
    metric: BlockMetric | None = None,
    **options: Any,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` centroids.

    Args:
        x: ``(n, d)`` float16/bfloat16/float32/float64 points (sub-vectors). Computation is in
            float32, except ``fairseq-em``, which keeps its centroids in ``x``'s dtype as iPQ does.
        k: Number of centroids, ``2 <= k <= n``.
        method: ``pgkm`` (default), ``fairseq-em``, ``faiss`` or ``kmeans++``.
        n_iter: Maximum Lloyd iterations (a run stops early at a fixed point).
        seed: Seed of the run's own generator; global random state is never used.
        weights: Optional ``(n,)`` non-negative weight of every point.
        backend: Nearest-centroid search: ``auto`` (fastest available), ``torch``, ``faiss``,
            ``faiss-gpu``.
        compact: Merge unused and duplicate codewords; ``centroids`` then has ``k_used`` rows.
        compact_tol: Codewords closer than this (grid pitch) are duplicates; 0 means equal.
        metric: A per-group quadratic metric (activation-aware clustering, see
            :mod:`dist_pgkm.kmeans.block_metric`): point ``i``'s error is ``(x_i - c)^T M_gi (x_i -
            c)``. A multiple of the identity for every point is the plain problem (the same
            bytes); one matrix shared by all points is solved by any method on the whitened
            points; a metric that differs by group needs ``pgkm``.
        **options: Method options, see :mod:`dist_pgkm.config.kmeans` (e.g. ``consolidate``,
            ``split_by`` for pgkm; ``eps``, ``max_tentatives`` for fairseq-em).

    Returns:
        ``centroids`` (float32, ``(k, d)`` or ``(k_used, d)`` when compacted), ``codes`` (int64,
        ``(n,)``) and ``stats``. Same inputs and seed give the same bytes on a given backend.
        With a metric, ``stats.sse`` stays the Euclidean error and ``stats.metric_sse`` is the
        error under the metric.

    Raises:
        InvalidInputError: Bad points, weights, ``k`` or ``n_iter`` (see the message for the fix).
        ConfigError: Unknown method or option, or a per-group metric with a method other
            than ``pgkm``.
        BackendUnavailableError: The requested backend cannot run here.
    """
    t0 = time.perf_counter()
    spec = METHODS.get(method)
    if spec is None:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}.")
    opts = _options(method, spec, options)
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}.")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise InvalidInputError(f"n_iter must be an integer >= 1, got {n_iter!r}.")
    if compact_tol < 0:
        raise InvalidInputError(f"compact_tol must be >= 0, got {compact_tol!r}.")
    points = check_points(x)
    k = check_k(k, points.shape[0])
    w = check_weights(weights, points.shape[0])
    x32 = points if points.dtype == torch.float32 else points.to(torch.float32)
    if metric is not None:
        metric = check_metric(metric, points.shape[0], points.shape[1])
        if metric.is_euclidean():
            metric = None  # the plain problem, bit for bit
        elif metric.shared():
            result = _whitened(spec, opts, points, x32, w, k, n_iter, seed, backend, t0, metric)
            return compact_result(result, x32, w, compact_tol) if compact else result
        elif method != "pgkm":
            raise ConfigError(
                f"method {method!r} clusters with the Euclidean distance only; a metric that "
                "differs from group to group (activation-aware quantization) needs method "
                "'pgkm'. Use pgkm, or metric: weight for this method."
            )
    inp = ClusterInput(points, x32.contiguous(), w, k, n_iter, int(seed), backend, t0, metric)
    result = spec.run(inp, **opts.model_dump())
    if compact:
        result = compact_result(result, inp.x32, w, compact_tol)
    return result


def _whitened(
    spec: MethodSpec,
    opts: MethodOptions,
    points: torch.Tensor,
    x32: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    n_iter: int,
    seed: int,
    backend: str,
    t0: float,
    metric: BlockMetric,
) -> KMeansResult:
    """One metric ``M = L L^T`` for all points: cluster ``x L`` plainly, map the codebook back.

    ``(x - c)^T M (x - c) = |x L - c L|^2``, so the Euclidean clustering of the whitened points
    is the metric clustering, with centroids ``c = c' L^-1``.
    """
    factor = torch.linalg.cholesky(metric.shared_matrix().double()).float()  # (d, d) lower
    y = (x32 @ factor).contiguous()  # (n, d) rows x_i L
    inp = ClusterInput(y.to(points.dtype), y, weights, k, n_iter, int(seed), backend, t0)
    result = spec.run(inp, **opts.model_dump())
    # c L = c'  =>  c = c' L^-1
    centroids = torch.linalg.solve_triangular(
        factor.double(), result.centroids.double(), upper=False, left=False
    ).float()
    result.stats.metric_sse = result.stats.sse
    result.stats.sse = sse_of(x32, weights, centroids, result.codes)
    return KMeansResult(centroids, result.codes, result.stats)
