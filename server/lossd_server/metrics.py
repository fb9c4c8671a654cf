"""Prometheus metrics: the service's own and the loss values it computes.

Everything hangs off one :class:`Metrics` object built on an injectable registry, so
tests read a fresh one. Names follow the Prometheus naming guide: ``lossd_`` prefix, base
units, ``_total`` only on counters, one counter with a ``code`` label, histograms (not
summaries) so replicas aggregate. Label values are bounded: ``method`` and ``stage`` are
fixed sets, ``loss`` is a catalogue name, ``invalid`` (a name the catalogue lacks) or empty
(the call names no loss: ``ListLosses``, or a call refused before its message was read),
``tag`` goes through :class:`TagPolicy`, ``code`` is a gRPC status name, ``worker`` a worker
process index.

Series appear when they first happen, so an idle pod's scrape stays small (under 200
lines, whatever the catalogue holds) and grows only with the methods, losses and tags in
use. The exceptions start at 0 for what reads them:

* ``lossd_requests_in_flight`` for every method: an autoscaler (and the dashboard's job
  list) reads it from idle pods too;
* when a method first ends a call for a loss, its ``lossd_requests_total`` for every code
  in ``KNOWN_CODES``, so the first error of each kind shows in ``rate()`` (a counter born
  at 1 would hide it); when a method first times a stage, its every stage alike.

Per call, labelled children are looked up once and kept (``labels()`` costs a few
microseconds each, a dozen times a call), and a call is tracked by a plain object rather
than generator-based context managers. A call's values are not written as it goes: each
is appended to its series' pending list (one C-level ``list.append``, no lock), and
:meth:`Metrics.drain` applies them in bulk (one bucket search for a series' pending
values, one sum per counter): before every collection (a scrape reads every call that
ended before it), every ``DRAIN_CALLS`` calls on a serving thread, and in a worker
process before each flush. Writing them one by one was a seventh of a small call's server
instructions.

With several serving processes (``lossd serve --processes N``), prometheus-client's
multiprocess mode is on in every worker (``PROMETHEUS_MULTIPROC_DIR``): counter and
histogram values live in memory-mapped files that the supervisor sums on every scrape, so
totals survive a worker's restart. A worker writes the values its calls change to those
files every ``FLUSH_SECONDS`` (0.1 s) from a thread of its own, rather than on every call:
the supervisor's figures trail by that much, and a worker killed outright loses at most
that much. Each gauge declares how workers combine (``multiprocess_mode``): in-flight and
queue gauges add up, the last batch's mean is the most recent one, per-process gauges carry
a ``worker`` label.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

from lossd_server.errors import status_of
from lossd_server.losses import LOSSES

METHODS = ("Evaluate", "EvaluateStream", "ListLosses", "ModelInfer", "SharedMemorySession")
STAGES = ("decode", "queue", "compute", "encode")
INVALID_LOSS = "invalid"
NO_LOSS = ""
"""The ``loss`` label of a call that names none: Prometheus reads an empty value as no
label, so ``sum by (loss)`` shows such calls apart from every loss."""
OTHER_TAG = "other"
NO_TAG = "none"
INVALID_TAG = "invalid"
MAX_TAG_LENGTH = 64
"""Default of ``--max-tag-length``. A tag is a label value written into every series of
its loss (a few dozen lines of each scrape, and the multiprocess files): six 2 MiB tags
made a 240 MB scrape."""
_TAG = re.compile(r"[A-Za-z0-9_.:/@+=-]+")
"""The characters a tag may hold: no whitespace, quotes or control characters, which would
need escaping in the exposition format and could forge lines in logs."""
# Codes a request commonly ends with; each starts at 0 for a method and loss in use.
KNOWN_CODES = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
               "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "INTERNAL")
DEFAULT_LOSS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
                        8.0, 16.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = tuple(float(4 ** i * 256) for i in range(12))  # 256 B .. 1 GiB

P = TypeVar("P", bound="_Pending")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
request_log = logging.getLogger("lossd_server.requests")


def multiprocess() -> bool:
    """Whether metric values go to files shared by worker processes (prometheus-client
    chooses at import, from ``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class TagPolicy:
    """Bounds the ``tag`` label: an allow-list, or the first ``max_tags`` distinct tags.

    Anything else is counted as ``other``; an empty tag is ``none``. A tag longer than
    ``max_tag_length`` characters or with a character outside letters, digits and
    ``_.:/@+=-`` is counted as ``invalid`` (the call is served; its metrics degrade, they
    never grow with the tag). With worker processes, ``shared`` (a :class:`SharedTags`)
    makes the first ``max_tags`` the pod's, not each worker's.

    >>> p = TagPolicy(max_tags=1)
    >>> p.resolve("resnet"), p.resolve("vit"), p.resolve("resnet"), p.resolve("")
    ('resnet', 'other', 'resnet', 'none')
    >>> p.resolve("x" * 65), p.resolve("two words")
    ('invalid', 'invalid')
    """

    def __init__(self, *, allow: Iterable[str] = (), max_tags: int = 32,
                 shared: SharedTags | None = None,
                 max_tag_length: int = MAX_TAG_LENGTH) -> None:
        self.allow = frozenset(t for t in allow if t)
        self.max_tags = max_tags
        self.max_tag_length = max_tag_length
        self.shared = shared
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def resolve(self, tag: str) -> str:
        if not tag:
            return NO_TAG
        if len(tag) > self.max_tag_length or not _TAG.fullmatch(tag):
            return INVALID_TAG
        if self.allow:
            return tag if tag in self.allow else OTHER_TAG
        if tag in self._seen:  # set membership is atomic; the lock guards admission only
            return tag
        with self._lock:
            if tag in self._seen:
                return tag
            admitted = (self.shared.admit(tag, self.max_tags) if self.shared is not None
                        else len(self._seen) < self.max_tags)
            if admitted:
                self._seen.add(tag)
                return tag
        return OTHER_TAG


class SharedTags:
    """The tags admitted so far by every worker of a pod: one file per tag in ``directory``,
    admitted under an exclusive ``flock``, so the bound holds across processes.

    Once ``max_tags`` are taken, an unknown tag costs one ``stat``; nothing grows without
    bound.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._full = False

    def _path(self, tag: str) -> str:
        import hashlib

        return os.path.join(self.directory, hashlib.sha256(tag.encode()).hexdigest())

    def admit(self, tag: str, max_tags: int) -> bool:
        path = self._path(tag)
        if os.path.exists(path):
            return True
        if self._full:
            return False
        import fcntl

        fd = os.open(os.path.join(self.directory, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(path):
                return True
            taken = sum(1 for name in os.listdir(self.directory) if not name.startswith("."))
            if taken >= max_tags:
                self._full = True
                return False
            with open(path, "x"):
                pass
            return True
        finally:
            os.close(fd)  # releases the lock


FLUSH_SECONDS = 0.1
"""How often a worker process writes its metric values to the shared files."""


class _Flushed:
    """A prometheus value that a worker process writes to the shared files in the
    background (every ``FLUSH_SECONDS``, and on :func:`flush`), not on every call: an
    mmap-backed write costs several times an in-memory one, dozens of times a call.

    Increments gather per thread (each thread adds to its own entry, so no lock is taken);
    the last value set wins. A worker killed outright loses at most its last
    ``FLUSH_SECONDS`` of metrics.
    """

    __slots__ = ("_flushed", "_latest", "_per_thread", "_target", "_written")

    def __init__(self, target: Any) -> None:
        self._target = target
        self._per_thread: dict[int, float] = {}
        self._flushed = 0.0
        self._latest: tuple[float, float | None] | None = None
        self._written: tuple[float, float | None] | None = None
        _FLUSHER.add(self)

    def inc(self, amount: float) -> None:
        tid = threading.get_ident()
        per_thread = self._per_thread
        per_thread[tid] = per_thread.get(tid, 0.0) + amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._latest = (value, timestamp)

    def flush(self) -> None:
        """Write what changed (the flusher's, under its lock)."""
        total = sum(self._per_thread.copy().values())  # copy(): atomic under the GIL
        if total != self._flushed:
            self._target.inc(total - self._flushed)
            self._flushed = total
        latest = self._latest
        if latest is not None and latest is not self._written:
            value, timestamp = latest
            self._target.set(value, timestamp=timestamp)
            self._written = latest


class _Flusher:
    """The worker process's `_Flushed` values and the thread that writes them."""

    def __init__(self) -> None:
        self._values: list[_Flushed] = []
        self._drains: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, value: _Flushed) -> None:
        with self._lock:
            self._values.append(value)
            self._start()

    def add_drain(self, drain: Callable[[], None]) -> None:
        """Call ``drain`` (:meth:`Metrics.drain`) before each flush."""
        with self._lock:
            self._drains.append(drain)
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lossd-metrics",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            for drain in list(self._drains):
                drain()
            values = list(self._values)
            for value in values:
                value.flush()


_FLUSHER = _Flusher()


def flush() -> None:
    """Write every pending metric value now (a worker process about to exit)."""
    _FLUSHER.flush()


def _writer(value: Any) -> Any:
    """How the hot path writes ``value``: directly in one process, through a
    `_Flushed` in a worker process."""
    return _Flushed(value) if value._multiprocess else value


class ValueWriter:
    """A Counter or Gauge child's value, written without prometheus-client's per-call checks
    (a third of a small call's metric cost). ``mostrecent`` gauges carry a timestamp."""

    __slots__ = ("_timestamped", "_value", "add")

    def __init__(self, child: Any) -> None:
        self._value = _writer(child._value)
        self._timestamped = getattr(child, "_is_most_recent", False)
        # inc(amount) without a call of its own in between: the hot path's (6 a call).
        self.add: Callable[[float], None] = self._value.inc

    def inc(self, amount: float = 1.0) -> None:
        self._value.inc(amount)

    def set(self, value: float) -> None:
        if self._timestamped:
            self._value.set(float(value), timestamp=time.time())
        else:
            self._value.set(float(value))


class HistogramWriter:
    """A Histogram child's bucket and sum values, observed with one bisection instead of
    prometheus-client's loop over every bound, and in bulk (:meth:`observe_counts`).

    These are the objects ``Histogram.observe`` itself increments (mmap-backed in
    multiprocess mode); tests compare the exposition with ``observe`` and with numpy's
    counts, so a change in prometheus-client cannot go unnoticed.
    """

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds = list(child._upper_bounds)
        self._buckets = [_writer(b) for b in child._buckets]
        self._sum = _writer(child._sum)

    def observe(self, value: float) -> None:
        """As ``Histogram.observe`` for a non-NaN ``value``."""
        self._buckets[bisect.bisect_left(self._bounds, value)].inc(1)
        self._sum.inc(value)

    def observe_counts(self, counts: list[int], total: float) -> None:
        """Add per-bucket ``counts`` (non-cumulative, one per bound and +Inf) and their
        ``total``: a batch of 16k losses would cost milliseconds one ``observe`` at a time."""
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._sum.inc(total)


DRAIN_CALLS = 256
"""Calls (or evaluated stream batches) between two drains on a serving thread: bounds what
waits in the pending lists when nobody scrapes, and amortises the drain's fixed costs."""


class _Pending:
    """Values appended on the hot path, applied in bulk by :meth:`drain` (under
    :meth:`Metrics.drain`'s lock). ``list.append`` and ``del list[:n]`` are each atomic
    under the GIL, so a value appended while a drain runs waits for the next one."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[Any] = []

    def _take(self) -> list[Any]:
        pending = self._pending
        n = len(pending)
        taken = pending[:n]
        del pending[:n]
        return taken

    def drain(self) -> None:
        raise NotImplementedError


class PendingValue(_Pending):
    """A counter's or gauge's increments, summed into ``writer`` (a :class:`ValueWriter`)
    at each drain; ``add(amount)`` is the pending list's own ``append``."""

    __slots__ = ("_writer", "add")

    def __init__(self, writer: ValueWriter) -> None:
        super().__init__()
        self._writer = writer
        self.add: Callable[[float], None] = self._pending.append

    def drain(self) -> None:
        if self._pending:
            self._writer.inc(sum(self._take()))


class PendingHistogram(_Pending):
    """A histogram's observations (``observe(value)``, non-NaN: the pending list's
    ``append``), bucketed together at each drain into ``writer``."""

    __slots__ = ("_np_bounds", "_writer", "observe")

    def __init__(self, writer: HistogramWriter) -> None:
        super().__init__()
        self._writer = writer
        self._np_bounds = np.asarray(writer._bounds, dtype=np.float64)
        self.observe: Callable[[float], None] = self._pending.append

    def drain(self) -> None:
        if not self._pending:
            return
        values = self._take()
        if len(values) == 1:
            self._writer.observe(values[0])
            return
        # Bucket i counts values <= bounds[i] (the last bound is +Inf), as bisect_left.
        counts = np.bincount(self._np_bounds.searchsorted(values, side="left"),
                             minlength=len(self._np_bounds))
        self._writer.observe_counts(counts.tolist(), sum(values))


class PendingLosses(_Pending):
    """A loss histogram's per-sample arrays (``add(array)``, batches of at most
    ``_SMALL_BATCH`` values: a larger one is bucketed at once, not held), joined and
    bucketed at each drain by ``metrics.bucket_counts`` into ``writer``."""

    __slots__ = ("_metrics", "_writer", "add")

    def __init__(self, metrics: Metrics, writer: HistogramWriter) -> None:
        super().__init__()
        self._metrics = metrics
        self._writer = writer
        self.add: Callable[[np.ndarray], None] = self._pending.append

    def drain(self) -> None:
        if self._pending:
            arrays = self._take()
            values = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            self._writer.observe_counts(*self._metrics.bucket_counts(values))


class _Drain:
    """A collector that drains the metrics' pending values before the registry collects
    them (registered first, so it runs first; it exports nothing)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.drain()
        return []


class _MethodSeries:
    """The children of one method, each bound once, when first used (``in_flight`` at
    once). Two threads binding the same child at once is harmless: both write to it."""

    __slots__ = (
        "_metrics",
        "_received",
        "_sent",
        "duration",
        "in_flight",
        "method",
        "requests",
        "stages",
    )

    def __init__(self, m: Metrics, method: str) -> None:
        self._metrics = m
        self.method = method
        self.in_flight = m.pending_value(m.in_flight.labels(method))
        self._received: tuple[PendingValue, PendingHistogram] | None = None
        self._sent: PendingValue | None = None
        self.stages: dict[str, PendingHistogram] = {}
        self.requests: dict[tuple[str, str], PendingValue] = {}
        self.duration: dict[str, PendingHistogram] = {}

    def received(self, nbytes: int) -> None:
        writers = self._received
        if writers is None:
            m = self._metrics
            writers = self._received = (m.pending_value(m.received_bytes.labels(self.method)),
                                        m.pending_histogram(m.request_size.labels(self.method)))
        writers[0].add(nbytes)
        writers[1].observe(nbytes)

    def sent(self, nbytes: int) -> None:
        writer = self._sent
        if writer is None:
            m = self._metrics
            writer = self._sent = m.pending_value(m.sent_bytes.labels(self.method))
        writer.add(nbytes)

    def stage(self, name: str) -> PendingHistogram:
        histogram = self.stages.get(name)
        if histogram is None:  # the method's first timed stage: every stage starts at 0
            m = self._metrics
            self.stages = {stage: self.stages.get(stage) or m.pending_histogram(
                m.stage_duration.labels(self.method, stage)) for stage in STAGES}
            histogram = self.stages[name]
        return histogram

    def finished(self, loss: str, code: str, seconds: float) -> None:
        histogram = self.duration.get(loss)
        if histogram is None:  # the first call of this loss: its known codes start at 0
            for known in KNOWN_CODES:
                self._counter(loss, known)
            histogram = self.duration[loss] = self._metrics.pending_histogram(
                self._metrics.request_duration.labels(self.method, loss))
        counter = self.requests.get((loss, code)) or self._counter(loss, code)
        counter.add(1)
        histogram.observe(seconds)

    def _counter(self, loss: str, code: str) -> PendingValue:
        counter = self.requests.get((loss, code))
        if counter is None:
            m = self._metrics
            counter = self.requests[loss, code] = m.pending_value(
                m.requests.labels(self.method, loss, code))
        return counter


class _LossSeries:
    """The children of one loss and resolved tag, bound once; the weighted mean at the first
    weighted batch, the device time at the first CUDA one."""

    __slots__ = ("_device_compute", "_metrics", "_weighted_mean", "batch_mean", "loss",
                 "pending_losses", "sample_loss", "samples", "tag")

    def __init__(self, m: Metrics, loss: str, tag: str) -> None:
        self._metrics = m
        self.loss = loss
        self.tag = tag
        self.samples = m.pending_value(m.samples.labels(loss))
        self.sample_loss = HistogramWriter(m.sample_loss.labels(loss, tag))
        self.pending_losses = m.pending(PendingLosses(m, self.sample_loss))
        self.batch_mean = ValueWriter(m.batch_mean.labels(loss, tag))
        self._weighted_mean: ValueWriter | None = None
        self._device_compute: HistogramWriter | None = None

    def weighted_mean(self, value: float) -> None:
        writer = self._weighted_mean
        if writer is None:
            writer = self._weighted_mean = ValueWriter(
                self._metrics.batch_weighted_mean.labels(self.loss, self.tag))
        writer.set(value)

    def device_seconds(self, seconds: float) -> None:
        histogram = self._device_compute
        if histogram is None:
            histogram = self._device_compute = HistogramWriter(
                self._metrics.device_compute.labels(self.loss))
        histogram.observe(seconds)


class Metrics:
    """The server's metrics, registered on ``registry`` (a fresh one by default).

    ``process``: export the process collector (off in worker processes, whose supervisor
    exports each process's figures with a ``worker`` label). ``worker``: this process's
    worker index, the ``worker`` label of per-process gauges.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 loss_buckets: Sequence[float] = DEFAULT_LOSS_BUCKETS,
                 tags: TagPolicy | None = None, process: bool = True,
                 worker: str = "0") -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # Values written on the hot path wait in these (see the module docstring).
        self._pending: list[_Pending] = []
        self._drain_lock = threading.Lock()
        self._tick = itertools.count(1).__next__
        r.register(_Drain(self))  # before the metrics it drains, so it collects first
        if multiprocess():
            _FLUSHER.add_drain(self.drain)
        self.loss_buckets = tuple(sorted(loss_buckets))
        self.tags = tags if tags is not None else TagPolicy()
        self.worker = worker
        self.requests = Counter("lossd_requests", "Finished requests by method, loss and "
                                "gRPC status code.", ("method", "loss", "code"), registry=r)
        self.request_duration = Histogram(
            "lossd_request_duration_seconds", "Request duration from handler entry to reply.",
            ("method", "loss"), buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram(
            "lossd_stage_duration_seconds", "Time per request stage: decode (wire to "
            "tensors), queue (waiting for a compute slot), compute (validate, device work, "
            "reduce), encode (tensors to wire).", ("method", "stage"),
            buckets=_LATENCY_BUCKETS, registry=r)
        self.samples = Counter("lossd_samples", "Samples evaluated.", ("loss",), registry=r)
        self.received_bytes = Counter("lossd_received_bytes", "Request message bytes.",
                                      ("method",), registry=r)
        self.sent_bytes = Counter("lossd_sent_bytes", "Response message bytes.", ("method",),
                                  registry=r)
        self.request_size = Histogram("lossd_request_size_bytes", "Request message size.",
                                      ("method",), buckets=_SIZE_BUCKETS, registry=r)
        self.in_flight = Gauge("lossd_requests_in_flight", "Requests being served.",
                               ("method",), registry=r, multiprocess_mode="livesum")
        self.device = Gauge("lossd_device_info", "The device losses are computed on, per "
                            "worker process (value 1).",
                            ("worker", "type", "index", "name", "torch_version",
                             "cuda_version"), registry=r, multiprocess_mode="livesum")
        self.device_compute = Histogram(
            "lossd_device_compute_seconds", "Device-side time of the loss computation "
            "(CUDA events; CUDA only).", ("loss",), buckets=_LATENCY_BUCKETS, registry=r)
        self.device_memory_allocated = Gauge(
            "lossd_device_memory_allocated_bytes", "CUDA memory held by tensors, per worker "
            "process (after its last evaluation).", ("worker",), registry=r,
            multiprocess_mode="livesum")
        self.device_memory_reserved = Gauge(
            "lossd_device_memory_reserved_bytes", "CUDA memory reserved by the caching "
            "allocator, per worker process (after its last evaluation).", ("worker",),
            registry=r, multiprocess_mode="livesum")
        self.batch_mean = Gauge("lossd_batch_mean_loss", "Mean loss of the last batch, by "
                                "loss and tag.", ("loss", "tag"), registry=r,
                                multiprocess_mode="mostrecent")
        self.batch_weighted_mean = Gauge(
            "lossd_batch_weighted_mean_loss", "Weighted mean loss of the last weighted "
            "batch, by loss and tag.", ("loss", "tag"), registry=r,
            multiprocess_mode="mostrecent")
        self.sample_loss = Histogram("lossd_sample_loss", "Per-sample loss values, by loss "
                                     "and caller tag.", ("loss", "tag"),
                                     buckets=self.loss_buckets, registry=r)
        self._bounds = np.asarray(self.loss_buckets, dtype=np.float64)
        if process and not multiprocess():
            ProcessCollector(registry=r)
        self._methods = {method: _MethodSeries(self, method) for method in METHODS}
        self._losses: dict[tuple[str, str], _LossSeries] = {}
        self._losses_lock = threading.Lock()
        self._device: torch.device | None = None

    def pending(self, pending: P) -> P:
        """``pending`` drained by :meth:`drain` from now on."""
        self._pending.append(pending)
        return pending

    def pending_value(self, child: Any) -> PendingValue:
        """A Counter or Gauge child written through a :class:`PendingValue`."""
        return self.pending(PendingValue(ValueWriter(child)))

    def pending_histogram(self, child: Any) -> PendingHistogram:
        """A Histogram child written through a :class:`PendingHistogram`."""
        return self.pending(PendingHistogram(HistogramWriter(child)))

    def drain(self, *, wait: bool = True) -> None:
        """Apply every pending value. ``wait=False`` (a serving thread's periodic drain):
        return at once if another thread is draining."""
        if not self._drain_lock.acquire(blocking=wait):
            return
        try:
            for pending in self._pending:  # (one appended meanwhile is drained too)
                pending.drain()
        finally:
            self._drain_lock.release()

    def _ticked(self) -> None:
        """Count a call or batch; every ``DRAIN_CALLS``-th drains, if nobody else is."""
        if not self._tick() % DRAIN_CALLS:
            self.drain(wait=False)

    def set_device(self, device: torch.device) -> None:
        """Record the device (``lossd_device_info``); on CUDA, its memory gauges."""
        self._device = device
        if device.type == "cuda":
            name, cuda = torch.cuda.get_device_name(device), str(torch.version.cuda)
        else:
            name, cuda = "cpu", ""
        self.device.labels(self.worker, device.type, str(device.index or 0), name,
                           torch.__version__, cuda).set(1)
        self.refresh_device_memory()

    def refresh_device_memory(self) -> None:
        """Read the CUDA allocator's figures into the memory gauges (CUDA only)."""
        device = self._device
        if device is not None and device.type == "cuda":
            self.device_memory_allocated.labels(self.worker).set(
                float(torch.cuda.memory_allocated(device)))
            self.device_memory_reserved.labels(self.worker).set(
                float(torch.cuda.memory_reserved(device)))

    def loss_label(self, name: str) -> str:
        """The bounded ``loss`` label of a call naming ``name`` (see the module)."""
        if not name:
            return NO_LOSS
        return name if name in LOSSES else INVALID_LOSS

    def call(self, method: str) -> CallRecord:
        """Track one request (a context manager): in-flight, duration, and its status code
        when it ends; at debug level, one log line."""
        return CallRecord(self, self._methods[method])

    def loss_series(self, loss: str, tag: str) -> _LossSeries:
        """The children of ``loss`` and the request ``tag`` (resolved by the tag policy)."""
        key = (loss, self.tags.resolve(tag))
        series = self._losses.get(key)
        if series is None:
            with self._losses_lock:
                series = self._losses.get(key)
                if series is None:
                    series = self._losses[key] = _LossSeries(self, *key)
        return series

    def bucket_counts(self, values: np.ndarray) -> tuple[list[int], float]:
        """Per-bucket counts of ``values`` (NaN left out) and the sum of the finite ones."""
        if values.shape[0] <= _SMALL_BATCH:  # fsum of a list beats numpy's fixed costs
            total = _fsum(values.tolist())
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                total = float(values.sum(dtype=np.float64))
        if not math.isfinite(total):  # NaN goes in no bucket, and no sum takes +-inf
            v = values.astype(np.float64)
            values = v[~np.isnan(v)]
            total = float(values[np.isfinite(values)].sum())
        # Bucket i counts values <= bounds[i]; the last (+Inf) catches the rest.
        # (the method, not np.searchsorted: its dispatch wrappers are 3 Python frames)
        counts = np.bincount(self._bounds.searchsorted(values, side="left"),
                             minlength=len(self._bounds) + 1)
        return counts.tolist(), total


_SMALL_BATCH = 256


def _fsum(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except ValueError:  # both infinities
        return math.nan


class _StageTimer:
    """Times a block into ``_histogram`` (set by :meth:`CallRecord.stage`; no ``__init__``
    of its own, so making one runs no Python code: a call makes four)."""

    __slots__ = ("_histogram", "_start")

    _histogram: Any
    _start: float

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._histogram.observe(time.perf_counter() - self._start)


class CallRecord:
    """What one request reports as it goes; see :meth:`Metrics.call`."""

    __slots__ = (
        "_series",
        "_start",
        "code",
        "duration",
        "loss",
        "method",
        "metrics",
        "samples",
    )

    def __init__(self, metrics: Metrics, series: _MethodSeries) -> None:
        self.metrics = metrics
        self._series = series
        self.method = series.method
        self.loss = ""
        self.code = grpc.StatusCode.OK
        self.samples = 0
        self.duration = 0.0
        self._start = 0.0

    def __enter__(self) -> CallRecord:
        self._series.in_flight.add(1)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, GeneratorExit):  # gRPC closed a stream's handler: caller gone
            self.code = grpc.StatusCode.CANCELLED
        elif exc is not None:
            self.code = status_of(exc).code
        self.duration = time.perf_counter() - self._start
        series = self._series
        series.in_flight.add(-1)
        # _name_ is Enum's own attribute: .name is two Python calls (a descriptor).
        series.finished(self.metrics.loss_label(self.loss), self.code._name_, self.duration)
        if request_log.isEnabledFor(logging.DEBUG):
            request_log.debug("request", extra={
                "method": self.method, "loss": self.loss, "n": self.samples,
                "code": self.code.name, "duration_s": round(self.duration, 6)})
        self.metrics._ticked()

    # The three below look the method's series up inline and call into _MethodSeries only
    # the first time (to create them): a call runs them 6 times.

    def stage(self, name: str) -> _StageTimer:
        """Time a block as stage ``name`` (a context manager)."""
        series = self._series
        timer = _StageTimer()
        timer._histogram = series.stages.get(name) or series.stage(name)
        return timer

    def received(self, nbytes: int) -> None:
        writers = self._series._received
        if writers is None:
            self._series.received(nbytes)
            return
        writers[0].add(nbytes)
        writers[1].observe(nbytes)

    def sent(self, nbytes: int) -> None:
        writer = self._series._sent
        if writer is None:
            self._series.sent(nbytes)
            return
        writer.add(nbytes)

    def evaluated(self, loss: str, tag: str, per_sample: np.ndarray, mean: float,
                  weighted_mean: float | None, device_seconds: float | None) -> None:
        """A batch was evaluated: count samples and record the loss values."""
        m = self.metrics
        series = m.loss_series(loss, tag)
        n = int(per_sample.shape[0])
        self.samples += n
        series.samples.add(n)
        if n <= _SMALL_BATCH:
            series.pending_losses.add(per_sample)
        else:  # bucketed now: numpy's fixed costs are small beside it, and nothing is held
            series.sample_loss.observe_counts(*m.bucket_counts(per_sample))
        series.batch_mean.set(mean)
        if weighted_mean is not None:
            series.weighted_mean(weighted_mean)
        if device_seconds is not None:
            series.device_seconds(device_seconds)
            m.refresh_device_memory()
        m._ticked()


def parse_buckets(text: str) -> tuple[float, ...]:
    """"0.1,1,10" -> (0.1, 1.0, 10.0), sorted; raises ValueError on junk or duplicates."""
    values = sorted(float(x) for x in text.split(",") if x.strip())
    if not values or len(set(values)) != len(values):
        raise ValueError(f"bucket bounds {text!r}: need distinct numbers")
    return tuple(values)
