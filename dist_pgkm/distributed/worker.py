"""One job, start to finish, as a pure function of the job and its weight.

This is all a worker does, in-process or inside a Ray actor: the coordinator writes the result.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from dist_pgkm.checkpoint.calib import HessianFile, read_hessian
from dist_pgkm.checkpoint.shard import encode_layer
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.errors import InvalidInputError
from dist_pgkm.models.source import ModelSource
from dist_pgkm.pq.quantize import quantize_weight
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = ["JobResult", "check_finite", "run_job", "run_layer", "weight_sha256"]


@dataclass
class JobResult:
    """A finished job: the shard's tensors and header metadata, the time it took, the peak
    resident memory of the process that ran it (so far), the k-means metric it used
    (``weight``, ``hessian``, ``hessian-diag``) and the sha256 of the source weight's bytes as
    they were read (:func:`weight_sha256`), which a resumed run compares."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    seconds: float
    peak_rss_bytes: int = 0
    metric: str = "weight"
    source_sha256: str = ""


def weight_sha256(weight: torch.Tensor) -> str:
    """The sha256 of a tensor's bytes as stored (dtype and shape are checked elsewhere).

    Hashing the weight already read for its job costs no I/O (about 1 GB/s on one core).
    """
    data = weight.detach().contiguous().reshape(-1).view(torch.uint8)  # (n_bytes,)
    return hashlib.sha256(data.numpy().data).hexdigest()  # no copy


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Refuse a weight holding NaN or infinity, naming the layer and the first bad position.

    Raises:
        InvalidInputError: Some value is NaN or infinite.
    """
    finite = torch.isfinite(weight)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(-1).nonzero().flatten()  # flat indices of the bad values
    first = int(bad[0])
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), weight.shape))
    value = float(weight.reshape(-1)[first])
    raise InvalidInputError(
        f"{name}: its weight {tuple(weight.shape)} holds {bad.numel()} NaN or infinite "
        f"value(s); the first is {value} at {list(position)} (row {position[0]}). k-means "
        "cannot place centroids among non-finite values. Fix the source checkpoint (a diverged "
        "or badly converted one often shows this), or keep this layer in float with a "
        "`skip: true` rule. Layers already finished are kept: the same command resumes."
    )


def run_job(
    job: LayerJob,
    weight: torch.Tensor,
    config: QuantizeConfig,
    hessian: torch.Tensor | None = None,
) -> JobResult:
    """Quantize one layer's weight as the job says.

    Args:
        job: The layer, its block size, codebook size, seed and the rule's options.
        weight: The layer's weight as stored (any float dtype; clustering is in float32).
        config: The run's configuration (method, iterations, options, centroid dtype, damping).
        hessian: ``(width / bs, bs, bs)`` diagonal blocks of the layer's input second moment
            from calibration, for a rule with ``metric: hessian*``; without it such a layer is
            quantized with the weight metric (the result says which metric was used).
    """
    start = time.perf_counter()
    digest = weight_sha256(weight)
    check_finite(weight, job.name)
    q = quantize_weight(
        weight,
        job.block_size,
        job.k,
        method=config.method,
        seed=job.seed,
        name=job.name,
        options=job.options,
        hessian=hessian,
        damp=config.calibration.damp,
        n_iter=config.n_iter,
        **config.method_options,
    )
    tensors, meta = encode_layer(job.name, q, config.centroid_dtype, kind=job.kind, k=job.k)
    seconds = time.perf_counter() - start
    return JobResult(job.name, tensors, meta, seconds, peak_rss_bytes(), q.metric, digest)


def run_layer(
    source: ModelSource,
    job: LayerJob,
    config: QuantizeConfig,
    hessian: HessianFile | None = None,
) -> JobResult:
    """Read the job's weight (and its ``H`` file, by path) and run it: what every executor runs.

    Args:
        source: The model, opened by whoever runs the job (the driver, or a Ray actor).
        job: The layer to quantize.
        config: The run's configuration.
        hessian: The layer's calibration file (path and sha256) for ``metric: hessian``.

    Raises:
        CheckpointError: The ``H`` file is missing, modified or unreadable.
        InvalidInputError: The weight holds NaN or infinity.
    """
    weight = source.read(job.tensor)
    h = None
    if hessian is not None:
        h = read_hessian(hessian.path, hessian.sha256, job.name, job.block_size)
    return run_job(job, weight, config, h)
