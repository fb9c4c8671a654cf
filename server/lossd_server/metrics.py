"""Prometheus metrics: the service's own and the loss values it computes.

Everything hangs off one :class:`Metrics` object built on an injectable registry, so
tests read a fresh one. Names follow the Prometheus naming guide: ``lossd_`` prefix, base
units, ``_total`` only on counters, one counter with a ``code`` label, histograms (not
summaries) so replicas aggregate. Label values are bounded: ``method`` and ``stage`` are
fixed sets, ``loss`` is a catalogue name or ``invalid``, ``tag`` goes through
:class:`TagPolicy`, ``code`` is a gRPC status name.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lossd_server.losses import LOSSES

METHODS = ("Evaluate", "EvaluateStream", "ListLosses", "ModelInfer")
STAGES = ("decode", "queue", "compute", "encode")
INVALID_LOSS = "invalid"
OTHER_TAG = "other"
NO_TAG = "none"
# Codes a request can end with; each starts at 0 for every method and loss.
KNOWN_CODES = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
               "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "INTERNAL")
DEFAULT_LOSS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
                        8.0, 16.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = tuple(float(4 ** i * 256) for i in range(12))  # 256 B .. 1 GiB


class TagPolicy:
    """Bounds the ``tag`` label: an allow-list, or the first ``max_tags`` distinct tags.

    Anything else is counted as ``other``; an empty tag is ``none``.

    >>> p = TagPolicy(max_tags=1)
    >>> p.resolve("resnet"), p.resolve("vit"), p.resolve("resnet"), p.resolve("")
    ('resnet', 'other', 'resnet', 'none')
    """

    def __init__(self, *, allow: Iterable[str] = (), max_tags: int = 32) -> None:
        self.allow = frozenset(t for t in allow if t)
        self.max_tags = max_tags
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def resolve(self, tag: str) -> str:
        if not tag:
            return NO_TAG
        if self.allow:
            return tag if tag in self.allow else OTHER_TAG
        with self._lock:
            if tag in self._seen:
                return tag
            if len(self._seen) < self.max_tags:
                self._seen.add(tag)
                return tag
        return OTHER_TAG


@dataclass
class _LossHistogram:
    counts: np.ndarray
    total: float = 0.0


class SampleLossCollector(Collector):
    """``lossd_sample_loss``: every per-sample loss, by loss and tag, observed in bulk.

    prometheus-client's Histogram observes one value per call; a batch of 16k losses would
    cost milliseconds that way, so buckets are counted with numpy and exposed here.
    """

    name = "lossd_sample_loss"

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._series: dict[tuple[str, str], _LossHistogram] = {}
        self._lock = threading.Lock()

    def observe(self, loss: str, tag: str, values: np.ndarray) -> None:
        v = values.astype(np.float64, copy=False)
        v = v[~np.isnan(v)]
        # Bucket i counts values <= bounds[i]; the last (+Inf) catches the rest.
        idx = np.searchsorted(self.bounds, v, side="left")
        counts = np.bincount(idx, minlength=len(self.bounds) + 1)
        with self._lock:
            series = self._series.setdefault(
                (loss, tag), _LossHistogram(np.zeros(len(self.bounds) + 1, dtype=np.int64)))
            series.counts += counts
            series.total += float(v[np.isfinite(v)].sum())

    def touch(self, loss: str, tag: str) -> None:
        with self._lock:
            self._series.setdefault(
                (loss, tag), _LossHistogram(np.zeros(len(self.bounds) + 1, dtype=np.int64)))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            self.name, "Per-sample loss values, by loss and caller tag.",
            labels=("loss", "tag"))
        with self._lock:
            items = [(k, s.counts.copy(), s.total) for k, s in self._series.items()]
        edges = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        for (loss, tag), counts, total in items:
            cumulative = np.cumsum(counts)
            family.add_metric([loss, tag], list(zip(edges, cumulative.tolist(), strict=True)),
                              total)
        yield family


@dataclass
class Metrics:
    """The server's metrics, registered on ``registry`` (a fresh one by default)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    loss_buckets: Sequence[float] = DEFAULT_LOSS_BUCKETS
    tags: TagPolicy = field(default_factory=TagPolicy)
    process: bool = True

    def __post_init__(self) -> None:
        r = self.registry
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
                               ("method",), registry=r)
        self.device = Info("lossd_device", "The device losses are computed on.", registry=r)
        self.device_compute = Histogram(
            "lossd_device_compute_seconds", "Device-side time of the loss computation "
            "(CUDA events; CUDA only).", ("loss",), buckets=_LATENCY_BUCKETS, registry=r)
        self.device_memory_allocated = Gauge(
            "lossd_device_memory_allocated_bytes", "CUDA memory held by tensors.", registry=r)
        self.device_memory_reserved = Gauge(
            "lossd_device_memory_reserved_bytes", "CUDA memory reserved by the caching "
            "allocator.", registry=r)
        self.batch_mean = Gauge("lossd_batch_mean_loss", "Mean loss of the last batch, by "
                                "loss and tag.", ("loss", "tag"), registry=r)
        self.batch_weighted_mean = Gauge(
            "lossd_batch_weighted_mean_loss", "Weighted mean loss of the last weighted "
            "batch, by loss and tag.", ("loss", "tag"), registry=r)
        self.sample_loss = SampleLossCollector(self.loss_buckets)
        r.register(self.sample_loss)
        if self.process:
            ProcessCollector(registry=r)
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        for method in METHODS:
            self.in_flight.labels(method)
            self.received_bytes.labels(method)
            self.sent_bytes.labels(method)
            self.request_size.labels(method)
            for stage in STAGES:
                self.stage_duration.labels(method, stage)
            for loss in (*LOSSES, INVALID_LOSS):
                self.request_duration.labels(method, loss)
                for code in KNOWN_CODES:
                    self.requests.labels(method, loss, code)
        for loss in LOSSES:
            self.samples.labels(loss)

    def set_device(self, device: torch.device) -> None:
        """Record the device as an info metric; on CUDA, export its memory gauges."""
        info = {"type": device.type, "index": str(device.index or 0),
                "torch_version": torch.__version__}
        if device.type == "cuda":
            info["name"] = torch.cuda.get_device_name(device)
            info["cuda_version"] = str(torch.version.cuda)
            self.device_memory_allocated.set_function(
                lambda: float(torch.cuda.memory_allocated(device)))
            self.device_memory_reserved.set_function(
                lambda: float(torch.cuda.memory_reserved(device)))
            for loss in LOSSES:
                self.device_compute.labels(loss)
        else:
            info["name"] = "cpu"
        self.device.info(info)

    def loss_label(self, name: str) -> str:
        return name if name in LOSSES else INVALID_LOSS

    @contextlib.contextmanager
    def call(self, method: str) -> Iterator[CallRecord]:
        """Track one request: in-flight, duration, and its status code when it ends."""
        record = CallRecord(self, method)
        self.in_flight.labels(method).inc()
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:
            record.code = getattr(exc, "code", grpc.StatusCode.INTERNAL)
            if not isinstance(record.code, grpc.StatusCode):
                record.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            record.duration = time.perf_counter() - start
            self.in_flight.labels(method).dec()
            loss = self.loss_label(record.loss)
            self.requests.labels(method, loss, record.code.name).inc()
            self.request_duration.labels(method, loss).observe(record.duration)


