"""DeepSpeed engines in the pytest process share one gloo process group, destroyed at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import torch_threads

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install '.[finetune]'")
pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[models]'")


@pytest.fixture(scope="session")
def _session_group() -> Iterator[tuple[int, int]]:
    from dist_pgkm.finetune.engine import init_distributed, shutdown_distributed

    try:
        yield init_distributed()
    finally:
        shutdown_distributed()


@pytest.fixture
def process_group(_session_group: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """Rank 0 of a single-process group, with torch on one thread for the test: the models are
    tiny, and two threads on two busy cores made a step up to 100x slower."""
    with torch_threads(1):
        yield _session_group
