"""One evaluation on one device: validate, compute, reduce. No gRPC here.

>>> import torch
>>> e = Engine(torch.device("cpu"))
>>> r = e.evaluate(Batch("mse_loss", torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])))
>>> r.per_sample.tolist(), r.aggregate.mean
([1.0, 4.0], 2.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lossd_server import validate
from lossd_server.losses import Loss
from lossd_server.reduce import Aggregate, per_sample, reduction

Tensor = torch.Tensor


@dataclass(frozen=True)
class Batch:
    """A decoded request: host tensors as they came off the wire, options as Python values."""

    loss: str
    predictions: Tensor
    targets: Tensor
    weights: Tensor | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    gradient: str | None = None
    """A reduction (``reduce.REDUCTIONS``) whose gradient w.r.t. predictions is wanted."""


@dataclass(frozen=True)
class Evaluation:
    """Per-sample losses (float32, host, (N,)) and the batch's exact aggregate.

    ``device_seconds``: device-side time of the loss computation (CUDA only, else None).
    ``gradient``: with ``Batch.gradient``, d(reduction)/d(predictions) on the host, in the
    predictions' shape and dtype.
    """

    per_sample: Tensor
    aggregate: Aggregate
    device_seconds: float | None = None
    gradient: Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Engine:
    """Evaluates batches on ``device``; every input is validated on the host first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def evaluate(self, batch: Batch, *, allow_zero_weight_sum: bool = False) -> Evaluation:
        """Per-sample losses and aggregates of one batch.

        ``allow_zero_weight_sum``: streams accept a batch whose weights are all zero (the
        running total decides); a single Evaluate does not.
        Raises ``validate.RequestError`` for bad input.
        """
        spec = validate.loss(batch.loss)
        opts = validate.options(spec, batch.options)
        class_index = validate.batch(spec, batch.predictions, batch.targets, batch.weights, opts,
                                     allow_zero_weight_sum=allow_zero_weight_sum)
        validate.gradient(batch.gradient, weighted=batch.weights is not None)
        nan_policy = opts.pop("nan_policy")

        dtype = compute_dtype(batch.predictions.dtype)
        pred = batch.predictions.to(self.device).to(dtype)
        if class_index:
            target = batch.targets.to(self.device).long()
        else:
            target = batch.targets.to(self.device).to(dtype)
        for name, value in opts.items():
            if isinstance(value, Tensor):
                opts[name] = value.to(self.device, dtype)

        finite = None
        if nan_policy != "propagate":
            finite = validate.finite_predictions(pred)
            if nan_policy == "raise":
                validate.no_nonfinite(finite)

        if batch.gradient:
            pred = pred.detach().requires_grad_(True)
        with torch.enable_grad() if batch.gradient else torch.inference_mode():
            return self._compute(batch, spec, pred, target, opts, class_index, nan_policy,
                                 finite)

    def _compute(self, batch: Batch, spec: Loss, pred: Tensor, target: Tensor,
                 opts: dict[str, Any], class_index: bool, nan_policy: str,
                 finite: Tensor | None) -> Evaluation:
        events = None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        values = spec.fn(pred, target, **opts)
        valid = (target != opts["ignore_index"]) if class_index else None
        losses, all_ignored = per_sample(values, valid, sum_class_dim=spec.sum_class_dim)
        if events is not None:
            events[1].record()

        losses_host = losses.detach().cpu()
        weights = None if batch.weights is None else batch.weights.to(torch.float64).numpy()
        aggregate = Aggregate.of_batch(
            losses_host.numpy(), weights,
            ignored=None if all_ignored is None else all_ignored.cpu().numpy(),
            omitted=None if finite is None or nan_policy != "omit"
            else ~finite.cpu().numpy().astype(np.bool_))
        gradient = None
        if batch.gradient:
            keep = torch.ones_like(losses, dtype=torch.bool)
            if all_ignored is not None:
                keep &= ~all_ignored
            if finite is not None and nan_policy == "omit":
                keep &= finite
            w = None if batch.weights is None else batch.weights.to(self.device, losses.dtype)
            reduced = reduction(batch.gradient, losses, keep, w)
            (grad,) = torch.autograd.grad(reduced, pred)
            gradient = grad.to(batch.predictions.dtype).cpu()
        device_seconds = None
        if events is not None:
            events[1].synchronize()
            device_seconds = events[0].elapsed_time(events[1]) / 1000.0
        return Evaluation(per_sample=losses_host.detach().to(torch.float32),
                          aggregate=aggregate, device_seconds=device_seconds,
                          gradient=gradient)
