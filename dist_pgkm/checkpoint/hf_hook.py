"""Register the ``pgkm`` quantizer with transformers without importing transformers.

``import dist_pgkm`` must stay light, yet ``transformers.AutoModel*.from_pretrained(DIR)`` must
load a dist-pgkm checkpoint once ``dist_pgkm`` is imported. transformers resolves a
``quant_method`` through the mappings of ``transformers.quantizers.auto``, so registering right
after *that* module is imported is both sufficient and as late as possible: a process that
imports transformers only for its tokenizers never pays for the quantizer registry (importing
it takes ~4 s, against ~1 s for the lazy top-level ``transformers``).

:func:`install` therefore registers at once when that module is already imported; otherwise it
puts a finder in front of ``sys.meta_path`` that, when the module is first imported, wraps its
loader so that :func:`dist_pgkm.checkpoint.hf.register` runs right after the module executes,
and then takes itself out of ``sys.meta_path``. This module imports only the standard library.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["TARGET_MODULE", "install", "installed"]

logger = logging.getLogger(__name__)

TARGET_MODULE = "transformers.quantizers.auto"
"""The transformers module that holds the quantizer registry."""

_REGISTER_MODULE = "dist_pgkm.checkpoint.hf"


def _register() -> None:
    """Run ``dist_pgkm.checkpoint.hf.register()``, never breaking the import that triggered it."""
    try:
        module = importlib.import_module(_REGISTER_MODULE)
        register = getattr(module, "register", None)
        if register is None:
            return  # the registry was imported *by* that module, which registers when it is done
        register()
    # An import hook must not turn `import transformers` into a crash: a transformers release
    # without the public registration API (or with a conflicting "pgkm") only loses dist-pgkm
    # checkpoints, and says so; `dist_pgkm.load` then raises the precise error.
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        logger.warning(
            "dist-pgkm could not register its 'pgkm' quantizer with transformers (%s); "
            "transformers cannot load dist-pgkm checkpoints in this process. Use "
            "dist_pgkm.load(DIR) to see the full error.",
            exc,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then registers (once the registry module has executed)."""

    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Give the module its real loader back first: tracebacks, inspect and linecache ask it
        # for the source.
        if module.__spec__ is not None and module.__spec__.loader is self:
            module.__spec__.loader = self._wrapped
        module.__loader__ = self._wrapped
        self._wrapped.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of :data:`TARGET_MODULE` and leaves."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != TARGET_MODULE:
            return None
        _uninstall()
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if isinstance(spec, ModuleSpec):
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # an exotic loader: leave it alone (dist_pgkm.load still registers)
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegistryFinder)]


def installed() -> bool:
    """Whether the import hook is waiting for transformers' quantizer registry."""
    return any(isinstance(f, _RegistryFinder) for f in sys.meta_path)


def install() -> None:
    """Make transformers know ``quant_method: "pgkm"``, now or as soon as it can use it.

    Idempotent, cheap, and harmless when transformers is not installed (the hook then never
    fires).
    """
    if TARGET_MODULE in sys.modules:
        _register()
    elif not installed():
        sys.meta_path.insert(0, _RegistryFinder())
