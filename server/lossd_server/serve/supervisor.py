"""``lossd serve --processes N`` (N > 1): a :class:`Supervisor` runs N worker processes on
one port, as grpc's multiprocessing example does.

It reserves the port (a socket bound with SO_REUSEPORT that it holds for its whole life, so
the port is never free for another program, even while every worker restarts) and starts
each worker as a fresh interpreter (:mod:`lossd_server.serve.worker`) that binds the same
port with SO_REUSEPORT. The kernel spreads incoming connections over the workers; every
call rides a connection, so the calls of one client channel go to one worker. What callers
rely on holds across processes:

* **metrics**: workers run prometheus-client's multiprocess mode (their values live in
  files under a directory of the supervisor's), and the supervisor serves the one
  ``/metrics`` endpoint: counters and histograms summed over every worker that ever ran
  (a restart loses nothing), gauges combined as each declares, per-process figures
  (``process_*``, ``lossd_worker_up``, ``lossd_worker_restarts_total``) with a ``worker``
  label. The tag bound (``--max-tags``) holds for the pod (``metrics.SharedTags``).
* **health**: SERVING only while every worker is ready (warmed up, not draining). The
  supervisor tells each worker the pod's state, and serves ``--health-port`` itself
  (:class:`lossd_server.health.Health`, as one server does).
* **faults**: a worker that dies is logged and restarted, with a backoff that grows while
  it keeps dying; its callers see UNAVAILABLE for the calls that were on it (clients
  retry) and the port stays reserved. A worker that fails before it first becomes ready
  is a configuration error: everything stops and ``lossd serve`` exits 2.
* **stuck and frozen workers**: a worker whose heartbeat is ``--heartbeat-seconds`` late
  (stopped, wedged) or whose compute watchdog reports stuck work (``--stall-seconds``) is
  marked down (``lossd_worker_up`` 0, pod health NOT_SERVING), killed, and restarted as a
  dead one is (``lossd_worker_replaced_total`` counts them, by reason).
* **a killed supervisor**: the kernel sends each worker SIGTERM (they drain and exit), and
  the last process out of the metrics directory removes it (``host.make_pod_directory``).
* **drain**: SIGTERM or SIGINT drains every worker within ``--grace-seconds``: each
  refuses new calls with UNAVAILABLE and lets its calls in flight finish, and every
  listener stays open until the whole pod is idle (a worker that closed early would have
  the kernel reset the connections it still hands that worker). The supervisor then tells
  all to close and exits 0 once all have finished.

The supervisor never touches a device and never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from lossd_server.serve.host import (
    EXIT_CONFIG,
    device_list,
    leave_pod_directory,
    make_pod_directory,
    torch_threads,
)
from lossd_server.serve.worker import ENV_INDEX, ENV_PARENT, ENV_STATUS_FD, MULTIPROC_ENV
from lossd_server.settings import Settings

if TYPE_CHECKING:
    from lossd_server.health import Health

log = logging.getLogger("lossd")

RESTART_BACKOFF = (1.0, 30.0)
"""A dead worker is restarted after 1 s, doubling while it keeps dying, at most 30 s."""
STABLE_SECONDS = 60.0
"""A worker up this long has its restart backoff reset."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and never listening: the port
    stays this process's (and its workers') while it is open. ``port`` 0 picks a free one.

    A port some other program holds fails here, loudly, rather than being shared.
    """
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEPORT: taken?
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bare, port))
            except OSError as exc:
                raise OSError(f"cannot bind {host}:{port} ({exc.strerror}; in use?)") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port} ({exc.strerror})") from None
    return sock


@dataclasses.dataclass
class _Worker:
    """One worker slot: its current process (if any) and its history."""

    index: int
    device: str
    proc: subprocess.Popen[bytes] | None = None
    status: int = -1  # read end of its status pipe
    buffer: bytes = b""
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_BACKOFF[0]
    restart_at: float | None = None
    told: bool | None = None  # the serving state last sent to it
    idle: bool = False  # draining, done waiting for its calls (finished, or grace over)
    beat: float = 0.0  # when it last reported anything (its heartbeat)
    replaced: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> times

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    """Runs ``processes`` workers on one port; see the module docstring."""

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 2:
            raise ValueError("a supervisor runs at least 2 worker processes")
        self.settings = settings
        self.processes = processes
        devices = device_list(settings.device)
        self.workers = [_Worker(i, devices[i % len(devices)]) for i in range(processes)]
        self.threads = torch_threads(settings, processes)
        self.port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._selector = selectors.DefaultSelector()
        self._stop: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._serving = False
        self._health: Health | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        from lossd_server.security import TokenStore

        tokens = TokenStore.from_settings(s)  # a bad token file fails here, before workers
        reserved = reserve_port(s.host, s.port)
        self.port = reserved.getsockname()[1]
        directory, held = make_pod_directory()
        self.directory = directory
        http = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        log.info("lossd starting", extra={"settings": s.loggable(), "processes":
                                           self.processes, "torch_threads": self.threads})
        try:
            for w in self.workers:
                self._spawn(w)
            code = self._wait_until_ready()
            if code is not None:
                return code
            http = self._serve_metrics()
            self._health = self._serve_health()
            self._update_health()
            log.info("lossd serving", extra={
                "address": f"{s.host}:{self.port}", "metrics_port": self.metrics_port,
                "health_port": self.health_port, "processes": self.processes,
                "workers": [w.pid for w in self.workers], "torch_threads": self.threads,
                "devices": sorted({w.device for w in self.workers}),
                "tls": "mutual" if s.tls_client_ca else s.tls,
                "auth_tokens": tokens.count if tokens.enabled else 0,
                "threads": s.threads, "max_rpcs": s.rpc_limit,
                "shm_socket_dir": (s.shm_socket_dir or tempfile.gettempdir())
                if s.shared_memory else None})
            self._supervise()
            return self._drain()
        finally:
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            if self._health is not None:
                self._health.stop()
            if http is not None:
                http.shutdown()
                http.server_close()
            reserved.close()
            leave_pod_directory(directory, held)
            shutil.rmtree(directory, ignore_errors=True)  # even if a worker still holds it
            log.info("lossd stopped")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop is None:
            self._stop = signal.Signals(signum).name
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _wait_until_ready(self) -> int | None:
        """Until every worker first reports ready: None, or the exit code when one failed
        (a configuration error) or a signal came first."""
        while not all(w.ready for w in self.workers):
            self._poll(0.2)
            failed = [w for w in self.workers if w.proc is None]
            if failed or self._stop is not None:
                for w in failed:
                    log.error("worker failed to start; stopping", extra={"worker": w.index})
                self._drain()
                return EXIT_CONFIG if failed else 0
        return None

    def _supervise(self) -> None:
        """Restart workers that die, replace frozen ones, keep health current, until a
        signal."""
        late = self.settings.heartbeat_seconds
        while self._stop is None:
            self._poll(0.2)
            now = time.monotonic()
            for w in self.workers:
                if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                    self._spawn(w)
                elif late and w.ready and now - w.beat > late:
                    self._replace(w, "frozen", silent_seconds=round(now - w.beat, 1))
            self._update_health()

    def _replace(self, w: _Worker, reason: str, **fields: Any) -> None:
        """Mark ``w`` down and kill it; :meth:`_exited` restarts it as a dead one."""
        log.error("worker replaced", extra={"worker": w.index, "pid": w.pid,
                                            "reason": reason, **fields})
        w.ready = False
        w.replaced[reason] = w.replaced.get(reason, 0) + 1
        if w.proc is not None:
            w.proc.kill()  # SIGKILL ends a stopped process too

    def _drain(self) -> int:
        """Drain every worker; 0 when all finished within the grace period."""
        grace = self.settings.grace_seconds
        log.info("draining", extra={"signal": self._stop, "grace_seconds": grace,
                                    "processes": self.processes})
        self._stop = self._stop or "drain"
        self._update_health()
        for w in self.workers:
            w.restart_at = None
            self._tell(w, "drain")
        deadline = time.monotonic() + grace + 10.0
        closed = False
        while any(w.proc is not None for w in self.workers):
            if not closed and all(w.idle or w.proc is None for w in self.workers):
                for w in self.workers:  # the pod is idle: every listener closes now
                    self._tell(w, "close")
                closed = True
            if time.monotonic() > deadline:
                for w in self.workers:
                    if w.proc is not None:
                        log.error("worker still running after the grace period; killed",
                                  extra={"worker": w.index, "pid": w.pid})
                        w.proc.kill()
                        w.proc.wait()
                        self._gone(w)
                return 1
            self._poll(0.2)
        return 0

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        read, write = os.pipe()
        env = {**os.environ, **self.settings.to_env(), ENV_PARENT: str(os.getpid()),
               "LOSSD_PORT": str(self.port), "LOSSD_METRICS_PORT": "-1",
               "LOSSD_HEALTH_PORT": "-1", "LOSSD_PROCESSES": "1", "LOSSD_DEVICE": w.device,
               "LOSSD_TORCH_THREADS": str(self.threads), MULTIPROC_ENV: self.directory,
               ENV_INDEX: str(w.index), ENV_STATUS_FD: str(write)}
        try:
            w.proc = subprocess.Popen([sys.executable, "-m", "lossd_server.serve", "--worker"],
                                      env=env, stdin=subprocess.PIPE, pass_fds=(write,))
        finally:
            os.close(write)
        os.set_blocking(read, False)
        w.status, w.buffer, w.ready, w.told, w.idle = read, b"", False, None, False
        w.started, w.restart_at = time.monotonic(), None
        self._selector.register(read, selectors.EVENT_READ, w)
        log.info("worker started", extra={"worker": w.index, "pid": w.pid,
                                          "device": w.device})

    def _poll(self, timeout: float) -> None:
        """Read status lines and notice exits (wakes early on a signal)."""
        for key, _ in self._selector.select(timeout):
            if key.fileobj == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            self._read_status(key.data)
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                self._read_status(w)
                self._exited(w)

    def _read_status(self, w: _Worker) -> None:
        if w.status < 0:
            return
        try:
            chunk = os.read(w.status, 65536)
        except BlockingIOError:
            return
        w.buffer += chunk
        *lines, w.buffer = w.buffer.split(b"\n")
        if lines:
            w.beat = time.monotonic()
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "stalled" and w.ready and self._stop is None:
                    self._replace(w, "stalled")
                elif event.get("event") == "ready":
                    w.ready = w.ever_ready = True
                    log.info("worker ready", extra={"worker": w.index, "pid": w.pid,
                                                    "device": event.get("device")})
                elif event.get("event") == "idle":
                    w.idle = True

    def _exited(self, w: _Worker) -> None:
        assert w.proc is not None
        code = w.proc.returncode
        draining = self._stop is not None
        how = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
        up = time.monotonic() - w.started
        if draining:
            log.info("worker stopped", extra={"worker": w.index, "pid": w.pid, "code": code})
        else:
            log.error("worker died", extra={"worker": w.index, "pid": w.pid, "how": how,
                                            "up_seconds": round(up, 1)})
        self._gone(w)
        if draining or not w.ever_ready:
            return
        if up >= STABLE_SECONDS:
            w.backoff = RESTART_BACKOFF[0]
        w.restart_at = time.monotonic() + w.backoff
        log.info("restarting worker", extra={"worker": w.index, "in_seconds": w.backoff})
        w.backoff = min(RESTART_BACKOFF[1], w.backoff * 2)
        w.restarts += 1

    def _gone(self, w: _Worker) -> None:
        from prometheus_client import multiprocess

        assert w.proc is not None
        multiprocess.mark_process_dead(w.proc.pid, self.directory)  # type: ignore[no-untyped-call]
        if w.status >= 0:
            self._selector.unregister(w.status)
            os.close(w.status)
        if w.proc.stdin is not None:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        w.proc, w.status, w.ready = None, -1, False

    def _tell(self, w: _Worker, word: str) -> None:
        stdin: IO[bytes] | None = w.proc.stdin if w.proc is not None else None
        if stdin is None:
            return
        with contextlib.suppress(OSError):  # a worker that just died reads nothing
            stdin.write(word.encode() + b"\n")
            stdin.flush()

    def _update_health(self) -> None:
        """SERVING while every worker is ready and nothing drains; each worker is told."""
        serving = self._stop is None and all(w.ready for w in self.workers)
        for w in self.workers:
            if w.ready and w.told is not serving and self._stop is None:
                self._tell(w, "serving" if serving else "not_serving")
                w.told = serving
        if serving != self._serving:
            self._serving = serving
            log.info("health", extra={"status": "SERVING" if serving else "NOT_SERVING",
                                      "ready": sum(w.ready for w in self.workers),
                                      "processes": self.processes})
        if self._health is not None:
            self._health.set_serving(serving)

    # -- the supervisor's own endpoints --------------------------------------------------

    def _serve_metrics(self) -> Any:
        s = self.settings
        if s.metrics_port < 0:
            return None
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        registry.register(_SupervisorCollector(self))
        http, _ = start_http_server(s.metrics_port, addr=s.resolved_metrics_host,
                                    registry=registry)
        self.metrics_port = http.server_port
        return http

    def _serve_health(self) -> Health | None:
        """``--health-port``: plaintext grpc.health.v1 with the pod's state."""
        s = self.settings
        if s.health_port < 0:
            return None
        from lossd_server.health import SERVICES, Health

        health = Health(SERVICES)
        self.health_port = health.bind(s.host, s.health_port)
        health.start()
        return health


