"""Server assembly and lifecycle: ``create_server(settings)`` and ``serve(settings)``.

A server is: the LossService, the standard gRPC health service (NOT_SERVING until the
device passed a warm-up evaluation, NOT_SERVING again while draining), server reflection,
and a Prometheus /metrics endpoint on its own port.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import kserve
from lossd_server.engine import Batch, Engine
from lossd_server.metrics import Metrics, TagPolicy, parse_buckets
from lossd_server.servicer import LossServicer
from lossd_server.settings import Settings

log = logging.getLogger("lossd")
LOSS_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda``; ``cuda:<i>``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device: {spec!r} is not auto, cpu, cuda or cuda:<i>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {spec} asked for, but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {spec} asked for, but only "
                             f"{torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"--device: {spec!r} is not auto, cpu, cuda or cuda:<i>")
    return device


def warm_up(engine: Engine) -> None:
    """One small evaluation on the device; raises if the result is wrong."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    result = engine.evaluate(Batch("cross_entropy", logits, torch.tensor([0, 1])))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    if not torch.allclose(result.per_sample, expected):
        raise RuntimeError(f"warm-up on {engine.device} gave {result.per_sample.tolist()}, "
                           f"expected {expected.tolist()}")


@dataclass
class LossdServer:
    """A created (bound, not yet started) server: ``start()``, then ``stop(grace)``."""

    settings: Settings
    server: grpc.Server
    port: int
    engine: Engine
    metrics: Metrics
    health: health.HealthServicer
    services: tuple[str, ...]
    ready: threading.Event = field(default_factory=threading.Event)
    metrics_port: int | None = None
    _metrics_http: Any = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.services):
            self.health.set(name, status)
        if serving:
            self.ready.set()
        else:
            self.ready.clear()

    def start(self) -> LossdServer:
        """Start serving; health turns SERVING once a warm-up evaluation passed."""
        self.server.start()
        if self.settings.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.resolved_metrics_host,
                registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        warm_up(self.engine)
        self.set_serving(True)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace``."""
        self.ready.clear()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def __enter__(self) -> LossdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0)


def create_server(settings: Settings, *, metrics: Metrics | None = None) -> LossdServer:
    """Build the server and bind its port (``port=0`` picks a free one, see ``.port``)."""
    engine = Engine(resolve_device(settings.device))
    if metrics is None:
        metrics = Metrics(loss_buckets=parse_buckets(settings.loss_buckets),
                          tags=TagPolicy(allow=settings.tags.split(","),
                                         max_tags=settings.max_tags))
    metrics.set_device(engine.device)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and
        # silently share its traffic. Fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers,
                                                    thread_name_prefix="lossd"),
                         options=options)
    pb_grpc.add_LossServiceServicer_to_server(
        LossServicer(engine, max_message_bytes=settings.max_message_bytes, metrics=metrics,
                     slots=settings.concurrency), server)
    ready = threading.Event()
    services = [LOSS_SERVICE,
                kserve.add_to_server(server, engine, max_message_bytes=settings.max_message_bytes,
                                     ready=ready.is_set)]

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port} (in use?)")
    lossd = LossdServer(settings=settings, server=server, port=port, engine=engine,
                        metrics=metrics, health=health_servicer, services=tuple(services),
                        ready=ready)
    lossd.set_serving(False)
    return lossd


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain for ``grace_seconds`` and return 0."""
    server = create_server(settings)
    log.info("lossd starting", extra={"settings": asdict(settings),
                                       "device": str(server.engine.device)})
    server.start()
    log.info("lossd serving", extra={"address": server.address,
                                      "metrics_port": server.metrics_port,
                                      "device": str(server.engine.device)})
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("draining", extra={"signal": signal.Signals(signum).name,
                                    "grace_seconds": settings.grace_seconds})
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    server.stop(settings.grace_seconds)
    log.info("lossd stopped")
    return 0