@dataclass
class CallRecord:
    """What one request reports as it goes; see :meth:`Metrics.call`."""

    metrics: Metrics
    method: str
    loss: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    samples: int = 0
    duration: float = 0.0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_duration.labels(self.method, name).observe(
                time.perf_counter() - start)

    def received(self, nbytes: int) -> None:
        self.metrics.received_bytes.labels(self.method).inc(nbytes)
        self.metrics.request_size.labels(self.method).observe(nbytes)

    def sent(self, nbytes: int) -> None:
        self.metrics.sent_bytes.labels(self.method).inc(nbytes)

    def evaluated(self, loss: str, tag: str, per_sample: np.ndarray, mean: float,
                  weighted_mean: float | None, device_seconds: float | None) -> None:
        """A batch was evaluated: count samples and record the loss values."""
        m = self.metrics
        self.samples += int(per_sample.shape[0])
        m.samples.labels(loss).inc(per_sample.shape[0])
        tag_label = m.tags.resolve(tag)
        m.sample_loss.observe(loss, tag_label, per_sample)
        m.batch_mean.labels(loss, tag_label).set(mean)
        if weighted_mean is not None:
            m.batch_weighted_mean.labels(loss, tag_label).set(weighted_mean)
        if device_seconds is not None:
            m.device_compute.labels(loss).observe(device_seconds)


def parse_buckets(text: str) -> tuple[float, ...]:
    """"0.1,1,10" -> (0.1, 1.0, 10.0), sorted; raises ValueError on junk or duplicates."""
    values = sorted(float(x) for x in text.split(",") if x.strip())
    if not values or len(set(values)) != len(values):
        raise ValueError(f"bucket bounds {text!r}: need distinct numbers")
    return tuple(values)
