"""``import dist_pgkm`` stays light: no ray, deepspeed or faiss, and CUDA is never touched."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import dist_pgkm, dist_pgkm.kmeans, dist_pgkm.pgkm, dist_pgkm.pq, dist_pgkm.noise
import dist_pgkm.config
import torch
heavy = ("ray", "deepspeed", "faiss", "transformers", "safetensors")
heavy = [m for m in heavy if m in sys.modules]
print(json.dumps({"heavy": heavy, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_import_is_lean() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], check=True, capture_output=True, text=True, timeout=120
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "cuda_initialized": False}
