"""Fuzz: damaged checkpoint files give typed errors, never a crash, a hang or another weight.

A small real checkpoint (all-MiniLM-L6-v2 cut to one block and its first 1,024 tokens, four
layers quantized, one with row scales, books and outliers, so every tensor of the format is
there) is written once. Then, ``count`` times, one file (the merged ``model.safetensors`` or a
per-layer shard) is damaged in one of five ways, and everything that reads it runs:

- ``header``: 1-8 random bytes of the length prefix or the JSON header replaced;
- ``entry``: one header entry edited and the header rewritten (unknown dtype, other shape,
  shifted offsets, a tensor dropped or renamed);
- ``body``: 1-8 random bytes of the tensor data replaced (half the time in a ``codes`` tensor,
  so codes beyond the codebook are common);
- ``truncate``: the file cut at a random length;
- ``extend``: 1-4,096 random bytes appended.

Readers of the merged file: ``dist_pgkm.load`` (verifying the sha256, the default), the same
with ``verify=False`` (what the header, shape and code checks catch alone),
``transformers.AutoModel.from_pretrained`` (verifying) and ``describe(verify=True)`` (what
``dist-pgkm inspect`` runs). Readers of a shard: ``describe`` and ``read_shard`` +
``decode_layer`` with and without the manifest's sha256 (what a resumed run and the merge read).

Each outcome is counted: a return, a typed error (:class:`~dist_pgkm.errors.DistPGKMError`),
whether that error names the damaged file, or any other exception (``untyped``). A load that
verified and returned must hold exactly the weights written (else ``wrong weight``). The
iterations run in a child process; one that kills it is a ``crash``, one that makes no progress
for ``timeout`` seconds a ``hang``, and the run goes on in a new child. The goals: 0 untyped,
0 crashes or hangs, 0 wrong weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_pgkm.bench.common import (  # type: ignore[import-not-found, unused-ignore]
    Target,
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    replace_marker_section,
    targets_markdown,
    targets_rich_table,
    utc_now,
)
from rich.console import Console

__all__ = [
    "MUTATIONS",
    "FuzzOptions",
    "FuzzReport",
    "build_checkpoint",
    "mutate",
    "render_report",
    "run_benchmark",
    "write_markdown",
]

logger = logging.getLogger(__name__)

MUTATIONS = ("header", "entry", "body", "truncate", "extend")
TARGETS = ("merged", "shard")
VOCAB = 1024
# Three layers of the one block and the word embeddings: the query with 12 codewords (4-bit
# codes can then point past the codebook), the FFN output with every lever of format 2 (books,
# row scales, outliers).
CONFIG: dict[str, Any] = {
    "n_iter": 2,
    "rules": [
        {"match": "encoder.layer.0.attention.self.query", "block_size": 8, "k": 12},
        {"match": "encoder.layer.0.intermediate.dense", "block_size": 8, "k": 16},
        {
            "match": "encoder.layer.0.output.dense",
            "block_size": 8,
            "k": 16,
            "scale": "row",
            "codebook_rows": 192,
            "outliers": 0.001,
        },
        {"match": "embeddings.word_embeddings", "block_size": 8, "k": 32},
    ],
}
_DTYPES = ("F16", "BF16", "F32", "U8", "I32", "I64", "F4X", "", "BOOL")


@dataclass(frozen=True)
class FuzzOptions:
    """What one fuzz run does.

    Attributes:
        count: Damaged files to try.
        seed: Seed of the damage (iteration ``i`` uses ``seed * 1_000_003 + i``).
        timeout: Seconds without progress after which an iteration counts as a hang.
        work_dir: Where the checkpoint is written (default: a temporary directory).
        command: The command line, recorded in the report.
    """

    count: int = 1000
    seed: int = 0
    timeout: float = 120.0
    work_dir: Path | None = None
    command: str = ""


@dataclass
class FuzzReport:
    """Counts of a fuzz run, by outcome, mutation and reader, with examples of failures."""

    options: dict[str, Any]
    machine: dict[str, Any]
    commit: str | None
    date: str
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    by_mutation: dict[str, dict[str, int]] = field(default_factory=dict)
    by_reader: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "fuzz",
            "date": self.date,
            "commit": self.commit,
            "machine": self.machine,
            "options": self.options,
            "seconds": self.seconds,
            "counts": self.counts,
            "by_mutation": self.by_mutation,
            "by_reader": self.by_reader,
            "examples": self.examples,
            "targets": [t.as_dict() for t in compute_targets(self)],
        }


# --- the checkpoint -----------------------------------------------------------------------


def build_checkpoint(work: Path) -> Path:
    """Quantize MiniLM cut to one block and 1,024 tokens; return the output directory.

    The cut model is real weights in a real architecture (BertModel), small enough that
    loading it takes a fraction of a second.
    """
    from dist_pgkm.checkpoint.shard import write_shard
    from dist_pgkm.config import load_config
    from dist_pgkm.distributed.coordinator import quantize_model
    from dist_pgkm.models.offline import minilm_dir
    from dist_pgkm.utils.safetensors_io import read_tensors

    model = minilm_dir()
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config.update(num_hidden_layers=1, vocab_size=VOCAB)
    (source / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors, _ = read_tensors(model / "model.safetensors")
    kept = {
        key: (value[:VOCAB] if key == "embeddings.word_embeddings.weight" else value)
        for key, value in tensors.items()
        if not key.startswith("encoder.layer.") or key.startswith("encoder.layer.0.")
    }
    write_shard(source / "model.safetensors", kept, {"format": "pt"})
    out = work / "checkpoint"
    quantize_model(source, load_config(CONFIG), out)
    return out


# --- damage -------------------------------------------------------------------------------


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0


def _edit_entry(data: bytes, rng: random.Random) -> bytes:
    n = _header_len(data)
    header = json.loads(data[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    what = rng.choice(("dtype", "shape", "offsets", "drop", "rename", "metadata"))
    if what == "dtype":
        entry["dtype"] = rng.choice(_DTYPES)
    elif what == "shape":
        shape = list(entry["shape"]) or [1]
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice((-1, 1, 2, -shape[i], shape[i])))
        entry["shape"] = rng.choice((shape, [*shape, 1], shape[1:]))
    elif what == "offsets":
        delta = rng.choice((-8, -1, 1, 8, 1 << 20))
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + delta]
    elif what == "drop":
        del header[key]
    elif what == "rename":
        header[key + "x"] = header.pop(key)
    else:
        meta = header.setdefault("__metadata__", {})
        meta[rng.choice([*meta, "format_version", "k_used", "shape"])] = rng.choice(("0", "x", "9"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    """``data`` (a safetensors file) damaged in the way ``kind`` names (see the module doc)."""
    n = _header_len(data)
    out = bytearray(data)
    if kind == "header":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(min(len(out), 8 + n))] = rng.randrange(256)
    elif kind == "entry":
        return _edit_entry(data, rng)
    elif kind == "body":
        start, end = 8 + n, len(out)
        if rng.random() < 0.5:
            header = json.loads(data[8 : 8 + n])
            codes = [e for k, e in header.items() if k.endswith(".codes")]
            if codes:
                begin, stop = rng.choice(codes)["data_offsets"]
                start, end = 8 + n + begin, 8 + n + stop
        for _ in range(rng.randint(1, 8)):
            if end > start:
                out[rng.randrange(start, end)] = rng.randrange(256)
    elif kind == "truncate":
        return data[: rng.randrange(len(data))]
    elif kind == "extend":
        return data + rng.randbytes(rng.randint(1, 4096))
    else:
        raise ValueError(f"unknown mutation {kind!r}")
    return bytes(out)


# --- one iteration (in the child process) ---------------------------------------------------


def _outcome(call: Callable[[], Any], damaged: Path) -> tuple[str, Any, str]:
    """(outcome, value, message): ``ok``, ``typed``, ``typed-unnamed`` or ``untyped``."""
    from dist_pgkm.errors import DistPGKMError

    try:
        return "ok", call(), ""
    except DistPGKMError as exc:
        named = damaged.name in str(exc)
        return ("typed" if named else "typed-unnamed"), None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return "untyped", None, f"{type(exc).__name__}: {exc}"


def _same_weights(model: Any, reference: Mapping[str, Any]) -> bool:
    import torch

    state = model.state_dict()
    return set(state) == set(reference) and all(
        torch.equal(state[k], reference[k]) for k in reference
    )


def _readers(
    out: Path, target: Path, reference: Mapping[str, Any]
) -> dict[str, tuple[Callable[[], Any], bool]]:
    """Reader name -> (call, whether a return must hold the weights written)."""
    import dist_pgkm
    from dist_pgkm.checkpoint import decode_layer, read_shard
    from dist_pgkm.checkpoint.manifest import Manifest
    from dist_pgkm.checkpoint.summary import describe

    if target.name.startswith("model"):
        from transformers import AutoModel

        def from_pretrained() -> Any:
            return AutoModel.from_pretrained(out)

        return {
            "load": (lambda: dist_pgkm.load(out), True),
            "load-unverified": (lambda: dist_pgkm.load(out, verify=False), False),
            "from_pretrained": (from_pretrained, True),
            "inspect": (lambda: describe(out, verify=True), False),
        }
    manifest = Manifest.read(out)
    assert manifest is not None
    sha = next(r.sha256 for r in manifest.layers.values() if out / r.shard == target)
    return {
        "inspect": (lambda: describe(out), False),
        "read_shard": (lambda: decode_layer(*read_shard(target, sha), where=str(target)), False),
        "read_shard-unchecked": (
            lambda: decode_layer(*read_shard(target), where=str(target)),
            False,
        ),
    }


def _iteration(
    out: Path, files: list[Path], originals: Mapping[Path, bytes], seed: int, i: int
) -> dict[str, Any]:
    rng = random.Random(seed * 1_000_003 + i)
    merged = [f for f in files if f.name.startswith("model")]
    shards = [f for f in files if f.parent.name == "shards"]
    target = rng.choice(merged if rng.random() < 0.5 else shards)
    kind = rng.choice(MUTATIONS)
    target.write_bytes(mutate(originals[target], kind, rng))
    return {"i": i, "target": target.name, "mutation": kind}


def _worker(spec_path: str) -> None:
    """Child process: run iterations ``start..count``, one JSON line each, then exit."""
    import torch

    import dist_pgkm

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out = Path(spec["out"])
    files = [Path(f) for f in spec["files"]]
    originals = {f: f.read_bytes() for f in files}
    reference = {k: v.clone() for k, v in dist_pgkm.load(out).state_dict().items()}
    with open(spec["results"], "a", encoding="utf-8") as log:
        for i in range(spec["start"], spec["count"]):
            log.write(json.dumps({"started": i}) + "\n")
            log.flush()
            row = _iteration(out, files, originals, spec["seed"], i)
            target = next(f for f in files if f.name == row["target"])
            row["readers"] = {}
            for name, (call, exact) in _readers(out, target, reference).items():
                outcome, value, message = _outcome(call, target)
                if outcome == "ok" and exact and not _same_weights(value, reference):
                    outcome = "wrong-weight"
                row["readers"][name] = {"outcome": outcome, "message": message[:400]}
                del value
            target.write_bytes(originals[target])
            log.write(json.dumps(row) + "\n")
            log.flush()


# --- the parent -----------------------------------------------------------------------------


def _run_child(spec: Path, results: Path, timeout: float) -> str | None:
    """Run one child until it ends; 'crash' or 'hang' when it dies or stalls, else None."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [
        sys.executable,
        "-c",
        f"from dist_pgkm.bench.fuzz import _worker; _worker({str(spec)!r})",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    size, last = -1, time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        now_size = results.stat().st_size if results.exists() else 0
        if now_size != size:
            size, last = now_size, time.monotonic()
        elif time.monotonic() - last > timeout:
            proc.kill()
            proc.wait()
            return "hang"
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        logger.warning("fuzz worker ended with %s: %s", proc.returncode, stderr[-2000:])
        return "crash"
    return None


