"""One calibration for every preset, and the same ``H`` bytes on any number of Ray workers.

MiniLM on real WordNet text (every width is 384 or 1536, so ``H`` is stored in 24 x 24
blocks). Reuse: a run at block size 8 fills a calibration cache; runs at 2, 3 and 4 find every
layer there (no block is run) and read the same ``H`` bytes, and write the same checkpoint, as
fresh calibrations at those block sizes. Distribution: the calibration spread over 1 and 2
workers of a real 2-node loopback cluster (one CPU each) writes the same ``H`` files as the
in-process path on one thread.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_pgkm.checkpoint.calib import read_hessian
from dist_pgkm.config import load_config
from dist_pgkm.distributed.coordinator import RunSummary, calibration_batch, quantize_model
from dist_pgkm.eval.text import calibration_windows, load_text
from dist_pgkm.models.calibrate import diagonal_blocks, stored_block_size
from dist_pgkm.models.offline import minilm_dir
from dist_pgkm.utils.optional import set_threads

from .conftest import checkpoint_bytes

SEQ_LEN = 64
SAMPLES = 3 * calibration_batch(SEQ_LEN) - 16  # 3 chunks of micro-batches, the last one short
AWARE = [
    "encoder.layer.1.attention.output.dense",  # width 384
    "encoder.layer.3.output.dense",  # width 1536
    "pooler.dense",  # after the blocks
]


def _config(block_size: int) -> dict[str, Any]:
    return {
        "n_iter": 2,
        "calibration": {"samples": SAMPLES, "seq_len": SEQ_LEN},
        "rules": [{"match": AWARE, "block_size": block_size, "k": 16, "metric": "hessian"}],
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One thread, as each Ray worker (--cpus-per-worker 1): the forward pass's float32 sums,
    hence H's last bits, may depend on how a product is split between threads."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    text = load_text(["wordnet"])[:200_000]
    return calibration_windows(tokenizer, text, SAMPLES, SEQ_LEN)


@pytest.fixture(scope="module")
def fresh(
    tmp_path_factory: pytest.TempPathFactory, windows: torch.Tensor
) -> dict[int, tuple[Path, RunSummary]]:
    """A fresh in-process calibration (OUT/calib) per block size."""
    runs = {}
    for bs in (2, 3, 4, 8):
        out = tmp_path_factory.mktemp(f"fresh{bs}")
        runs[bs] = (
            out,
            quantize_model(minilm_dir(), load_config(_config(bs)), out, calib_ids=windows),
        )
    return runs


def _calib_bytes(calib: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(calib.glob("*.safetensors"))}


def test_stored_block_size_serves_every_preset() -> None:
    assert stored_block_size(576, 8) == stored_block_size(576, 3) == 24
    assert stored_block_size(2048, 2) == stored_block_size(2048, 8) == 8  # 3 does not divide
    assert stored_block_size(5632, 4) == 8
    assert stored_block_size(1020, 3) == 12
    assert stored_block_size(640, 2) == 8
    assert stored_block_size(576, 16) == 48  # not a preset size: g grows to hold it
    assert stored_block_size(7, 7) == 7
    # Small integers: every sum is exact, so only the indexing is compared.
    x = torch.randint(-8, 8, (300, 48), generator=torch.Generator().manual_seed(0)).double()
    h24 = torch.einsum("tgi,tgj->gij", x.reshape(300, 2, 24), x.reshape(300, 2, 24))
    for bs in (1, 2, 3, 4, 6, 8, 12, 24):
        direct = torch.einsum("tgi,tgj->gij", x.reshape(300, -1, bs), x.reshape(300, -1, bs))
        assert torch.equal(diagonal_blocks(h24, bs), direct), bs


@pytest.mark.slow  # 49 s on the loaded 2-core machine: the fixture's 4 fresh runs
def test_fresh_h_is_the_plain_sum_read_out_per_block_size(
    fresh: dict[int, tuple[Path, RunSummary]],
) -> None:
    # The same model and windows at every block size: one stored layout, the same bytes.
    files = {bs: _calib_bytes(out / "calib") for bs, (out, _) in fresh.items()}
    assert files[2] == files[3] == files[4] == files[8]
    h = read_hessian(fresh[8][0] / "calib" / "encoder.layer.3.output.dense.safetensors")
    assert h.shape == (64, 24, 24)  # 1536 / 24
    for bs in (2, 3, 4, 8):
        out = fresh[bs][0]
        got = read_hessian(out / "calib" / "pooler.dense.safetensors", block_size=bs)
        assert got.shape == (384 // bs, bs, bs)


@pytest.mark.slow  # 30 s (80 s with the fresh runs) on the loaded 2-core machine
def test_a_second_preset_reuses_the_cache_to_the_same_bytes(
    tmp_path: Path, windows: torch.Tensor, fresh: dict[int, tuple[Path, RunSummary]]
) -> None:
    cache = tmp_path / "cache"
    first = quantize_model(
        minilm_dir(), load_config(_config(8)), tmp_path / "r8", calib_ids=windows, calib_cache=cache
    )
    assert first.calibration is not None
    assert first.calibration["blocks_run"] == 6
    assert not (tmp_path / "r8" / "calib").exists()
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert first.calibration["store"] == str(entry)
    assert checkpoint_bytes(tmp_path / "r8") == checkpoint_bytes(fresh[8][0])
    for bs in (2, 3, 4):
        out = tmp_path / f"r{bs}"
        summary = quantize_model(
            minilm_dir(), load_config(_config(bs)), out, calib_ids=windows, calib_cache=cache
        )
        calibration = summary.calibration
        assert calibration is not None
        assert (calibration["blocks_run"], calibration["reused"]) == (0, len(AWARE))
        assert calibration["seconds"] == 0.0
        for name in AWARE:
            got = read_hessian(entry / f"{name}.safetensors", block_size=bs)
            want = read_hessian(fresh[bs][0] / "calib" / f"{name}.safetensors", block_size=bs)
            assert got.shape == (want.shape[0], bs, bs)
            assert got.numpy().tobytes() == want.numpy().tobytes(), (bs, name)
        assert checkpoint_bytes(out) == checkpoint_bytes(fresh[bs][0]), bs
    # Other windows: another cache entry, and the run's own fingerprint still refuses them.
    other = windows.roll(1, dims=0)
    again = quantize_model(
        minilm_dir(), load_config(_config(2)), tmp_path / "o", calib_ids=other, calib_cache=cache
    )
    assert again.calibration is not None
    assert again.calibration["blocks_run"] == 6
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


@pytest.mark.slow  # 182 s on the loaded 2-core machine (load ~13), 69 s of it the fresh runs
def test_cluster_calibration_is_byte_identical_for_1_and_2_workers(
    tmp_path: Path, windows: torch.Tensor, fresh: dict[int, tuple[Path, RunSummary]]
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")
    pytest.importorskip("psutil", reason="the cluster harness stops nodes with psutil")
    from .cluster import LoopbackCluster

    reference = _calib_bytes(fresh[4][0] / "calib")  # in-process, one thread
    config = load_config(_config(4))
    cluster = LoopbackCluster()
    try:
        cluster.start()
        for workers in (1, 2):
            out = tmp_path / f"w{workers}"
            summary = quantize_model(
                minilm_dir(),
                copy.deepcopy(config),
                out,
                calib_ids=windows,
                address=cluster.address,
                workers=workers,
            )
            calibration = summary.calibration
            assert calibration is not None
            assert (calibration["workers"], calibration["blocks_run"]) == (workers, 6)
            assert _calib_bytes(out / "calib") == reference, workers
            assert checkpoint_bytes(out) == checkpoint_bytes(fresh[4][0]), workers
    finally:
        cluster.stop()