class _SupervisorCollector:
    """Per-process figures of the pod: ``process_*`` of the supervisor and of every live
    worker, labelled ``worker``; ``lossd_worker_up`` and ``lossd_worker_restarts_total``."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client import ProcessCollector
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        workers = list(self.supervisor.workers)
        up = GaugeMetricFamily("lossd_worker_up", "1 while the worker process is ready, "
                               "else 0.", labels=("worker",))
        restarts = CounterMetricFamily("lossd_worker_restarts", "Times the worker process "
                                       "was restarted after it died.", labels=("worker",))
        replaced = CounterMetricFamily("lossd_worker_replaced", "Times the worker process "
                                       "was killed to be replaced, by reason: frozen (its "
                                       "heartbeat late), stalled (stuck work).",
                                       labels=("worker", "reason"))
        for w in workers:
            up.add_metric([str(w.index)], 1.0 if w.ready else 0.0)
            restarts.add_metric([str(w.index)], float(w.restarts))
            for reason in ("frozen", "stalled"):
                replaced.add_metric([str(w.index), reason], float(w.replaced.get(reason, 0)))
        yield up
        yield restarts
        yield replaced
        families: dict[str, Metric] = {}
        processes: list[tuple[str, int | str]] = [("supervisor", "self")]
        processes += [(str(w.index), w.pid) for w in workers if w.pid is not None]
        for label, pid in processes:
            collector = ProcessCollector(pid=_constant(pid), registry=None)
            for metric in collector.collect():
                family = families.setdefault(metric.name, Metric(
                    metric.name, metric.documentation, metric.type))
                for sample in metric.samples:
                    family.add_sample(sample.name, {**sample.labels, "worker": label},
                                      sample.value)
        yield from families.values()


def _constant(value: int | str) -> Any:
    return lambda: value
