"""``lossd serve``: the server in this process, or N serving processes under a supervisor.

    lossd serve                          # --processes auto
    lossd serve --processes 4 --port 50051
    python -m lossd_server.serve --processes 1

With ``--processes 1`` the server runs in this process (:func:`serve_single`): build,
start, wait for SIGTERM or SIGINT, drain within ``--grace-seconds``, exit 0.

With ``--processes N`` (N > 1) a :class:`Supervisor` runs N worker processes on one port,
as grpc's multiprocessing example does: it reserves the port (a socket bound with
SO_REUSEPORT that it holds for its whole life, so the port is never free for another
program, even while every worker restarts) and starts each worker as a fresh interpreter
(``python -m lossd_server.serve --worker``) that binds the same port with SO_REUSEPORT.
The kernel spreads incoming connections over the workers; every call rides a connection,
so the calls of one client channel go to one worker. What callers rely on holds across
processes:

* **metrics**: workers run prometheus-client's multiprocess mode (their values live in
  files under a directory of the supervisor's), and the supervisor serves the one
  ``/metrics`` endpoint: counters and histograms summed over every worker that ever ran
  (a restart loses nothing), gauges combined as each declares, per-process figures
  (``process_*``, ``lossd_worker_up``, ``lossd_worker_restarts_total``) with a ``worker``
  label. The tag bound (``--max-tags``) holds for the pod (``metrics.SharedTags``).
* **health**: SERVING only while every worker is ready (warmed up, not draining). The
  supervisor tells each worker the pod's state, and serves ``--health-port`` itself.
* **faults**: a worker that dies is logged and restarted, with a backoff that grows while
  it keeps dying; its callers see UNAVAILABLE for the calls that were on it (clients
  retry) and the port stays reserved. A worker that fails before it first becomes ready
  is a configuration error: everything stops and ``lossd serve`` exits 2.
* **drain**: SIGTERM or SIGINT drains every worker within ``--grace-seconds``: each
  refuses new calls with UNAVAILABLE and lets its calls in flight finish, and every
  listener stays open until the whole pod is idle (a worker that closed early would have
  the kernel reset the connections it still hands that worker). The supervisor then tells
  all to close and exits 0 once all have finished.

Supervisor and worker talk over two pipes: the worker's stdin carries one word a line
(``serving``, ``not_serving``, ``drain``, ``close``; end of file, the supervisor gone,
drains and closes too) and a pipe named by ``LOSSD_WORKER_STATUS_FD`` carries JSON lines
back (``{"event": "ready", ...}``, ``{"event": "idle"}``).

This module is the top of the server's dependency graph: nothing in the server imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import lossd
from lossd_server import logs
from lossd_server import settings as settings_mod
from lossd_server.settings import Settings

if TYPE_CHECKING:
    from lossd_server.app import LossdServer

log = logging.getLogger("lossd")

GPU_PROCESSES = 4
"""``--processes auto`` on a GPU host: worker processes per GPU."""
ENV_INDEX = "LOSSD_WORKER_INDEX"
ENV_STATUS_FD = "LOSSD_WORKER_STATUS_FD"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF = (1.0, 30.0)
"""A dead worker is restarted after 1 s, doubling while it keeps dying, at most 30 s."""
STABLE_SECONDS = 60.0
"""A worker up this long has its restart backoff reset."""
EXIT_CONFIG = 2


# ---------------------------------------------------------------------------------------
# The command


def add_command(subparsers: Any) -> None:
    """Add ``serve`` to the ``lossd`` command (entry point group ``lossd.commands``)."""
    parser = subparsers.add_parser(
        "serve", help="run the gRPC server",
        description="Run the lossd gRPC server. Every flag can also be set through the "
                    "LOSSD_* environment variable named in its help; a flag wins.")
    settings_mod.add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``lossd serve`` with parsed flags: a worker, one process, or a supervisor."""
    if getattr(args, "worker", False):
        code = _worker()
        # Skip the interpreter's teardown: garbage-collecting torch takes seconds, and the
        # server has stopped and every log line is out.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if importlib.util.find_spec("torch") is None:
        print("lossd serve: torch is not installed; in a lossd checkout: pip install "
              "'.[server]' (or the wheel of make dist: pip install "
              f"'dist/lossd-{lossd.__version__}-py3-none-any.whl[server]'); see "
              "docs/install.md", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = settings_mod.from_args(args)
        settings.check()
        processes = resolve_processes(settings)
    except ValueError as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level, settings.log_format)
    try:
        if processes == 1:
            return serve_single(settings)
        return Supervisor(settings, processes).run()
    except (ValueError, OSError) as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lossd_server.serve [flags]``: the same as ``lossd serve [flags]``."""
    parser = argparse.ArgumentParser(prog="lossd")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args))


# ---------------------------------------------------------------------------------------
# How many processes, on which devices


def available_cpus() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup CPU quota (a
    Kubernetes CPU limit), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without initialising CUDA (the supervisor never
    touches a device): ``CUDA_VISIBLE_DEVICES`` when set, else the driver's device list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):  # CUDA stops at the first invalid entry
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _device_list(device: str) -> list[str]:
    """The devices workers spread over: a given list, every visible GPU for ``cuda`` or
    ``auto`` on a multi-GPU host, else the one device."""
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    if device in ("auto", "cuda") and visible_gpus() > 1:
        return [f"cuda:{i}" for i in range(visible_gpus())]
    return [device]


def resolve_processes(settings: Settings) -> int:
    """``--processes``: a number, or ``auto``: the CPU cores available on a CPU host,
    ``GPU_PROCESSES`` per GPU on a GPU host (each worker holds its own CUDA context)."""
    if settings.processes != "auto":
        return int(settings.processes)
    devices = _device_list(settings.device)
    on_gpu = any(d.startswith("cuda") for d in devices) or (
        settings.device == "auto" and visible_gpus() > 0)
    return GPU_PROCESSES * len(devices) if on_gpu else available_cpus()


def torch_threads(settings: Settings, processes: int) -> int:
    """Intra-op threads of each process: ``--torch-threads``, or the cores divided among
    the processes (N processes of all-core thread pools would fight over the cores)."""
    return settings.torch_threads or max(1, available_cpus() // processes)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_allocator() -> bool:
    """Make glibc keep and reuse freed memory: large requests then reuse warm pages instead
    of faulting in fresh ones (about 3 us per 4 KiB page on the VMs measured, 25-55 ms per
    32-64 MiB request). Must run before the server starts its threads. Returns whether it
    applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        return False


