"""The core every integration shares: one ``evaluate_stream`` per evaluation, fed from a
bounded queue by the training thread, and the metrics it ends with.

The rule of this module: the training thread never waits on the network. ``put`` copies a
batch to host memory and queues it; a background thread sends the queue over one stream
and keeps what the stream ends with. The training thread waits only for room in
the queue or for the last answers, each wait bounded by ``timeout``; past it, or when the
server fails, the evaluation's metrics are left out with a :class:`LossdWarning`
(``strict=True``: the error is raised instead). Nothing here knows a framework.

A result covers the batches this process put; where processes meet (a Lightning epoch's
end, a torchmetrics ``compute``), :meth:`StreamedMetrics.across_ranks` merges every
process's result exactly (``lossd.distributed.gather``), and a process that failed leaves
the metrics out on all of them, never a partial merge passed off as the whole.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lossd._client import LossClient
from lossd._errors import DeadlineExceeded, LossdError
from lossd._eval import class_targets
from lossd._result import Aggregates, class_names_of
from lossd.state import MergeError, merge

DEFAULT_TIMEOUT = 30.0
"""Seconds the training thread waits at most at any one point (room in the queue, the
last answers): long enough for a loaded server, short enough that a stuck one costs one
pause, not the run."""
DEFAULT_QUEUE = 16
"""Batches queued at most: enough to ride out a slow answer or two, small enough that the
host memory held is a few batches' predictions."""
_POLL = 0.1
"""Seconds between looks at a failed or abandoned stream while the training thread waits."""
_END = object()
"""The queue's last item: the stream ends there."""


class LossdWarning(UserWarning):
    """A lossd metric was left out (the server unreachable, slow or refusing the input);
    training went on."""


def to_host(value: Any) -> Any:
    """A tensor detached and copied to host memory (torch's ``.detach().cpu()``; a no-op
    for CPU tensors); numpy arrays and anything else as they are."""
    if hasattr(value, "detach"):
        return value.detach().cpu()
    return value


def flat_metrics(a: Aggregates, prefix: str = "") -> dict[str, float]:
    """The scalars of ``a`` as ``{prefix + name: value}``, for a framework's logger:
    ``loss`` (the mean over the samples that count), ``weighted_loss``, ``count``,
    ``accuracy``, ``top_{k}_accuracy``, ``ece``, ``loss_q{level}`` and ``loss_max``, and
    per class ``class/{name}/loss`` and ``class/{name}/accuracy`` (the class's name where
    class names are given, else its index). Only what was asked for appears."""
    out: dict[str, float] = {"loss": a.mean, "count": float(a.count)}
    if a.weighted_mean is not None:
        out["weighted_loss"] = a.weighted_mean
    if a.accuracy is not None:
        out["accuracy"] = a.accuracy
    for k, v in (a.top_k_accuracy or {}).items():
        out[f"top_{k}_accuracy"] = v
    if a.ece is not None:
        out["ece"] = a.ece
    if a.quantiles is not None:
        out.update({f"loss_q{level:g}": v for level, v in a.quantiles.items()})
        out["loss_max"] = a.quantiles.max
    if a.per_class is not None:
        pc = a.per_class
        for i, label in enumerate(pc.labels):
            out[f"class/{label}/loss"] = float(pc.mean[i])
            if pc.accuracy is not None:
                out[f"class/{label}/accuracy"] = float(pc.accuracy[i])
    return {prefix + k: float(v) for k, v in out.items()}


def hardest_table(a: Aggregates) -> tuple[list[str], list[list[Any]]]:
    """The hardest samples as (columns, rows) for a logger's table: index (the position
    in the evaluation's order), loss and, where known, target, predicted class (by name
    where given) and confidence."""
    samples = list(a.hardest or ())
    columns = ["index", "loss"] + [c for c in ("target", "predicted", "confidence")
                                   if any(getattr(s, c) is not None for s in samples)]
    rows = [[s.index, s.loss, *[getattr(s, f"{c}_name", None) or getattr(s, c)
                                for c in columns[2:]]] for s in samples]
    return columns, rows


