"""The native front (``lossd_server.native``): gRPC C++ carries the calls, lossd's Python
handlers answer them. The rest of the suite runs on it (``--front auto``, the default);
these tests cover what is its own: the build, the fallback, the bounds gRPC C++ enforces
for a call's first message, the dispatcher's spill, and the same answers on both fronts.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from lossd import LossClient
from lossd_server import native
from lossd_server.app import LossdServer, create_server
from lossd_server.native import NativeServer, NativeUnavailable
from lossd_server.settings import Settings
from tests.conftest import EngineBlocker, batch, metric_value, served, start_server, wait_for

EVALUATE = "/lossd.v1.LossService/Evaluate"


def _unavailable() -> str:
    try:
        native.load()
    except NativeUnavailable as exc:
        return str(exc).splitlines()[0]
    return ""


# Where gRPC C++ cannot be built (`make test` installs it as root), say what to install.
UNAVAILABLE = _unavailable()
needs_native = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"native front: {UNAVAILABLE}")


@pytest.fixture(scope="module", params=[pytest.param("native", marks=needs_native), "grpcio"])
def front_server(request: pytest.FixtureRequest) -> Iterator[LossdServer]:
    yield from served(front=request.param, metrics_port=0)


def unsent(address: str, n: int) -> tuple[list[grpc.Future], threading.Event, grpc.Channel]:
    """``n`` Evaluate calls that open and never send their request message."""
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait()
        return
        yield b""  # a generator that yields nothing

    ch = grpc.insecure_channel(address)
    calls = [ch.stream_unary(EVALUATE).future(never(), timeout=60) for _ in range(n)]
    return calls, release, ch


# ---- the build -------------------------------------------------------------------------


@needs_native
def test_the_module_is_built_once_and_cached(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_NATIVE_CACHE", str(tmp_path))
    path = native.build()
    assert path.is_relative_to(tmp_path) and path.stat().st_size > 0
    built = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == built


def test_a_machine_without_a_compiler_is_told_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(NativeUnavailable, match="apt-get install g\\+\\+ pkg-config "
                                                "libgrpc\\+\\+-dev"):
        native.build(force=True)
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_auto_falls_back_to_grpcio_saying_why_and_native_fails_loudly(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unavailable() -> None:
        raise NativeUnavailable("no gRPC C++ here")

    monkeypatch.setattr(native, "load", unavailable)
    settings = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "device": "cpu"}
    with caplog.at_level(logging.WARNING, logger="lossd"):
        srv = create_server(Settings(**settings, front="auto"))  # type: ignore[arg-type]
    try:
        assert isinstance(srv.server, grpc.Server) and not isinstance(srv.server, NativeServer)
    finally:
        srv.close()
    assert any("native front unavailable" in r.getMessage() for r in caplog.records)
    with pytest.raises(NativeUnavailable, match="no gRPC C\\+\\+ here"):
        create_server(Settings(**settings, front="native"))  # type: ignore[arg-type]


@needs_native
def test_auto_serves_on_the_native_front_where_it_builds() -> None:
    srv = start_server()
    try:
        assert isinstance(srv.server, NativeServer)
    finally:
        srv.stop(0)


# ---- the same answers on both fronts ------------------------------------------------------


def test_both_fronts_answer_bit_for_bit_and_name_the_bad_field(front_server: LossdServer) -> None:
    address = f"127.0.0.1:{front_server.port}"
    x, t, _ = batch(3, n=40)
    big = np.random.default_rng(0).standard_normal((20_000, 10), dtype=np.float32)
    big_t = np.random.default_rng(1).integers(0, 10, 20_000)
    with LossClient(address, timeout=30) as client:
        for pred, targ in ((x, t), (big, big_t)):  # on the dispatcher, and on the pool
            got = client.evaluate(pred, targ)
            want = torch.nn.functional.cross_entropy(torch.from_numpy(pred),
                                                     torch.from_numpy(targ), reduction="none")
            assert got.per_sample.tobytes() == want.numpy().tobytes()
        with pytest.raises(lossd.LossdError) as exc:
            client.evaluate(x, np.full(len(t), 99))
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "targets" in str(exc.value)
        results = list(client.evaluate_stream((x, t) for _ in range(3)))
        assert [r.per_sample.tobytes() for r in results] == [
            client.evaluate(x, t).per_sample.tobytes()] * 3


def test_both_fronts_answer_an_unknown_method_unimplemented(front_server: LossdServer) -> None:
    address = f"127.0.0.1:{front_server.port}"
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as exc:
        ch.unary_unary("/lossd.v1.LossService/NoSuchMethod")(b"", timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_both_fronts_refuse_a_unary_call_without_its_message(front_server: LossdServer) -> None:
    address = f"127.0.0.1:{front_server.port}"
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as exc:
        ch.stream_unary(EVALUATE)(iter(()), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "exactly one request message" in (exc.value.details() or "")


# ---- what gRPC C++ bounds: a call's first message -----------------------------------------


@needs_native
def test_unsent_calls_beyond_max_receiving_are_evicted_and_counted() -> None:
    srv = start_server(front="native", max_receiving=2, message_timeout_seconds=60,
                       metrics_port=0)
    calls, release, ch = unsent(f"127.0.0.1:{srv.port}", 2)
    try:
        wait_for(lambda: metric_value(srv.metrics_port or 0, "lossd_receiving_calls") == 2)
        late, late_release, late_ch = unsent(f"127.0.0.1:{srv.port}", 1)
        # One of the two older calls ends (which one arrived first is gRPC's to say), the
        # new one waits on.
        wait_for(lambda: any(call.done() for call in calls))
        evicted, kept = sorted(calls, key=lambda call: not call.done())
        with pytest.raises(grpc.RpcError) as exc:
            evicted.result(10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-receiving" in (exc.value.details() or "")
        time.sleep(0.3)
        assert not kept.done() and not late[0].done()
        wait_for(lambda: metric_value(srv.metrics_port or 0, "lossd_message_waits_ended_total",
                                      method="Evaluate", reason="evicted") == 1)
        late_release.set()
        late_ch.close()
    finally:
        release.set()
        ch.close()
        srv.stop(0)


@needs_native
def test_an_unsent_call_ends_unavailable_after_the_message_timeout() -> None:
    srv = start_server(front="native", message_timeout_seconds=1, metrics_port=0)
    calls, release, ch = unsent(f"127.0.0.1:{srv.port}", 1)
    try:
        wait_for(lambda: metric_value(srv.metrics_port or 0, "lossd_receiving_calls") == 1)
        with pytest.raises(grpc.RpcError) as exc:
            calls[0].result(10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--message-timeout-seconds" in (exc.value.details() or "")
        wait_for(lambda: metric_value(srv.metrics_port or 0, "lossd_receiving_calls") == 0)
    finally:
        release.set()
        ch.close()
        srv.stop(0)


@needs_native
def test_a_drain_ends_unsent_calls_and_still_answers_health() -> None:
    srv = start_server(front="native")
    calls, release, ch = unsent(f"127.0.0.1:{srv.port}", 3)
    try:
        time.sleep(0.5)
        srv.drain()
        for call in calls:
            with pytest.raises(grpc.RpcError) as exc:
                call.result(10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (exc.value.details() or "")
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as probe:
            status = health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        release.set()
        ch.close()
        srv.stop(0)


# ---- the dispatcher -----------------------------------------------------------------------


@needs_native
def test_calls_go_on_while_the_dispatcher_waits_on_a_stalled_evaluation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first small call runs on the dispatcher and stalls there (held compute): the next
    calls spill to the pool, health and ListLosses are answered, and the held call ends
    with its answer once compute goes on."""
    srv = start_server(front="native", concurrency=2)
    blocker = EngineBlocker(srv.engine, monkeypatch)
    address = f"127.0.0.1:{srv.port}"
    x, t, want = batch(5)
    try:
        with LossClient(address, timeout=30) as client, \
                LossClient(address, timeout=30) as other:
            held = threading.Thread(target=client.evaluate, args=(x, t))
            held.start()
            wait_for(lambda: blocker.entered == 1)
            started = time.monotonic()
            assert other.losses()  # ListLosses, through the spill thread and the pool
            with grpc.insecure_channel(address) as probe:
                health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)
            assert time.monotonic() - started < 5
            blocker.release.set()
            held.join(30)
            np.testing.assert_allclose(other.evaluate(x, t).per_sample, want, rtol=1e-6)
    finally:
        blocker.release.set()
        srv.stop(0)


