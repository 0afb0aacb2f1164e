"""The one user of transformers' internal key renaming (``transformers.core_model_loading``).

transformers 5 maps checkpoint keys to a model's parameter names through per-architecture
conversion mappings (renamings such as ``LayerNorm.gamma`` -> ``LayerNorm.weight``, and converters
that fuse, split or transpose tensors). Finding the quantizable layers of a source
(:mod:`dist_pgkm.models.layers`) and checking a checkpoint's keys before loading it
(:mod:`dist_pgkm.checkpoint.hf`) must both see the keys exactly as ``from_pretrained`` will, so
both ask :func:`key_renamer`. These functions are internal to transformers and may move between
releases; this module is the one place to adapt when they do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["KeyRenamer", "key_renamer"]

logger = logging.getLogger(__name__)


class KeyRenamer(Protocol):
    """Checkpoint key -> ``(model key, converted)``.

    ``converted`` is true when a transformers converter transforms the tensor on load (it is
    then not a parameter of the model as stored). With ``base_model_prefix`` and
    ``meta_state_dict``, the base-model prefix is added or dropped as ``from_pretrained`` does;
    with ``transforms=False`` that is all that is done (transformers' fallback for a key that
    its renamings would miss but that the model has as it is).
    """

    def __call__(
        self,
        key: str,
        base_model_prefix: str | None = None,
        meta_state_dict: Mapping[str, Any] | None = None,
        transforms: bool = True,
    ) -> tuple[str, bool]: ...


def key_renamer(model: Any, hf_quantizer: Any = None) -> KeyRenamer:
    """Return transformers' checkpoint-key renaming for ``model``.

    Args:
        model: A transformers ``PreTrainedModel`` (on the meta device is enough).
        hf_quantizer: The quantizer loading it, if any (it may add its own conversions).

    Returns:
        The renaming. With a transformers release that has no conversion mapping, keys are
        taken as they are (and a warning says so).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        logger.warning(
            "This transformers version has no checkpoint conversion mapping; checkpoint keys "
            "are matched with module names as they are"
        )

        def as_is(
            key: str,
            base_model_prefix: str | None = None,
            meta_state_dict: Mapping[str, Any] | None = None,
            transforms: bool = True,
        ) -> tuple[str, bool]:
            return key, False

        return as_is
    if hf_quantizer is None:
        transforms = get_model_conversion_mapping(model)
    else:
        transforms = get_model_conversion_mapping(model, None, hf_quantizer)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(
        key: str,
        base_model_prefix: str | None = None,
        meta_state_dict: Mapping[str, Any] | None = None,
        transforms: bool = True,
    ) -> tuple[str, bool]:
        state: Any = meta_state_dict
        if transforms:
            name, pattern = rename_source_key(key, renamings, converters, base_model_prefix, state)
        else:
            name, pattern = rename_source_key(key, [], [], base_model_prefix, state)
        return str(name), pattern is not None

    return rename
