"""Server assembly and lifecycle: ``create_server(settings)``, then ``start()``, ``stop()``.

A server is: the loss catalogue (built-ins and plugins), one evaluation service
(:mod:`lossd_server.service`) under two fronts side by side, the LossService
(:mod:`lossd_server.servicer`) and the Open Inference Protocol (:mod:`lossd_server.kserve`),
the standard gRPC health service (:class:`lossd_server.health.Health`: NOT_SERVING until
the device passed a warm-up evaluation, NOT_SERVING again while draining), server
reflection, and a Prometheus
/metrics endpoint on its own port (and address).

Every call passes :class:`gate.Gate`: bearer tokens when configured (health stays open),
UNAVAILABLE while draining, in-flight counting. TLS and mutual TLS come from
``security.server_credentials``; limits from ``limits``. ``stop(grace)`` drains: health
NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish within ``grace``, then the
port closes. A compute slot held past ``--stall-seconds`` (stuck work,
:mod:`lossd_server.watchdog`) turns health NOT_SERVING until it comes back. Processes,
signals and the ``lossd serve`` command are :mod:`lossd_server.serve`'s.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from lossd.v1 import loss_service_pb2 as pb
from lossd_server import kserve, native, plugins
from lossd_server import metrics as metrics_mod
from lossd_server.batching import BatchingSettings
from lossd_server.engine import Batch, Engine
from lossd_server.gate import Gate
from lossd_server.health import Health, bind
from lossd_server.limits import Admission, LimitMetrics, MessageWaits
from lossd_server.metrics import Metrics, TagPolicy, parse_buckets
from lossd_server.native import NativeServer, NativeUnavailable, TlsPems
from lossd_server.security import TokenStore, server_credentials, tls_pems
from lossd_server.service import EvaluationService
from lossd_server.servicer import LossServicer, add_to_server
from lossd_server.settings import Settings
from lossd_server.shm import DescriptorSocket, SharedMemoryRegistry
from lossd_server.watchdog import StallMetrics, Watchdog

log = logging.getLogger("lossd")
LOSS_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda``; ``cuda:<i>``.

    A list (``cuda:0,cuda:1``) is for worker processes to spread over (``lossd serve
    --processes``); each worker resolves its own entry.
    """
    if "," in spec:
        raise ValueError(f"--device: {spec!r} lists several devices; one process uses one "
                         "(serve with --processes of at least their number)")
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
    server: grpc.Server  # or a NativeServer (--front)
    port: int
    engine: Engine
    metrics: Metrics
    health: Health
    ready: threading.Event = field(default_factory=threading.Event)
    metrics_port: int | None = None
    gate: Gate | None = None
    service: EvaluationService | None = None
    servicer: LossServicer | None = None
    health_port: int | None = None
    descriptor_socket: DescriptorSocket | None = None
    watchdog: Watchdog | None = None
    stall_listeners: list[Callable[[bool], None]] = field(default_factory=list)
    """Called with True when compute stalls, False when it recovers (a worker process
    tells its supervisor)."""
    _metrics_http: Any = field(default=None, repr=False)
    _serving: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def admission(self) -> Admission:
        """The compute slots and their wait queue (``running``, ``waiting``)."""
        assert self.service is not None
        return self.service.admission

    @property
    def stalled(self) -> bool:
        """Whether a compute slot is held past ``--stall-seconds`` now."""
        return self.watchdog is not None and self.watchdog.stalled

    def set_serving(self, serving: bool) -> None:
        """Serve (health SERVING, ready) or not; a stall keeps it NOT_SERVING meanwhile."""
        self._serving = serving
        serving = serving and not self.stalled
        self.health.set_serving(serving)
        if serving:
            self.ready.set()
        else:
            self.ready.clear()

    def _on_stall(self, stalled: bool) -> None:
        self.set_serving(self._serving)
        for listener in self.stall_listeners:
            listener(stalled)

    def start(self, *, serving: bool = True) -> LossdServer:
        """Start serving; health turns SERVING once a warm-up evaluation passed (with
        ``serving=False`` it stays NOT_SERVING until ``set_serving(True)``: a worker
        process waits for its supervisor, which knows when every worker is ready)."""
        if self.descriptor_socket is not None:
            self.descriptor_socket.start()
        self.server.start()
        self.health.start()
        if self.settings.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.resolved_metrics_host,
                registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        warm_up(self.engine)
        if self.watchdog is not None:
            self.watchdog.start()
        if serving:
            self.set_serving(True)
        return self

    def drain(self) -> None:
        """Health NOT_SERVING and new calls refused with UNAVAILABLE; in-flight ones go on."""
        self._serving = False  # for good: a stall that ends now turns nothing back on
        self.ready.clear()
        if self.gate is not None:
            self.gate.drain()
        if isinstance(self.server, NativeServer):
            self.server.drain()
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = None) -> None:
        """Drain, let in-flight calls finish within ``grace`` seconds, then close the port
        (calls still running then are cancelled). ``grace`` None waits without limit."""
        self.close(self.drain_and_wait(grace))

    def drain_and_wait(self, grace: float | None) -> float | None:
        """Drain, then let in-flight calls finish within ``grace`` seconds (None: without
        limit, 0: not at all); returns the grace left, for :meth:`close`."""
        start = time.monotonic()
        self.drain()
        if self.gate is not None and grace != 0 and not self.gate.wait_idle(grace):
            log.warning("grace period over; cancelling calls still running",
                        extra={"in_flight": self.gate.in_flight})
        return None if grace is None else max(0.0, grace - (time.monotonic() - start))

    def close(self, grace: float | None = 0) -> None:
        """Close the port, cancelling the calls still running after ``grace`` seconds, and
        the server's other endpoints. :meth:`stop` drains first; this does not."""
        self.server.stop(grace).wait()
        if self.gate is not None:
            self.gate.waits.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        metrics_mod.flush()  # a worker process's last metric values, before it exits
        if self.descriptor_socket is not None:
            self.descriptor_socket.close()
        self.health.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def __enter__(self) -> LossdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0)


