"""The compute watchdog: stuck work is noticed, not waited for.

A loss that never returns (a hanging plugin, a wedged kernel) holds its compute slot
forever, and Python cannot interrupt the thread running it. So the watchdog does the one
thing that helps: it notices. A :class:`Watchdog` looks at the admission's slots every
``POLL_SECONDS``; once one has been held longer than ``--stall-seconds`` the server is
*stalled*: one error log line ("compute stalled"), ``lossd_compute_stalls_total`` counts
it, ``lossd_compute_stalled`` reads 1, and its owner is told (a server turns health
NOT_SERVING; a worker process reports it to its supervisor, which replaces the process).
When the slot comes back the stall ends ("compute recovered"), and the owner is told too.

No gRPC and no torch here: this module watches numbers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from lossd_server.limits import Admission

log = logging.getLogger("lossd")


class StallMetrics:
    """``lossd_compute_stalls_total`` and ``lossd_compute_stalled`` on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stalls = Counter("lossd_compute_stalls", "Times a compute slot was held longer "
                              "than --stall-seconds (stuck work).", registry=registry)
        self.stalled = Gauge("lossd_compute_stalled", "1 while a compute slot is held longer "
                             "than --stall-seconds, else 0.", registry=registry,
                             multiprocess_mode="livemax")


class Watchdog:
    """Watches ``admission``: a slot held over ``bound`` seconds is a stall; each change
    (stalled, recovered) calls ``on_change(stalled)`` from the watchdog's thread."""

    POLL_SECONDS = 0.25  # noticed within bound + this

    def __init__(self, admission: Admission, bound: float,
                 on_change: Callable[[bool], None], metrics: StallMetrics | None = None
                 ) -> None:
        if bound <= 0:
            raise ValueError("a watchdog's bound is positive")
        self.admission = admission
        self.bound = bound
        self.on_change = on_change
        self.metrics = metrics
        self.stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch from a daemon thread (it must never keep a process from exiting)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lossd-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            self.check()

    def check(self) -> bool:
        """Look once (the thread's step, public for tests); returns whether stalled."""
        held = self.admission.longest_hold()
        stalled = held > self.bound
        if stalled != self.stalled:
            self.stalled = stalled
            if stalled:
                log.error("compute stalled", extra={
                    "held_seconds": round(held, 1), "stall_seconds": self.bound,
                    "running": self.admission.running, "waiting": self.admission.waiting})
            else:
                log.warning("compute recovered", extra={"stall_seconds": self.bound})
            if self.metrics is not None:
                if stalled:
                    self.metrics.stalls.inc()
                self.metrics.stalled.set(1 if stalled else 0)
            self.on_change(stalled)
        return stalled
