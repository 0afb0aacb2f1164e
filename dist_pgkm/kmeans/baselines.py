"""The baselines PG k-means is measured against, behind the same interface.

- ``fairseq_em``: iPQ's k-means, re-implemented from its published behaviour (DESIGN.md §3):
  random init with replacement, empty clusters resolved one at a time by splitting the most
  populated centroid by +-eps followed by a full re-assignment, abort after ``max_tentatives``.
  It runs in the input's own dtype, as iPQ's fp16 recipe does, so a split can vanish in rounding.
- ``faiss_kmeans``: ``faiss.Kmeans`` on all points, its statistics mapped to ours.
- ``kmeanspp_kmeans``: k-means++ seeding, empties relocated to the farthest points.
"""

from __future__ import annotations

import time

import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.kmeans.assign import FaissAssigner, make_assigner, resolve_backend
from dist_pgkm.kmeans.init import kmeanspp_init, random_init_with_replacement
from dist_pgkm.kmeans.lloyd import RepairInput, finish, lloyd, update_centroids
from dist_pgkm.kmeans.metrics import cluster_weights, columns
from dist_pgkm.kmeans.result import ClusterInput, KMeansResult
from dist_pgkm.utils.optional import import_faiss

__all__ = ["fairseq_em", "faiss_kmeans", "kmeanspp_kmeans", "relocate_to_farthest"]


def fairseq_em(inp: ClusterInput, eps: float = 1e-6, max_tentatives: int = 100) -> KMeansResult:
    """iPQ's EM k-means (see module docstring).

    Args:
        inp: The problem. Centroids are kept in ``inp.x.dtype``; distances are computed in fp32
            from those centroids, so exactly equal centroids still tie (lowest index wins).
        eps: Scale of the random split perturbation.
        max_tentatives: Split tentatives allowed in one iteration before giving up; when it
            gives up the run stops there, keeping the split centroids and the last assignment.

    Returns:
        The result; ``stats.aborted`` tells whether it gave up.
    """
    dtype = inp.x.dtype
    gen = inp.generator()
    x, w, k = inp.x32, inp.weights, inp.k
    assigner = make_assigner(x, inp.backend)
    stats = inp.new_stats("fairseq-em", assigner.name)
    centroids = random_init_with_replacement(inp.x, k, gen)  # (k, d) in the input's dtype
    stats.init_seconds = time.perf_counter() - inp.t0
    codes = torch.zeros(x.shape[0], dtype=torch.int64)
    cols = columns(x, w)
    previous: torch.Tensor | None = None
    for _ in range(inp.n_iter):
        codes, _ = assigner.assign(centroids.float())
        stats.distance_passes += 1
        counts = cluster_weights(codes, w, k)
        empty = (counts == 0).nonzero().flatten()
        stats.empty_per_iter.append(int(empty.numel()))
        tentatives = 0
        while empty.numel():
            target = int(empty[torch.randint(0, empty.numel(), (), generator=gen)])
            donor = int(counts.argmax())
            e = torch.randn(centroids.shape[1], generator=gen).to(dtype) * eps
            centroids[target] = centroids[donor] + e
            centroids[donor] -= e
            codes, _ = assigner.assign(centroids.float())
            stats.distance_passes += 1
            stats.repair_passes += 1
            counts = cluster_weights(codes, w, k)
            empty = (counts == 0).nonzero().flatten()
            if tentatives == max_tentatives and empty.numel():
                stats.aborted = True
                break
            tentatives += 1
        stats.iterations += 1
        if stats.aborted:  # iPQ leaves the loop before this iteration's update
            stats.elapsed.append(time.perf_counter() - inp.t0)
            break
        converged = previous is not None and torch.equal(codes, previous)
        if not converged:
            centroids = update_centroids(x, w, codes, centroids.float(), cols).to(dtype)
        stats.elapsed.append(time.perf_counter() - inp.t0)
        if converged:
            break
        previous = codes
    return finish(x, w, centroids, codes, stats, inp.t0)


def faiss_kmeans(inp: ClusterInput) -> KMeansResult:
    """``faiss.Kmeans`` on every point (its default would subsample to 256 points per centroid).

    faiss initialises with ``k`` distinct random points and splits a populated centroid into
    ``c(1 +- 1/1024)`` for each empty one after its update. Its per-iteration split counts are
    reported as ``empty_per_iter``. One extra search yields the final codes.
    """
    faiss = import_faiss()
    backend = resolve_backend("faiss" if inp.backend == "auto" else inp.backend, inp.x32.device)
    if backend not in ("faiss", "faiss-gpu"):
        raise InvalidInputError(
            f"method 'faiss' runs on faiss itself; backend {inp.backend!r} does not apply. "
            "Use backend='auto', 'faiss' or 'faiss-gpu'."
        )
    x = inp.x32.cpu()
    n, d = x.shape
    stats = inp.new_stats("faiss", backend)
    km = faiss.Kmeans(
        d,
        inp.k,
        niter=inp.n_iter,
        seed=inp.seed & 0x7FFFFFFF,  # faiss takes a 32-bit seed; layer seeds have 63 bits
        max_points_per_centroid=n,
        min_points_per_centroid=1,
        verbose=False,
        gpu=backend == "faiss-gpu",
    )
    start = time.perf_counter()
    stats.init_seconds = start - inp.t0
    weights = None if inp.weights is None else inp.weights.cpu().numpy()
    km.train(x.numpy(), weights=weights)
    for it in km.iteration_stats:
        stats.objective.append(float(it["obj"]))
        stats.empty_per_iter.append(int(it["nsplit"]))
        stats.elapsed.append(start - inp.t0 + float(it["time"]))
    stats.iterations = len(km.iteration_stats)
    stats.repair_passes = sum(1 for e in stats.empty_per_iter if e)  # faiss splits in the M-step
    stats.distance_passes = stats.iterations + 1
    centroids = torch.from_numpy(km.centroids).clone()
    codes, _ = FaissAssigner(x).assign(centroids)
    return finish(x, inp.weights, centroids, codes, stats, inp.t0)


def relocate_to_farthest(r: RepairInput) -> torch.Tensor:
    """Move the farthest points (largest weighted distance) into the empty clusters.

    Only points whose cluster keeps another member are moved; no distance pass is spent.
    """
    k = r.counts.shape[0]
    members = torch.bincount(r.codes, minlength=k)
    score = r.dist if r.weights is None else r.dist * r.weights
    score = torch.where(members[r.codes] >= 2, score, torch.full_like(score, -1.0))
    n_move = min(r.empty.numel(), int((score >= 0).sum()))
    far = torch.topk(score, n_move).indices
    codes = r.codes.clone()
    codes[far] = r.empty[:n_move].to(codes.device)
    return codes


def kmeanspp_kmeans(inp: ClusterInput) -> KMeansResult:
    """k-means++ seeding, then Lloyd with empties relocated to the farthest points."""
    gen = inp.generator()
    assigner = make_assigner(inp.x32, inp.backend)
    stats = inp.new_stats("kmeans++", assigner.name)
    init = kmeanspp_init(inp.x32, inp.weights, inp.k, gen)
    stats.init_seconds = time.perf_counter() - inp.t0
    centroids, codes = lloyd(
        inp.x32, inp.weights, init, assigner, inp.n_iter, stats, gen, relocate_to_farthest, inp.t0
    )
    return finish(inp.x32, inp.weights, centroids, codes, stats, inp.t0)
