"""Fixtures: real lossd servers on free loopback ports, and clients to them; the example
plugin (examples/plugin), installed for the tests that need it and nowhere else."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd import LossClient
from lossd_server import plugins
from lossd_server.app import LossdServer, create_server
from lossd_server.catalogue import LOSSES
from lossd_server.settings import Settings

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "examples" / "plugin"


def metric_value(port: int, name: str, **labels: str) -> float:
    """One sample of a server's /metrics on 127.0.0.1:``port`` (KeyError if absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError(name, labels)


class EngineBlocker:
    """Holds every evaluation of ``engine`` until ``release`` is set, counting arrivals.

    ``must_release``: an evaluation whose wait times out (30 s) fails instead of running.
    """

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch, *,
                 must_release: bool = True) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()
        real = engine.evaluate

        def blocked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.entered += 1
            released = self.release.wait(30)
            assert released or not must_release
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "evaluate", blocked)


def read_json_logs_until_serving(stream: IO[str]) -> list[dict[str, Any]]:
    """JSON log lines of a ``lossd serve`` process, up to its "lossd serving" line."""
    lines: list[dict[str, Any]] = []
    for raw in stream:
        lines.append(json.loads(raw))
        if lines[-1]["msg"] == "lossd serving":
            break
    return lines


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def health(port: int, service: str = "lossd.v1.LossService") -> int:
    """The grpc.health.v1 status a server on 127.0.0.1:``port`` reports for ``service``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status)


Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs, targets, torch's losses


def batch(seed: int, n: int = 64, c: int = 10) -> Batch:
    """Logits, labels and their cross-entropy per sample (torch's, as the reference)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)).astype(np.float32)
    t = rng.integers(0, c, n)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                             reduction="none").numpy()
    return x, t, want


def held_stream(address: str, cases: list[Batch], go_on: threading.Event,
                answered: threading.Semaphore) -> list[np.ndarray]:
    """An ``evaluate_stream`` of ``cases`` that is in flight by construction: it sends the
    first batch, releases ``answered`` once that batch is answered, and sends the rest
    only after ``go_on`` is set. Returns every batch's per-sample losses."""
    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield cases[0][:2]
        assert go_on.wait(30)
        for x, t, _ in cases[1:]:
            yield x, t

    out = []
    with LossClient(address, timeout=60) as client:
        for r in client.evaluate_stream(batches()):
            out.append(r.per_sample)
            if len(out) == 1:
                answered.release()
    return out


class ServeProcess:
    """``lossd serve --port 0`` in a subprocess with JSON logs, once it logged "lossd
    serving"; ``lines`` are its log records (read by a thread as they come), ``port`` and
    ``metrics_port`` what it bound."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> None:
        full = {k: v for k, v in os.environ.items() if k != "LOSSD_AUTH_TOKENS"}
        full.update(LOSSD_LOG_FORMAT="json", LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1",
                    LOSSD_PORT="0")
        full.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "lossd._cli", "serve", *args],
                                     env=full, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(timeout):
            self.kill()
            raise AssertionError(f"not serving after {timeout} s: {self.lines}")
        serving = self.record("lossd serving")
        self.port = int(str(serving["address"]).rsplit(":", 1)[1])
        self.metrics_port: int | None = serving.get("metrics_port")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:  # a line that is not a log record (a crash's traceback)
                self.lines.append({"msg": raw.rstrip("\n"), "raw": True})
                continue
            if self.lines[-1]["msg"] == "lossd serving":
                self._serving.set()
        self._serving.set()  # the process ended; the waiter sees no "lossd serving"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def records(self, msg: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x["msg"] == msg]

    def record(self, msg: str) -> dict[str, Any]:
        found = self.records(msg)
        assert found, (msg, self.lines)
        return found[0]

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def sigterm_with_streams_in_flight(serve: ServeProcess, streams: int,
                                   while_draining: Callable[[], None],
                                   exit_within: float) -> None:
    """SIGTERM to ``serve`` with ``streams`` EvaluateStreams in flight, each by construction
    (:func:`held_stream`: its first batch answered, its other two sent only after the
    signal). Checks health turns NOT_SERVING, runs ``while_draining`` (a new call's
    refusal), checks the process is still draining, then that every stream completes with
    torch's losses and the process exits 0 within ``exit_within`` seconds. The process is
    killed on the way out, however this ends; its log is the caller's to check."""
    signalled = threading.Event()
    answered = threading.Semaphore(0)
    cases = [[batch(100 * i + j) for j in range(3)] for i in range(streams)]
    try:
        with futures.ThreadPoolExecutor(streams) as pool:
            calls = [pool.submit(held_stream, serve.address, cases[i], signalled, answered)
                     for i in range(streams)]
            for _ in range(streams):
                assert answered.acquire(timeout=60)
            serve.signal(signal.SIGTERM)
            wait_for(lambda: health(serve.port)
                     == health_pb2.HealthCheckResponse.NOT_SERVING)
            while_draining()
            assert serve.proc.poll() is None  # still draining: the streams are open
            signalled.set()
            for i, call in enumerate(calls):
                got = call.result(60)
                assert len(got) == 3
                for per_sample, (_, _, want) in zip(got, cases[i], strict=True):
                    np.testing.assert_allclose(per_sample, want, rtol=1e-6)
        assert serve.wait(exit_within) == 0
    finally:
        signalled.set()
        serve.kill()


