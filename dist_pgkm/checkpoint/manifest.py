"""``manifest.json``: what a run is (its fingerprint) and which layers are finished.

The coordinator is the manifest's only writer. It rewrites the whole file atomically after each
finished layer, so after a crash the manifest lists exactly the layers whose shards were
completely on disk before it was written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dist_pgkm.checkpoint.atomic import LOCK_NAME
from dist_pgkm.checkpoint.store import RunStore
from dist_pgkm.errors import CheckpointError

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "LayerRecord", "Manifest", "fingerprint_diff"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class LayerRecord:
    """A finished layer: its shard (relative to the output dir), the shard's sha256, the time
    it took, the k-means metric it was quantized with (``weight``, ``hessian``,
    ``hessian-diag``), and the sha256 of the source weight's bytes it was quantized from (empty
    in manifests written before it was recorded)."""

    shard: str
    sha256: str
    seconds: float
    metric: str = "weight"
    source_sha256: str = ""


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when equal)."""
    problems = []
    if old.get("dist_pgkm_version") != new.get("dist_pgkm_version"):
        problems.append(
            f"it was written by dist-pgkm {old.get('dist_pgkm_version')}, this is "
            f"{new.get('dist_pgkm_version')}"
        )
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            problems.append(
                f"config `{key}` was {json.dumps(old_cfg.get(key))}, now "
                f"{json.dumps(new_cfg.get(key))}"
            )
    old_src = {f["name"]: f for f in old.get("source", [])}
    new_src = {f["name"]: f for f in new.get("source", [])}
    for name in sorted(set(old_src) | set(new_src)):
        if name not in new_src:
            problems.append(f"source file {name} is gone")
        elif name not in old_src:
            problems.append(f"source file {name} is new")
        elif old_src[name] != new_src[name]:
            problems.append(f"source file {name} has changed")
    old_cal, new_cal = old.get("calibration"), new.get("calibration")
    if old_cal != new_cal:
        if old_cal is None:
            problems.append("it ran without calibration, this one calibrates")
        elif new_cal is None:
            problems.append("it ran with calibration, this one without")
        else:
            keys = sorted(set(old_cal) | set(new_cal))
            changed = [k for k in keys if old_cal.get(k) != new_cal.get(k)]
            problems.append(
                f"the calibration differs ({', '.join(changed)}: another text, tokenizer, "
                "number or length of windows, or other layers needing it)"
            )
    if not problems and old != new:
        problems.append("the model's layers differ")
    return problems


