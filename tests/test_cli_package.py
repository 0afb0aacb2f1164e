"""The CLI package's rules: no library module imports it; the Ray options are defined once and
their defaults are the library's."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import dist_pgkm
from dist_pgkm.cli import build_parser
from dist_pgkm.cli._ray import ray_options

PACKAGE = Path(dist_pgkm.__file__).parent


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "dist_pgkm.cli" or n.startswith("dist_pgkm.cli.") for n in names):
                offenders.append(relative)
    assert offenders == []


def test_ray_option_defaults_are_the_librarys() -> None:
    from dist_pgkm.distributed.coordinator import quantize_model
    from dist_pgkm.finetune.pipeline import finetune_model

    parser = build_parser()
    quantize = ray_options(parser.parse_args(["quantize", "m", "--config", "c", "--out", "o"]))
    finetune = ray_options(parser.parse_args(["finetune", "m", "--config", "c", "--out", "o"]))
    for options, function in ((quantize, quantize_model), (finetune, finetune_model)):
        signature = inspect.signature(function).parameters
        assert options == {key: signature[key].default for key in options}
    assert set(finetune) == {"workers", "address"}
    assert len(quantize) == 6
