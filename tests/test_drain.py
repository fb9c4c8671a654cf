"""Graceful drain: SIGTERM/SIGINT (or ``stop(grace)``) turns health NOT_SERVING, refuses new
calls with UNAVAILABLE, lets in-flight calls finish within the grace period, then exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

import lossd
from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from tests.conftest import (
    EngineBlocker,
    ServeProcess,
    batch,
    health,
    sigterm_with_streams_in_flight,
    start_server,
    wait_for,
)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def test_sigterm_with_32_calls_in_flight_completes_them_all_and_exits_0() -> None:
    """32 calls in flight when SIGTERM arrives: each is an EvaluateStream that has had its
    first batch answered and sends its remaining two only after the signal, so every one
    is in flight at that moment by construction (the server logs how many it counted)."""
    serve = ServeProcess("--processes", "1", "--workers", "40", "--max-waiting", "32",
                         "--grace-seconds", "30")
    sigterm_with_streams_in_flight(serve, 32, lambda: assert_refused_as_draining(serve.port),
                                   exit_within=30)
    assert serve.record("draining")["signal"] == "SIGTERM"
    assert serve.record("drain started")["in_flight"] == 32
    assert serve.lines[-1]["msg"] == "lossd stopped"


def test_sigint_drains_too() -> None:
    serve = ServeProcess("--processes", "1", "--grace-seconds", "10")
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
