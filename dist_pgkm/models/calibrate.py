"""Calibration: every selected layer's input second moment ``H = X^T X``, streamed block by block.

Activation-aware quantization (``metric: hessian``) weighs a sub-vector's error by the inputs
the layer sees. :func:`collect_hessians` runs calibration token windows through the model once
and keeps, per requested layer, only diagonal blocks of ``H``: ``(width / g, g, g)`` float32
with ``g`` the least common multiple of the preset block sizes (2, 3, 4, 8) dividing the width
(:func:`stored_block_size`: 24 for SmolLM2, 55 KB a projection; 2.8 MB for a 70B
``down_proj`` at 24; the full ``H`` would be up to 3.3 GB). Every block size dividing ``g`` reads
its ``bs x bs`` blocks out of them (:func:`diagonal_blocks`), so one calibration serves every
preset.

The model is never in memory as a whole (the GPTQ / VPTQ pattern):

1. It is built on the meta device (:func:`~dist_pgkm.models.layers.build_meta_model`, buffers
   real); the **block list** is the ``nn.ModuleList`` holding the most parameters
   (``model.layers``, ``encoder.layer``), found without per-architecture tables.
2. Everything outside the block list (embeddings, final norm, head) is read from the source.
3. **Capture**: block 0 is replaced by a stand-in that records what the model passes to it
   (hidden states, and the other arguments: position embeddings, attention mask) and stops the
   forward pass. Layers before the block list get their inputs here.
4. **Blocks**: for each block in turn its weights are read, every window goes through it in
   micro-batches with forward pre-hooks accumulating ``X^T X`` of the requested Linear layers
   (a float32 product per micro-batch, summed in float64), its output replaces the hidden
   states, and its weights are dropped.
5. **Tail**: layers after the block list (``lm_head``, a pooler) get their inputs by running
   the model again with every block replaced by a stand-in returning the cached final hidden
   states; the pass stops as soon as every tail layer has seen its input, so no logits over the
   vocabulary are computed.

An Embedding tied to an output Linear (SmolLM2's ``model.embed_tokens``, tied to ``lm_head``)
gets that Linear's ``H``: its sub-vectors run along the same dimension. Other Embeddings and
Conv2d layers have no Linear input and get no ``H`` (they are quantized with the weight metric).

The caller is told after each stage (:class:`BlockResult`) and persists what it needs; given the
hidden states at a block boundary (``resume``), the next call starts there. Nothing here writes
files (``checkpoint/calib.py`` does). transformers is imported on first use.

Supported: models whose blocks map hidden states to hidden states of the same shape, called
with the same other arguments each time (decoder-only LLMs, BERT-style encoders). Models that
call one block several times (ALBERT) or chain two block lists (encoder-decoders) are not.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_pgkm.errors import InvalidInputError, ModelSourceError
from dist_pgkm.models.layers import build_meta_model, checkpoint_keys
from dist_pgkm.models.source import ModelSource

__all__ = [
    "HEAD",
    "PRESET_BLOCK_SIZES",
    "BlockResult",
    "CalibrationPass",
    "CalibrationSummary",
    "HessianRequest",
    "StagePartials",
    "block_result",
    "collect_hessians",
    "diagonal_blocks",
    "find_block_list",
    "fold_partials",
    "merge_stages",
    "stored_block_size",
    "windows_digest",
]

logger = logging.getLogger(__name__)

HEAD = -1
""":attr:`BlockResult.block` of the layers before the block list (embedding projections)."""

PRESET_BLOCK_SIZES = (2, 3, 4, 8)
"""Block sizes every stored ``H`` can serve when they divide the layer's width (the presets')."""


def stored_block_size(width: int, block_size: int) -> int:
    """The size of the diagonal blocks of ``H`` collected for a layer: ``g``.

    ``g`` is the least common multiple of the preset block sizes that divide ``width`` (24
    when 24 divides it, 8 for a width of 2048) and of ``block_size``. Every ``bs x bs``
    diagonal block with ``bs | g`` lies inside one ``g x g`` diagonal block, so one
    calibration serves every preset (:func:`diagonal_blocks`). It depends on the width and on
    ``block_size`` only when that is not a preset size dividing the width.

    Args:
        width: The layer's input width.
        block_size: The block size asked for; must divide ``width``.

    Returns:
        ``g``, a multiple of ``block_size`` dividing ``width``.
    """
    base = math.lcm(*(b for b in PRESET_BLOCK_SIZES if width % b == 0), 1)
    return math.lcm(base, block_size)  # both divide width, so their lcm does too


def diagonal_blocks(hessian: torch.Tensor, block_size: int) -> torch.Tensor:
    """The ``bs x bs`` diagonal blocks of ``H`` read out of its ``g x g`` diagonal blocks.

    Args:
        hessian: ``(width / g, g, g)``.
        block_size: ``bs``, a divisor of ``g``.

    Returns:
        ``(width / bs, bs, bs)``, contiguous; ``hessian`` itself when ``bs == g``.

    Raises:
        InvalidInputError: ``bs`` does not divide ``g``.
    """
    groups, g = int(hessian.shape[0]), int(hessian.shape[-1])
    if block_size < 1 or g % block_size:
        raise InvalidInputError(
            f"H is stored in diagonal blocks of {g}; a block size of {block_size} does not "
            f"divide it, so its blocks cannot be read from them. Calibrate again for this "
            "block size (a fresh calibration directory)."
        )
    if block_size == g:
        return hessian
    r = g // block_size
    blocks = hessian.reshape(groups, r, block_size, r, block_size)
    diag = blocks.diagonal(dim1=1, dim2=3)  # (G, bs, bs, r)
    return diag.permute(0, 3, 1, 2).reshape(groups * r, block_size, block_size).contiguous()


@dataclass(frozen=True)
class HessianRequest:
    """A layer whose quantization needs ``H``.

    Attributes:
        name: The layer's module name (the job's name).
        block_size: Its block size: ``H`` is kept in diagonal blocks of
            :func:`stored_block_size` ``(width, block_size)``, a multiple of it.
        tied: Modules sharing its weight (``("lm_head",)`` for a tied input embedding); the
            first Linear among ``name`` and these gives the inputs.
    """

    name: str
    block_size: int
    tied: tuple[str, ...] = ()


@dataclass
class BlockResult:
    """One finished stage of the calibration.

    Attributes:
        block: Index in the block list; :data:`HEAD` for the layers before it, ``n_blocks``
            for the layers after it.
        n_blocks: Length of the block list.
        hessians: Request name -> ``(width / g, g, g)`` float32 ``H`` of the requests that
            this stage finished (``g``: :func:`stored_block_size`).
        inputs_of: Request name -> the Linear whose inputs gave its ``H``.
        hidden: The hidden states entering block ``block + 1``, ``(samples, seq_len, dim)``
            float32 (None after the tail). The buffer is reused by the next stage: copy or
            write it before returning.
        tokens: Tokens the stage processed.
        seconds: Wall time of the stage.
        blocks_done: Blocks run so far by this call (this one included).
        blocks_planned: Blocks this call runs in all (fewer than ``n_blocks`` when resumed,
            or when no layer after some block needs ``H``).
    """

    block: int
    n_blocks: int
    hessians: dict[str, torch.Tensor]
    inputs_of: dict[str, str]
    hidden: torch.Tensor | None
    tokens: int
    seconds: float
    blocks_done: int = 0
    blocks_planned: int = 0


@dataclass
class CalibrationSummary:
    """What :func:`collect_hessians` did.

    Attributes:
        block_list: Module name of the block list (``model.layers``).
        n_blocks: Its length.
        start_block: The first block run (above 0 when resumed from saved hidden states).
        blocks_run: Blocks run in this call.
        tokens: Tokens per pass (``samples * seq_len``).
        seconds: Wall time, model building included.
        inputs_of: Request name -> the Linear whose inputs gave its ``H``.
        without_input: Requests with no Linear input (an untied Embedding, a Conv2d): no ``H``.
        workers: Processes the windows were spread over (1: this one).
        worker_peak_rss_bytes: Peak RSS of each of them when they were Ray workers.
    """

    block_list: str
    n_blocks: int
    start_block: int
    blocks_run: int
    tokens: int
    seconds: float
    inputs_of: dict[str, str] = field(default_factory=dict)
    without_input: tuple[str, ...] = ()
    workers: int = 1
    worker_peak_rss_bytes: tuple[int, ...] = ()


OnBlock = Callable[[BlockResult], None]


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of token windows (shape and int64 little-endian values): the calibration's data."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(ids.shape)).encode())
    digest.update(ids.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ``nn.ModuleList`` holding the most parameters.

    A list nested in another (a mixture of experts inside a block) never holds more than its
    parent; on equal counts the outer list wins.

    Raises:
        ModelSourceError: The model has no ``nn.ModuleList`` with parameters.
    """
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        count = sum(p.numel() for p in module.parameters())
        key = (count, -name.count("."))
        if count > 0 and (best is None or key > best[:2]):
            best = (count, -name.count("."), name, module)
    if best is None:
        raise ModelSourceError(
            f"{type(model).__name__} has no list of repeated blocks (an nn.ModuleList with "
            "parameters), so calibration cannot stream it block by block. Quantize it with "
            "`metric: weight`."
        )
    return best[2], best[3]