def run_benchmark(
    options: FuzzOptions, progress: Callable[[int, int, str], None] | None = None
) -> FuzzReport:
    """Build the checkpoint, damage it ``options.count`` times, and count the outcomes."""
    report = FuzzReport(
        options={
            "count": options.count,
            "seed": options.seed,
            "timeout": options.timeout,
            "command": options.command,
        },
        machine=machine_info({"torch_threads": 1}),
        commit=git_commit(),
        date=utc_now(),
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-pgkm-fuzz-") as tmp:
        work = options.work_dir or Path(tmp)
        out = build_checkpoint(work / "fuzz")
        files = sorted([*out.glob("model*.safetensors"), *(out / "shards").glob("*.safetensors")])
        originals = {f: f.read_bytes() for f in files}
        results = work / "fuzz-results.jsonl"
        results.unlink(missing_ok=True)
        spec = work / "fuzz-spec.json"
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        next_i = 0
        while next_i < options.count:
            spec.write_text(
                json.dumps(
                    {
                        "out": str(out),
                        "files": [str(f) for f in files],
                        "seed": options.seed,
                        "start": next_i,
                        "count": options.count,
                        "results": str(results),
                    }
                )
            )
            failure = _run_child(spec, results, options.timeout)
            lines = [json.loads(x) for x in results.read_text(encoding="utf-8").splitlines()]
            rows = [x for x in lines if "readers" in x]
            done = {x["i"] for x in rows}
            started = [x["started"] for x in lines if "started" in x]
            for f, data in originals.items():  # a killed child leaves its damage behind
                f.write_bytes(data)
            if failure is None:
                break
            stuck = max((i for i in started if i not in done), default=next_i)
            failures.append({"i": stuck, "failure": failure})
            next_i = stuck + 1
            if progress is not None:
                progress(len(rows) + len(failures), options.count, f"fuzz ({failure})")
        report.seconds = time.perf_counter() - start
    _count(report, rows, failures)
    if progress is not None:
        progress(options.count, options.count, "fuzz")
    return report


def _count(report: FuzzReport, rows: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
    counts: Counter[str] = Counter()
    by_mutation: dict[str, Counter[str]] = {m: Counter() for m in MUTATIONS}
    by_reader: dict[str, Counter[str]] = {}
    for row in rows:
        counts["iterations"] += 1
        counts[f"target-{'merged' if row['target'].startswith('model') else 'shard'}"] += 1
        for reader, result in row["readers"].items():
            outcome = result["outcome"]
            counts[outcome] += 1
            by_mutation[row["mutation"]][outcome] += 1
            by_reader.setdefault(reader, Counter())[outcome] += 1
            if (
                outcome in ("untyped", "typed-unnamed", "wrong-weight")
                and len(report.examples) < 20
            ):
                report.examples.append(
                    {
                        "i": row["i"],
                        "target": row["target"],
                        "mutation": row["mutation"],
                        "reader": reader,
                        "outcome": outcome,
                        "message": result["message"],
                    }
                )
    for failure in failures:
        counts[failure["failure"]] += 1
        counts["iterations"] += 1
        report.examples.append(failure)
    for key in ("ok", "typed", "typed-unnamed", "untyped", "wrong-weight", "crash", "hang"):
        counts.setdefault(key, 0)
    report.counts = dict(counts)
    report.by_mutation = {k: dict(v) for k, v in by_mutation.items()}
    report.by_reader = {k: dict(v) for k, v in by_reader.items()}


def compute_targets(report: FuzzReport) -> list[Target]:
    """The three goals of issue 18, and that typed errors name the damaged file."""
    c = report.counts
    n = c.get("iterations", 0)
    note = f"{n} damaged files"
    return [
        Target("1", "untyped exceptions", c.get("untyped", 0), "0", c.get("untyped", 0) == 0, note),
        Target(
            "2",
            "crashes or hangs",
            c.get("crash", 0) + c.get("hang", 0),
            "0",
            c.get("crash", 0) + c.get("hang", 0) == 0,
            note,
        ),
        Target(
            "3",
            "verified loads returning another weight",
            c.get("wrong-weight", 0),
            "0",
            c.get("wrong-weight", 0) == 0,
            note,
        ),
        Target(
            "4",
            "typed errors that do not name the file",
            c.get("typed-unnamed", 0),
            "0",
            c.get("typed-unnamed", 0) == 0,
            note,
        ),
    ]


def render_report(console: Console, report: FuzzReport) -> None:
    console.print(targets_rich_table(compute_targets(report), title="fuzz"))
    console.print(
        f"{report.counts.get('iterations', 0)} damaged files in {report.seconds:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
    )
    for example in report.examples[:5]:
        console.print(f"  {example}")


def markdown_section(report: FuzzReport) -> str:
    c = report.counts
    rows = [
        [m, *(str(report.by_mutation.get(m, {}).get(o, 0)) for o in _OUTCOMES)] for m in MUTATIONS
    ]
    readers = [
        [r, *(str(v.get(o, 0)) for o in _OUTCOMES)] for r, v in sorted(report.by_reader.items())
    ]
    return "\n".join(
        [
            "## Fuzz: damaged checkpoint files",
            "",
            machine_line(report.machine, report.commit, report.date),
            f"`{report.options.get('command') or 'dist-pgkm bench fuzz'}`: "
            f"{c.get('iterations', 0)} damaged files (merged {c.get('target-merged', 0)}, shards "
            f"{c.get('target-shard', 0)}), {report.seconds:.0f} s. Crashes {c.get('crash', 0)}, "
            f"hangs {c.get('hang', 0)}.",
            "",
            targets_markdown(compute_targets(report)),
            "",
            "Outcomes of every reader call, by damage:",
            "",
            markdown_table(["damage", *_OUTCOMES], rows),
            "",
            "By reader:",
            "",
            markdown_table(["reader", *_OUTCOMES], readers),
            "",
        ]
    )


_OUTCOMES = ("ok", "typed", "typed-unnamed", "untyped", "wrong-weight")


def write_markdown(path: Path, report: FuzzReport) -> None:
    replace_marker_section(path, "fuzz", markdown_section(report))
