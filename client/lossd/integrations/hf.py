"""A Hugging Face Trainer ``compute_metrics`` that streams each evaluation to a lossd
server, so the Trainer keeps no logits. Needs ``transformers`` (``pip install
'lossd[hf]'``) only for the Trainer itself: this module imports neither it nor torch.

The rule: with ``TrainingArguments(batch_eval_metrics=True)`` the Trainer calls
``compute_metrics`` once per batch and drops the batch; each call queues it on one stream
(a background thread sends it) and returns at once with no metrics; the call with
``compute_result=True`` (the last batch) ends the stream and returns the evaluation's
metrics. A slow or dead server costs a :class:`~lossd.integrations.LossdWarning` and the
lossd metrics of that evaluation (``strict=True`` raises instead).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lossd._result import Aggregates
from lossd.integrations._stream import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    StreamedMetrics,
    flat_metrics,
)

__all__ = ["LossdMetrics"]


def torch_layout(predictions: Any, targets: Any) -> Any:
    """Predictions with their class dimension second, as torch's losses take them: the
    Trainer's token-level logits are (N, T, C) against labels (N, T), torch's (N, C, T)."""
    ndim = len(getattr(predictions, "shape", ()))
    if targets is None or ndim < 3 or ndim != len(getattr(targets, "shape", ())) + 1:
        return predictions
    if hasattr(predictions, "movedim"):
        return predictions.movedim(-1, 1)
    import numpy as np

    return np.moveaxis(predictions, -1, 1)


def first(value: Any) -> Any:
    """The first of a tuple of model outputs (the logits), or the value itself."""
    return value[0] if isinstance(value, tuple | list) else value


class LossdMetrics:
    """``compute_metrics`` for the Hugging Face Trainer: the evaluation set streamed to a
    lossd server batch by batch.

    Example::

        args = TrainingArguments(..., batch_eval_metrics=True)
        trainer = Trainer(model, args, eval_dataset=...,
                          compute_metrics=LossdMetrics("127.0.0.1:50051"))
        trainer.evaluate()   # {"eval_lossd/loss": ..., "eval_lossd/accuracy": ..., ...}

    Each call takes an ``EvalPrediction``: its ``predictions`` (the logits, or a tuple of
    outputs whose first is the logits) and ``label_ids``. Token-level logits (N, T, C) are
    sent as torch's (N, C, T), so with ``cross_entropy`` each sequence's loss follows
    lossd's per-sample rule: the mean over its positions whose label is not -100 (the
    Trainer's mask, lossd's default ``ignore_index``); an all-masked sequence counts in
    ``ignored``. Causal language models score position t against label t+1: shift the
    labels in ``preprocess_logits_for_metrics`` or the model first.

    The metrics (the Trainer adds its ``eval_`` prefix) are as
    :class:`~lossd.integrations.lightning.LossdCallback` logs them, under ``prefix``:
    ``loss``, ``count``, ``accuracy``, ``ece``, ``loss_q{level}``, ``loss_max``,
    ``class/{name}/loss`` and ``class/{name}/accuracy``; the arguments are the callback's
    (``per_class``, ``accuracy``, ``calibration`` default to on for class-index targets).
    ``last``: the last evaluation's aggregates (the hardest samples, ...).

    Without ``batch_eval_metrics`` the Trainer gathers every logit first and calls once
    (``compute_result`` left out): that works too, one batch, but saves no memory.
    Distributed: the Trainer gathers each batch to every process, so each process streams
    the whole set and returns the same metrics (world-size times the server's work).
    """

    def __init__(self, address: str, loss: str = "cross_entropy", *,
                 per_class: bool | None = None, accuracy: bool | None = None,
                 calibration: bool | None = None, top_k: int | Iterable[int] | None = None,
                 hardest: int = 10, quantiles: bool | Iterable[float] | None = True,
                 class_names: Sequence[str] | None = None, strict: bool = False,
                 prefix: str = "lossd/", timeout: float = DEFAULT_TIMEOUT,
                 queue_size: int = DEFAULT_QUEUE,
                 client_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        self.prefix = prefix
        self.metrics = StreamedMetrics(
            address, loss=loss, options=options, per_class=per_class, accuracy=accuracy,
            calibration=calibration, top_k=top_k, hardest=hardest, quantiles=quantiles,
            class_names=class_names, timeout=timeout, queue_size=queue_size, strict=strict,
            client_options=client_options, what="lossd metrics of this evaluation")
        self.last: Aggregates | None = None

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        """Queue the batch; with ``compute_result``, end the stream and return the
        metrics (empty when the server failed: warned)."""
        targets = first(eval_pred.label_ids)
        self.metrics.put(torch_layout(first(eval_pred.predictions), targets), targets)
        if not compute_result:
            return {}
        result = self.metrics.close()
        if result is None:
            return {}
        self.last = result
        return flat_metrics(result, self.prefix)
