"""A torchmetrics ``Metric`` whose state lives on a lossd server: ``update`` queues a
batch on one stream, ``compute`` reads the stream's running aggregates, ``reset`` ends it.
Needs ``torchmetrics`` (``pip install 'lossd[torchmetrics]'``).

The rule: no state on this side, so nothing for torchmetrics to sync. Across processes
that means each process's ``compute`` covers its own updates only: ``dist_sync`` needs
the coming exact merge (``lossd.distributed.gather``), the step to add in :meth:`compute`;
until then a one-time warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from lossd._result import Aggregates
from lossd.integrations._stream import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    LossdWarning,
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
    wait on the server each step. A server that fails: a :class:`LossdWarning` and an
    empty dict (``strict=True`` raises). ``last``: the aggregates of the last compute.
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
                 client_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__()
        self.stream = StreamedMetrics(
            address, loss=loss, options=options, per_class=per_class, accuracy=accuracy,
            calibration=calibration, top_k=top_k, hardest=hardest, quantiles=quantiles,
            class_names=class_names, timeout=timeout, queue_size=queue_size, strict=strict,
            client_options=client_options, what="LossdMetric")
        self.last: Aggregates | None = None
        self._warned_ranks = False

    def update(self, preds: Any, target: Any) -> None:
        """Queue one batch (predictions, targets) on the stream."""
        self.stream.put(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics over every batch since the last reset (this process's only: see the
        module's note on distributed runs)."""
        if (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 and not self._warned_ranks):
            self._warned_ranks = True
            warnings.warn("LossdMetric: this process's batches only; syncing ranks needs "
                          "the exact merge (lossd.distributed.gather), not available yet",
                          LossdWarning, stacklevel=2)
        result = self.stream.flush()
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
