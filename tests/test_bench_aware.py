"""``dist-pgkm bench ptq --aware``: its cases, its configs, its targets and its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_pgkm.bench import aware  # type: ignore[import-not-found, unused-ignore]
from dist_pgkm.bench.common import section_markers  # type: ignore[import-not-found, unused-ignore]

from dist_pgkm.config.quantize import load_config


def test_every_level_has_an_activation_aware_preset() -> None:
    for preset in aware.LEVELS.values():
        config = load_config(Path(aware.__file__).resolve().parents[1] / "configs" / preset)
        assert config.convention == "llm"
        assert config.needs_calibration, preset
        assert [r for r in config.rules if not r.skip], preset


def test_variants_switch_exactly_one_lever(tmp_path: Path) -> None:
    level = aware.ABLATION_LEVEL
    full = load_config(aware.variant_config(level, "llm", "all", tmp_path))
    plain = load_config(aware.variant_config(level, "ipq", "plain", tmp_path))
    assert plain.convention == "ipq"
    assert all(r.plain for r in plain.rules if not r.skip)
    assert not plain.needs_calibration
    for variant, lever in aware.LEVERS.items():
        config = load_config(aware.variant_config(level, "llm", variant, tmp_path))
        for rule, ref in zip(config.rules, full.rules, strict=True):
            if rule.skip:
                continue
            for key in ("metric", "scale", "codebook_rows", "outliers"):
                assert getattr(rule, key) == lever.get(key, aware.PLAIN[key]), (variant, key)
            # Block sizes and codebook sizes never change: the bits differ only by the lever.
            assert (rule.block_size, rule.k) == (ref.block_size, ref.k)
        assert not all(r.plain for r in config.rules if not r.skip)


def test_cases_cover_the_issue() -> None:
    cases = aware.cases(aware.AwareOptions())
    smol = [c for c in cases if c.model == "smollm2-135m"]
    for convention in ("llm", "ipq"):
        for level in aware.LEVELS:
            here = {
                (c.variant, c.method)
                for c in smol
                if (c.convention, c.level) == (convention, level)
            }
            assert {("all", "pgkm"), ("plain", "pgkm"), ("rtn", "rtn-g64")} <= here
            baselines = {("plain", "faiss"), ("plain", "fairseq-em")}
            assert baselines <= here if convention == "llm" else not baselines & here
    ablation = {c.variant for c in smol if c.convention == "llm" and c.level == 3}
    assert set(aware.LEVERS) <= ablation
    mini = [c for c in cases if c.model == "minilm-l6" and c.variant == "plain"]
    assert {(c.convention, c.method) for c in mini} == {
        (conv, m) for conv in ("llm", "ipq") for m in ("pgkm", "faiss", "fairseq-em")
    }
    # Targets first: the originals, then every row a target judges, the iPQ convention last.
    assert {c.variant for c in cases[:2]} == {"original"}
    judged = [
        i for i, c in enumerate(cases) if c.convention == "llm" and c.variant in ("all", "rtn")
    ]
    assert judged == list(range(2, 2 + len(judged)))
    assert all(c.convention == "ipq" for c in cases[-14:])
    assert len(aware.cases(aware.AwareOptions(quick=True))) == 3


def _row(**values: Any) -> dict[str, Any]:
    base = {"method": "pgkm", "convention": "llm", "level": 3, "bits_per_weight": 3.1}
    return {**base, **values}


def test_targets_from_rows() -> None:
    rows = [
        _row(model="smollm2-135m", variant="original", convention="-", level=0, ppl=17.0),
        _row(model="smollm2-135m", variant="all", level=4, ppl=20.0),
        _row(model="smollm2-135m", variant="all", level=3, ppl=40.0),
        _row(model="smollm2-135m", variant="all", level=2, ppl=150.0),
        _row(model="smollm2-135m", variant="rtn", level=3, ppl=200.0, method="rtn-g64"),
        _row(model="minilm-l6", variant="original", convention="-", level=0, top1=0.25),
        _row(model="minilm-l6", variant="all", top1=0.23),
        _row(model="minilm-l6", variant="all", convention="ipq", top1=0.2),
    ]
    targets = {t.id: t for t in aware.compute_targets(rows)}
    assert targets["ppl4"].measured == pytest.approx(20 / 17, abs=1e-3)
    assert targets["ppl4"].met
    assert not targets["ppl3"].met  # 40 / 17 = 2.35 > 2
    assert targets["ppl2"].met  # 150 < 200
    assert targets["minilm-llm"].met  # 0.92
    assert not targets["minilm-ipq"].met  # 0.8
    assert aware.compute_targets(rows[1:4]) == []  # no original yet: nothing judged


def test_markdown_section(tmp_path: Path) -> None:
    report = aware.AwareReport(
        mode="full", command="dist-pgkm bench ptq --aware", machine={}, commit="abc", date="d"
    )
    report.rows = [
        _row(model="smollm2-135m", variant="original", convention="-", level=0, ppl=17.0),
        _row(model="smollm2-135m", variant="all", ppl=25.5, rel_sse=0.01, quantize_s=100.0),
    ]
    report.targets = aware.compute_targets(report.rows)
    md = tmp_path / "b.md"
    aware.write_markdown(md, report)
    text = md.read_text()
    start, end = section_markers("ptq-aware")
    assert start in text
    assert end in text
    assert "| smollm2-135m | llm | ~3 | all | pgkm | 3.100 | 25.5 | 1.50 | 0.0100 | 100 |" in text


def test_resume_skips_the_measured_cases() -> None:
    done = (
        _row(model="smollm2-135m", variant="original", convention="-", level=0, ppl=17.0),
        _row(model="smollm2-135m", variant="plain", ppl=40.0),
        _row(model="smollm2-135m", variant="all", ppl=25.0),
    )
    assert all(
        any(case.matches(row) for row in done)
        for case in aware.cases(aware.AwareOptions(quick=True))
    )
    options = aware.AwareOptions(
        quick=True, done=done, done_seconds=1234.5, done_date="2026-12-01T00:00:00Z"
    )
    report = aware.run_benchmark(options)
    assert report.rows == [dict(row) for row in done]  # nothing ran again
    # The interrupted run's start and time carry over: the report is of the whole run.
    assert (report.date, report.seconds) == ("2026-12-01T00:00:00Z", 1234.5)
    assert not aware.Case("smollm2-135m", "llm", 3, "plain", "faiss").matches(done[1])


def test_cli_resume_continues_the_saved_run_of_this_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from dist_pgkm.bench.common import git_commit  # type: ignore[import-not-found, unused-ignore]

    from dist_pgkm.cli import main

    rows = [
        _row(model="smollm2-135m", variant="original", convention="-", level=0, ppl=17.0),
        _row(model="smollm2-135m", variant="plain", ppl=40.0),
        _row(model="smollm2-135m", variant="all", ppl=25.0),
    ]
    saved = {"benchmark": "ptq-aware", "commit": git_commit(), "date": "2026-12-01T00:00:00Z",
             "seconds": 3600.0, "rows": rows}  # fmt: skip
    path = tmp_path / "aware.json"
    path.write_text(json.dumps(saved))
    args = ["bench", "ptq", "--aware", "--quick", "--resume", "--json", str(path)]
    assert main(args) == 0
    report = json.loads(path.read_text())
    assert report["rows"] == rows
    assert report["date"] == saved["date"]
    assert 3600.0 <= report["seconds"] < 3660.0  # the whole run's time, not this part's

    path.write_text(json.dumps({**saved, "commit": "0" * 40}))
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"holds a 'ptq-aware' run of commit {'0' * 40}" in err
    assert "Run without --resume" in err