@needs_native
def test_interceptors_run_in_order_and_a_call_leaves_no_reference_cycle() -> None:
    """grpcio's order (the first interceptor outermost), and no garbage cycle per call: a
    server's calls are freed by reference counting, not left to the garbage collector."""
    seen: list[str] = []

    class Recording(grpc.ServerInterceptor):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        def intercept_service(self, continuation: Any, details: Any) -> Any:
            seen.append(self.name)
            return continuation(details)

    server = NativeServer(futures.ThreadPoolExecutor(2),
                          interceptors=[Recording("outer"), Recording("inner")])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda r, _c: r)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/t.Echo/Call")
            assert [echo(b"%d" % i, timeout=10) for i in range(20)] == [
                b"%d" % i for i in range(20)]
        gc.collect()
        ours = [o for o in gc.garbage
                if getattr(o, "__module__", "").startswith("lossd_server")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        server.stop(0)
    assert seen == ["outer", "inner"] * 20
    assert ours == []


def test_a_read_only_cache_without_a_build_is_unavailable_not_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image's LOSSD_NATIVE_CACHE on a read-only root, without this build in it: `auto`
    must fall back to grpcio, so the build says so instead of raising OSError."""
    read_only = tmp_path / "cache"
    read_only.mkdir(mode=0o555)
    monkeypatch.setenv("LOSSD_NATIVE_CACHE", str(read_only / "native"))
    if os.access(read_only, os.W_OK):  # root ignores the mode: make the parent a file
        read_only.rmdir()
        read_only.write_text("")
    with pytest.raises(NativeUnavailable, match="LOSSD_NATIVE_CACHE"):
        native.build()


# A fresh process: gRPC C++'s threads are the process's, started by its first server.
_THREAD_POLICIES = """
import os, sys, threading
from concurrent import futures
import grpc
from lossd_server.native import NativeServer

def policies():
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

before = policies()
caller = os.sched_getscheduler(0)
server = NativeServer(futures.ThreadPoolExecutor(2), yield_io_threads=sys.argv[1] == "on")
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda r, _c: r)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    assert ch.unary_unary("/t.Echo/Call")(b"x", timeout=10) == b"x"
started = {t: p for t, p in policies().items() if t not in before}
dispatcher = next(t.native_id for t in threading.enumerate() if t.name == "lossd-front")
print(server.io_yielding, os.sched_getscheduler(0) == caller == os.SCHED_OTHER,
      started[dispatcher] == os.SCHED_OTHER,
      sum(p == os.SCHED_BATCH for p in started.values()))
server.stop(0).wait(10)
"""


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_server_threads_yield_to_the_dispatcher_unless_told_not_to(mode: str) -> None:
    """With yield_io_threads the threads the server starts (gRPC C++'s, the finisher) run at
    SCHED_BATCH, so they never preempt the dispatcher, which stays at the normal policy, as
    does the thread that started the server; without it no thread is SCHED_BATCH."""
    out = subprocess.run([sys.executable, "-c", _THREAD_POLICIES, mode], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    yielding, caller_normal, dispatcher_normal, batch = out
    assert (yielding, caller_normal, dispatcher_normal) == (str(mode == "on"), "True", "True")
    if mode == "on":
        assert int(batch) >= 2  # gRPC's callback pollers and the finisher, at least
    else:
        assert int(batch) == 0
