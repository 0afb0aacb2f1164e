"""Shared fixtures: hard data sets built to break k-means implementations."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tests never touch a GPU implicitly and never use more threads than the machine has.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on ``n`` threads inside the block. Small problems run several times faster on one
    thread than on two busy cores (OpenMP threads spin while they wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for a test."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """torch on one thread for a whole module (``pytestmark = usefixtures(...)``)."""
    with torch_threads(1):
        yield


def gaussian_mixture(n: int, d: int, centers: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """``n`` points around ``centers`` well-separated centres (float32)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * spread
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.3


def with_zero_blocks(x: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A copy of ``x`` with a ``fraction`` of its rows set exactly to zero (pruned weights)."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    out[torch.randperm(x.shape[0], generator=g)[: int(fraction * x.shape[0])]] = 0.0
    return out


def with_duplicates(x: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A copy of ``x`` where a ``fraction`` of rows are exact copies of other rows."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    n = x.shape[0]
    dst = torch.randperm(n, generator=g)[: int(fraction * n)]
    out[dst] = x[torch.randint(0, n, (dst.numel(),), generator=g)]
    return out


def sse_reference(x: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> float:
    """Float64 SSE straight from the definition."""
    return float(((x.double() - centroids.double()[codes]) ** 2).sum())


@pytest.fixture
def mixture() -> torch.Tensor:
    return gaussian_mixture(6000, 8, 40, seed=1)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``dist-pgkm ARGS`` as a user would (a subprocess, wide terminal for the tables)."""
    return subprocess.run(
        [sys.executable, "-m", "dist_pgkm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


def smollm2_weight(key: str, rows: int | None = None) -> torch.Tensor:
    """A float32 weight of the real SmolLM2-135M (its first ``rows`` rows), via safetensors."""
    from safetensors import safe_open

    from dist_pgkm.models.offline import smollm2_dir

    with safe_open(str(smollm2_dir() / "model.safetensors"), framework="pt") as f:
        weight = f.get_slice(key)[:rows] if rows is not None else f.get_tensor(key)
    return weight.to(torch.float32).contiguous()
