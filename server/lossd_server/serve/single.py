"""``lossd serve --processes 1``: the server in this process.

Build, start, wait for SIGTERM or SIGINT, drain within ``--grace-seconds``, exit 0. A call
still computing then (stuck work: Python cannot interrupt it) does not keep the process:
it exits 1 at once, without the interpreter's teardown, which would wait for that thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from lossd_server.serve.host import exit_now, prepare_process, set_from_signal
from lossd_server.settings import Settings

if TYPE_CHECKING:
    from lossd_server.app import LossdServer

log = logging.getLogger("lossd")


def serve_single(settings: Settings) -> int:
    """Serve in this process until SIGTERM/SIGINT, then drain for ``grace_seconds``."""
    prepare_process(settings, 1)
    from lossd_server.app import create_server

    server = create_server(settings)
    log.info("lossd starting", extra={"settings": settings.loggable(),
                                       "device": str(server.engine.device)})
    server.start()
    log.info("lossd serving", extra={**_serving_fields(server, settings), "processes": 1})
    signum = _wait_for_signal(settings)
    in_flight = server.gate.in_flight if server.gate is not None else 0
    log.info("drain started", extra={"in_flight": in_flight, "signal": signum})
    server.stop(settings.grace_seconds)
    stuck = server.admission.running
    if stuck:
        log.error("lossd stopped with calls still computing; exiting without them",
                  extra={"running": stuck, "held_seconds": round(
                      server.admission.longest_hold(), 1)})
        exit_now(1)
    log.info("lossd stopped")
    return 0


def _serving_fields(server: LossdServer, settings: Settings) -> dict[str, Any]:
    tokens = server.gate.tokens if server.gate is not None else None
    return {"address": server.address, "metrics_port": server.metrics_port,
            "health_port": server.health_port, "device": str(server.engine.device),
            "tls": "mutual" if settings.tls_client_ca else settings.tls,
            "auth_tokens": tokens.count if tokens else 0, "threads": settings.threads,
            "max_rpcs": settings.rpc_limit,
            "descriptor_socket": (os.fspath(server.descriptor_socket.path)
                                  if server.descriptor_socket is not None else None)}


def _wait_for_signal(settings: Settings) -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name (logged as it arrives)."""
    got: list[str] = []
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signal.Signals(signum).name)
        set_from_signal(stopped, then=lambda: log.info("draining", extra={
            "signal": got[-1], "grace_seconds": settings.grace_seconds}))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopped.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    return got[0]
