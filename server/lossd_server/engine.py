"""One evaluation on one device: validate, compute, reduce. No gRPC here.

>>> import torch
>>> e = Engine(torch.device("cpu"))
>>> r = e.evaluate(Batch("mse_loss", torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])))
>>> r.per_sample.tolist(), r.aggregate.mean
([1.0, 4.0], 2.5)
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lossd_server import analysis, limits, validate
from lossd_server.describe import dtype_str, shape_str
from lossd_server.errors import LossFailed, RequestError
from lossd_server.losses import Loss
from lossd_server.reduce import Aggregate, per_sample, reduction

Tensor = torch.Tensor
log = logging.getLogger("lossd.engine")


@dataclass(slots=True)
class Batch:
    """A decoded request: host tensors as they came off the wire, options as Python values."""

    loss: str
    predictions: Tensor
    targets: Tensor | None
    """None for a loss that takes no targets."""
    weights: Tensor | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    gradient: str | None = None
    """A reduction (``reduce.REDUCTIONS``) whose gradient w.r.t. predictions is wanted."""
    analyses: analysis.Request = analysis.NONE
    """The analyses wanted besides the aggregates (per class, accuracy, hardest, ...)."""
    inputs: Mapping[str, Tensor] = field(default_factory=dict)
    """The loss's extra tensors by name (N first)."""
    sample_ids: Tensor | None = None
    """(N,) int64 caller ids of the samples, carried into the hardest samples."""


@dataclass(slots=True)
class Evaluation:
    """Per-sample losses (float32, host, (N,)) and the batch's exact aggregate.

    ``device_seconds``: device-side time of the loss computation (CUDA only, else None).
    ``gradient``: with ``Batch.gradient``, d(reduction)/d(predictions) on the host, in the
    predictions' shape and dtype. ``analysis``: with ``Batch.analyses``, those analyses of
    the batch (sample indices from 0).
    """

    losses: np.ndarray
    """The per-sample losses, float32 (N,): what the fronts encode and the metrics read."""
    aggregate: Aggregate
    device_seconds: float | None = None
    gradient: Tensor | None = None
    analysis: analysis.Analysis | None = None

    @property
    def per_sample(self) -> Tensor:
        """``losses`` as a tensor (the same memory), made when asked for: most calls never
        ask, and making one is a torch call."""
        return torch.from_numpy(self.losses)