def _is_temp(name: str) -> bool:
    """A temp file of :func:`~dist_pgkm.checkpoint.atomic.atomic_open` (``.<name>.*.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


class Manifest(RunStore):
    """The run state of one output directory.

    Use :meth:`open` to start or resume a run; :meth:`record` after each finished layer.
    """

    STATE_NAME = MANIFEST_NAME

    @property
    def out_dir(self) -> Path:
        """The run's output directory (the store's directory)."""
        return self.dir

    @classmethod
    def open(cls, out_dir: Path, fingerprint: dict[str, Any], *, resume: bool) -> Manifest:
        """Start a run in ``out_dir`` or continue the one there.

        Args:
            out_dir: Output directory (created when missing).
            fingerprint: Source files, config and package version of this run.
            resume: The caller expects an existing run (``--resume``); an empty directory is
                then an error rather than a fresh start.

        Raises:
            CheckpointError: ``out_dir`` holds another run (fingerprints differ), files that
                are not a dist-pgkm run, or an unreadable manifest; or ``resume`` and nothing
                to resume.
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} is a file; --out must be a directory.")
        data = cls.resumable(out_dir, fingerprint, resume=resume)
        if data is not None:
            logger.info("Resuming the run in %s", out_dir)
            return cls(out_dir, data)
        manifest = cls(
            out_dir,
            {
                "format_version": MANIFEST_VERSION,
                "fingerprint": fingerprint,
                "layers": {},
                "merged": None,
            },
        )
        manifest.save()
        return manifest

    @classmethod
    def read_state(cls, path: Path) -> Any:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["fingerprint"]
            version = data["format_version"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}). It was not written by this tool, or was "
                "edited. Use a new --out directory, or delete this one to start over."
            ) from exc
        if version != MANIFEST_VERSION:
            raise CheckpointError(
                f"{path}: manifest version {version!r}, this dist-pgkm writes "
                f"{MANIFEST_VERSION}. Use a new --out directory or the version that wrote it."
            )
        return data

    @classmethod
    def refuse(cls, directory: Path, data: Any, identity: Any) -> None:
        problems = fingerprint_diff(data["fingerprint"], identity)
        raise CheckpointError(
            f"{directory} holds another run, so it cannot be resumed: "
            f"{'; '.join(problems[:6])}. Run with the same model and config to resume, "
            "or choose a new --out directory (or delete this one) to start over."
        )

    @classmethod
    def check_new(cls, directory: Path, resume: bool) -> None:
        foreign = cls.strangers(directory, lambda name: name == LOCK_NAME or _is_temp(name))
        if foreign:
            found = ", ".join(sorted(foreign)[:5])
            raise CheckpointError(
                f"{directory} is not empty ({found}) and holds no {MANIFEST_NAME}, so it is not "
                "a dist-pgkm run. Choose a new or empty --out directory."
            )
        if resume:
            raise CheckpointError(
                f"--resume: {directory} holds no run to resume ({MANIFEST_NAME} is missing). "
                "Drop --resume to start a new run there."
            )

    @classmethod
    def read(cls, out_dir: Path) -> Manifest | None:
        """The manifest of ``out_dir`` as it is, to report on it (no run is started or checked).

        Returns:
            The manifest, or None when ``out_dir`` has none.

        Raises:
            CheckpointError: The manifest is unreadable or not one this dist-pgkm writes.
        """
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            valid = (
                isinstance(data, dict)
                and isinstance(data["fingerprint"], dict)
                and isinstance(data["layers"], dict)
                and all(isinstance(r, dict) for r in data["layers"].values())
            )
            if not valid:
                raise ValueError("not a manifest of fingerprint and layers")
            for record in data["layers"].values():
                LayerRecord(**record)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}). It was not written by this tool, or was "
                "edited: restore it, or quantize again into a new --out directory."
            ) from exc
        if data.get("format_version") != MANIFEST_VERSION:
            raise CheckpointError(
                f"{path}: manifest version {data.get('format_version')!r}, this dist-pgkm "
                f"reads {MANIFEST_VERSION}. Use the dist-pgkm version that wrote it."
            )
        return cls(Path(out_dir), data)

    def run_option(self, key: str) -> Any:
        """A config option the run was started with (None when it does not record it)."""
        config = self.data["fingerprint"].get("config")
        return config.get(key) if isinstance(config, dict) else None

    @property
    def layers(self) -> dict[str, LayerRecord]:
        """Finished layers by module name."""
        return {name: LayerRecord(**rec) for name, rec in self.data["layers"].items()}

    def verify(self) -> list[str]:
        """Check every finished layer's shard against its sha256; forget the bad ones.

        Returns:
            Names of the layers whose shard was missing, truncated or modified; they will be
            redone.
        """
        bad = self.drop_changed(self.data["layers"], "shard")
        for name in bad:
            logger.warning("Shard of %s is missing or corrupt; the layer will be redone", name)
        if bad:
            self.data["merged"] = None
            self.save()
        return bad

    def forget(self, names: list[str]) -> None:
        """Mark finished layers as to be done again (their source changed) and save."""
        for name in names:
            del self.data["layers"][name]
        if names:
            self.data["merged"] = None
            self.save()

    def record(self, name: str, record: LayerRecord) -> None:
        """Mark ``name`` finished (its shard must already be on disk) and save."""
        self.data["layers"][name] = asdict(record)
        self.data["merged"] = None
        self.save()

    @property
    def merged(self) -> dict[str, str] | None:
        """Files of the merged checkpoint with their sha256, or None before the merge."""
        merged: dict[str, str] | None = self.data.get("merged")
        return merged

    def set_merged(self, files: dict[str, str]) -> None:
        self.data["merged"] = dict(files)
        self.save()
