"""One job, start to finish, as a pure function of the job and its weight.

This is all a worker does, in-process or inside a Ray actor: the coordinator writes the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dist_pgkm.checkpoint.shard import encode_layer
from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.plan import LayerJob
from dist_pgkm.pq.quantize import quantize_weight
from dist_pgkm.utils.memory import peak_rss_bytes

__all__ = ["JobResult", "run_job"]


@dataclass
class JobResult:
    """A finished job: the shard's tensors and header metadata, the time it took, the peak
    resident memory of the process that ran it (so far), and the k-means metric it used
    (``weight``, ``hessian``, ``hessian-diag``)."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    seconds: float
    peak_rss_bytes: int = 0
    metric: str = "weight"


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
    return JobResult(job.name, tensors, meta, seconds, peak_rss_bytes(), q.metric)
