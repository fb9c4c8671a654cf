"""One caller holding the server's threads or streams (issue 19, items 1 and 2).

Each test starts a real server on a free loopback port, lets one hostile caller hold it
(calls that never send their request message, streams that never send a message), and
checks that everyone else is still served within the issue's bounds: health and another
caller's Evaluate within 5 s, another caller's stream admitted within 20 s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from lossd import LossClient
from tests.conftest import ServeProcess, metric_value, start_server

EVALUATE = "/lossd.v1.LossService/Evaluate"
EVALUATE_STREAM = "/lossd.v1.LossService/EvaluateStream"
LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=np.float32)
LABELS = np.array([0, 2])
BOUND = 5.0  # seconds: health and another caller's Evaluate answer within it


@contextlib.contextmanager
def unsent_calls(address: str, n: int, *, connections: int,
                 metadata: tuple[tuple[str, str], ...] = ()) -> Iterator[list[grpc.Future]]:
    """``n`` Evaluate calls over ``connections`` channels that open and never send their
    request message (a request iterator that never yields), held until the block ends."""
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait()
        return
        yield b""  # a generator that yields nothing

    # Distinct channel arguments: each channel its own connection (no subchannel sharing).
    channels = [grpc.insecure_channel(address, options=[("lossd.test.channel", i)])
                for i in range(connections)]
    calls = [channels[i % connections].stream_unary(EVALUATE).future(
        never(), timeout=60, metadata=metadata) for i in range(n)]
    try:
        time.sleep(1.0)  # let every call reach the server
        yield calls
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()


def served_within(address: str, bound: float, *, token: str | None = None) -> float:
    """Health Check and an Evaluate on a fresh connection; both must answer within
    ``bound`` seconds. Returns the slower one's time."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=bound).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    health_s = time.monotonic() - started
    started = time.monotonic()
    with LossClient(address, timeout=bound, token=token, retry_attempts=1) as client:
        result = client.evaluate(LOGITS, LABELS)
    assert result.per_sample.shape == (2,)
    return max(health_s, time.monotonic() - started)


@pytest.mark.parametrize("connections", [1, 80], ids=["one-connection", "80-connections"])
def test_80_unsent_unary_calls_leave_health_and_other_callers_served(connections: int) -> None:
    srv = start_server(metrics_port=0)
    try:
        address = f"127.0.0.1:{srv.port}"
        with unsent_calls(address, 80, connections=connections):
            assert served_within(address, BOUND) < BOUND
            assert served_within(address, BOUND) < BOUND  # and again: not a lucky slot
        assert metric_value(srv.metrics_port or 0, "lossd_message_waits_ended_total",
                            method="Evaluate", reason="evicted") > 0
    finally:
        srv.stop(0)


def test_unsent_calls_without_a_token_are_refused_before_the_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TEST_TOKENS", "good-token")
    srv = start_server(auth_tokens_env="LOSSD_TEST_TOKENS")
    try:
        address = f"127.0.0.1:{srv.port}"
        with unsent_calls(address, 80, connections=8) as calls:
            # Refused at once, without waiting for the message that never comes.
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call.result(timeout=BOUND)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert served_within(address, BOUND, token="good-token") < BOUND
    finally:
        srv.stop(0)


def test_a_call_whose_message_never_arrives_ends_unavailable_after_the_timeout() -> None:
    srv = start_server(message_timeout_seconds=1.0)
    try:
        address = f"127.0.0.1:{srv.port}"
        started = time.monotonic()
        with unsent_calls(address, 1, connections=1) as calls, \
                pytest.raises(grpc.RpcError) as err:
            calls[0].result(timeout=BOUND)
        assert time.monotonic() - started < 1.0 + BOUND
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--message-timeout-seconds" in (err.value.details() or "")
    finally:
        srv.stop(0)


def test_80_unsent_calls_on_two_worker_processes() -> None:
    """One connection reaches one worker; fresh connections are spread over both, so
    several of them reach the held one."""
    with ServeProcess("--processes", "2") as pod, \
            unsent_calls(pod.address, 80, connections=1):
        for _ in range(6):
            assert served_within(pod.address, BOUND) < BOUND


# ---------------------------------------------------------------------------------------
# Idle streams