def _prepare_process(settings: Settings, processes: int) -> None:
    """Process-wide set-up of a serving process, before any server thread starts."""
    if settings.malloc_reuse:
        tune_allocator()
    import torch

    torch.set_num_threads(torch_threads(settings, processes))


# ---------------------------------------------------------------------------------------
# One process


def serve_single(settings: Settings) -> int:
    """Serve in this process until SIGTERM/SIGINT, then drain for ``grace_seconds``."""
    _prepare_process(settings, 1)
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
        log.info("draining", extra={"signal": got[-1], "grace_seconds": settings.grace_seconds})
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopped.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    return got[0]


# ---------------------------------------------------------------------------------------
# The supervisor


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
        devices = _device_list(settings.device)
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
        self._health: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        from lossd_server.security import TokenStore

        tokens = TokenStore.from_settings(s)  # a bad token file fails here, before workers
        reserved = reserve_port(s.host, s.port)
        self.port = reserved.getsockname()[1]
        directory = tempfile.mkdtemp(prefix="lossd-metrics-")
        self.directory = directory
        http = health_server = None
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
            health_server = self._serve_health()
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
            if health_server is not None:
                health_server.stop(0).wait()
            if http is not None:
                http.shutdown()
                http.server_close()
            reserved.close()
            shutil.rmtree(directory, ignore_errors=True)
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
        """Restart workers that die, keep health current, until a signal."""
        while self._stop is None:
            self._poll(0.2)
            now = time.monotonic()
            for w in self.workers:
                if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                    self._spawn(w)
            self._update_health()

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
        env = {**os.environ, **self.settings.to_env(),
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
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "ready":
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
            from grpc_health.v1 import health_pb2

            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in self._health_names:
                self._health.set(name, status)

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

    def _serve_health(self) -> Any:
        """``--health-port``: plaintext grpc.health.v1 with the pod's state."""
        s = self.settings
        if s.health_port < 0:
            return None
        from concurrent import futures

        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        from lossd.kserve.v2 import grpc_service_pb2
        from lossd.v1 import loss_service_pb2

        self._health_names = ("", loss_service_pb2.DESCRIPTOR.services_by_name[
            "LossService"].full_name, grpc_service_pb2.DESCRIPTOR.services_by_name[
            "GRPCInferenceService"].full_name)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                        thread_name_prefix="lossd-health"),
                             options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{s.host}:{s.health_port}"
        self.health_port = server.add_insecure_port(address)
        if not self.health_port:
            raise OSError(f"cannot bind {address} (in use?)")
        server.start()
        return server


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
        for w in workers:
            up.add_metric([str(w.index)], 1.0 if w.ready else 0.0)
            restarts.add_metric([str(w.index)], float(w.restarts))
        yield up
        yield restarts
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


# ---------------------------------------------------------------------------------------
# A worker


def _worker() -> int:
    """A worker process: serve on the shared port, as the supervisor says."""
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
        _prepare_process(settings, 1)
        from lossd_server.app import create_server, load_plugins
        from lossd_server.metrics import Metrics, SharedTags, TagPolicy, parse_buckets

        load_plugins(settings)  # before the metrics, so plugin losses start at zero too
        metrics = Metrics(loss_buckets=parse_buckets(settings.loss_buckets),
                          tags=TagPolicy(allow=settings.tags.split(","),
                                         max_tags=settings.max_tags,
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


if __name__ == "__main__":
    raise SystemExit(main())
