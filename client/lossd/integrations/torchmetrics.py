"""A torchmetrics ``Metric`` whose state lives on a lossd server: ``update`` queues a
batch on a stream, ``compute`` returns the metrics of every batch since the last
``reset``, which ends the evaluation. Needs ``torchmetrics`` (``pip install
'lossd[torchmetrics]'``).

The rule: no tensor state on this side, so torchmetrics has nothing of ours to sync; the
processes meet in :meth:`LossdMetric.compute` instead, where each one's exact result (the
stream it had open is ended for its state, and later updates go on a new one) merges with
every other's (``lossd.distributed.gather``), so every process returns the metrics of all
the processes' batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from lossd._result import Aggregates
from lossd.integrations._stream import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    StreamedMetrics,
    flat_metrics,
)

__all__ = ["LossdMetric"]


class LossdMetric(Metric):
    """Loss, accuracy, per-class, calibration and quantile metrics of a stream of batches,
    computed by a lossd server.

    Example::

        metric = LossdMetric("127.0.0.1:50051", class_names=["cat", "dog"])
        for x, y in loader:
            metric.update(model(x), y)
        metric.compute()   # {"loss": tensor(...), "accuracy": ..., "class/cat/loss": ...}
        metric.reset()

    ``compute`` returns a dict of scalar float64 tensors named as
    :func:`~lossd.integrations.flat_metrics` names them (``loss``, ``accuracy``,
    ``class/{name}/loss``, ...), equal to one ``evaluate_all`` over every batch since the
    last ``reset``; it waits for the batches still queued, and ``update`` may go on after
    it. The arguments are :class:`~lossd.integrations.lightning.LossdCallback`'s. Calling
    the metric (``forward``) updates it and returns None: a per-batch value would cost a
    wait on the server each step. A server that fails: a
    :class:`~lossd.integrations.LossdWarning` and an empty dict (``strict=True`` raises).
    ``last``: the aggregates of the last compute.

    Distributed (torch.distributed initialized): ``compute`` is a collective, as
    torchmetrics' own sync is: every process of ``process_group`` (None: the default
    group) calls it, and each returns the metrics of every process's batches, merged
    exactly in rank order (one ``evaluate_all`` over rank 0's batches, then rank 1's,
    ...). A process whose stream failed leaves them out in every process (warned; with
    ``strict`` raised). ``sync_on_compute=False``: each process its own batches, no
    collective. The result is not cached (torchmetrics' ``compute_with_cache``), so that
    every call is the same collective in every process.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, address: str, loss: str = "cross_entropy", *,
                 per_class: bool | None = None, accuracy: bool | None = None,
                 calibration: bool | None = None, top_k: int | Iterable[int] | None = None,
                 hardest: int = 0, quantiles: bool | Iterable[float] | None = True,
                 class_names: Sequence[str] | None = None, strict: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, queue_size: int = DEFAULT_QUEUE,
                 client_options: Mapping[str, Any] | None = None,
                 sync_on_compute: bool = True, process_group: Any = None,
                 **options: Any) -> None:
        super().__init__(sync_on_compute=sync_on_compute, process_group=process_group,
                         compute_with_cache=False)
        self.stream = StreamedMetrics(
            address, loss=loss, options=options, per_class=per_class, accuracy=accuracy,
            calibration=calibration, top_k=top_k, hardest=hardest, quantiles=quantiles,
            class_names=class_names, timeout=timeout, queue_size=queue_size, strict=strict,
            client_options=client_options, what="LossdMetric")
        self.last: Aggregates | None = None

    def update(self, preds: Any, target: Any) -> None:
        """Queue one batch (predictions, targets) on the stream."""
        self.stream.put(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics over every batch since the last reset; under torch.distributed,
        every process's (a collective: see the class)."""
        flush = self.stream.flush
        result = (self.stream.across_ranks(flush, group=self.process_group)
                  if self.sync_on_compute else flush())
        if result is None:
            return {}
        self.last = result
        return {k: torch.tensor(v, dtype=torch.float64)
                for k, v in flat_metrics(result).items()}

    def reset(self) -> None:
        """End the stream (the server forgets it); the next update opens a new one."""
        super().reset()
        self.stream.close()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Update with the batch; no per-batch value (see the class)."""
        self.update(*args, **kwargs)