@contextlib.contextmanager
def idle_streams(address: str, n: int) -> Iterator[list[grpc.Future]]:
    """``n`` EvaluateStream calls, each on its own connection, that send nothing."""
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait()
        return
        yield b""

    channels = [grpc.insecure_channel(address, options=[("lossd.test.channel", i)])
                for i in range(n)]
    streams = [ch.stream_stream(EVALUATE_STREAM)(never(), timeout=120) for ch in channels]
    try:
        yield streams
    finally:
        release.set()
        for s in streams:
            s.cancel()
        for ch in channels:
            ch.close()


def admitted_stream_within(address: str, bound: float) -> float:
    """Seconds until another caller's ``evaluate_stream`` is admitted and answered, retrying
    a refusal (RESOURCE_EXHAUSTED) after the server's ``retry_after``; fails past ``bound``."""
    started = time.monotonic()
    with LossClient(address, timeout=bound, retry_attempts=1) as client:
        while True:
            try:
                results = list(client.evaluate_stream([(LOGITS, LABELS)], timeout=bound))
                assert results[0].per_sample.shape == (2,)
                return time.monotonic() - started
            except lossd.ResourceExhausted as exc:
                left = bound - (time.monotonic() - started)
                assert left > 0, f"not admitted within {bound} s: {exc}"
                time.sleep(min(left, exc.retry_after or 0.5))


def test_max_streams_idle_streams_leave_room_for_another_callers_stream() -> None:
    srv = start_server(max_streams=8, metrics_port=0)
    try:
        address = f"127.0.0.1:{srv.port}"
        with idle_streams(address, 8) as streams:
            deadline = time.monotonic() + 10
            while srv.admission.streams < 8:  # every idle stream holds its admission
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert admitted_stream_within(address, 20.0) < 20.0
            assert served_within(address, BOUND) < BOUND
            ended = [s for s in streams if s.done()]
            assert ended, "no idle stream was closed to admit the other caller"
            with pytest.raises(grpc.RpcError) as err:
                ended[0].result()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "idle" in (err.value.details() or "")
        assert metric_value(srv.metrics_port or 0, "lossd_message_waits_ended_total",
                            method="EvaluateStream", reason="idle_stream") > 0
    finally:
        srv.stop(0)


def test_default_max_streams_idle_streams_on_two_worker_processes() -> None:
    # 96 connections spread over both workers: at least the default --max-streams (32) each.
    with ServeProcess("--processes", "2") as pod, idle_streams(pod.address, 96):
        time.sleep(1.0)
        assert admitted_stream_within(pod.address, 20.0) < 20.0
        assert served_within(pod.address, BOUND) < BOUND


def test_an_idle_stream_with_room_left_stays_open() -> None:
    """Idle streams are closed only when another stream needs their place."""
    srv = start_server(max_streams=4, stream_idle_seconds=0.5)
    try:
        address = f"127.0.0.1:{srv.port}"
        with idle_streams(address, 2) as streams:
            time.sleep(2.0)
            assert not any(s.done() for s in streams)
            assert admitted_stream_within(address, BOUND) < BOUND
            assert not any(s.done() for s in streams)
    finally:
        srv.stop(0)


def test_message_wait_settings_are_flags_with_defaults() -> None:
    from lossd_server.settings import Settings

    s = Settings()
    assert s.max_receiving > 0 and s.message_timeout_seconds > 0
    assert s.stream_idle_seconds > 0
    # The pool holds every admitted wait, stream and evaluation, with room for health.
    assert s.threads >= (s.concurrency + s.max_waiting + s.stream_limit + s.max_receiving
                         + 2)
    with pytest.raises(ValueError, match="--max-receiving"):
        Settings(max_receiving=0).check()


def test_an_unsent_call_does_not_hold_a_drain_up() -> None:
    srv = start_server()
    with unsent_calls(f"127.0.0.1:{srv.port}", 4, connections=1):
        started = time.monotonic()
        srv.stop(10.0)
        assert time.monotonic() - started < 5.0