class Analyses:
    """What the stream asks the server for. ``per_class``, ``accuracy`` and
    ``calibration`` (ECE) need class-index targets: None turns them on exactly when the
    first batch's targets are class indices for its predictions (integers shaped as the
    predictions less their class dimension); True or False decides."""

    def __init__(self, *, per_class: bool | None, accuracy: bool | None,
                 calibration: bool | None, top_k: int | Iterable[int] | None, hardest: int,
                 quantiles: bool | Iterable[float] | None) -> None:
        if hardest < 0:
            raise ValueError("hardest: at least 0")
        self.per_class = per_class
        self.accuracy = accuracy
        self.calibration = calibration
        self.top_k = top_k if top_k is None or isinstance(top_k, int) else tuple(top_k)
        self.hardest = hardest
        self.quantiles = quantiles if quantiles is None or isinstance(quantiles, bool) \
            else tuple(quantiles)

    def fields(self, predictions: Any, targets: Any) -> dict[str, Any]:
        """The analysis arguments of ``evaluate_stream`` for a stream whose first batch is
        (``predictions``, ``targets``)."""
        classes = targets is not None and class_targets(predictions, targets)

        def on(choice: bool | None) -> bool:
            return classes if choice is None else choice

        return {"per_class": on(self.per_class), "accuracy": on(self.accuracy),
                "diagnostics": on(self.calibration),
                "top_k": self.top_k, "hardest": self.hardest, "quantiles": self.quantiles}