def load_plugins(settings: Settings) -> list[plugins.Plugin]:
    """The plugins of ``settings``: the ``--plugin`` modules, then (unless
    ``--no-entry-points``) the installed entry points of group ``lossd.losses``. Each is
    loaded once per process, so every worker process loads its own; raises
    ``plugins.PluginError`` (naming the plugin and the problem) for one that cannot load."""
    return plugins.load(settings.plugins, entry_points=settings.entry_points)


def create_server(settings: Settings, *, metrics: Metrics | None = None,
                  reuse_port: bool = False) -> LossdServer:
    """Build the server and bind its port (``port=0`` picks a free one, see ``.port``).

    Loads the plugins first (:func:`load_plugins`), so metrics and the Open Inference
    Protocol endpoint know every loss. ``reuse_port``: share the port with other processes
    (SO_REUSEPORT), as the worker processes of ``lossd serve --processes N`` do; otherwise a
    taken port fails loudly.
    """
    load_plugins(settings)
    engine = Engine(resolve_device(settings.device), max_elements=settings.max_elements)
    if metrics is None:
        metrics = Metrics(loss_buckets=parse_buckets(settings.loss_buckets),
                          tags=TagPolicy(allow=settings.tags.split(","),
                                         max_tags=settings.max_tags,
                                         max_tag_length=settings.max_tag_length))
    metrics.set_device(engine.device)
    settings.check()
    if settings.cuda_memory_fraction and engine.device.type == "cuda":
        index = engine.device.index
        torch.cuda.set_per_process_memory_fraction(
            settings.cuda_memory_fraction,
            torch.cuda.current_device() if index is None else index)
    on_native = _native_front(settings)
    # On the native front gRPC C++ reads (and bounds) a unary call's message: the gate
    # only parses it.
    gate = Gate(metrics=metrics, tokens=TokenStore.from_settings(settings),
                waits=MessageWaits(max_receiving=settings.max_receiving,
                                   timeout=settings.message_timeout_seconds,
                                   stream_idle=settings.stream_idle_seconds,
                                   metrics=LimitMetrics.of(metrics.registry)),
                received=on_native)
    # One evaluation service under both fronts: one admission queue, one set of metrics.
    service = EvaluationService(engine, metrics=metrics, slots=settings.concurrency,
                                max_waiting=settings.max_waiting,
                                max_streams=settings.stream_limit,
                                max_elements=settings.max_elements,
                                batching=BatchingSettings(settings.batch_max_samples,
                                                          settings.batch_delay_us / 1e6)
                                if settings.batching == "on" else None,
                                in_flight=lambda: gate.in_flight)
    pool = futures.ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="lossd",
                                      initializer=_serving_thread)
    # With dynamic batching every call goes to the pool, where concurrent calls meet in the
    # batcher; on the native front's dispatcher they would run one after another, alone.
    server, credentials = _front(settings, pool, gate, on_native=on_native,
                                 reuse_port=reuse_port,
                                 can_inline=(_never if service.batcher is not None
                                             else service.admission.has_free_slot))
    registry, fd_socket = None, None
    if settings.shared_memory:
        registry = SharedMemoryRegistry(max_bytes=settings.shm_max_bytes)
        fd_socket = DescriptorSocket(registry, Path(settings.shm_socket_dir
                                                    or tempfile.gettempdir()))
    servicer = LossServicer(service, max_message_bytes=settings.max_message_bytes,
                            shared_memory=registry,
                            descriptor_socket=os.fspath(fd_socket.path) if fd_socket else "")
    add_to_server(servicer, server, max_map_entries=settings.max_map_entries)
    ready = threading.Event()
    services = [LOSS_SERVICE, kserve.add_to_server(server, service, ready=ready.is_set)]

    health_service = Health(services)
    health_service.add_to_server(server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    port = bind(server, settings.host, settings.port, credentials)
    health_port = (health_service.bind(settings.host, settings.health_port)
                   if settings.health_port >= 0 else None)
    lossd = LossdServer(settings=settings, server=server, port=port, engine=engine,
                        metrics=metrics, health=health_service, ready=ready, gate=gate,
                        service=service, servicer=servicer, health_port=health_port,
                        descriptor_socket=fd_socket)
    if settings.stall_seconds > 0:
        lossd.watchdog = Watchdog(service.admission, settings.stall_seconds, lossd._on_stall,
                                  StallMetrics(metrics.registry))
    lossd.set_serving(False)
    return lossd


def _native_front(settings: Settings) -> bool:
    """Whether the calls go over the native front (``--front``): ``auto`` falls back to
    grpcio, saying why, where it cannot be built; ``native`` fails then."""
    if settings.front == "grpcio":
        return False
    try:
        native.load()
    except NativeUnavailable as exc:
        if settings.front == "native":
            raise
        log.warning("native front unavailable; serving with grpcio",
                    extra={"reason": str(exc).splitlines()[0]})
        return False
    return True


def _front(settings: Settings, pool: futures.ThreadPoolExecutor, gate: Gate, *,
           on_native: bool, reuse_port: bool, can_inline: Callable[[], bool]
           ) -> tuple[grpc.Server, grpc.ServerCredentials | TlsPems | None]:
    """The gRPC server carrying the calls and its TLS credentials (None: plaintext)."""
    options = server_options(settings, reuse_port=reuse_port)
    if not on_native:
        return (grpc.server(pool, options=options, interceptors=[gate],
                            maximum_concurrent_rpcs=settings.rpc_limit),
                server_credentials(settings))
    server = NativeServer(pool, options=options, interceptors=[gate],
                          maximum_concurrent_rpcs=settings.rpc_limit,
                          initializer=_serving_thread, can_inline=can_inline,
                          waits=gate.waits, require_auth=gate.tokens is not None,
                          yield_io_threads=settings.yield_io_threads)
    pems = tls_pems(settings)
    if pems is None:
        return server, None
    key, cert, client_ca = pems
    return server, TlsPems(key, cert, client_ca, client_ca is not None)


def _never() -> bool:
    return False


def _serving_thread() -> None:
    """Each call thread computes without autograd (a gradient request turns it on for
    itself), so the engine skips entering inference mode on every call."""
    torch.set_grad_enabled(False)


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """gRPC server channel options: message size, keepalive, connection age."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and
        # silently share its traffic. Fail loudly instead, unless the port is shared on
        # purpose by worker processes (their supervisor holds it, see lossd_server.serve).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Keepalive: ping idle clients so a dead peer's calls are cancelled, and accept the
        # clients' own pings (lossd clients ping every 30 s, even without calls) instead of
        # answering GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms",
         int(settings.min_client_ping_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings.max_connection_age_seconds > 0:
        # Clients reconnect (and re-resolve DNS, finding new replicas) every few minutes;
        # calls in flight on an old connection keep it for up to an hour.
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds
                                                       * 1000)),
                    ("grpc.max_connection_age_grace_ms", 3_600_000)]
    return options

