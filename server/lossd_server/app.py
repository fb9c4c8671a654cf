"""Server assembly and lifecycle: ``create_server(settings)`` and ``serve(settings)``."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
import torch

from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.engine import Engine
from lossd_server.servicer import LossServicer
from lossd_server.settings import Settings

log = logging.getLogger("lossd")


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


@dataclass
class LossdServer:
    """A created (bound, not yet started) server: ``start()``, then ``stop(grace)``."""

    settings: Settings
    server: grpc.Server
    port: int
    engine: Engine

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> LossdServer:
        self.server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds."""
        self.server.stop(grace).wait()

    def __enter__(self) -> LossdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0)


def create_server(settings: Settings) -> LossdServer:
    """Build the server and bind its port (``port=0`` picks a free one, see ``.port``)."""
    engine = Engine(resolve_device(settings.device))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", -1),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers,
                                                    thread_name_prefix="lossd"),
                         options=options)
    pb_grpc.add_LossServiceServicer_to_server(
        LossServicer(engine, max_message_bytes=settings.max_message_bytes), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    return LossdServer(settings=settings, server=server, port=port, engine=engine)


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain for ``grace_seconds`` and return 0."""
    server = create_server(settings).start()
    log.info("lossd serving on %s (device %s)", server.address, server.engine.device)
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: draining for up to %ss", signal.Signals(signum).name,
                 settings.grace_seconds)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    server.stop(settings.grace_seconds)
    log.info("lossd stopped")
    return 0