_VERSION = operator.attrgetter("_version")
"""A tensor's version counter (bumped by every in-place write)."""
_NO_CONTEXT = contextlib.nullcontext()
"""Reusable (it holds no state): one fewer object and call per computation."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(slots=True)
class Checked:
    """A batch that passed validation, with its typed options."""

    batch: Batch
    spec: Loss
    options: dict[str, Any]
    class_targets: validate.ClassTargets | None
    """For class-index targets, their range (see ``validate.ClassTargets``); else None."""
    nan_policy: str


@dataclass(slots=True)
class _Computed:
    """Host results of one device call: per-sample values and the masks of left-out samples."""

    losses: np.ndarray
    ignored: np.ndarray | None
    omitted: np.ndarray | None
    device_seconds: float | None
    gradient: Tensor | None
    analysis: analysis.BatchData | None = None


@dataclass(slots=True)
class _Staged:
    """A checked batch on the device, as the loss function takes it (``Engine._stage``)."""

    pred: Tensor
    """In the wire dtype (each chunk is upcast on its own); with a gradient wanted, in the
    compute dtype, a leaf that requires grad."""
    target: Tensor | None
    inputs: dict[str, Tensor]
    opts: dict[str, Any]
    """Tensor options on the device in the compute dtype; ``ignore_index`` taken out where
    the engine applies it itself."""
    dtype: torch.dtype
    """The compute dtype (``compute_dtype``)."""
    ignore_index: int | None
    """See ``_ignore_index``."""


CHUNK_BYTES = 16 * 1024 * 1024
"""Predictions (in the compute dtype) of at most this size go through a loss at once: a
larger batch of a samplewise loss is evaluated in chunks of samples, so the loss's
intermediates (a log-softmax as large as the logits, an upcast copy of bfloat16 ones) take
a chunk's memory, not the batch's."""
ALIGN_ELEMENTS = 64
"""Chunks start at multiples of this many elements. torch's CPU kernels run the bulk of a
tensor through vector instructions and its last few elements through scalar code, whose
exp or log can round differently by an ulp; with chunks cut at vector-width multiples every
element takes the path it takes in one piece, so the values are the same bit for bit."""


def chunks(predictions: Tensor, limit: int | None = None, *, work: int = 0) -> list[slice]:
    """Row ranges of ``predictions`` whose float32 (or float64) size, with their share of
    the loss's ``work`` elements (``Loss.working_elements`` for the whole batch), is at most
    ``limit`` (default ``CHUNK_BYTES``; at least one aligned step), cut at
    ``ALIGN_ELEMENTS``. Counting the work keeps a chunk short in time as well: a
    ``ctc_loss`` batch just under ``--max-elements`` is a dozen chunks, not one of ~1 s."""
    limit = CHUNK_BYTES if limit is None else limit
    itemsize = 8 if predictions.dtype == torch.float64 else 4
    if (predictions.numel() + work) * itemsize <= limit:
        return [slice(None)]
    n = predictions.shape[0]
    elements = max(1, predictions[0].numel()) if n else 1
    align = ALIGN_ELEMENTS // math.gcd(ALIGN_ELEMENTS, elements)  # rows a step is made of
    row = elements + (-(-work // n) if n else 0)  # a row's elements with its share of work
    step = max(align, limit // (row * itemsize) // align * align)
    if step >= n:
        return [slice(None)]
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


@dataclass(slots=True)
class _Chunk:
    """Per-sample results of some samples (see ``Engine._chunk``), joinable by ``cat``."""

    losses: Tensor
    all_ignored: Tensor | None
    valid: Tensor | None
    finite: Tensor | None
    values: Tensor | None
    outputs: analysis.ClassOutputs | None

    @staticmethod
    def cat(parts: list[_Chunk]) -> _Chunk:
        def join(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        first = parts[0].outputs
        outputs = None
        if first is not None:
            outs = [p.outputs for p in parts if p.outputs is not None]
            confidence = join([o.confidence for o in outs])
            outputs = analysis.ClassOutputs(
                torch.cat([o.predicted for o in outs]), confidence,
                torch.cat([o.hit for o in outs]),
                tuple(torch.cat([o.top_k_hits[i] for o in outs])
                      for i in range(len(first.top_k_hits))))
        losses = join([p.losses for p in parts])
        assert losses is not None
        return _Chunk(losses, join([p.all_ignored for p in parts]),
                      join([p.valid for p in parts]), join([p.finite for p in parts]),
                      join([p.values for p in parts]), outputs)


class Engine:
    """Evaluates batches on ``device``; every input is validated on the host first.

    On CUDA, inputs go through pinned host memory with non-blocking copies, and results come
    back with one synchronisation per batch.
    """

    def __init__(self, device: torch.device, *, max_elements: int = 0) -> None:
        self.device = device
        # --max-elements (0: no limit) for a batch's tensors plus its loss's working
        # memory (Loss.working_elements), checked before the loss runs.
        self.max_elements = max_elements
        self._cuda = device.type == "cuda"

    def check(self, batch: Batch, *, allow_zero_weight_sum: bool = False) -> Checked:
        """Validate ``batch`` on the host; raises ``errors.RequestError``."""
        spec = validate.loss(batch.loss)
        opts = validate.options(spec, batch.options)
        class_targets = validate.batch(spec, batch.predictions, batch.targets, batch.weights,
                                       opts, batch.inputs,
                                       allow_zero_weight_sum=allow_zero_weight_sum)
        if batch.gradient is not None:
            validate.gradient(batch.gradient, weighted=batch.weights is not None)
        if batch.sample_ids is not None:
            validate.sample_ids(batch.predictions.shape[0], batch.sample_ids)
        if batch.analyses.any:
            validate.analyses(batch.analyses, spec, batch.predictions, batch.targets,
                              class_index=class_targets is not None)
        if self.max_elements and spec.working_elements is not None:
            self._claim_working_memory(spec, batch, opts)
        nan_policy = opts.pop("nan_policy")
        return Checked(batch, spec, opts, class_targets, nan_policy)

    def _claim_working_memory(self, spec: Loss, batch: Batch, opts: Mapping[str, Any]) -> None:
        """Refuse (RESOURCE_EXHAUSTED, ``too_large``) a batch whose tensors and the loss's
        working memory for them pass ``max_elements``: what the loss allocates, not only
        what the caller sent. A samplewise loss runs in chunks of samples (``chunks``), so
        its largest chunk's share counts; a gradient doubles it (autograd keeps the
        forward's tables and allocates the backward's)."""
        assert spec.working_elements is not None
        work = spec.working_elements(batch.predictions, batch.targets, batch.inputs, opts)
        n = batch.predictions.shape[0] if batch.predictions.dim() else 0
        if batch.gradient:
            work *= 2
        elif spec.samplewise and n:
            rows = max(len(range(*part.indices(n))) for part in chunks(batch.predictions))
            work = work * rows // n
        held = sum(t.numel() for t in (batch.predictions, batch.targets, batch.weights,
                                       *batch.inputs.values(), *opts.values())
                   if isinstance(t, Tensor))
        limits.claim_working_memory(spec.name, held, work, self.max_elements)

    def evaluate(self, batch: Batch, *, allow_zero_weight_sum: bool = False,
                 still_wanted: Callable[[], None] | None = None) -> Evaluation:
        """Per-sample losses and aggregates of one batch.

        ``allow_zero_weight_sum``: streams accept a batch whose weights are all zero (the
        running total decides); a single Evaluate does not. ``still_wanted``: called
        between chunks of a batch evaluated in several (never for one in a single piece);
        it raises (``errors.Refused``) to stop an evaluation whose caller left.
        Raises ``errors.RequestError`` for bad input.
        """
        checked = self.check(batch, allow_zero_weight_sum=allow_zero_weight_sum)
        computed = self._run(checked, still_wanted)
        return _evaluation(computed, batch.weights, slice(None), computed.device_seconds,
                           batch.analyses, batch.sample_ids)

    def evaluate_many(self, checked: list[Checked]) -> list[Evaluation]:
        """One device call for several validated batches that share loss, options, dtypes
        and trailing shape (see ``batching.coalesce_key``); each gets its own exact result.
        """
        if len(checked) == 1:
            computed = self._run(checked[0])
            return [_evaluation(computed, checked[0].batch.weights, slice(None),
                                computed.device_seconds, checked[0].batch.analyses,
                                checked[0].batch.sample_ids)]
        first = checked[0]
        batches = [c.batch for c in checked]
        weights = None if first.batch.weights is None else torch.cat(
            [b.weights for b in batches if b.weights is not None])
        targets = None if first.batch.targets is None else torch.cat(
            [b.targets for b in batches if b.targets is not None])
        inputs = {name: torch.cat([b.inputs[name] for b in batches])
                  for name in first.batch.inputs}
        merged = Batch(first.batch.loss, torch.cat([b.predictions for b in batches]),
                       targets, weights, first.batch.options,
                       analyses=first.batch.analyses, inputs=inputs)
        ranges = [c.class_targets for c in checked if c.class_targets is not None]
        class_targets = (validate.ClassTargets(min(r.lo for r in ranges),
                                               max(r.hi for r in ranges)) if ranges else None)
        computed = self._run(Checked(merged, first.spec, first.options, class_targets,
                                      first.nan_policy))
        out, start = [], 0
        for b in batches:
            n = b.predictions.shape[0]
            out.append(_evaluation(computed, b.weights, slice(start, start + n),
                                   computed.device_seconds, b.analyses, b.sample_ids))
            start += n
        return out

    def _to_device(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        if self._cuda:
            if not t.is_pinned():  # (a copy out of shared memory is pinned already)
                staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                staged.copy_(t)
                t = staged
            t = t.to(self.device, non_blocking=True)
        # Even a no-op .to() is a dispatch: microseconds that add up on small batches.
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def _run(self, c: Checked, still_wanted: Callable[[], None] | None = None) -> _Computed:
        """One device call for a checked batch, in stages: stage its tensors on the device,
        compute the per-sample values (in chunks, asking ``still_wanted`` between them;
        timed on CUDA), apply the NaN policy, take the gradient, and bring the results to
        the host (``_results``)."""
        staged = self._stage(c)
        wants_gradient = bool(c.batch.gradient)
        events = None
        if self._cuda:
            events = (torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                      torch.cuda.Event(enable_timing=True))  # type: ignore[no-untyped-call]
            events[0].record()
        # Serving threads run with grad off. no_grad, not inference_mode: inference tensors
        # have no version counters, which _call reads to catch in-place writes.
        with (torch.enable_grad() if wants_gradient
              else torch.no_grad() if torch.is_grad_enabled()
              else _NO_CONTEXT):
            chunk = self._compute(c, staged, gradient=wants_gradient,
                                  still_wanted=still_wanted)
            if events is not None:
                events[1].record()
            omitted = _nan_policy(chunk, c.nan_policy)
            gradient = self._gradient(c, staged, chunk, omitted) if wants_gradient else None
            return self._results(c, chunk, omitted, gradient, events)

    def _stage(self, c: Checked) -> _Staged:
        """The batch's tensors and tensor options on the device, in the dtypes the loss
        takes: class indices as int64, the rest in the compute dtype, except predictions."""
        batch, spec = c.batch, c.spec
        dtype = compute_dtype(batch.predictions.dtype)
        pred = self._to_device(batch.predictions)
        target = None
        if batch.targets is not None:
            integer = batch.targets.dtype in validate.INDEX_DTYPES
            target = self._to_device(batch.targets, torch.int64 if integer else dtype)
        inputs = {name: self._to_device(t, torch.int64 if spec.input_by_name[name].dtype == "int"
                                        else dtype) for name, t in batch.inputs.items()
                  } if batch.inputs else {}
        opts = dict(c.options)
        for name, value in opts.items():  # (replacing values only: the loop may)
            if isinstance(value, Tensor):
                opts[name] = value.to(self.device, dtype)
        ignore_index = _ignore_index(c, target, opts)
        if batch.gradient:
            pred = pred.to(dtype).detach().requires_grad_(True)
        return _Staged(pred, target, inputs, opts, dtype, ignore_index)

    def _compute(self, c: Checked, s: _Staged, *, gradient: bool,
                 still_wanted: Callable[[], None] | None = None) -> _Chunk:
        """Per-sample values of the whole batch: in one piece, or, for a samplewise loss
        without a gradient, chunk by chunk (see ``chunks``, sized by the inputs and the
        loss's working memory) and joined. Between chunks ``still_wanted`` may stop it."""
        pred, dtype, spec = s.pred, s.dtype, c.spec
        if gradient or not spec.samplewise:
            pieces = [slice(None)]
        else:
            batch = c.batch
            work = (0 if spec.working_elements is None else spec.working_elements(
                batch.predictions, batch.targets, batch.inputs, c.options))
            pieces = chunks(pred, work=work)
        if len(pieces) == 1:  # no slicing: views and no-op casts cost dispatches too
            return self._chunk(c, pred if pred.dtype == dtype else pred.to(dtype), s.target,
                               s.inputs, s.opts, s.ignore_index, gradient=gradient)
        parts = []
        for i, rows in enumerate(pieces):
            if i and still_wanted is not None:
                still_wanted()
            parts.append(self._chunk(c, pred[rows].to(dtype),
                                     None if s.target is None else s.target[rows],
                                     {name: t[rows] for name, t in s.inputs.items()},
                                     s.opts, s.ignore_index, gradient=gradient))
        return _Chunk.cat(parts)

    def _chunk(self, c: Checked, pred: Tensor, target: Tensor | None,
               inputs: Mapping[str, Tensor], opts: dict[str, Any], ignore_index: int | None,
               *, gradient: bool) -> _Chunk:
        """The loss, per-sample values and analyses' inputs of some samples.

        ``ignore_index``: None when no target can be ignored (no mask needed). Where the
        engine applies it itself (``spec.engine_ignore_index``) the loss function sees class
        0 at ignored positions, and their values are zeroed."""
        spec = c.spec
        wanted = c.batch.analyses
        class_index = c.class_targets is not None
        finite = (validate.finite_predictions(pred) if c.nan_policy != "propagate"
                  else None)
        valid = None
        if ignore_index is not None:
            assert target is not None
            valid = target != ignore_index
            if spec.engine_ignore_index:
                target = target.masked_fill(~valid, 0)
        # Read before the loss runs: what the analyses see is the request's, whatever fn does.
        outputs = (analysis.class_outputs(pred.detach(), target, valid, wanted)
                   if wanted.predictions and class_index and target is not None else None)
        values = self._call(spec, pred, target, inputs, opts, gradient=gradient, valid=valid,
                            request=c.batch)
        if valid is not None and spec.engine_ignore_index:
            values = values.masked_fill(~valid, 0)
        losses, all_ignored = per_sample(values, valid, sum_class_dim=spec.sum_class_dim)
        dense_classes = (wanted.per_class and class_index and target is not None
                         and target.dim() > 1)
        if dense_classes and target is not None and values.shape != target.shape:
            raise RequestError(
                "per_class", f"needs a value per position; {spec.name} returns one per sample "
                             "for dense targets")
        return _Chunk(losses, all_ignored, valid, finite,
                      values.detach() if dense_classes else None, outputs)

    def _call(self, spec: Loss, pred: Tensor, target: Tensor | None,
              inputs: Mapping[str, Tensor], opts: Mapping[str, Any], *, gradient: bool,
              valid: Tensor | None, request: Batch) -> Tensor:
        """``spec.fn`` on the device tensors, every loss alike (built-in or plugin): an
        exception or a bad output becomes :class:`LossFailed` naming the loss and the
        problem, with the traceback in the log; running out of memory stays itself. A plugin
        gets tensors it may write into (:class:`_Private`; ``request`` is the batch whose
        memory they may share), and one call at a time unless it is ``thread_safe``."""
        args: tuple[Tensor, ...] = (pred,) if target is None else (pred, target)
        if not spec.builtin:  # a plugin's arguments are its own (plugins.py)
            own = _Private(request)
            args = tuple(map(own, args))
            inputs = {name: own(t) for name, t in inputs.items()}
            opts = {name: (own(v) if isinstance(v, Tensor) else v) for name, v in opts.items()}
        # Their version counters, read before and after: in place writes show. (Loops and
        # map, not comprehensions: each of those is a frame of its own, every call.)
        arguments = [*args, *inputs.values()]
        for value in opts.values():
            if isinstance(value, Tensor):
                arguments.append(value)
        versions = list(map(_VERSION, arguments))
        try:
            if spec.lock is None:
                out = spec.fn(*args, **inputs, **opts)
            else:
                with spec.lock:  # not thread_safe: one call at a time (catalogue.register)
                    out = spec.fn(*args, **inputs, **opts)
        except Exception as exc:
            if limits.is_out_of_memory(exc):
                raise
            log.error("loss function raised", exc_info=True, extra={"loss": spec.name})
            raise LossFailed(spec.name, f"its function raised {type(exc).__name__} (the "
                                        "traceback is in the server log)") from exc
        problem = self._output_problem(out, pred, valid, gradient=gradient,
                                       exact_positions=spec.engine_ignore_index)
        if problem is None and list(map(_VERSION, arguments)) != versions:
            problem = ("its function modified its arguments in place (they are views of the "
                       "request's memory)")
        if problem is not None:
            log.error("loss function returned a bad output",
                      extra={"loss": spec.name, "problem": problem})
            raise LossFailed(spec.name, problem)
        assert isinstance(out, Tensor)
        return out

    def _output_problem(self, out: Any, pred: Tensor, valid: Tensor | None, *,
                        gradient: bool, exact_positions: bool) -> str | None:
        """What is wrong with a loss function's output, or None: it must be a tensor of the
        compute dtype on the device, (N, ...) or (N,), matching the class-index positions
        when there are some, and differentiable when a gradient is asked for."""
        n = pred.shape[0]
        if not isinstance(out, Tensor):
            return f"its function returned a {type(out).__name__}, not a tensor"
        if out.dtype != pred.dtype:
            return (f"its function returned {dtype_str(out.dtype)} values; expected "
                    f"{dtype_str(pred.dtype)}, the compute dtype of its inputs")
        device = out.device
        if device != pred.device:
            return f"its function returned a tensor on {device}; expected {self.device}"
        if out.dim() == 0 or out.shape[0] != n:
            return (f"its function returned shape {shape_str(out.shape)}; expected (N, ...) "
                    f"with N = {n}, torch's reduction='none' output")
        if out.numel() == 0:
            return f"its function returned shape {shape_str(out.shape)}, no values"
        if valid is not None:
            shapes = [tuple(valid.shape)] if exact_positions else [tuple(valid.shape), (n,)]
            if tuple(out.shape) not in shapes:
                return (f"its function returned shape {shape_str(out.shape)}; expected "
                        f"{' or '.join(map(shape_str, shapes))}, one value per class-index "
                        "position of the targets")
        if gradient and not out.requires_grad:
            return ("its output does not depend on the predictions through torch autograd, so "
                    "no gradient can be computed")
        return None

    def _gradient(self, c: Checked, s: _Staged, chunk: _Chunk, omitted: Tensor | None
                  ) -> Tensor:
        """d(the batch's ``gradient`` reduction)/d(predictions), in the predictions' wire
        dtype; ignored and omitted samples are left out of the reduction, weights count.
        Autograd failing becomes :class:`LossFailed`; running out of memory stays itself. A
        value that autograd finds does not reach the predictions (torch's norm of order 0,
        triplet_margin_loss's ``p=0``, has no gradient) is the request's options at fault:
        INVALID_ARGUMENT on ``gradient``."""
        batch, spec = c.batch, c.spec
        assert batch.gradient is not None
        keep = torch.ones_like(chunk.losses, dtype=torch.bool)
        if chunk.all_ignored is not None:
            keep &= ~chunk.all_ignored
        if omitted is not None:
            keep &= ~omitted
        w = None if batch.weights is None else self._to_device(batch.weights,
                                                               chunk.losses.dtype)
        value = reduction(batch.gradient, chunk.losses, keep, w)
        try:
            (grad,) = torch.autograd.grad(value, s.pred, allow_unused=True)
        except Exception as exc:
            if limits.is_out_of_memory(exc):
                raise
            log.error("loss gradient failed", exc_info=True, extra={"loss": spec.name})
            raise LossFailed(spec.name, f"its output could not be differentiated with respect "
                                        f"to the predictions ({type(exc).__name__}; the "
                                        "traceback is in the server log)") from exc
        if grad is None:
            options = c.options
            chosen = ", ".join(f"{o.name}={options[o.name]!r}" for o in spec.options
                               if o.name in options and not isinstance(options[o.name], Tensor)
                               and options[o.name] != o.default)
            raise RequestError("gradient", f"{spec.name} "
                               f"{'with ' + chosen + ' ' if chosen else ''}has no gradient with "
                               "respect to the predictions (its value does not depend on them "
                               "differentiably); leave the gradient out or change the options")
        return grad.to(batch.predictions.dtype)

    def _results(self, c: Checked, chunk: _Chunk, omitted: Tensor | None,
                 gradient: Tensor | None,
                 events: tuple[torch.cuda.Event, torch.cuda.Event] | None) -> _Computed:
        """The batch's results on the host, with one synchronisation: per-sample losses, the
        ignored and omitted masks, the gradient, what the analyses read (valid positions for
        per-class breakdowns, elementwise values, class outputs) where they are wanted, and
        the device time between ``events`` (CUDA)."""
        outputs = chunk.outputs
        host = self._to_host([
            chunk.losses.detach() if gradient is not None else chunk.losses,
            chunk.all_ignored, omitted, gradient,
            None if chunk.valid is None or not c.batch.analyses.classes else chunk.valid,
            chunk.values,
            *((outputs.predicted, outputs.confidence, outputs.hit, *outputs.top_k_hits)
              if outputs is not None else ())])
        device_seconds = None
        if events is not None:
            device_seconds = events[0].elapsed_time(events[1]) / 1000.0
        h_losses, h_ignored, h_omitted, h_gradient, *h_extra = host
        assert h_losses is not None
        np_losses = h_losses.numpy()
        np_ignored = None if h_ignored is None else h_ignored.numpy()
        np_omitted = None if h_omitted is None else h_omitted.numpy()
        data = None
        if c.batch.analyses.any:
            data = _batch_data(c, np_losses, np_ignored, np_omitted,
                               [None if t is None else t.numpy() for t in h_extra])
        return _Computed(losses=np_losses, ignored=np_ignored, omitted=np_omitted,
                         device_seconds=device_seconds, gradient=h_gradient, analysis=data)

    def _to_host(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """Copy device results to the host with one synchronisation."""
        if not self._cuda:
            return tensors
        out: list[Tensor | None] = []
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        torch.cuda.current_stream(self.device).synchronize()
        return out


def _ignore_index(c: Checked, target: Tensor | None, opts: dict[str, Any]) -> int | None:
    """The class index whose target positions must be masked, or None when no mask is
    needed: (N,) targets whose range leaves it out (the loss is per sample anyway). Where
    the engine applies ``ignore_index`` itself, it leaves ``opts`` (the function has no
    such option)."""
    if c.class_targets is None:
        return None
    assert target is not None
    candidate = int(opts.pop("ignore_index") if c.spec.engine_ignore_index
                    else opts["ignore_index"])
    if target.dim() > 1 or c.class_targets.may_contain(candidate):
        return candidate
    return None


def _nan_policy(chunk: _Chunk, policy: str) -> Tensor | None:
    """``nan_policy`` on the samples with a non-finite prediction: "raise" raises
    ``RequestError`` naming the first; "omit" returns their mask (they leave the aggregates);
    "propagate" (no finiteness computed) returns None."""
    if chunk.finite is None:
        return None
    if policy == "raise":
        validate.no_nonfinite(chunk.finite)
        return None
    return ~chunk.finite if policy == "omit" else None


class _Private:
    """Hands a plugin a tensor it may write into: a copy where the tensor shares memory with
    the request (its bytes, a shared-memory region, the host tensors the analyses read),
    the tensor itself where the engine made it for this call (a dtype conversion, a copy
    on the device). On CUDA, and for converted dtypes, that is no copy at all."""

    def __init__(self, request: Batch) -> None:
        tensors = [request.predictions, request.targets, *request.inputs.values(),
                   *(v for v in request.options.values() if isinstance(v, Tensor))]
        self.shared = {t.untyped_storage().data_ptr() for t in tensors
                       if t is not None and t.device.type == "cpu"}

    def __call__(self, t: Tensor) -> Tensor:
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() in self.shared:
            return t.clone()
        return t


def _keep(n: int, ignored: np.ndarray | None, omitted: np.ndarray | None) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    if ignored is not None:
        keep &= ~ignored
    if omitted is not None:
        keep &= ~omitted
    return keep


def _batch_data(c: Checked, losses: np.ndarray, ignored: np.ndarray | None,
                omitted: np.ndarray | None, extra: list[np.ndarray | None]
                ) -> analysis.BatchData:
    """What the analyses read of a computed batch (weights left for ``_evaluation``)."""
    valid, elementwise, *outputs = extra
    class_index = c.class_targets is not None
    targets = (c.batch.targets.numpy() if class_index and c.batch.targets is not None
               else None)
    predicted = confidence = hit = None
    top_k_hits: tuple[np.ndarray, ...] = ()
    if outputs:
        predicted, confidence, hit, *rest = outputs
        top_k_hits = tuple(h for h in rest if h is not None)
    return analysis.BatchData(
        losses=losses, keep=_keep(losses.shape[0], ignored, omitted), targets=targets,
        valid=valid, elementwise=elementwise, weights=None, predicted=predicted,
        confidence=confidence, hit=hit, top_k_hits=top_k_hits)


def _rows(d: analysis.BatchData, part: slice, weights: np.ndarray | None,
          sample_ids: np.ndarray | None = None) -> analysis.BatchData:
    """The samples ``part`` of a batch's analysis data, with that batch's own weights and
    sample ids."""
    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[part]
    return analysis.BatchData(
        losses=d.losses[part], keep=d.keep[part], targets=cut(d.targets), valid=cut(d.valid),
        elementwise=cut(d.elementwise), weights=weights, predicted=cut(d.predicted),
        confidence=cut(d.confidence), hit=cut(d.hit),
        top_k_hits=tuple(h[part] for h in d.top_k_hits), sample_ids=sample_ids)


def _evaluation(c: _Computed, weights: Tensor | None, part: slice,
                device_seconds: float | None,
                analyses: analysis.Request = analysis.NONE,
                sample_ids: Tensor | None = None) -> Evaluation:
    """The Evaluation of samples ``part`` of a computed batch (``sample_ids``: that
    batch's own, as sent)."""
    losses = c.losses[part]
    w = None if weights is None else weights.to(torch.float64).numpy()
    aggregate = Aggregate.of_batch(
        losses, w,
        ignored=None if c.ignored is None else c.ignored[part],
        omitted=None if c.omitted is None else c.omitted[part])
    result = None
    if c.analysis is not None and analyses.any:
        ids = None if sample_ids is None else sample_ids.numpy()
        result = analysis.analyse(analyses, _rows(c.analysis, part, w, ids))
    if losses.dtype == np.float32:
        array = losses
    else:
        with np.errstate(over="ignore"):  # float64 losses beyond float32 become inf
            array = losses.astype(np.float32)
    return Evaluation(losses=array, aggregate=aggregate, device_seconds=device_seconds,
                      gradient=c.gradient, analysis=result)
