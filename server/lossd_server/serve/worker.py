"""A worker process of ``lossd serve --processes N``: one server on the pod's shared port,
doing what its supervisor (:mod:`lossd_server.serve.supervisor`) says.

The supervisor starts it as ``python -m lossd_server.serve --worker`` with the settings in
``LOSSD_*`` variables and talks to it over two pipes:

* its stdin carries one word a line: ``serving`` and ``not_serving`` (the pod's health),
  ``drain`` (refuse new calls, let those in flight finish), ``close`` (the whole pod is
  idle: close the listener). End of file, the supervisor gone, drains and closes too.
* the pipe named by ``LOSSD_WORKER_STATUS_FD`` carries JSON lines back:
  ``{"event": "ready", ...}`` once warmed up, ``{"event": "idle"}`` once drained.

Its metrics live in files under ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor's directory),
its tag bound is the pod's (``metrics.SharedTags``). A configuration error exits 2 before
it reports ready; SIGTERM on its own drains and closes it on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

from lossd_server import logs
from lossd_server.serve.host import EXIT_CONFIG, prepare_process
from lossd_server.settings import Settings

log = logging.getLogger("lossd")

ENV_INDEX = "LOSSD_WORKER_INDEX"
ENV_STATUS_FD = "LOSSD_WORKER_STATUS_FD"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def main() -> NoReturn:
    """The worker process's whole life: serve, then exit with :func:`serve`'s code."""
    code = serve()
    # Skip the interpreter's teardown: garbage-collecting torch takes seconds, and the
    # server has stopped and every log line is out.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> int:
    """Serve on the shared port, as the supervisor says, until it says close."""
    index = int(os.environ[ENV_INDEX])
    status = os.fdopen(int(os.environ[ENV_STATUS_FD]), "w", buffering=1)
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format, worker=index)
    # Ctrl-C reaches the whole process group; the supervisor drains its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()  # drain: refuse new calls, let those in flight finish
    close = threading.Event()  # every worker of the pod is idle: close the listener

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()  # a worker signalled on its own drains on its own
        close.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        prepare_process(settings, 1)
        from lossd_server.app import create_server, load_plugins
        from lossd_server.metrics import Metrics, SharedTags, TagPolicy, parse_buckets

        load_plugins(settings)  # before the metrics, so plugin losses start at zero too
        metrics = Metrics(loss_buckets=parse_buckets(settings.loss_buckets),
                          tags=TagPolicy(allow=settings.tags.split(","),
                                         max_tags=settings.max_tags,
                                         max_tag_length=settings.max_tag_length,
                                         shared=SharedTags(os.path.join(
                                             os.environ[MULTIPROC_ENV], "tags"))),
                          process=False, worker=str(index))
        server = create_server(settings, metrics=metrics, reuse_port=True)
        server.start(serving=False)
    except (ValueError, OSError) as exc:
        print(f"lossd: worker {index}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    status.write(json.dumps({"event": "ready", "pid": os.getpid(),
                             "device": str(server.engine.device)}) + "\n")

    def control() -> None:
        for line in sys.stdin.buffer:
            word = line.strip()
            if word == b"serving":
                server.set_serving(True)
            elif word == b"not_serving":
                server.set_serving(False)
            elif word == b"drain":
                stop.set()
            elif word == b"close":
                close.set()
        stop.set()  # the supervisor went away
        close.set()

    threading.Thread(target=control, name="lossd-control", daemon=True).start()
    while not stop.wait(1.0):
        pass
    in_flight = server.gate.in_flight if server.gate is not None else 0
    log.info("drain started", extra={"in_flight": in_flight})
    deadline = time.monotonic() + settings.grace_seconds
    server.drain_and_wait(settings.grace_seconds)
    # The listener stays open until the whole pod is idle: a connection the kernel hands
    # to this worker meanwhile gets a clean UNAVAILABLE ("draining"), not a reset.
    with contextlib.suppress(OSError):  # the supervisor may be gone
        status.write(json.dumps({"event": "idle"}) + "\n")
    close.wait(max(0.0, deadline - time.monotonic()))
    server.close(max(0.0, deadline - time.monotonic()))
    return 0
