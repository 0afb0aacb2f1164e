"""k-means under a per-block quadratic metric: the activation-aware error of product quantization.

A point ``x_i`` (a sub-vector of a weight) belongs to a *group* ``g_i`` (the input features
its block covers), and its error against a centroid ``c`` is ``(x_i - c)^T M_g (x_i - c)``
with ``M_g`` symmetric positive definite: for a Linear layer, the diagonal block of its input
second moment ``X^T X`` for those features, so the error is that of the layer's outputs on the
calibration inputs. One codebook is shared by every group.

With ``M_g = L_g L_g^T`` (Cholesky), the error is ``|y_i - c L_g|^2`` with the *whitened* point
``y_i = x_i L_g``: the nearest-centroid search of group ``g`` is a plain Euclidean search of its
whitened points against the codebook mapped by ``L_g``, so every search backend serves
(:class:`MetricAssigner`). The centroid minimising a cluster's error is
``(sum_i w_i M_gi)^-1 sum_i w_i M_gi x_i`` (:func:`metric_update`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_pgkm.errors import InvalidInputError
from dist_pgkm.kmeans.assign import Assigner, TorchAssigner, resolve_backend
from dist_pgkm.kmeans.metrics import segment_sum
from dist_pgkm.utils.optional import import_faiss

__all__ = [
    "BlockMetric",
    "MetricAssigner",
    "apply_metric",
    "check_metric",
    "metric_distances",
    "metric_update",
    "whiten",
]

_CHUNK = 1 << 18  # points per chunk of (chunk, d, d) gathers


@dataclass(frozen=True)
class BlockMetric:
    """A quadratic metric per group of points.

    Attributes:
        matrices: ``(G, d, d)`` float32 symmetric positive definite matrices.
        groups: ``(n,)`` int64 group of every point, in ``[0, G)``.
    """

    matrices: torch.Tensor
    groups: torch.Tensor

    @property
    def n_groups(self) -> int:
        return int(self.matrices.shape[0])

    def shared(self) -> bool:
        """Whether every point uses the same matrix (then whitening once is exact)."""
        m = self.matrices
        g = self.groups
        return bool((m == m[:1]).all()) or g.numel() == 0 or bool((g == g[0]).all())

    def shared_matrix(self) -> torch.Tensor:
        """The matrix all points use (:meth:`shared` must hold)."""
        first = int(self.groups[0]) if self.groups.numel() else 0
        matrix: torch.Tensor = self.matrices[first]
        return matrix

    def is_euclidean(self) -> bool:
        """Whether every point uses the same multiple of the identity: the plain problem
        (a common positive factor scales every error alike and changes no argmin or mean)."""
        if not self.shared():
            return False
        m = self.shared_matrix()
        d = m.shape[0]
        return bool(m[0, 0] > 0) and torch.equal(m, m[0, 0] * torch.eye(d, dtype=m.dtype))

    def factors(self) -> torch.Tensor:
        """``(G, d, d)`` lower-triangular ``L_g`` with ``M_g = L_g L_g^T`` (float32)."""
        factors: torch.Tensor = torch.linalg.cholesky(self.matrices.double())
        return factors.float()

    def subset(self, index: torch.Tensor) -> BlockMetric:
        """The metric of the points ``index`` selects."""
        return BlockMetric(self.matrices, self.groups[index])


def check_metric(metric: BlockMetric, n: int, d: int) -> BlockMetric:
    """Validate a metric for ``n`` points of dimension ``d``.

    Raises:
        InvalidInputError: Wrong shapes, groups out of range, non-finite or non-symmetric
            matrices, or a matrix that is not positive definite.
    """
    m, g = metric.matrices, metric.groups
    if m.dim() != 3 or m.shape[1:] != (d, d):
        raise InvalidInputError(
            f"metric matrices have shape {tuple(m.shape)}, expected (G, {d}, {d}) for points "
            f"of dimension {d}."
        )
    if g.dim() != 1 or g.numel() != n or g.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError(
            f"metric groups must be an integer tensor of shape ({n},), one per point; got "
            f"{g.dtype} {tuple(g.shape)}."
        )
    if n and (int(g.min()) < 0 or int(g.max()) >= m.shape[0]):
        raise InvalidInputError(
            f"metric groups range over [{int(g.min())}, {int(g.max())}] but there are "
            f"{m.shape[0]} matrices."
        )
    m32 = m.to(torch.float32)
    if not bool(torch.isfinite(m32).all()):
        raise InvalidInputError("metric matrices hold NaN or infinity; damp or drop them.")
    if not torch.allclose(m32, m32.transpose(1, 2), rtol=1e-5, atol=1e-6):
        raise InvalidInputError("metric matrices must be symmetric.")
    _, info = torch.linalg.cholesky_ex(m32.double())
    bad = (info != 0).nonzero().flatten()
    if bad.numel():
        raise InvalidInputError(
            f"metric matrix {int(bad[0])} (and {bad.numel() - 1} more) is not positive definite; "
            "add damping (a multiple of the identity) to every matrix."
        )
    return BlockMetric(m32.contiguous(), g.to(torch.int64))


def whiten(x: torch.Tensor, groups: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` whitened points ``y_i = x_i L_gi`` (float32), chunked."""
    y = torch.empty_like(x, dtype=torch.float32)
    for s in range(0, x.shape[0], _CHUNK):
        e = s + _CHUNK
        # (chunk, 1, d) @ (chunk, d, d) -> (chunk, 1, d)
        y[s:e] = torch.bmm(x[s:e, None, :].to(torch.float32), factors[groups[s:e]]).squeeze(1)
    return y