class _Stream:
    """One ``evaluate_stream`` over the batches :meth:`put` queues, run by a daemon
    thread; once it ends, ``running`` holds its aggregates and their state (and
    ``losses`` the per-sample losses, for a report)."""

    def __init__(self, client: LossClient, *, loss: str, analyses: Mapping[str, Any],
                 options: Mapping[str, Any], class_names: Sequence[str] | None,
                 queue_size: int, keep_losses: bool) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._keep_losses = keep_losses
        self.put_count = 0
        self.answered = 0
        self.running: Aggregates | None = None
        self.losses: list[np.ndarray] = []
        self.error: Exception | None = None
        self.done = False
        self._thread = threading.Thread(
            target=self._run, name="lossd-stream", daemon=True,
            args=(client, dict(loss=loss, class_names=class_names, **analyses, **options)))
        self._thread.start()

    def _batches(self) -> Iterator[Any]:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def _run(self, client: LossClient, arguments: dict[str, Any]) -> None:
        try:
            # running=False: the answers carry no analyses, the stream's end all of them
            # (the server encodes them once, and this thread decodes them once).
            last = None
            for last in client.evaluate_stream(self._batches(), running=False, **arguments):
                with self._changed:
                    self.answered += 1
                    if self._keep_losses:
                        self.losses.append(last.per_sample)
                    self._changed.notify_all()
            with self._changed:
                self.running = None if last is None else last.running
        except Exception as exc:  # handed to the training thread, which decides
            with self._changed:
                self.error = exc
        finally:
            self._stop.set()
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def put(self, item: Any, deadline: float) -> bool:
        """Queue ``item``; False once the stream failed or ended. Raises
        DeadlineExceeded when no room came before ``deadline`` (time.monotonic())."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
            except queue.Full:
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the lossd server fell behind: no room in the "
                                           "stream's queue") from None
                continue
            if item is not _END:
                self.put_count += 1
            return True
        return False

    def wait(self, deadline: float, *, ended: bool) -> None:
        """Until every batch put is answered (``ended``: and the stream is over), or it
        failed; DeadlineExceeded at ``deadline``."""
        with self._changed:
            while not self.done and (ended or self.answered < self.put_count):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded("the lossd server did not answer every batch in "
                                           "time")
                self._changed.wait(min(left, _POLL))

    def abandon(self) -> None:
        """Stop feeding the stream: its thread ends once its call does."""
        self._stop.set()


class StreamedMetrics:
    """An evaluation streamed to a lossd server: :meth:`put` batches, then :meth:`close`
    (the evaluation's final aggregates) or :meth:`flush` (the aggregates so far, the
    evaluation going on); :meth:`across_ranks` merges either with every other process's.
    A stream opens at the first batch put after a close (or a flush).

    ``address``: the server, as ``LossClient`` takes it; ``client_options``: more
    ``LossClient`` arguments (``token``, ``root_certificates``, ...). The client is made at
    the first batch and replaced after a stream is abandoned (closing it is what cancels
    a stuck call). ``per_class`` ... ``quantiles``: the analyses, as :class:`Analyses`
    takes them. ``timeout``, ``queue_size``: see :data:`DEFAULT_TIMEOUT` and
    :data:`DEFAULT_QUEUE`. ``keep_losses``: keep every per-sample loss (4 bytes a sample;
    the report's histogram needs them). Failures: a :class:`LossdWarning` naming ``what``
    and the cause, and the aggregates are None; ``strict``: the error is raised. The
    integrations pass their own arguments of the same names straight through.
    ``failure``: the error that left the current evaluation's metrics out (None while
    they are not), until the next evaluation opens.
    """

    def __init__(self, address: str, *, loss: str, options: Mapping[str, Any],
                 per_class: bool | None, accuracy: bool | None, calibration: bool | None,
                 top_k: int | Iterable[int] | None, hardest: int,
                 quantiles: bool | Iterable[float] | None,
                 class_names: Sequence[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, queue_size: int = DEFAULT_QUEUE,
                 strict: bool = False, keep_losses: bool = False, what: str = "lossd metrics",
                 client_options: Mapping[str, Any] | None = None) -> None:
        self.analyses = Analyses(per_class=per_class, accuracy=accuracy,
                                 calibration=calibration, top_k=top_k, hardest=hardest,
                                 quantiles=quantiles)
        if timeout <= 0 or queue_size < 1:
            raise ValueError("timeout > 0 and queue_size >= 1")
        self.address = address
        self.loss = loss
        self.options = dict(options)
        self.class_names = class_names_of(class_names)
        self.timeout = timeout
        self.queue_size = queue_size
        self.strict = strict
        self.keep_losses = keep_losses
        self.what = what
        self.client_options = dict(client_options or {})
        self._client: LossClient | None = None
        self._stream: _Stream | None = None
        self._failed = False
        self.failure: Exception | None = None
        self._kept: Aggregates | None = None
        """The streams this evaluation ended at flushes, merged."""
        self._kept_losses: list[np.ndarray] = []
        self._last_losses: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a spawned process gets a copy): the connection, an open stream and
        the evaluation's results so far stay behind; the copy opens its own at its first
        batch."""
        return {**self.__dict__, "_client": None, "_stream": None, "_failed": False,
                "failure": None, "_kept": None, "_kept_losses": []}

    def put(self, predictions: Any, targets: Any) -> None:
        """Queue one batch (copied to host memory first), opening the stream at the first
        batch. Returns at once unless the queue is full; after a failure, does nothing
        until the next close."""
        if self._failed:
            return
        predictions, targets = to_host(predictions), to_host(targets)
        if self._stream is None:
            self.failure = None   # a new evaluation, or the next part of one
            if self._client is None:
                self._client = LossClient(self.address, **self.client_options)
            self._stream = _Stream(self._client, loss=self.loss,
                                   analyses=self.analyses.fields(predictions, targets),
                                   options=self.options, class_names=self.class_names,
                                   queue_size=self.queue_size, keep_losses=self.keep_losses)
        try:
            if not self._stream.put((predictions, targets), time.monotonic() + self.timeout):
                self._fail(self._stream.error)
        except DeadlineExceeded as exc:
            self._fail(exc)

    def flush(self) -> Aggregates | None:
        """The aggregates over every batch put since the last close, once all are
        answered, with their exact state (as :meth:`across_ranks` needs); None when nothing
        was put or the evaluation failed.

        A stream's figures and state come at its end, so the open stream is ended and its
        result kept, and the next :meth:`put` opens a new one. The kept results and the
        streams after them merge exactly: later flushes and the close still cover every
        batch since the last close, as one stream would."""
        stream = self._stream
        if self._failed:
            return None
        if stream is None:   # nothing put since the last close or flush
            self.failure = None
            return self._kept
        self._stream = None
        self._failed = True   # until the stream ends well: a lost part fails it all
        last = self._finish(stream)
        if last is None:
            return None
        self._failed = False
        self._kept = last if self._kept is None else merge([self._kept, last])
        self._kept_losses += stream.losses
        return self._kept

    def close(self) -> Aggregates | None:
        """End the evaluation: its final aggregates, or None when nothing was put or it
        failed (warned, or raised with ``strict``). The next :meth:`put` opens a new one:
        the last :meth:`flush`, then the evaluation forgotten (its losses kept for
        :meth:`losses`), whatever the flush gave or raised."""
        try:
            return self.flush()
        finally:
            self._failed, self._kept = False, None
            self._last_losses, self._kept_losses = self._kept_losses, []

    def across_ranks(self, end: Callable[[], Aggregates | None], group: Any = None
                     ) -> Aggregates | None:
        """What ``end()`` (:meth:`close` or :meth:`flush`) gives in this
        process, merged in rank order with what it gives in every other process of
        ``group`` (a torch.distributed group; None: the default one) by
        ``lossd.distributed.gather``; this process's own when torch.distributed is not
        initialized. A collective: every process of the group calls it at the same point.

        A process whose evaluation failed (or whose result does not merge) leaves the
        metrics out on every process, after all took part, so none is left waiting: here
        a :class:`LossdWarning` naming the rank (``strict``: the MergeError is raised),
        in the failed process its own warning or error. A process that put nothing takes
        part and is left out of the merge."""
        from lossd.distributed import gather

        raised: Exception | None = None
        local: Aggregates | Exception | None
        try:
            local = end()
        except Exception as exc:  # strict, or a bug: raised once every process took part
            local = raised = exc
        if local is None and self.failure is not None:
            local = self.failure  # warned already
        try:
            return gather(local, group=group)
        except MergeError as exc:
            problem = exc
        if raised is not None:
            raise raised
        if not isinstance(local, Exception):   # another process's failure
            self._report(problem)
        return None

    def losses(self) -> np.ndarray:
        """The per-sample losses of the last closed stream, in order (``keep_losses``)."""
        parts = self._last_losses
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def discard(self) -> None:
        """Drop the evaluation, its open stream if any and its results (e.g. a
        sanity-check pass)."""
        stream, self._stream = self._stream, None
        self._failed = False
        self.failure = None
        self._kept, self._kept_losses = None, []
        if stream is not None:
            stream.abandon()
            if not stream.done:
                self._abandon(stream)

    def _finish(self, stream: _Stream) -> Aggregates | None:
        """End ``stream``: its final aggregates, or None when it failed (reported)."""
        deadline = time.monotonic() + self.timeout   # one wait, however it is spent
        try:
            if stream.put(_END, deadline):
                stream.wait(deadline, ended=True)
        except DeadlineExceeded as exc:
            self._abandon(stream)
            self._report(exc)
            return None
        if stream.error is not None:
            self._abandon(stream)
            self._report(stream.error)
            return None
        return stream.running

    def _fail(self, exc: Exception | None) -> None:
        """The open stream failed: abandon it and report once; later puts do nothing."""
        self._failed = True
        if self._stream is not None:
            self._abandon(self._stream)
        self._report(exc or LossdError(f"the stream to {self.address} ended early"))

    def _abandon(self, stream: _Stream) -> None:
        """Stop ``stream`` and close the client under it, which cancels a call stuck on
        the server; the next stream gets a new client."""
        stream.abandon()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _report(self, exc: Exception) -> None:
        self.failure = exc
        if self.strict:
            raise exc
        warnings.warn(f"{self.what} left out (lossd server {self.address}): {exc}",
                      LossdWarning, stacklevel=4)

