"""A PyTorch Lightning callback that streams validation and test outputs to a lossd server
and logs what comes back. Needs ``lightning`` (``pip install 'lossd[lightning]'``).

The rule: the step never waits on the network and training never stops for lossd. Each
``validation_step``/``test_step`` output is queued (host memory, bounded) and sent over
one stream per epoch by a background thread; the metrics are logged at the epoch's end.
A slow or dead server costs a :class:`~lossd.integrations.LossdWarning` and that epoch's
lossd metrics (``strict=True`` raises instead).

Distributed (DDP, world size > 1): every rank streams its own shard, and at the epoch's end
the ranks' results merge exactly (``lossd.distributed.gather``, a collective every rank
takes part in), so every rank logs the same metrics over the whole validation set; a rank
whose stream failed leaves them out on every rank.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from lossd import _report
from lossd._result import Aggregates
from lossd.integrations._stream import (
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    LossdWarning,
    StreamedMetrics,
    flat_metrics,
    hardest_table,
)

__all__ = ["LossdCallback"]

Select = Callable[[Any, Any], "tuple[Any, Any] | None"]
"""``select(outputs, batch) -> (predictions, targets)``: picks them from what a step
returned and its batch; None skips the batch."""


def pick(outputs: Any) -> tuple[Any, Any] | None:
    """(predictions, targets) from a step's output: a mapping with ``logits`` or
    ``predictions`` and ``targets``, or a (predictions, targets) pair; else None."""
    if isinstance(outputs, Mapping):
        key = "logits" if "logits" in outputs else "predictions"
        if key in outputs and "targets" in outputs:
            return outputs[key], outputs["targets"]
        return None
    if isinstance(outputs, tuple | list) and len(outputs) == 2:
        return outputs[0], outputs[1]
    return None


class LossdCallback(pl.Callback):
    """Streams what ``validation_step`` and ``test_step`` return to a lossd server and logs
    the evaluation's metrics at each epoch's end.

    Example::

        class Model(pl.LightningModule):
            def validation_step(self, batch, batch_idx):
                x, y = batch
                return {"logits": self(x), "targets": y}

        trainer = pl.Trainer(callbacks=[LossdCallback("127.0.0.1:50051",
                                                      class_names=dataset.classes)])

    A step returns ``{"logits" (or "predictions"): ..., "targets": ...}`` or a
    ``(predictions, targets)`` pair; ``select(outputs, batch)`` picks them from anything
    else. ``loss`` and ``options`` (the loss's options, e.g. ``label_smoothing=0.1``) as for
    ``LossClient.evaluate``.

    Logged through the module's loggers (``pl_module.log_dict``) as
    ``{prefix}{val|test}/{name}``: ``loss`` (the mean), ``count``, ``accuracy``,
    ``top_{k}_accuracy``, ``ece``, ``loss_q{level}``, ``loss_max``; and per class
    ``class/{name}/loss`` and ``class/{name}/accuracy`` keyed by ``class_names`` (else the
    class index), straight to the loggers (``logger.log_metrics``, at the global step):
    not in ``trainer.callback_metrics``, because hundreds of keys through ``log_dict``
    cost the training thread a visible share of a short epoch. ``per_class``, ``accuracy``
    and ``calibration`` (ECE) default to on exactly when the targets are class indices;
    ``top_k``, ``hardest`` (K samples, 0: none) and ``quantiles`` (True: 0.5, 0.9, 0.99; or
    the levels) as in ``evaluate``. The hardest
    samples (index: the position in the epoch's evaluation order) go to every logger that
    takes a table (``log_table``, as WandbLogger), and with ``report_dir`` each epoch writes
    an HTML report ``{val|test}-epoch{N}.html`` there (needs matplotlib). The sanity check
    Lightning runs before training is not evaluated; several validation dataloaders go
    into one evaluation, in the order Lightning runs them.

    Under DDP each rank streams the batches of its shard and the ranks' results merge
    exactly at the epoch's end, in rank order (the hardest samples' index: the position in
    rank 0's batches, then rank 1's, ...): every rank logs the same values, so
    ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them on every rank; the tables
    and the report (its histogram over every rank's losses) come from rank 0. Lightning's
    ``DistributedSampler`` pads the set to a multiple of the world size by repeating its
    first samples, and lossd counts what it is given: ``count`` is the set's size plus
    that padding (at most world size - 1 samples), unless the set divides evenly or the
    sampler drops the remainder (``drop_last``).

    ``timeout`` (seconds): the longest a step or an epoch's end waits on lossd (room in the
    queue of ``queue_size`` batches, the last answers); ``strict``: raise instead of
    warning. ``client_options``: more ``LossClient`` arguments (``token``, ...).
    ``last``: the last epoch's aggregates by stage ("val", "test"), for code that wants
    more than the logged scalars.
    """

    def __init__(self, address: str, loss: str = "cross_entropy", *,
                 per_class: bool | None = None, accuracy: bool | None = None,
                 calibration: bool | None = None, top_k: int | Iterable[int] | None = None,
                 hardest: int = 10, quantiles: bool | Iterable[float] | None = True,
                 class_names: Sequence[str] | None = None,
                 report_dir: str | Path | None = None, select: Select | None = None,
                 strict: bool = False, prefix: str = "lossd/",
                 timeout: float = DEFAULT_TIMEOUT, queue_size: int = DEFAULT_QUEUE,
                 client_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__()
        if report_dir is not None:
            _report.check()  # matplotlib missing: say so now, not after an epoch
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.select = select
        self.strict = strict
        self.prefix = prefix
        self.metrics = StreamedMetrics(
            address, loss=loss, options=options, per_class=per_class, accuracy=accuracy,
            calibration=calibration, top_k=top_k, hardest=hardest, quantiles=quantiles,
            class_names=class_names, timeout=timeout, queue_size=queue_size, strict=strict,
            client_options=client_options, what="lossd metrics of this epoch",
            keep_losses=report_dir is not None)
        self.last: dict[str, Aggregates] = {}
        self._warned: set[str] = set()

    # --- the hooks -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            # Lightning advises sync_dist=True for epoch-level values under DDP; ours are
            # merged across ranks already (the same on every rank), so averaging them
            # again would only cost a collective per key.
            warnings.filterwarnings(
                "ignore", message=re.escape(f"It is recommended to use `self.log('{self.prefix}"),
                category=PossibleUserWarning)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._put(outputs, batch)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._put(outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self.metrics.discard()
            return
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.metrics.discard()

    # --- the work ------------------------------------------------------------------------

    def _put(self, outputs: Any, batch: Any) -> None:
        picked = self.select(outputs, batch) if self.select else pick(outputs)
        if picked is None:
            if self.select is None:
                self._refuse(outputs)
            return
        self.metrics.put(*picked)

    def _refuse(self, outputs: Any) -> None:
        """A step output the callback cannot read: a TypeError with ``strict``, else a
        one-time warning (the batch is skipped)."""
        message = (f"LossdCallback: the step returned a {type(outputs).__name__}; return "
                   "{'logits': ..., 'targets': ...} or (predictions, targets), or pass "
                   "select=lambda outputs, batch: (predictions, targets)")
        if self.strict:
            raise TypeError(message)
        self._warn_once("outputs", message + "; those batches are skipped")

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
                   ) -> None:
        # Every rank, under DDP: a collective (each rank's stream ends and all merge).
        result = self.metrics.across_ranks(self.metrics.close)
        if result is None:
            return
        self.last[stage] = result
        key = f"{self.prefix}{stage}/"
        scalars = flat_metrics(result, key)
        per_class = {k: v for k, v in scalars.items() if k.startswith(f"{key}class/")}
        # float64 tensors: Lightning would store plain floats as float32.
        pl_module.log_dict({k: torch.tensor(v, dtype=torch.float64)
                            for k, v in scalars.items() if k not in per_class})
        # Per class: straight to the loggers. Through log_dict each key costs the training
        # thread ~0.6 ms (its checks and Lightning's bookkeeping): 100 classes, 0.12 s.
        if per_class and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(per_class, step=trainer.global_step)
        if trainer.is_global_zero and result.hardest is not None and len(result.hardest):
            columns, rows = hardest_table(result)
            for logger in trainer.loggers:
                log_table = getattr(logger, "log_table", None)
                if callable(log_table):
                    log_table(key=f"{key}hardest", columns=columns, data=rows)
        if self.report_dir is not None:
            losses = self._every_ranks_losses(trainer)
            if losses is not None:
                self._write_report(trainer, stage, result, losses)

    def _every_ranks_losses(self, trainer: pl.Trainer) -> np.ndarray | None:
        """The per-sample losses of every rank, in rank order (the merged result's
        positions), on rank 0; None on the others. A collective under DDP."""
        losses = self.metrics.losses()
        if trainer.world_size <= 1:
            return losses
        parts: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero \
            else None
        torch.distributed.gather_object(losses, parts, dst=0)
        return None if parts is None else np.concatenate(parts)

    def _write_report(self, trainer: pl.Trainer, stage: str, result: Aggregates,
                      losses: np.ndarray) -> None:
        assert self.report_dir is not None
        page = _report.render(
            loss=self.metrics.loss, aggregates=result, losses=losses,
            options=self.metrics.options,
            sources={"stage": stage, "epoch": str(trainer.current_epoch)},
            target=self.metrics.address, samples=int(losses.shape[0]))
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"{stage}-epoch{trainer.current_epoch}.html"
        path.write_text(page, encoding="utf-8")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, LossdWarning, stacklevel=3)
