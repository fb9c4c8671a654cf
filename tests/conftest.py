"""Fixtures: real lossd servers on free loopback ports, and clients to them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import IO, Any

import pytest
import torch

from lossd import LossClient
from lossd_server.app import LossdServer, create_server
from lossd_server.settings import Settings

HAS_CUDA = torch.cuda.is_available()


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


def start_server(**overrides: object) -> LossdServer:
    """A started server on 127.0.0.1 with a free gRPC port and no metrics port by default."""
    values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1,
                                 "device": "cpu"}
    values.update(overrides)
    return create_server(Settings(**values)).start()  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server() -> Iterator[LossdServer]:
    srv = start_server()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="session")
def client(server: LossdServer) -> Iterator[LossClient]:
    with LossClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def gpu_server() -> Iterator[LossdServer]:
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    srv = start_server(device="cuda")
    yield srv
    srv.stop(0)


@pytest.fixture(scope="session")
def gpu_client(gpu_server: LossdServer) -> Iterator[LossClient]:
    with LossClient(f"127.0.0.1:{gpu_server.port}", timeout=120) as c:
        yield c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