@dataclass
class _Target:
    """A requested layer, the Linear whose inputs it takes, and its ``X^T X`` products."""

    job: str
    linear: str
    block_size: int  # g, the stored block size (stored_block_size), not the layer's
    block: int | None  # index in the block list; None: before or after it
    groups: int
    parts: list[torch.Tensor] = field(default_factory=list)  # (groups, g, g) float32 each
    tokens: int = 0
    calls: int = 0

    def add(self, x: torch.Tensor) -> None:
        t = x.detach().reshape(-1, self.groups, self.block_size)  # (tokens, G, g)
        g = t.transpose(0, 1).to(torch.float32)  # (G, tokens, g)
        # One float32 product per micro-batch; fold_partials sums them in float64, in order.
        self.parts.append(torch.bmm(g.transpose(1, 2), g).cpu())  # (G, g, g)
        self.tokens += int(t.shape[0])
        self.calls += 1

    def take(self) -> list[torch.Tensor]:
        parts, self.parts = self.parts, []
        return parts


def fold_partials(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``H`` from its per-micro-batch float32 products: summed in float64, in the given order.

    The one reduction of every path (in this process, or chunks gathered from Ray workers in
    chunk order), so the sum, hence the stored bytes, do not depend on where a chunk ran.

    Returns:
        ``(G, g, g)`` float64.
    """
    assert parts, "no product to fold"
    total = torch.zeros(parts[0].shape, dtype=torch.float64)
    for part in parts:
        total += part.to(torch.float64)
    return total


def _checked(job: str, linear: str, hessian: torch.Tensor, where: str) -> torch.Tensor:
    """``H`` as float32, after checking that it is finite."""
    if not bool(torch.isfinite(hessian).all()):
        raise InvalidInputError(
            f"{job}: the input second moment X^T X of {linear}, collected on the "
            f"calibration text, holds NaN or infinity: its inputs overflowed ({where}). "
            "Check the model's weights for NaN or infinity, use shorter windows "
            "(calibration.seq_len), or quantize this layer with `metric: weight`."
        )
    return hessian.to(torch.float32).cpu().contiguous()


class _StopForwardError(Exception):
    """Raised inside the model's forward pass once everything wanted from it was seen."""


class _Catcher(nn.Module):
    """Stands in for block 0: records its arguments and stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        raise _StopForwardError


class _Replay(nn.Module):
    """Stands in for every block in the tail pass: returns the cached final hidden states."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


class _Weights:
    """Fills a meta model's parameters from the source, module by module, and empties them."""

    def __init__(
        self, model: nn.Module, source: ModelSource, device: torch.device, dtype: torch.dtype
    ) -> None:
        self._source = source
        self._device = device
        self._dtype = dtype
        self._stored_as = checkpoint_keys(model, source)
        self._names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(param), []).append(name)
        self._loaded: dict[int, nn.Parameter] = {}  # id(meta parameter) -> real parameter

    def fill(self, modules: Iterable[nn.Module]) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """Replace the meta parameters of ``modules`` (not recursive) by the source's tensors.

        Tied parameters (one Parameter under several names) are read once and stay tied.

        Returns:
            ``(module, name, meta parameter)`` for :meth:`empty`.
        """
        replaced = []
        for module in modules:
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                module._parameters[name] = self._real(param)
                replaced.append((module, name, param))
        return replaced

    def empty(self, replaced: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
        """Put the meta parameters back, freeing the real ones."""
        for module, name, param in replaced:
            module._parameters[name] = param
            self._loaded.pop(id(param), None)

    def _real(self, param: nn.Parameter) -> nn.Parameter:
        real = self._loaded.get(id(param))
        if real is not None:
            return real
        names = self._names.get(id(param), ["?"])
        key = next((self._stored_as[n] for n in names if n in self._stored_as), None)
        if key is None:
            raise ModelSourceError(
                f"{self._source.path}: the checkpoint holds no tensor for {names[0]} as the "
                "model uses it (missing, or stored in a form transformers converts on load), so "
                "the model cannot be run on calibration text. Quantize with `metric: weight`, "
                "or save the model with save_pretrained and pass that directory."
            )
        tensor = self._source.read(key)
        if tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        real = nn.Parameter(tensor.to(self._device), requires_grad=False)
        self._loaded[id(param)] = real
        return real


def _same(a: Any, b: Any) -> bool:
    """Whether two captured block arguments are equal (tensors by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


@contextlib.contextmanager
def _hooked(
    model: nn.Module, targets: Sequence[_Target], stop_when_all_seen: bool = False
) -> Iterator[set[str]]:
    """Forward pre-hooks adding each target's input to its ``X^T X``.

    With ``stop_when_all_seen``, the forward pass is stopped (:class:`_StopForwardError`) once every
    target has seen its input; the yielded set (targets seen) must then be cleared before each
    forward pass.
    """
    seen: set[str] = set()
    handles = []

    def hook_for(target: _Target) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            target.add(args[0])
            seen.add(target.job)
            if stop_when_all_seen and len(seen) == len(targets):
                raise _StopForwardError

        return hook

    for target in targets:
        module = model.get_submodule(target.linear)
        handles.append(module.register_forward_pre_hook(hook_for(target)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _never_reached(target: _Target, where: str) -> InvalidInputError:
    via = f" (through {target.linear})" if target.linear != target.job else ""
    return InvalidInputError(
        f"{target.job}{via} was never called by the forward pass {where}, so calibration "
        "collected no inputs for it. Quantize it with `metric: weight` (a rule matching it "
        "before the hessian rule), or exclude it with `skip: true`."
    )


def _resolve(
    model: nn.Module,
    requests: Sequence[HessianRequest],
    blocks_name: str,
    n_blocks: int,
) -> tuple[list[_Target], list[str]]:
    """Each request's Linear and position; the requests that have no Linear input."""
    targets: list[_Target] = []
    without: list[str] = []
    prefix = f"{blocks_name}."
    for request in requests:
        linear = None
        for candidate in (request.name, *request.tied):
            try:
                module = model.get_submodule(candidate)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear):
                linear = candidate, module
                break
        if linear is None:
            without.append(request.name)
            continue
        name, module = linear
        width = module.in_features
        if request.block_size < 1 or width % request.block_size:
            raise InvalidInputError(
                f"{request.name}: block size {request.block_size} does not divide the input "
                f"width {width} of {name}. Use a block size that divides it."
            )
        block = None
        if name.startswith(prefix):
            index = name[len(prefix) :].split(".", 1)[0]
            if index.isdigit() and int(index) < n_blocks:
                block = int(index)
        g = stored_block_size(width, request.block_size)
        targets.append(_Target(request.name, name, g, block, width // g))
    return targets, without


def _check_shape(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise InvalidInputError(
            f"calibration windows must be a 2-D tensor of token ids (samples, seq_len); got "
            f"shape {tuple(windows.shape)} and dtype {windows.dtype}."
        )
    if windows.shape[0] < 1 or windows.shape[1] < 1:
        raise InvalidInputError(
            f"calibration windows have shape {tuple(windows.shape)}: at least one window of at "
            "least one token is needed."
        )


def _check_windows(windows: torch.Tensor, model: nn.Module, config: dict[str, Any]) -> None:
    """Windows the model can take: within its positions and its vocabulary."""
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and windows.shape[1] > limit:
        raise InvalidInputError(
            f"calibration windows of {windows.shape[1]} tokens are longer than the model's "
            f"{limit} positions (max_position_embeddings). Set calibration.seq_len to at most "
            f"{limit}."
        )
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding) and int(windows.max()) >= embeddings.num_embeddings:
        raise InvalidInputError(
            f"a calibration token id is {int(windows.max())}, but the model's vocabulary has "
            f"{embeddings.num_embeddings} entries: the text was tokenized with another "
            "model's tokenizer. Tokenize it with this model's tokenizer."
        )
    if int(windows.min()) < 0:
        raise InvalidInputError("calibration token ids must be non-negative.")


@dataclass
class StagePartials:
    """One stage of a pass over some windows, before the reduction.

    Attributes:
        block: As :attr:`BlockResult.block`.
        n_blocks: Length of the block list.
        partials: Request name -> its float32 ``(width / g, g, g)`` ``X^T X`` products, one
            per micro-batch, in window order (:func:`fold_partials` sums them).
        inputs_of: Request name -> the Linear whose inputs gave them.
        where: Where the stage ran (for error messages).
        hidden: The hidden states of these windows entering block ``block + 1`` (None after
            the tail, and where they are not wanted: Ray workers keep theirs).
        tokens: Tokens the stage processed.
        seconds: Wall time of the stage.
        blocks_done: Blocks run so far by this pass (this one included).
        blocks_planned: Blocks this pass runs in all.
    """

    block: int
    n_blocks: int
    partials: dict[str, list[torch.Tensor]]
    inputs_of: dict[str, str]
    where: str
    hidden: torch.Tensor | None
    tokens: int
    seconds: float
    blocks_done: int = 0
    blocks_planned: int = 0


def merge_stages(stages: Sequence[StagePartials]) -> StagePartials:
    """The same stage of passes over consecutive window ranges, as one pass over all of them.

    Args:
        stages: In window order (worker 0's windows first).

    Returns:
        The partials concatenated in that order; tokens summed, the slowest part's seconds.
    """
    first = stages[0]
    if any(s.block != first.block or s.partials.keys() != first.partials.keys() for s in stages):
        raise InvalidInputError(
            "calibration passes over parts of the windows went out of step (blocks "
            f"{[s.block for s in stages]}): they must run the same model and layers."
        )
    partials = {name: [p for s in stages for p in s.partials[name]] for name in first.partials}
    return StagePartials(
        first.block,
        first.n_blocks,
        partials,
        dict(first.inputs_of),
        first.where,
        None,
        sum(s.tokens for s in stages),
        max(s.seconds for s in stages),
        first.blocks_done,
        first.blocks_planned,
    )


def block_result(stage: StagePartials) -> BlockResult:
    """Reduce a stage's partials (:func:`fold_partials`) into checked float32 ``H``."""
    hessians = {
        name: _checked(name, stage.inputs_of[name], fold_partials(parts), stage.where)
        for name, parts in stage.partials.items()
    }
    return BlockResult(
        stage.block,
        stage.n_blocks,
        hessians,
        dict(stage.inputs_of),
        stage.hidden,
        stage.tokens,
        stage.seconds,
        stage.blocks_done,
        stage.blocks_planned,
    )


@dataclass
class _BlockInputs:
    """Block 0's inputs, captured per micro-batch, then each block's in turn.

    Attributes:
        hidden: ``(samples, seq_len, dim)`` float32 hidden states, overwritten block by block.
        extras: Per micro-batch, the block's other arguments (masks, positions), one shared
            copy while they are equal.
    """

    hidden: torch.Tensor
    extras: list[tuple[tuple[Any, ...], dict[str, Any]]]


class CalibrationPass:
    """Calibration windows through the model block by block, one stage at a time.

    Building it reads ``config.json``, builds the model on the meta device and resolves the
    requests (:attr:`summary` is then known); :meth:`stages` runs the windows through it and
    yields every stage's per-micro-batch products (:class:`StagePartials`). A pass over a range
    of whole micro-batches gives the same products as a pass over all windows does for them,
    so passes over consecutive ranges, on any process, merge into the same ``H``
    (:func:`merge_stages`).

    Raises:
        ModelSourceError: No ``config.json`` or architecture, or no block list.
        InvalidInputError: Bad windows, or a block size not dividing a layer's width.
    """

    def __init__(
        self,
        source: ModelSource,
        requests: Sequence[HessianRequest],
        windows: torch.Tensor,
        *,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        keep_hidden: bool = True,
    ) -> None:
        self._start_time = time.perf_counter()
        if batch_size < 1:
            raise InvalidInputError(f"batch_size={batch_size}: use at least 1 window per pass.")
        _check_shape(windows)
        self._source = source
        self._windows = windows
        self._batch_size = batch_size
        self._keep_hidden = keep_hidden
        n, seq_len = int(windows.shape[0]), int(windows.shape[1])
        config = source.config()
        if config is None:
            raise ModelSourceError(
                f"{source.path} has no config.json, so its architecture is unknown and "
                "calibration text cannot be run through it. Put the model's config.json next "
                "to its weights, or quantize with `metric: weight`."
            )
        self._config = config
        model = build_meta_model(config, real_buffers=True)
        model.eval()
        if hasattr(model, "config") and hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # no key/value cache between micro-batches
        self._model = model
        self._blocks_name, self._blocks = find_block_list(model)
        self._dev = torch.device(device)
        self._targets, without = _resolve(model, requests, self._blocks_name, len(self._blocks))
        for name in without:
            logger.info("%s has no Linear input; it is quantized with the weight metric", name)
        self.summary = CalibrationSummary(
            self._blocks_name,
            len(self._blocks),
            0,
            0,
            n * seq_len,
            0.0,
            {t.job: t.linear for t in self._targets},
            tuple(without),
        )

    def stages(self, resume: tuple[int, torch.Tensor] | None = None) -> Iterator[StagePartials]:
        """Run the windows through the model, yielding each finished stage.

        The pass runs under :func:`torch.inference_mode`, entered around each step only: a
        context held across a ``yield`` would stay in force in the caller between stages,
        and leak for good into it if the generator were dropped unfinished.

        Args:
            resume: ``(b, hidden)``: the hidden states entering block ``b`` from an earlier
                pass over the same windows; used when no request lies in a block before
                ``b`` (else the blocks are run from 0).

        Yields:
            The layers before the block list (:data:`HEAD`), every block run, then the layers
            after it; nothing when no request has a Linear input. ``hidden`` is a buffer the
            next stage overwrites.

        Raises:
            ModelSourceError: A weight the forward pass needs is not in the checkpoint, or
                the blocks do not map hidden states to hidden states.
            InvalidInputError: Windows the model cannot take; a requested layer never
                reached by the forward pass.
        """
        steps = self._stages(resume)
        try:
            while True:
                with torch.inference_mode():
                    stage = next(steps, None)
                if stage is None:
                    return
                yield stage
        finally:
            with torch.inference_mode():  # the pass's own context exits inside this one
                steps.close()

    def _stages(
        self, resume: tuple[int, torch.Tensor] | None
    ) -> Generator[StagePartials, None, None]:
        """The body of :meth:`stages`; each step runs inside the caller's inference mode.

        Four phases: the weights outside the blocks are loaded (:meth:`_load_outside`); the
        windows run up to block 0, whose inputs are kept and the layers before it collected
        (:meth:`_capture`); the blocks run one at a time from the first one needed
        (:meth:`_start_block`, :meth:`_run_block`); the final hidden states go through the
        layers after the blocks (:meth:`_run_tail`).
        """
        targets, n_blocks, summary = self._targets, len(self._blocks), self.summary
        if not targets:
            summary.seconds = time.perf_counter() - self._start_time
            return
        n = int(self._windows.shape[0])
        _check_windows(self._windows, self._model, self._config)  # before reading any weight
        weights = self._load_outside()
        ids = self._windows.to(torch.int64)
        batches = [slice(s, min(s + self._batch_size, n)) for s in range(0, n, self._batch_size)]
        blocks_needed = [t.block for t in targets if t.block is not None]
        outer = [t for t in targets if t.block is None]

        with torch.inference_mode():
            t0 = time.perf_counter()
            inputs = self._capture(ids, batches, outer)
            head = [t for t in outer if t.calls > 0]
            tail = [t for t in outer if t.calls == 0]
            first = min(blocks_needed, default=n_blocks)
            last = n_blocks - 1 if tail else max(blocks_needed, default=-1)
            start = self._start_block(resume, inputs.hidden, first, last)
            planned = max(last + 1 - start, 0)
            seconds = time.perf_counter() - t0
            yield self._stage(HEAD, head, "before the blocks", seconds, inputs.hidden, planned)

            if start > 0:
                assert resume is not None
                inputs.hidden.copy_(resume[1])
                logger.info("Calibration resumes at block %d of %d", start, n_blocks)
            summary.start_block = start
            as_tuple = False
            for index in range(start, last + 1):
                t0 = time.perf_counter()
                mine = [t for t in targets if t.block == index]
                as_tuple = self._run_block(index, mine, weights, inputs, batches)
                seconds = time.perf_counter() - t0
                summary.blocks_run += 1
                logger.info(
                    "Calibration block %d/%d: %.1f s, %.0f tokens/s",
                    index + 1,
                    n_blocks,
                    seconds,
                    summary.tokens / max(seconds, 1e-9),
                )
                where = f"in block {self._blocks_name}.{index}"
                yield self._stage(index, mine, where, seconds, inputs.hidden, planned)

            if tail:
                t0 = time.perf_counter()
                self._run_tail(ids, batches, tail, inputs.hidden, as_tuple)
                seconds = time.perf_counter() - t0
                yield self._stage(n_blocks, tail, "after the blocks", seconds, None, planned)
        summary.seconds = time.perf_counter() - self._start_time

    def _stage(
        self,
        block: int,
        mine: Sequence[_Target],
        where: str,
        seconds: float,
        hidden: torch.Tensor | None,
        planned: int,
    ) -> StagePartials:
        """A finished stage: the products its targets collected, handed over."""
        return StagePartials(
            block,
            len(self._blocks),
            {t.job: t.take() for t in mine},
            {t.job: t.linear for t in mine},
            where,
            hidden if self._keep_hidden else None,
            self.summary.tokens,
            seconds,
            self.summary.blocks_run,
            planned,
        )

    def _load_outside(self) -> _Weights:
        """Load the weights outside the block list (embeddings, final norm, head) and move
        the buffers to the device; return the loader, which fills each block in turn."""
        model, dev, inside = self._model, self._dev, f"{self._blocks_name}."
        weights = _Weights(model, self._source, dev, torch.float32)
        outside = [
            module
            for name, module in model.named_modules()
            if name != self._blocks_name and not name.startswith(inside)
        ]
        weights.fill(outside)
        for module in model.modules():  # buffers follow the parameters to the device
            for key, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta and buffer.device != dev:
                    module._buffers[key] = buffer.to(dev)
        return weights

    def _capture(
        self, ids: torch.Tensor, batches: Sequence[slice], outer: Sequence[_Target]
    ) -> _BlockInputs:
        """Run every micro-batch up to block 0, collecting the layers before it (``outer``
        targets reached there) and keeping block 0's inputs."""
        model, blocks, dev = self._model, self._blocks, self._dev
        n = int(ids.shape[0])
        catcher = _Catcher()
        block0 = blocks[0]
        blocks[0] = catcher
        hidden: torch.Tensor | None = None
        extras: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        with _hooked(model, outer):
            for part in batches:
                catcher.args, catcher.kwargs = (), {}
                with contextlib.suppress(_StopForwardError):
                    model(input_ids=ids[part].to(dev))
                args, kwargs = catcher.args, dict(catcher.kwargs)
                if args:
                    x, rest = args[0], args[1:]
                elif "hidden_states" in kwargs:
                    x, rest = kwargs.pop("hidden_states"), ()
                else:
                    raise ModelSourceError(
                        f"{type(model).__name__}'s forward pass never reached "
                        f"{self._blocks_name}.0 with hidden states, so it cannot be streamed "
                        "block by block. Quantize it with `metric: weight`."
                    )
                if hidden is None:
                    hidden = torch.empty(n, *x.shape[1:], dtype=torch.float32, device=dev)
                hidden[part] = x
                if extras and _same(extras[-1], (rest, kwargs)):
                    extras.append(extras[-1])  # the same arguments: keep one copy
                else:
                    extras.append((rest, kwargs))
        assert hidden is not None
        blocks[0] = block0
        return _BlockInputs(hidden, extras)

    @staticmethod
    def _start_block(
        resume: tuple[int, torch.Tensor] | None, hidden: torch.Tensor, first: int, last: int
    ) -> int:
        """The first block to run: 0, or the block saved hidden states enter when no block
        before it is needed (``first``: the first block with a target; ``last``: the last
        block to run)."""
        if resume is None or last < 0:
            return 0
        # At least one block runs when the tail needs the blocks' output type.
        at, saved = resume
        if 0 < at <= min(first, last) and tuple(saved.shape) == tuple(hidden.shape):
            return at
        logger.info(
            "Saved hidden states (entering block %d) cannot be used: block %d must "
            "run again; calibration restarts at block 0",
            at,
            min(first, last),
        )
        return 0

    def _run_block(
        self,
        index: int,
        mine: Sequence[_Target],
        weights: _Weights,
        inputs: _BlockInputs,
        batches: Sequence[slice],
    ) -> bool:
        """Run block ``index`` over every micro-batch in place of its inputs, collecting its
        targets (``mine``); its weights are in memory meanwhile only.

        Returns:
            Whether the block returns a tuple (the tail's stand-in must do the same).
        """
        block, hidden, name = self._blocks[index], inputs.hidden, self._blocks_name
        filled = weights.fill(block.modules())
        as_tuple = False
        with _hooked(self._model, mine):
            for part, (rest, kwargs) in zip(batches, inputs.extras, strict=True):
                out = block(hidden[part], *rest, **kwargs)
                as_tuple = isinstance(out, (tuple, list))
                y = out[0] if as_tuple else out
                if not isinstance(y, torch.Tensor) or y.shape != hidden[part].shape:
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y)
                    raise ModelSourceError(
                        f"{name}.{index} returned {got} for hidden states of shape "
                        f"{tuple(hidden[part].shape)}; calibration needs blocks that map "
                        "hidden states to hidden states. Quantize this model with "
                        "`metric: weight`."
                    )
                hidden[part] = y
        weights.empty(filled)
        for target in mine:
            if target.calls == 0:
                raise _never_reached(target, f"in block {name}.{index}")
        return as_tuple

    def _run_tail(
        self,
        ids: torch.Tensor,
        batches: Sequence[slice],
        tail: Sequence[_Target],
        hidden: torch.Tensor,
        as_tuple: bool,
    ) -> None:
        """Run the final hidden states through what follows the blocks (every block replaced
        by a stand-in returning them), collecting the ``tail`` targets."""
        blocks, model = self._blocks, self._model
        original = list(blocks)
        replay = _Replay(as_tuple)
        for index in range(len(blocks)):
            blocks[index] = replay
        with _hooked(model, tail, stop_when_all_seen=True) as seen:
            for part in batches:
                seen.clear()
                replay.hidden = hidden[part]
                with contextlib.suppress(_StopForwardError):
                    model(input_ids=ids[part].to(self._dev))
        for index in range(len(blocks)):
            blocks[index] = original[index]
        for target in tail:
            if target.calls == 0:
                raise _never_reached(target, "before, in or after the block list")


def collect_hessians(
    source: ModelSource,
    requests: Sequence[HessianRequest],
    windows: torch.Tensor,
    on_block: OnBlock | None = None,
    *,
    resume: tuple[int, torch.Tensor] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> CalibrationSummary:
    """Run calibration windows through the model block by block and collect ``H`` per request.

    One :class:`CalibrationPass` over all windows in this process; each stage's products are
    folded (:func:`fold_partials`) as soon as it finishes.

    Args:
        source: The model (needs a ``config.json`` naming its architecture).
        requests: The layers that need ``H``, with their block sizes.
        windows: ``(samples, seq_len)`` token ids.
        on_block: Called after the layers before the block list, after every block, and after
            the tail, with what that stage finished (see :class:`BlockResult`).
        resume: ``(b, hidden)``: the hidden states entering block ``b`` from an earlier call
            with the same windows; used when no request lies in a block before ``b`` (else
            the blocks are run from 0).
        batch_size: Windows per forward pass (memory: activations of one block for
            ``batch_size * seq_len`` tokens). Part of what decides ``H``'s bytes.
        device: Where the blocks run. Hidden states of all windows are kept there, in float32.

    Returns:
        What was run, and which Linear fed which request.

    Raises:
        ModelSourceError: No ``config.json`` or architecture, no block list, or a weight the
            forward pass needs is not in the checkpoint.
        InvalidInputError: Bad windows (not token ids, longer than the model's positions,
            ids outside its vocabulary); a requested layer never reached by the forward pass;
            a non-finite ``H``.
    """
    calibration = CalibrationPass(source, requests, windows, batch_size=batch_size, device=device)
    for stage in calibration.stages(resume):
        result = block_result(stage)
        if on_block is not None:
            on_block(result)
    summary = calibration.summary
    logger.info(
        "Calibrated %d layers on %d tokens in %.1f s (%d blocks run)",
        len(summary.inputs_of),
        summary.tokens,
        summary.seconds,
        summary.blocks_run,
    )
    return summary
