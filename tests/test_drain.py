"""Graceful drain: SIGTERM/SIGINT (or ``stop(grace)``) turns health NOT_SERVING, refuses new
calls with UNAVAILABLE, lets in-flight calls finish within the grace period, then exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from tests.conftest import EngineBlocker, start_server

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=5).status)


def batch(seed: int, n: int = 64, c: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and their cross-entropy per sample (torch's, as the reference)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)).astype(np.float32)
    t = rng.integers(0, c, n)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                             reduction="none").numpy()
    return x, t, want


def assert_refused_as_draining(port: int) -> None:
    """A new call gets UNAVAILABLE: at once from a bare stub, after retries from a client."""
    x, t, _ = batch(0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.LossServiceStub(ch).ListLosses(pb.ListLossesRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (exc.value.details() or "")
    with LossClient(f"127.0.0.1:{port}", timeout=10) as client, \
            pytest.raises(lossd.Unavailable) as err:
        client.evaluate(x, t)
    assert "draining" in err.value.message and "retries exhausted" in err.value.message
    assert err.value.attempts == 5


# ---------------------------------------------------------------------------------------
# In process: stop(grace)


def Blocker(engine: Any, monkeypatch: pytest.MonkeyPatch) -> EngineBlocker:
    """Holds every evaluation until released; one left waiting past 30 s still runs."""
    return EngineBlocker(engine, monkeypatch, must_release=False)


def test_stop_lets_in_flight_calls_finish_and_refuses_new_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(concurrency=2, max_waiting=8)
    blocker = Blocker(srv.engine, monkeypatch)
    cases = [batch(i) for i in range(8)]
    with LossClient(f"127.0.0.1:{srv.port}", timeout=30) as client, \
            futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(client.evaluate, x, t) for x, t, _ in cases]
        wait_for(lambda: blocker.entered == 2 and srv.admission.waiting == 6)
        stopper = threading.Thread(target=srv.stop, args=(30,))
        stopper.start()
        wait_for(lambda: srv.gate is not None and srv.gate.draining)
        assert health(srv.port) == NOT_SERVING  # probes stay answered while draining
        assert_refused_as_draining(srv.port)
        assert stopper.is_alive()  # still waiting for the 8 calls
        blocker.release.set()
        for call, (_, _, want) in zip(calls, cases, strict=True):
            np.testing.assert_allclose(call.result(30).per_sample, want, rtol=1e-6)
        stopper.join(30)
        assert not stopper.is_alive()


def test_calls_still_running_when_the_grace_period_ends_are_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server()
    blocker = Blocker(srv.engine, monkeypatch)
    x, t, _ = batch(1)
    with LossClient(f"127.0.0.1:{srv.port}", timeout=30, retry_attempts=1) as client, \
            futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.evaluate, x, t)
        wait_for(lambda: blocker.entered == 1)
        start = time.monotonic()
        srv.stop(0.5)
        assert time.monotonic() - start < 5
        with pytest.raises(lossd.LossdError) as exc:
            call.result(10)
        assert exc.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        blocker.release.set()


# ---------------------------------------------------------------------------------------
# A real `lossd serve` process and a real signal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``lossd serve`` in a subprocess with JSON logs; ``lines`` are its log records."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "LOSSD_AUTH_TOKENS"}
        env.update(LOSSD_LOG_FORMAT="json", LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lossd_server.cli", "serve", "--port", str(self.port),
             *args], env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._serving.wait(60), self.lines

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(json.loads(raw))
            if self.lines[-1]["msg"] == "lossd serving":
                self._serving.set()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def record(self, msg: str) -> dict[str, Any]:
        return next(x for x in self.lines if x["msg"] == msg)


def test_sigterm_with_32_calls_in_flight_completes_them_all_and_exits_0() -> None:
    """32 calls in flight when SIGTERM arrives: each is an EvaluateStream that has had its
    first batch answered and sends its remaining two only after the signal, so every one
    is in flight at that moment by construction (the server logs how many it counted)."""
    serve = Serve("--workers", "40", "--max-waiting", "32", "--grace-seconds", "30")
    signalled = threading.Event()
    answered = threading.Semaphore(0)
    cases = [[batch(100 * i + j) for j in range(3)] for i in range(32)]

    def stream(i: int) -> list[np.ndarray]:
        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield cases[i][0][:2]
            assert signalled.wait(30)
            for x, t, _ in cases[i][1:]:
                yield x, t

        out = []
        with LossClient(f"127.0.0.1:{serve.port}", timeout=60) as client:
            for r in client.evaluate_stream(batches()):
                out.append(r.per_sample)
                if len(out) == 1:
                    answered.release()
        return out

    try:
        with futures.ThreadPoolExecutor(32) as pool:
            calls = [pool.submit(stream, i) for i in range(32)]
            for _ in range(32):
                assert answered.acquire(timeout=60)
            serve.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health(serve.port) == NOT_SERVING)
            assert_refused_as_draining(serve.port)
            assert serve.proc.poll() is None  # still draining: 32 streams are open
            signalled.set()
            for i, call in enumerate(calls):
                got = call.result(60)
                assert len(got) == 3
                for per_sample, (_, _, want) in zip(got, cases[i], strict=True):
                    np.testing.assert_allclose(per_sample, want, rtol=1e-6)
        assert serve.wait(30) == 0
    finally:
        signalled.set()
        serve.kill()
    assert serve.record("draining")["signal"] == "SIGTERM"
    assert serve.record("drain started")["in_flight"] == 32
    assert serve.lines[-1]["msg"] == "lossd stopped"


def test_sigint_drains_too() -> None:
    serve = Serve("--grace-seconds", "10")
    try:
        x, t, want = batch(7)
        with LossClient(f"127.0.0.1:{serve.port}", timeout=30) as client:
            np.testing.assert_allclose(client.evaluate(x, t).per_sample, want, rtol=1e-6)
        serve.proc.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0
    finally:
        serve.kill()
    assert serve.record("draining")["signal"] == "SIGINT"
    assert serve.record("drain started")["in_flight"] == 0
