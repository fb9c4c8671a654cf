"""The client's transports (``lossd._transport``): evaluate's unary calls over gRPC C++
(``native``) or grpcio (the default; the rest of the suite runs on it). These tests hold
the two to the same answers, errors, deadlines, retries, trailers and token, and check the
choice and its fallbacks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import lossd
from lossd import LossClient
from lossd import _transport as transport
from lossd.native import NativeUnavailable
from lossd_server.app import LossdServer
from tests.conftest import EngineBlocker, batch, served, start_server


def _unavailable() -> str:
    try:
        transport.MODULE.load()
    except NativeUnavailable as exc:
        return str(exc).splitlines()[0]
    return ""


UNAVAILABLE = _unavailable()
needs_native = pytest.mark.skipif(bool(UNAVAILABLE),
                                  reason=f"native transport: {UNAVAILABLE}")
BOTH = [pytest.param("native", marks=needs_native), "grpcio"]


@pytest.fixture(scope="module")
def srv() -> Iterator[LossdServer]:
    yield from served()


def _client(srv: LossdServer, kind: str, **kwargs: Any) -> LossClient:
    client = LossClient(f"127.0.0.1:{srv.port}", transport=kind, **kwargs)
    assert client.transport == kind
    return client


# ---- the choice ------------------------------------------------------------------------


def test_grpcio_tls_and_a_callers_channel_stay_on_grpcio_and_native_says_why() -> None:
    assert transport.choose("grpcio", custom_channel=False, tls=False) == "grpcio"
    assert transport.choose("auto", custom_channel=False, tls=True) == "grpcio"
    assert transport.choose("auto", custom_channel=True, tls=False) == "grpcio"
    with pytest.raises(ValueError, match="TLS"):
        transport.choose("native", custom_channel=False, tls=True)
    with pytest.raises(ValueError, match="caller's"):
        transport.choose("native", custom_channel=True, tls=False)
    with pytest.raises(ValueError, match="one of auto, native, grpcio"):
        transport.choose("http3", custom_channel=False, tls=False)


def test_grpcio_by_default_and_the_environment_chooses_when_the_client_does_not() -> None:
    assert transport.choose(None, custom_channel=False, tls=False, env={}) == "grpcio"
    with LossClient("127.0.0.1:1", env={}) as client:
        assert client.transport == "grpcio"
    env = {transport.ENV_TRANSPORT: "auto"}
    expected = "grpcio" if UNAVAILABLE else "native"
    assert transport.choose(None, custom_channel=False, tls=False, env=env) == expected
    with LossClient("127.0.0.1:1", env=env) as client:
        assert client.transport == expected


def test_auto_falls_back_where_it_cannot_build_and_native_fails_loudly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> None:
        raise NativeUnavailable("no gRPC C++ here")

    monkeypatch.setattr(transport.MODULE, "load", unavailable)
    assert transport.choose("auto", custom_channel=False, tls=False) == "grpcio"
    with pytest.raises(NativeUnavailable, match="no gRPC C\\+\\+ here"):
        LossClient("127.0.0.1:1", transport="native")


def test_a_failed_build_is_tried_once_per_process(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "empty.cpp"
    source.write_text("")
    module = lossd.native.NativeModule(source, "lossd._empty")
    monkeypatch.setenv("PATH", str(tmp_path))  # no pkg-config, no compiler
    with pytest.raises(NativeUnavailable, match="cannot run pkg-config"):
        module.load()
    monkeypatch.undo()  # the tools are back: a build would now get further
    with pytest.raises(NativeUnavailable, match="cannot run pkg-config"):
        module.load()  # the same answer, without building again


@needs_native
def test_a_cached_build_loads_without_asking_the_build_tools(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pkg-config takes about a second on gRPC C++'s dependency tree: a process whose
    module is built already must not run it (nor the compiler) to load it."""
    transport.MODULE.build()  # (cached already: the suite's first native client built it)

    def tools(*args: Any) -> Any:
        raise AssertionError(f"build tools run to load a cached build: {args}")

    monkeypatch.setattr(lossd.native, "_run", tools)
    fresh = lossd.native.NativeModule(transport.MODULE.source, transport.MODULE.import_name)
    assert fresh.load().Channel is not None


