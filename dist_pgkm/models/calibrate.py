"""Calibration: every selected layer's input second moment ``H = X^T X``, streamed block by block.

Activation-aware quantization (``metric: hessian``) weighs a sub-vector's error by the inputs
the layer sees. :func:`collect_hessians` runs calibration token windows through the model once
and keeps, per requested layer, only the ``bs x bs`` diagonal blocks of ``H`` that the layer's
block size needs: ``(width / bs, bs, bs)`` float32 (18 KB for a SmolLM2 projection at bs 8,
0.9 MB for a 70B ``down_proj``; the full ``H`` would be up to 3.3 GB).

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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_pgkm.errors import InvalidInputError, ModelSourceError
from dist_pgkm.models.layers import build_meta_model, checkpoint_keys
from dist_pgkm.models.source import ModelSource

__all__ = [
    "HEAD",
    "BlockResult",
    "CalibrationSummary",
    "HessianRequest",
    "collect_hessians",
    "find_block_list",
    "windows_digest",
]

logger = logging.getLogger(__name__)

HEAD = -1
""":attr:`BlockResult.block` of the layers before the block list (embedding projections)."""


@dataclass(frozen=True)
class HessianRequest:
    """A layer whose quantization needs ``H``.

    Attributes:
        name: The layer's module name (the job's name).
        block_size: Its block size: ``H`` is kept as ``(width / block_size, bs, bs)`` blocks.
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
        hessians: Request name -> ``(width / bs, bs, bs)`` float32 ``H`` of the requests that
            this stage finished.
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
    """

    block_list: str
    n_blocks: int
    start_block: int
    blocks_run: int
    tokens: int
    seconds: float
    inputs_of: dict[str, str] = field(default_factory=dict)
    without_input: tuple[str, ...] = ()


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
    """A requested layer, the Linear whose inputs it takes, and its running ``X^T X``."""

    job: str
    linear: str
    block_size: int
    block: int | None  # index in the block list; None: before or after it
    groups: int
    hessian: torch.Tensor  # (groups, bs, bs) float64
    tokens: int = 0
    calls: int = 0

    def add(self, x: torch.Tensor) -> None:
        t = x.detach().reshape(-1, self.groups, self.block_size)  # (tokens, G, bs)
        g = t.transpose(0, 1).to(torch.float32)  # (G, tokens, bs)
        # One float32 product per micro-batch, summed over micro-batches in float64.
        self.hessian += torch.bmm(g.transpose(1, 2), g).to(torch.float64)  # (G, bs, bs)
        self.tokens += int(t.shape[0])
        self.calls += 1

    def result(self, where: str) -> torch.Tensor:
        """``H`` as float32, after checking that it is finite."""
        if not bool(torch.isfinite(self.hessian).all()):
            raise InvalidInputError(
                f"{self.job}: the input second moment X^T X of {self.linear}, collected on the "
                f"calibration text, holds NaN or infinity: its inputs overflowed ({where}). "
                "Check the model's weights for NaN or infinity, use shorter windows "
                "(calibration.seq_len), or quantize this layer with `metric: weight`."
            )
        return self.hessian.to(torch.float32).cpu().contiguous()


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
    device: torch.device,
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
        groups = width // request.block_size
        bs = request.block_size
        hessian = torch.zeros(groups, bs, bs, dtype=torch.float64, device=device)
        targets.append(_Target(request.name, name, request.block_size, block, groups, hessian))
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
            ``batch_size * seq_len`` tokens).
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
    start_time = time.perf_counter()
    if batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size}: use at least 1 window per pass.")
    _check_shape(windows)
    n, seq_len = int(windows.shape[0]), int(windows.shape[1])
    config = source.config()
    if config is None:
        raise ModelSourceError(
            f"{source.path} has no config.json, so its architecture is unknown and calibration "
            "text cannot be run through it. Put the model's config.json next to its weights, "
            "or quantize with `metric: weight`."
        )
    model = build_meta_model(config, real_buffers=True)
    model.eval()
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache between micro-batches
    blocks_name, blocks = find_block_list(model)
    n_blocks = len(blocks)
    dev = torch.device(device)
    targets, without = _resolve(model, requests, blocks_name, n_blocks, dev)
    for name in without:
        logger.info("%s has no Linear input; it is quantized with the weight metric", name)
    inputs_of = {t.job: t.linear for t in targets}
    summary = CalibrationSummary(blocks_name, n_blocks, 0, 0, n * seq_len, 0.0, inputs_of)
    summary.without_input = tuple(without)
    if not targets:
        summary.seconds = time.perf_counter() - start_time
        return summary

    _check_windows(windows, model, config)  # before reading any weight
    weights = _Weights(model, source, dev, torch.float32)
    inside = f"{blocks_name}."
    outside = [
        module
        for name, module in model.named_modules()
        if name != blocks_name and not name.startswith(inside)
    ]
    weights.fill(outside)
    for module in model.modules():  # buffers follow the parameters to the device
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and buffer.device != dev:
                module._buffers[key] = buffer.to(dev)
    ids = windows.to(torch.int64)
    batches = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    blocks_needed = [t.block for t in targets if t.block is not None]
    outer = [t for t in targets if t.block is None]

    with torch.inference_mode():
        # --- capture: the inputs of block 0, and the layers before the block list -----------
        t0 = time.perf_counter()
        catcher = _Catcher()
        original = list(blocks)
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
                        f"{type(model).__name__}'s forward pass never reached {blocks_name}.0 "
                        "with hidden states, so it cannot be streamed block by block. Quantize "
                        "it with `metric: weight`."
                    )
                if hidden is None:
                    hidden = torch.empty(n, *x.shape[1:], dtype=torch.float32, device=dev)
                hidden[part] = x
                if extras and _same(extras[-1], (rest, kwargs)):
                    extras.append(extras[-1])  # the same arguments: keep one copy
                else:
                    extras.append((rest, kwargs))
        assert hidden is not None
        blocks[0] = original[0]
        head = [t for t in outer if t.calls > 0]
        tail = [t for t in outer if t.calls == 0]
        first = min(blocks_needed, default=n_blocks)
        last = n_blocks - 1 if tail else max(blocks_needed, default=-1)
        start = 0
        if resume is not None and last >= 0:
            # At least one block runs when the tail needs the blocks' output type.
            at, saved = resume
            if 0 < at <= min(first, last) and tuple(saved.shape) == tuple(hidden.shape):
                start = at
            else:
                logger.info(
                    "Saved hidden states (entering block %d) cannot be used: block %d must run "
                    "again; calibration restarts at block 0",
                    at,
                    min(first, last),
                )
        if on_block is not None:
            results = {t.job: t.result("before the blocks") for t in head}
            on_block(
                BlockResult(
                    HEAD,
                    n_blocks,
                    results,
                    {t.job: t.linear for t in head},
                    hidden,
                    n * seq_len,
                    time.perf_counter() - t0,
                    0,
                    max(last + 1 - start, 0),
                )
            )

        # --- the blocks, one at a time ------------------------------------------------------
        if start > 0:
            assert resume is not None
            hidden.copy_(resume[1])
            logger.info("Calibration resumes at block %d of %d", start, n_blocks)
        summary.start_block = start
        as_tuple = False
        for index in range(start, last + 1):
            t0 = time.perf_counter()
            block = original[index]
            mine = [t for t in targets if t.block == index]
            filled = weights.fill(block.modules())
            with _hooked(model, mine):
                for part, (rest, kwargs) in zip(batches, extras, strict=True):
                    out = block(hidden[part], *rest, **kwargs)
                    as_tuple = isinstance(out, (tuple, list))
                    y = out[0] if as_tuple else out
                    if not isinstance(y, torch.Tensor) or y.shape != hidden[part].shape:
                        raise ModelSourceError(
                            f"{blocks_name}.{index} returned "
                            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y)} for "
                            f"hidden states of shape {tuple(hidden[part].shape)}; calibration "
                            "needs blocks that map hidden states to hidden states. Quantize "
                            "this model with `metric: weight`."
                        )
                    hidden[part] = y
            weights.empty(filled)
            where = f"in block {blocks_name}.{index}"
            for target in mine:
                if target.calls == 0:
                    raise _never_reached(target, where)
            results = {t.job: t.result(where) for t in mine}
            seconds = time.perf_counter() - t0
            summary.blocks_run += 1
            logger.info(
                "Calibration block %d/%d: %.1f s, %.0f tokens/s",
                index + 1,
                n_blocks,
                seconds,
                n * seq_len / max(seconds, 1e-9),
            )
            if on_block is not None:
                on_block(
                    BlockResult(
                        index,
                        n_blocks,
                        results,
                        {t.job: t.linear for t in mine},
                        hidden,
                        n * seq_len,
                        seconds,
                        summary.blocks_run,
                        last + 1 - start,
                    )
                )

        # --- the tail: the cached final hidden states through what follows the blocks -------
        if tail:
            t0 = time.perf_counter()
            replay = _Replay(as_tuple)
            for index in range(n_blocks):
                blocks[index] = replay
            with _hooked(model, tail, stop_when_all_seen=True) as seen:
                for part in batches:
                    seen.clear()
                    replay.hidden = hidden[part]
                    with contextlib.suppress(_StopForwardError):
                        model(input_ids=ids[part].to(dev))
            for index in range(n_blocks):
                blocks[index] = original[index]
            for target in tail:
                if target.calls == 0:
                    raise _never_reached(target, "before, in or after the block list")
            results = {t.job: t.result("after the blocks") for t in tail}
            if on_block is not None:
                on_block(
                    BlockResult(
                        n_blocks,
                        n_blocks,
                        results,
                        {t.job: t.linear for t in tail},
                        None,
                        n * seq_len,
                        time.perf_counter() - t0,
                        summary.blocks_run,
                        summary.blocks_run,
                    )
                )
    summary.seconds = time.perf_counter() - start_time
    logger.info(
        "Calibrated %d layers on %d tokens in %.1f s (%d blocks run)",
        len(targets),
        n * seq_len,
        summary.seconds,
        summary.blocks_run,
    )
    return summary
