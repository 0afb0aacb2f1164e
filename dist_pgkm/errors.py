"""Typed errors raised by dist-pgkm.

Every user-facing error says *what* went wrong, *why* it is a problem, and *how to fix it*.
Internal invariants use ``assert`` instead; catching ``DistPGKMError`` catches every error a user
can cause.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistPGKMError",
    "DistributedError",
    "InvalidInputError",
    "ModelSourceError",
]


class DistPGKMError(Exception):
    """Base class of every error dist-pgkm raises on purpose."""


class InvalidInputError(DistPGKMError, ValueError):
    """A tensor or argument handed to the library cannot be used as given."""


class ConfigError(DistPGKMError, ValueError):
    """A configuration file or option is malformed, unknown or out of range."""


class BackendUnavailableError(DistPGKMError, RuntimeError):
    """A requested compute backend (faiss, CUDA, ...) is not installed or has no device."""


class ModelSourceError(DistPGKMError, FileNotFoundError):
    """A model (directory, file or packaged real model) cannot be found or read."""


class CheckpointError(DistPGKMError, ValueError):
    """A checkpoint, shard or manifest is missing, truncated, corrupt or inconsistent."""


class DataError(DistPGKMError, FileNotFoundError):
    """A text corpus or data set (a file, a Debian package, a download) cannot be found or read."""


class DistributedError(DistPGKMError, RuntimeError):
    """A distributed run cannot start or finish (no cluster, no resources, a fatal layer)."""