@needs_native
def test_a_child_forked_after_a_native_channel_uses_grpcio(srv: LossdServer) -> None:
    with _client(srv, "native") as client:
        client.evaluate(*batch(0)[:2])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: gRPC C++'s threads did not survive the fork
        try:
            os.write(write, transport.choose("auto", custom_channel=False,
                                             tls=False).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"grpcio"
    os.close(read)


# ---- the same calls on both ------------------------------------------------------------


@pytest.mark.parametrize("kind", BOTH)
def test_both_answer_bit_for_bit_and_name_the_bad_field(srv: LossdServer, kind: str) -> None:
    x, t, want = batch(3, n=100)
    with _client(srv, kind) as client:
        r = client.evaluate(x, t)
        np.testing.assert_array_equal(r.per_sample, want)
        t_bad = t.copy()
        t_bad[7] = 10
        with pytest.raises(lossd.InvalidArgument, match="targets: class index 10") as exc:
            client.evaluate(x, t_bad)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("kind", BOTH)
def test_both_keep_the_deadline(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server()
    blocker = EngineBlocker(srv.engine, monkeypatch, must_release=False)
    try:
        with _client(srv, kind) as client:
            started = time.monotonic()
            with pytest.raises(lossd.DeadlineExceeded):
                client.evaluate(*batch(1)[:2], timeout=0.5)
            assert time.monotonic() - started < 5
    finally:
        blocker.release.set()
        srv.stop(0)


@pytest.mark.parametrize("kind", BOTH)
def test_both_retry_unavailable_and_say_the_retries_ran_out(kind: str) -> None:
    with socket_without_server() as address, \
            LossClient(address, transport=kind, retry_attempts=3, timeout=20) as client, \
            pytest.raises(lossd.Unavailable, match="retries exhausted") as exc:
        client.evaluate(*batch(2)[:2])
    assert exc.value.attempts == 3


@pytest.mark.parametrize("kind", BOTH)
def test_both_read_the_servers_retry_after_trailer(kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(concurrency=1, max_waiting=0)
    blocker = EngineBlocker(srv.engine, monkeypatch)
    x, t, _ = batch(4)
    try:
        with _client(srv, kind) as busy, _client(srv, kind) as refused:
            held = threading.Thread(target=busy.evaluate, args=(x, t))
            held.start()
            while blocker.entered < 1:
                time.sleep(0.01)
            with pytest.raises(lossd.ResourceExhausted) as exc:
                refused.evaluate(x, t)
            assert exc.value.retry_after is not None and exc.value.retry_after > 0
            blocker.release.set()
            held.join(30)
    finally:
        blocker.release.set()
        srv.stop(0)


@pytest.mark.parametrize("kind", BOTH)
def test_both_send_the_token(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TEST_TOKENS", "s3cret")
    srv = start_server(auth_tokens_env="LOSSD_TEST_TOKENS")
    try:
        x, t, want = batch(5)
        with _client(srv, kind, token="s3cret") as client:
            np.testing.assert_array_equal(client.evaluate(x, t).per_sample, want)
        with _client(srv, kind, token="wrong") as client, \
                pytest.raises(lossd.Unauthenticated):
            client.evaluate(x, t)
    finally:
        srv.stop(0)


@needs_native
def test_a_signal_ends_a_blocked_native_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during a call that waits on the server: the handler's exception comes out
    within moments, not at the deadline (the call is cancelled)."""
    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    srv = start_server()
    blocker = EngineBlocker(srv.engine, monkeypatch, must_release=False)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with _client(srv, "native") as client:
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                client.evaluate(*batch(6)[:2], timeout=30)
            assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        blocker.release.set()
        srv.stop(0)


@contextlib.contextmanager
def socket_without_server() -> Iterator[str]:
    """An address where nothing listens (a port bound, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
