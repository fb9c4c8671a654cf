"""A worker process of ``lossd serve --processes N``: one server on the pod's shared port,
doing what its supervisor (:mod:`lossd_server.serve.supervisor`) says.

The supervisor starts it as ``python -m lossd_server.serve --worker`` with the settings in
``LOSSD_*`` variables and talks to it over two pipes:

* its stdin carries one word a line: ``serving`` and ``not_serving`` (the pod's health),
  ``drain`` (refuse new calls, let those in flight finish), ``close`` (the whole pod is
  idle: close the listener). End of file, the supervisor gone, drains and closes too.
* the pipe named by ``LOSSD_WORKER_STATUS_FD`` carries JSON lines back:
  ``{"event": "ready", ...}`` once warmed up, ``{"event": "idle"}`` once drained,
  ``{"event": "beat"}`` every ``HEARTBEAT_FRACTION`` of ``--heartbeat-seconds`` (a worker
  silent for longer is frozen, and its supervisor replaces it), and ``{"event":
  "stalled"}`` when its compute watchdog sees stuck work (its supervisor replaces it too).

Its metrics live in files under ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor's directory,
which the last process out removes), written so that a full filesystem drops metrics and
kills nothing (:mod:`lossd_server.metric_files`); its tag bound is the pod's
(``metrics.SharedTags``). A configuration error exits 2 before it reports ready; SIGTERM on
its own drains and closes it on its own, and the kernel sends it SIGTERM when its
supervisor dies.
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
from typing import Any, NoReturn

from lossd_server import logs
from lossd_server.serve.host import (
    EXIT_CONFIG,
    die_with_parent,
    exit_now,
    join_pod_directory,
    leave_pod_directory,
    parent_gone,
    prepare_process,
    set_from_signal,
)
from lossd_server.settings import Settings

log = logging.getLogger("lossd")

ENV_INDEX = "LOSSD_WORKER_INDEX"
ENV_STATUS_FD = "LOSSD_WORKER_STATUS_FD"
ENV_PARENT = "LOSSD_WORKER_PARENT"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_FRACTION = 0.25
"""A worker beats four times per ``--heartbeat-seconds``: one late beat is no alarm."""
ORPHAN_LEAVE_SECONDS = 5.0
"""How long a worker whose supervisor died tries to be the last one out of the pod
directory (:func:`host.leave_pod_directory`'s ``wait``): the supervisor's hold on it goes
only once its last thread has exited, which under load came after both workers of an idle
pod had drained and left (so neither removed it). Longer than that, the next start
sweeps it."""


def main() -> NoReturn:
    """The worker process's whole life: serve, then exit with :func:`serve`'s code (at
    once: a thread stuck in a loss must not keep the process)."""
    die_with_parent()
    parent = int(os.environ.get(ENV_PARENT, "0"))
    if parent_gone(parent):  # it died before the line above
        exit_now(0)
    directory = os.environ[MULTIPROC_ENV]
    try:
        held = join_pod_directory(directory)
    except OSError as exc:
        print(f"lossd: worker: metrics directory {directory}: {exc.strerror}",
              file=sys.stderr)
        exit_now(EXIT_CONFIG)
    code = serve()
    leave_pod_directory(directory, held, wait=ORPHAN_LEAVE_SECONDS if parent_gone(parent)
                        else 0.0)
    exit_now(code)


def serve() -> int:
    """Serve on the shared port, as the supervisor says, until it says close."""
    index = int(os.environ[ENV_INDEX])
    status = os.fdopen(int(os.environ[ENV_STATUS_FD]), "w", buffering=1)
    status_lock = threading.Lock()

    def report(event: str, **fields: Any) -> None:
        with status_lock, contextlib.suppress(OSError):  # the supervisor may be gone
            status.write(json.dumps({"event": event, **fields}) + "\n")
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format, worker=index)
    # Ctrl-C reaches the whole process group; the supervisor drains its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()  # drain: refuse new calls, let those in flight finish
    close = threading.Event()  # every worker of the pod is idle: close the listener

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        set_from_signal(stop, close)  # a worker signalled on its own drains on its own

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        prepare_process(settings, 1)
        from prometheus_client import Counter

        from lossd_server import metric_files
        from lossd_server.app import create_server, load_plugins
        from lossd_server.metrics import (
            Metrics,
            SharedTags,
            TagPolicy,
            ValueWriter,
            parse_buckets,
        )

        metric_files.install()  # before the first metric value is created

        load_plugins(settings)  # before the metrics, so plugin losses start at zero too
        metrics = Metrics(loss_buckets=parse_buckets(settings.loss_buckets),
                          tags=TagPolicy(allow=settings.tags.split(","),
                                         max_tags=settings.max_tags,
                                         max_tag_length=settings.max_tag_length,
                                         shared=SharedTags(os.path.join(
                                             os.environ[MULTIPROC_ENV], "tags"))),
                          process=False, worker=str(index))
        metric_files.count_drops(ValueWriter(Counter(
            "lossd_metric_series_dropped", "Metric series a worker process could not "
            "store: their file could not grow (the metrics filesystem is full).",
            registry=metrics.registry)))
        server = create_server(settings, metrics=metrics, reuse_port=True)
        server.stall_listeners.append(lambda stalled: report("stalled") if stalled else None)
        server.start(serving=False)
    except (ValueError, OSError) as exc:
        print(f"lossd: worker {index}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report("ready", pid=os.getpid(), device=str(server.engine.device))

    def beat() -> None:
        interval = settings.heartbeat_seconds * HEARTBEAT_FRACTION
        while not close.wait(interval):
            report("beat")

    if settings.heartbeat_seconds > 0:
        threading.Thread(target=beat, name="lossd-heartbeat", daemon=True).start()

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
    report("idle")
    close.wait(max(0.0, deadline - time.monotonic()))
    server.close(max(0.0, deadline - time.monotonic()))
    return 0