def test_a_drain_ends_unsent_calls_but_leaves_health_checks_to_be_answered() -> None:
    """Unit level: a probe whose message is still on its way when the drain starts is
    answered (NOT_SERVING), not refused UNAVAILABLE as an unsent Evaluate is."""
    from lossd_server.errors import Refused
    from lossd_server.limits import MessageWaits, Wait

    waits = MessageWaits(max_receiving=8, timeout=60)
    ended: dict[str, grpc.StatusCode] = {}
    arrived = {name: threading.Event() for name in ("Evaluate", "Check")}
    got: dict[str, str] = {}

    def run(name: str) -> None:
        def end(code: grpc.StatusCode, _message: str) -> None:
            ended[name] = code
            arrived[name].set()

        def read() -> str:
            arrived[name].wait()
            if name in ended:   # as grpcio's read fails once the call was ended
                raise grpc.RpcError()
            return "message"
        wait = Wait(waits, name, "ipv4:10.0.0.1:1000", end, probe=name == "Check")
        with contextlib.suppress(Refused):
            got[name] = waits.receive_first(wait, read)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in arrived]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while waits.receiving != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waits.drain()
    assert arrived["Evaluate"].wait(5)
    assert ended == {"Evaluate": grpc.StatusCode.UNAVAILABLE} and waits.receiving == 1
    arrived["Check"].set()   # the probe's message arrives after the drain began
    for t in threads:
        t.join(5)
    assert got == {"Check": "message"} and "Check" not in ended


def test_a_full_wait_list_ends_the_longest_wait_of_the_host_holding_most() -> None:
    """Unit level (every loopback caller is one host): the host with most unsent calls
    loses its longest wait, not the older wait of a host with fewer."""
    from lossd_server.errors import Refused
    from lossd_server.limits import MessageWaits

    waits = MessageWaits(max_receiving=3, timeout=60)
    ended: dict[str, grpc.StatusCode] = {}
    arrived = {name: threading.Event() for name in ("honest", "h1", "h2", "new")}
    threads = []

    def hold(name: str, peer: str, waiting: int) -> None:
        """A call from ``peer`` whose message arrives when ``arrived[name]`` is set (or the
        call is ended); returns once ``waiting`` calls wait."""
        def end(code: grpc.StatusCode, _message: str) -> None:
            ended[name] = code
            arrived[name].set()

        def run() -> None:
            wait = waits.call("Evaluate", peer, end)
            with contextlib.suppress(Refused):
                waits.receive_first(wait, arrived[name].wait)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while waits.receiving != waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    hold("honest", "ipv4:10.0.0.1:1000", 1)  # the oldest wait
    hold("h1", "ipv4:10.0.0.2:2000", 2)
    hold("h2", "ipv4:10.0.0.2:2001", 3)
    hold("new", "ipv4:10.0.0.3:3000", 3)  # one too many: 10.0.0.2 holds most
    assert arrived["h1"].wait(5)
    assert ended == {"h1": grpc.StatusCode.RESOURCE_EXHAUSTED}
    for event in arrived.values():
        event.set()
    for thread in threads:
        thread.join(5)
    assert waits.receiving == 0


def test_a_shared_memory_session_closed_for_idleness_is_reopened_by_the_client() -> None:
    srv = start_server(max_streams=1, stream_idle_seconds=0.5)
    try:
        address = f"127.0.0.1:{srv.port}"
        with LossClient(address, timeout=BOUND) as client, \
                client.shared_memory(1 << 16) as shm:
            first = shm.evaluate(LOGITS, LABELS)
            time.sleep(1.0)  # idle past --stream-idle-seconds, holding the only admission
            assert admitted_stream_within(address, BOUND) < BOUND  # takes its place
            again = shm.evaluate(LOGITS, LABELS)  # on a new session
            np.testing.assert_array_equal(first.per_sample, again.per_sample)
    finally:
        srv.stop(0)


def test_a_unary_call_leaves_no_reference_cycle() -> None:
    """A served unary call is freed by reference counting when it ends: the gate's Wait
    is not part of a cycle through grpcio's call state, whose garbage (the request bytes
    included) would otherwise wait for the garbage collector, ~20 objects a call."""
    import gc

    from lossd_server.limits import Wait

    srv = start_server()
    try:
        with LossClient(f"127.0.0.1:{srv.port}") as client:
            client.evaluate(LOGITS, LABELS)
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(5):
                    client.evaluate(LOGITS, LABELS)
                gc.collect()
                waits = [o for o in gc.garbage if isinstance(o, Wait)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    finally:
        srv.stop(0)
    assert not waits