def apply_metric(x: torch.Tensor, groups: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` rows ``M_gi x_i`` (the matrices are symmetric), chunked."""
    return whiten(x, groups, matrices)  # x_i M_g as a row is (M_g x_i)^T for symmetric M_g


def metric_distances(
    x: torch.Tensor, groups: torch.Tensor, matrices: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``(n,)`` float32 ``(x_i - c_i)^T M_gi (x_i - c_i)`` for paired rows of ``x`` and ``c``."""
    diff = x.to(torch.float32) - c.to(torch.float32)
    return (apply_metric(diff, groups, matrices) * diff).sum(dim=1).clamp_(min=0.0)


def metric_update(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    metric: BlockMetric,
    mx: torch.Tensor | None = None,
    mx_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """M-step under the metric: ``c_j = (sum w_i M_gi)^-1 sum w_i M_gi x_i`` over members ``i``.

    Args:
        x: ``(n, d)`` points.
        weights: ``(n,)`` weights or None.
        codes: ``(n,)`` cluster of every point.
        centroids: ``(k, d)`` current centroids; empty clusters keep theirs.
        metric: The points' metric.
        mx: ``(n, d)`` rows ``M_gi x_i``, cached by a caller that updates many times.
        mx_cols: ``columns(mx, weights)`` (the grouped sum's layout), cached likewise.

    Returns:
        A new ``(k, d)`` float32 tensor.
    """
    k, d = centroids.shape
    if mx is None:
        mx = apply_metric(x, metric.groups, metric.matrices)
    rhs = segment_sum(codes, mx, k, weights, mx_cols).double()  # (k, d)
    flat = metric.matrices.reshape(-1, d * d).double()  # (G, d * d)
    n_groups = flat.shape[0]
    if k * n_groups <= _CHUNK * 16:
        # Weight of every (cluster, group) pair, then one product: (k, G) @ (G, d * d).
        pair = codes * n_groups + metric.groups
        mass = torch.bincount(pair, weights=weights, minlength=k * n_groups).double()
        lhs = mass.reshape(k, n_groups) @ flat  # (k, d * d)
    else:  # (k, G) would be large (huge codebooks and many groups): sum member matrices
        lhs = torch.zeros(k, d * d, dtype=torch.float64)
        for s in range(0, x.shape[0], _CHUNK):
            e = s + _CHUNK
            rows = flat[metric.groups[s:e]]  # (chunk, d * d)
            if weights is not None:
                rows = rows * weights[s:e, None].double()
            lhs.index_add_(0, codes[s:e], rows)
    out = centroids.to(torch.float32).clone()
    filled = (lhs[:, 0] > 0).nonzero().flatten()  # M_g is positive definite: m_00 > 0
    if filled.numel():
        a = lhs[filled].reshape(-1, d, d)
        out[filled] = torch.linalg.solve(a, rhs[filled].unsqueeze(2)).squeeze(2).float()
    return out


class MetricAssigner(Assigner):
    """Nearest centroid under a per-group metric: a Euclidean search per group.

    The search of group ``g`` compares its whitened points ``x_i L_g`` with the codebook mapped
    by ``L_g`` (``|y|^2 - 2 y.c + |c|^2``, the torch backend's arithmetic; CPU or CUDA, as the
    points are). Large groups get a :class:`~dist_pgkm.kmeans.assign.TorchAssigner` each
    (``addmm`` + ``min`` in cache-sized blocks); groups of at most :attr:`SMALL` points are
    laid out in a padded ``(G, n_max, d)`` tensor and searched many at a time with ``baddbmm``,
    since a call per tiny group costs more than its arithmetic (a layer cut into one codebook
    per 32 rows has groups of 32 points). Measured on one thread, k = 256, SmolLM2 shapes:
    per-group torch searches took 374 / 70 / 170 ms per pass at (1536 points x 288 groups,
    d 2) / (576 x 144, d 4) / (576 x 192, d 8), against 879 / 220 / 234 ms for a faiss search
    per group and 583 / 99 / 128 ms for all groups batched (a 3-D ``min`` is slower than 2-D
    ones on cache-sized blocks).

    For ``d <= LIFT_MAX_D`` (the block sizes 2-4 of the LLM presets) no search is made per
    group: ``(x - c)^T M_g (x - c) = x^T M_g x + u_i . v_c`` with ``u_i`` the point's lifted
    features (``-2 M_g x_i`` and the entries of ``M_g``) and ``v_c`` the codeword's (``c`` and
    its products ``c_a c_b``), so one search of ``d + d (d + 1) / 2`` dimensions covers every
    group. With faiss it runs as an L2 search (faiss's fused L2 + argmin kernel; its
    inner-product search is ~3.5x slower here), else as the torch backend's ``addmm`` + ``min``.
    SmolLM2 gate_proj at bs 2 (442k points, 288 groups), K 256, 2 threads, loaded machine:
    0.49 s per pass with a torch search per group; lifted, 0.54 s with torch, 0.31 s with
    faiss's inner-product search, 0.09 s with its L2 kernel (the plain search: 0.08 s).

    Args:
        x: ``(n, d)`` float32 points, sorted by group.
        metric: Their metric (``metric.groups`` non-decreasing).
        block_bytes: Bound of one batched distance block.
        backend: Search backend of the lifted search (``auto`` / ``faiss``: faiss's L2 kernel
            when installed, CPU only; otherwise torch).
        mx: ``(n, d)`` rows ``M_gi x_i`` when the caller has them (they are the lift's first
            features).
    """

    name = "metric/torch"
    SMALL = 256
    LIFT_MAX_D = 4

    def __init__(
        self,
        x: torch.Tensor,
        metric: BlockMetric,
        block_bytes: int = 4 << 20,
        backend: str = "torch",
        mx: torch.Tensor | None = None,
    ) -> None:
        super().__init__(x)
        groups = metric.groups
        assert groups.numel() < 2 or bool((groups[1:] >= groups[:-1]).all())
        self.metric = metric
        self.factors = metric.factors().to(x.device)  # (G, d, d)
        self.whitened = whiten(x, groups, self.factors)  # (n, d)
        self._block_bytes = block_bytes
        self._lifted = x.shape[1] <= self.LIFT_MAX_D
        if self._lifted:
            self._lift_setup(backend, mx)
            return
        counts = torch.bincount(groups, minlength=metric.n_groups)
        ends = counts.cumsum(0)
        n_max = int(counts.max()) if counts.numel() else 0
        self._batched = n_max <= self.SMALL
        if self._batched:
            self._pos = torch.arange(x.shape[0], device=x.device) - (ends - counts)[groups]
            self._padded = torch.zeros(metric.n_groups, n_max, x.shape[1], device=x.device)
            self._padded[groups, self._pos] = self.whitened  # (G, n_max, d)
        else:
            self._spans = [
                (g, int(ends[g] - counts[g]), int(ends[g]))
                for g in counts.nonzero().flatten().tolist()
            ]
            self._searches = [TorchAssigner(self.whitened[s:e]) for _, s, e in self._spans]

    def _lift_setup(self, backend: str, mx: torch.Tensor | None) -> None:
        """Features for one search of all groups: ``(x - c)^T M (x - c) = x^T M x + u.v``.

        ``u = (-2 M x, M_ab (a <= b, off-diagonal entries doubled))`` depends on the point and
        its group, ``v = (c, c_a c_b (a <= b))`` on the codeword only, so every group shares
        one codebook of ``d + d (d + 1) / 2`` lifted features and the search is a single
        minimum inner product over all points (no call per group).
        """
        x, metric = self.x, self.metric
        d = x.shape[1]
        self._iu = torch.triu_indices(d, d, device=x.device)  # (2, T) pairs a <= b
        z = apply_metric(x, metric.groups, metric.matrices) if mx is None else mx  # (n, d) M_g x_i
        self._base = (z * x).sum(dim=1)  # (n,) x^T M x
        double = torch.where(self._iu[0] == self._iu[1], 1.0, 2.0).to(x.device)
        quad = metric.matrices[:, self._iu[0], self._iu[1]] * double  # (G, T)
        self._lift = torch.cat([-2.0 * z, quad[metric.groups]], dim=1).contiguous()  # (n, d+T)
        resolved = resolve_backend(backend, x.device)
        self._faiss = import_faiss() if resolved == "faiss" else None
        self.name = "metric/faiss" if self._faiss is not None else "metric/torch"
        if self._faiss is not None:
            # A zero last coordinate for the search as an L2 one (see _assign_lifted).
            pad = torch.zeros(self._lift.shape[0], 1)
            self._lift_np = torch.cat([self._lift, pad], dim=1).numpy()  # (n, d + T + 1)
            self._lift_rms = float(self._lift.square().sum(dim=1).mean().sqrt())

    def _assign_lifted(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.cat([c, c[:, self._iu[0]] * c[:, self._iu[1]]], dim=1)  # (k, d + T)
        n, k = self._lift.shape[0], v.shape[0]
        if self._faiss is not None:
            # min u.v as an L2 search (faiss's fused L2 + argmin kernel is ~3.5x faster than
            # its inner-product search at these dimensions): codewords w = (-s v, t) with
            # t = sqrt(R^2 - s^2 |v|^2), points (u, 0), so |(u, 0) - w|^2 = |u|^2 + 2 s u.v
            # + R^2 and the nearest w minimises u.v. s makes R^2 about |u|^2, the rounding
            # error of a distance then being that of the product u.v itself.
            vn = v.square().sum(dim=1)  # (k,)
            scale = self._lift_rms / max(float(vn.max().sqrt()), 1e-30)
            r2 = scale * scale * vn.max()
            t = (r2 - scale * scale * vn).clamp(min=0.0).sqrt()
            w = torch.cat([-scale * v, t[:, None]], dim=1).contiguous()  # (k, d + T + 1)
            index = self._faiss.IndexFlatL2(w.shape[1])
            index.add(w.numpy())
            _, arg = index.search(self._lift_np, 1)
            codes = torch.from_numpy(arg.reshape(-1))
            score = (self._lift * v[codes]).sum(dim=1)  # u.v of the chosen codeword
        else:
            codes = torch.empty(n, dtype=torch.int64, device=c.device)
            score = torch.empty(n, dtype=torch.float32, device=c.device)
            v_t = v.t().contiguous()  # (d + T, k)
            rows = max(1, (1 << 20) // (4 * k))  # 1 MiB distance blocks stay in cache
            for s in range(0, n, rows):
                e = min(n, s + rows)
                block = self._lift[s:e] @ v_t  # (rows, k)
                torch.min(block, dim=1, out=(score[s:e], codes[s:e]))
        return codes, (score + self._base).clamp_(min=0.0)

    def assign(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = centroids.to(device=self.x.device, dtype=torch.float32)
        if self._lifted:
            return self._assign_lifted(c.contiguous())
        mapped = torch.einsum("kd,gde->gke", c, self.factors)  # (G, k, d): c L_g
        if self._batched:
            return self._assign_batched(mapped)
        n = self.x.shape[0]
        codes = torch.empty(n, dtype=torch.int64, device=self.x.device)
        dist = torch.empty(n, dtype=torch.float32, device=self.x.device)
        for (g, s, e), search in zip(self._spans, self._searches, strict=True):
            codes[s:e], dist[s:e] = search.assign(mapped[g])
        return codes, dist

    def _assign_batched(self, mapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_sq = (mapped * mapped).sum(dim=2)  # (G, k)
        n_groups, n_max, _ = self._padded.shape
        k = mapped.shape[1]
        step = max(1, self._block_bytes // max(1, 4 * n_max * k))
        best = torch.empty(n_groups, n_max, device=mapped.device)
        arg = torch.empty(n_groups, n_max, dtype=torch.int64, device=mapped.device)
        for s in range(0, n_groups, step):
            e = min(n_groups, s + step)
            # (groups, n_max, k) = |c|^2 - 2 y.c ; |y|^2 is added after the min.
            block = torch.baddbmm(
                c_sq[s:e, None, :], self._padded[s:e], mapped[s:e].transpose(1, 2), alpha=-2.0
            )
            torch.min(block, dim=2, out=(best[s:e], arg[s:e]))
        groups, y = self.metric.groups, self.whitened
        dist = (best[groups, self._pos] + (y * y).sum(dim=1)).clamp_(min=0.0)
        return arg[groups, self._pos], dist

    def distances(
        self, index: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        c = centroids[codes[index]]
        return metric_distances(self.x[index], self.metric.groups[index], self.metric.matrices, c)
