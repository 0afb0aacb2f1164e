"""One boundary per outside library: which module of the package may import what.

safetensors is read through ``utils/safetensors_io.py`` only (the checkpoint writer writes the
format itself and imports nothing), transformers' internal key renaming is used from
``models/hf_keys.py`` only (docs/architecture.md, "One boundary per outside library"), and ray
is imported by the Ray executor and Ray Train's runner only: the coordinator, the command line
and fine-tuning reach Ray through ``distributed/executor.py`` and ``distributed/options.py``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dist_pgkm

PACKAGE = Path(dist_pgkm.__file__).parent

# imported module (prefix) -> the only package files allowed to import it
BOUNDARIES = {
    "safetensors": {"utils/safetensors_io.py"},
    "transformers.core_model_loading": {"models/hf_keys.py"},
    "transformers.conversion_mapping": {"models/hf_keys.py"},
    "ray": {"distributed/ray_executor.py", "distributed/ray_train.py"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_outside_libraries_are_reached_through_one_module() -> None:
    found: dict[str, set[str]] = {module: set() for module in BOUNDARIES}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for name in _imports(path):
            for module in BOUNDARIES:
                if name == module or name.startswith(module + "."):
                    found[module].add(relative)
    assert found == BOUNDARIES


RAY_FREE = """
import json, sys
import dist_pgkm.distributed.coordinator, dist_pgkm.distributed.executor
import dist_pgkm.distributed.options, dist_pgkm.finetune.pipeline, dist_pgkm.cli
print(json.dumps("ray" in sys.modules))
"""


def test_the_in_process_path_does_not_import_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", RAY_FREE], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