def start_server(**overrides: object) -> LossdServer:
    """A started server on 127.0.0.1 with a free gRPC port and no metrics port by default."""
    values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1,
                                 "device": "cpu"}
    values.update(overrides)
    return create_server(Settings(**values)).start()  # type: ignore[arg-type]


def served(**overrides: object) -> Iterator[LossdServer]:
    """A server fixture's body (``yield from served(...)``): ``start_server(**overrides)``
    for the fixture's scope, stopped at its end."""
    srv = start_server(**overrides)
    yield srv
    srv.stop(0)


def connected(srv: LossdServer, timeout: float = 60) -> Iterator[LossClient]:
    """A client fixture's body (``yield from connected(srv)``): a ``LossClient`` to ``srv``
    for the fixture's scope, closed at its end."""
    with LossClient(f"127.0.0.1:{srv.port}", timeout=timeout) as c:
        yield c


@pytest.fixture(scope="session")
def server() -> Iterator[LossdServer]:
    yield from served()


@pytest.fixture(scope="session")
def client(server: LossdServer) -> Iterator[LossClient]:
    yield from connected(server)


@pytest.fixture(scope="session")
def address(server: LossdServer) -> str:
    """The session server's address, for what takes one (the training integrations)."""
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def gpu_server() -> Iterator[LossdServer]:
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    yield from served(device="cuda")


@pytest.fixture(scope="session")
def gpu_client(gpu_server: LossdServer) -> Iterator[LossClient]:
    yield from connected(gpu_server, timeout=120)


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """Whatever is registered or loaded inside is gone afterwards: losses, loaded plugins
    and the plugin modules imported (``testplugin_*``, the example plugin). The registry is
    per process, so this keeps one test's plugins out of every later server."""
    losses = dict(LOSSES._losses)
    loaded = dict(plugins._loaded)
    modules = set(sys.modules)
    try:
        yield
    finally:
        LOSSES._losses = losses
        plugins._loaded.clear()
        plugins._loaded.update(loaded)
        for name in set(sys.modules) - modules:
            if name.startswith(("testplugin_", "lossd_example_plugin")):
                del sys.modules[name]


@pytest.fixture(scope="session")
def example_plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed into a directory of its own, once per session: on
    ``PYTHONPATH`` (or ``sys.path``) its entry point is found as an installed package's is.
    It is never installed into .venv, whose ``lossd serve`` must serve only what the user
    installs (a user's own ``charbonnier`` would clash with it). Installed from a copy, so
    that the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("example-plugin")
    source, target = work / "src", work / "site"
    shutil.copytree(EXAMPLE_PLUGIN, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target),
         str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


@pytest.fixture(scope="module")
def example_plugin(example_plugin_dir: Path) -> Iterator[Path]:
    """The example plugin loaded into this process for one test module, as a server loads
    an installed plugin (its entry point, with ``example_plugin_dir`` on ``sys.path``):
    every server of the process serves its losses until the module ends, then the process
    forgets it. Yields the directory, for the ``PYTHONPATH`` of ``lossd serve``."""
    with restored_registry():
        sys.path.insert(0, str(example_plugin_dir))
        try:
            plugins.load([], entry_points=True)
        finally:
            sys.path.remove(str(example_plugin_dir))
        assert {"charbonnier", "knowledge_distillation"} <= set(LOSSES)
        yield example_plugin_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
