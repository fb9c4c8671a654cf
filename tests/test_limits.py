"""Limits and backpressure: bounded admission, element limit, deadlines, out-of-memory."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import lossd
from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import limits
from lossd_server.app import LossdServer
from lossd_server.errors import Refused
from lossd_server.limits import Admission, CallState
from lossd_server.settings import Settings
from tests.conftest import EngineBlocker, metric_value, served, start_server

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=np.float32)
LABELS = np.array([0, 2])


def metric(srv: LossdServer, name: str, **labels: str) -> float:
    assert srv.metrics_port
    return metric_value(srv.metrics_port, name, **labels)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


Gate = EngineBlocker


@contextlib.contextmanager
def one_call_held(srv: LossdServer, client: LossClient,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """While the block runs, one evaluation of ``client``'s is held in ``srv``'s engine (on
    ``narrow``: its one slot taken); the gate counts what reaches the engine. On leaving,
    the gate opens and the held call must succeed."""
    gate = Gate(srv.engine, monkeypatch)
    with futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.evaluate, LOGITS, LABELS)
        try:
            wait_for(lambda: gate.entered == 1)
            yield gate
        finally:
            gate.release.set()
        running.result(30)


def request() -> pb.EvaluateRequest:
    from lossd.requests import Requests

    [req] = Requests(2**26).build("cross_entropy", LOGITS, LABELS, None, None, {})
    return pb.EvaluateRequest.FromString(req)


@pytest.fixture
def narrow() -> Iterator[LossdServer]:
    yield from served(concurrency=1, max_waiting=1, metrics_port=0)


def test_a_full_queue_is_refused_with_a_retry_after_hint(
        narrow: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(narrow.engine, monkeypatch)
    address = f"127.0.0.1:{narrow.port}"
    with LossClient(address, timeout=30) as client, futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.evaluate, LOGITS, LABELS)
        wait_for(lambda: gate.entered == 1)
        waiting = pool.submit(client.evaluate, LOGITS, LABELS)
        wait_for(lambda: narrow.admission.waiting == 1)
        with pytest.raises(lossd.ResourceExhausted) as exc:
            client.evaluate(LOGITS, LABELS)
        assert exc.value.retry_after is not None and exc.value.retry_after > 0
        assert "--max-waiting 1" in exc.value.message
        # The trailer itself, as any gRPC client sees it.
        with grpc.insecure_channel(address) as ch:
            call = pb_grpc.LossServiceStub(ch).Evaluate.with_call
            with pytest.raises(grpc.RpcError) as raw:
                call(request(), timeout=10)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(raw.value.trailing_metadata())
            assert int(trailers["retry-after-ms"]) >= 1
        gate.release.set()
        for f in (running, waiting):
            np.testing.assert_allclose(f.result(30).per_sample,
                                       torch.nn.functional.cross_entropy(
                                           torch.from_numpy(LOGITS), torch.from_numpy(LABELS),
                                           reduction="none").numpy())
    assert metric(narrow, "lossd_rejected_requests_total", method="Evaluate",
                  reason="queue_full") == 2
    assert metric(narrow, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                  code="RESOURCE_EXHAUSTED") == 2
    assert metric(narrow, "lossd_queue_waiting") == 0
    assert metric(narrow, "lossd_queue_running") == 0


def test_calls_beyond_max_rpcs_are_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(max_rpcs=1)
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=30) as client:
            with one_call_held(srv, client, monkeypatch), \
                    pytest.raises(lossd.ResourceExhausted):
                client.losses(timeout=5)
            assert client.losses()
    finally:
        srv.stop(0)


def test_too_many_elements_is_refused_before_decoding() -> None:
    srv = start_server(max_elements=60, metrics_port=0)
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            ok = client.evaluate(np.zeros((10, 5), np.float32), np.zeros(10, np.int64))
            assert ok.per_sample.shape == (10,)
            with pytest.raises(lossd.ResourceExhausted) as exc:
                client.evaluate(np.zeros((10, 5), np.float32), np.zeros(10, np.int64),
                                class_weights=np.ones(5, np.float64) * 1.0,
                                ignore_index=3)
            assert exc.value.message.startswith("options.class_weights.shape:")
            assert "--max-elements" in exc.value.message
            with pytest.raises(lossd.ResourceExhausted) as exc:
                client.evaluate(np.zeros((61,), np.float32), np.zeros(61, np.float32),
                                loss="mse_loss")
            assert exc.value.message.startswith("predictions.shape:")
        # A claimed shape, however huge, is refused before any allocation.
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            req = request()
            del req.predictions.shape[:]
            req.predictions.shape.extend([2**40, 2**20])
            with pytest.raises(grpc.RpcError) as raw:
                pb_grpc.LossServiceStub(ch).Evaluate(req, timeout=10)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (raw.value.details() or "").startswith("predictions.shape:")
        assert metric(srv, "lossd_rejected_requests_total", method="Evaluate",
                      reason="too_large") == 3
    finally:
        srv.stop(0)


def test_a_message_over_the_size_limit_is_resource_exhausted() -> None:
    srv = start_server(max_message_mb=0.1)
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=10, retry_attempts=1) as client, \
                pytest.raises(lossd.ResourceExhausted):
            client.evaluate(np.zeros(40_000, np.float32), np.zeros(40_000, np.float32),
                            loss="mse_loss", timeout=10)
    finally:
        srv.stop(0)


def test_a_call_whose_deadline_passes_while_queued_is_dropped_unanswered(
        narrow: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with LossClient(f"127.0.0.1:{narrow.port}", timeout=30) as client, \
            one_call_held(narrow, client, monkeypatch) as gate:
        start = time.monotonic()
        with pytest.raises(lossd.DeadlineExceeded):
            client.evaluate(LOGITS, LABELS, timeout=0.3)
        assert time.monotonic() - start < 2
        wait_for(lambda: metric(narrow, "lossd_cancelled_requests_total", method="Evaluate",
                                reason="deadline_exceeded") == 1)
        assert narrow.admission.waiting == 0
    assert gate.entered == 1  # the expired call never reached the engine
    assert metric(narrow, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                  code="DEADLINE_EXCEEDED") == 1


def test_a_cancelled_call_leaves_the_queue_without_computing(
        narrow: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(narrow.engine, monkeypatch)
    with grpc.insecure_channel(f"127.0.0.1:{narrow.port}") as ch:
        stub = pb_grpc.LossServiceStub(ch)
        running = stub.Evaluate.future(request(), timeout=30)
        wait_for(lambda: gate.entered == 1)
        queued = stub.Evaluate.future(request(), timeout=30)
        wait_for(lambda: narrow.admission.waiting == 1)
        queued.cancel()
        wait_for(lambda: narrow.admission.waiting == 0)
        wait_for(lambda: metric(narrow, "lossd_cancelled_requests_total", method="Evaluate",
                                reason="cancelled") == 1)
        gate.release.set()
        assert len(running.result(30).per_sample.data) == 8
    assert gate.entered == 1
    assert metric(narrow, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                  code="CANCELLED") == 1


def test_a_result_computed_after_the_deadline_is_not_sent(
        narrow: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = narrow.engine.evaluate

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(narrow.engine, "evaluate", slow)
    with LossClient(f"127.0.0.1:{narrow.port}", timeout=30) as client, \
            pytest.raises(lossd.DeadlineExceeded):
        client.evaluate(LOGITS, LABELS, timeout=0.2)
    wait_for(lambda: metric(narrow, "lossd_cancelled_requests_total", method="Evaluate",
                            reason="deadline_exceeded") == 1)
    assert metric(narrow, "lossd_stage_duration_seconds_count", method="Evaluate",
                  stage="encode") == 0


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 140737488355328 bytes."),
], ids=["cuda_oom", "memory_error", "cpu_allocator"])
def test_out_of_memory_is_resource_exhausted_and_the_server_serves_on(
        error: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(metrics_port=0)
    released: list[torch.device] = []
    real_release = limits.release_memory

    def release(device: torch.device) -> None:
        released.append(device)
        real_release(device)

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.undo()
        monkeypatch.setattr(limits, "release_memory", release)
        raise error

    try:
        monkeypatch.setattr(limits, "release_memory", release)
        monkeypatch.setattr(srv.engine, "evaluate", fail_once)
        with LossClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            with pytest.raises(lossd.ResourceExhausted) as exc:
                client.evaluate(LOGITS, LABELS)
            assert "out of cpu memory evaluating 2 samples" in exc.value.message
            assert exc.value.retry_after is not None
            assert released == [srv.engine.device]
            r = client.evaluate(LOGITS, LABELS)  # the server goes on
            assert r.per_sample.shape == (2,)
        assert metric(srv, "lossd_rejected_requests_total", method="Evaluate",
                      reason="out_of_memory") == 1
    finally:
        srv.stop(0)


def test_other_runtime_errors_stay_internal() -> None:
    assert limits.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert limits.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not limits.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not limits.is_out_of_memory(ValueError("out of memory"))


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_under_a_memory_cap() -> None:
    # A cap of 40 MB of the device: a 64 MiB batch cannot be evaluated, a small one can.
    total = torch.cuda.get_device_properties(0).total_memory
    srv = start_server(device="cuda", cuda_memory_fraction=40e6 / total, max_elements=0,
                       max_message_mb=200, metrics_port=0)
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=60,
                        max_message_bytes=200 << 20) as client:
            big = np.zeros((1 << 14, 1024), np.float32)
            with pytest.raises(lossd.ResourceExhausted) as exc:
                client.evaluate(big, np.zeros(1 << 14, np.int64))
            assert "out of cuda memory" in exc.value.message
            assert torch.cuda.memory_reserved(0) < 40e6  # the cache was released
            r = client.evaluate(LOGITS, LABELS)
            assert r.per_sample.shape == (2,)
        assert metric(srv, "lossd_rejected_requests_total", method="Evaluate",
                      reason="out_of_memory") == 1
    finally:
        srv.stop(0)
        torch.cuda.set_per_process_memory_fraction(1.0, 0)  # the cap is process-wide


# ---------------------------------------------------------------------------------------
# Streams: admitted at the door, never shed mid-way


def _stream_batches(seed: int, count: int, n: int = 256, c: int = 100
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, c)).astype(np.float32), rng.integers(0, c, n))
            for _ in range(count)]


def _torch_running_sums(batches: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """The exact running sum after each batch (float64 of the float32 per-sample losses)."""
    sums, total = [], 0.0
    per_sample = [torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                                    reduction="none") for x, t in batches]
    for i in range(len(batches)):
        total = float(torch.cat(per_sample[:i + 1]).double().sum())
        sums.append(total)
    return sums


def test_more_open_streams_than_slots_are_never_shed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's scenario on default settings (2 slots, 16 may wait): 24 streams each
    send a (256, 100) batch while the device is held, so 22 batches wait (more than
    --max-waiting), then stream on. No batch of an admitted stream is refused; every
    stream's running aggregates equal torch's. Meanwhile the unary busy path is as it was
    (refused with a retry-after hint), and a new stream is still admitted at the door."""
    srv = start_server(metrics_port=0)
    gate = Gate(srv.engine, monkeypatch)
    streams, per_stream = 25, 5
    data = [_stream_batches(i, per_stream) for i in range(streams)]
    go_on = threading.Event()
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=60) as client:
            def job(i: int) -> list[lossd.LossResult]:
                def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                    yield data[i][0]
                    go_on.wait(30)
                    yield from data[i][1:]
                return list(client.evaluate_stream(batches(), timeout=120))

            with futures.ThreadPoolExecutor(streams) as pool:
                jobs = [pool.submit(job, i) for i in range(streams - 1)]
                wait_for(lambda: gate.entered == 2 and srv.admission.waiting == streams - 3)
                with pytest.raises(lossd.ResourceExhausted) as unary:
                    client.evaluate(LOGITS, LABELS)
                assert unary.value.retry_after is not None and "busy" in unary.value.message
                jobs.append(pool.submit(job, streams - 1))  # admitted, and waits
                wait_for(lambda: srv.admission.waiting == streams - 2)
                assert srv.admission.streams == streams
                gate.release.set()
                go_on.set()
                results = [j.result(120) for j in jobs]
        for i, rs in enumerate(results):
            assert len(rs) == per_stream
            want = _torch_running_sums(data[i])
            for k, r in enumerate(rs):
                assert r.running is not None and r.running.count == 256 * (k + 1)
                assert r.running.sum == pytest.approx(want[k], rel=1e-12, abs=1e-9)
                np.testing.assert_array_equal(r.per_sample, torch.nn.functional.cross_entropy(
                    torch.from_numpy(data[i][k][0]), torch.from_numpy(data[i][k][1]),
                    reduction="none").numpy())
        for reason in ("queue_full", "too_many_streams"):
            assert metric(srv, "lossd_rejected_requests_total", method="EvaluateStream",
                          reason=reason) == 0
        assert metric(srv, "lossd_rejected_requests_total", method="Evaluate",
                      reason="queue_full") == 1
        assert metric(srv, "lossd_requests_total", method="EvaluateStream",
                      loss="cross_entropy", code="OK") == streams
        assert (srv.admission.streams, srv.admission.waiting) == (0, 0)
    finally:
        gate.release.set()
        go_on.set()
        srv.stop(0)


def test_streams_beyond_max_streams_are_refused_at_the_door() -> None:
    srv = start_server(max_streams=2, metrics_port=0)
    try:
        with LossClient(f"127.0.0.1:{srv.port}", timeout=30) as client:
            hold = [threading.Event(), threading.Event()]

            def open_stream(i: int) -> list[lossd.LossResult]:
                def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                    yield LOGITS, LABELS
                    hold[i].wait(30)
                return list(client.evaluate_stream(batches()))

            with futures.ThreadPoolExecutor(2) as pool:
                held = [pool.submit(open_stream, i) for i in range(2)]
                wait_for(lambda: srv.admission.streams == 2)
                with pytest.raises(lossd.ResourceExhausted) as exc:
                    list(client.evaluate_stream([(LOGITS, LABELS)]))
                assert "--max-streams 2" in exc.value.message
                assert exc.value.retry_after is not None and exc.value.retry_after >= 1
                with pytest.raises(lossd.ResourceExhausted, match="--max-streams"):
                    client.shared_memory(4096)  # a session is a stream too
                assert client.evaluate(LOGITS, LABELS).per_sample.shape == (2,)  # unary: fine
                hold[0].set()
                assert len(held[0].result(30)) == 1
                wait_for(lambda: srv.admission.streams == 1)
                assert len(list(client.evaluate_stream([(LOGITS, LABELS)]))) == 1
                hold[1].set()
                held[1].result(30)
        assert metric(srv, "lossd_rejected_requests_total", method="EvaluateStream",
                      reason="too_many_streams") == 1
        assert metric(srv, "lossd_rejected_requests_total", method="SharedMemorySession",
                      reason="too_many_streams") == 1
        assert metric(srv, "lossd_streams_open") == 0
    finally:
        srv.stop(0)


def test_a_waiting_stream_batch_keeps_its_deadline_and_cancellation(
        narrow: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with LossClient(f"127.0.0.1:{narrow.port}", timeout=30) as client, \
            one_call_held(narrow, client, monkeypatch) as gate:
        with pytest.raises(lossd.DeadlineExceeded):
            list(client.evaluate_stream([(LOGITS, LABELS)], timeout=0.3))
        wait_for(lambda: narrow.admission.waiting == 0 and narrow.admission.streams == 0)
        with grpc.insecure_channel(f"127.0.0.1:{narrow.port}") as ch:
            call = pb_grpc.LossServiceStub(ch).EvaluateStream(iter([request()]), timeout=30)
            wait_for(lambda: narrow.admission.waiting == 1)
            call.cancel()
            wait_for(lambda: narrow.admission.waiting == 0 and narrow.admission.streams == 0)
    assert gate.entered == 1  # neither reached the engine


def test_a_stream_whose_caller_goes_away_never_ends_internal() -> None:
    """A caller cancelling mid-stream: the server ends the stream CANCELLED (or, when gRPC
    reports the end of the messages before the cancellation, as a stream that ended),
    never INTERNAL with a traceback in the log."""
    srv = start_server(metrics_port=0)
    try:
        for _ in range(5):
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                more = threading.Event()

                def requests(more: threading.Event = more) -> Iterator[pb.EvaluateRequest]:
                    yield request()
                    more.wait(30)
                    yield request()

                call = pb_grpc.LossServiceStub(ch).EvaluateStream(requests(), timeout=30)
                assert len(next(call).per_sample.data) == 8
                call.cancel()  # while the server waits for the next message
                more.set()

        def ended(code: str) -> float:
            return metric(srv, "lossd_requests_total", method="EvaluateStream",
                          loss="cross_entropy", code=code)

        wait_for(lambda: ended("CANCELLED") + ended("OK") == 5)
        assert ended("INTERNAL") == 0
        assert metric(srv, "lossd_cancelled_requests_total", method="EvaluateStream",
                      reason="cancelled") == ended("CANCELLED")
    finally:
        srv.stop(0)


def test_admitted_batches_wait_whatever_the_queue_length() -> None:
    a = Admission(slots=1, max_waiting=0, max_streams=3)
    release = threading.Event()
    done: list[int] = []

    def batch(i: int) -> None:
        with a.slot(admitted=True):
            release.wait(10)
            done.append(i)

    with a.slot():
        with pytest.raises(Refused) as busy, a.slot():  # "full" for a unary call
            pass
        assert busy.value.reason == "queue_full"
        threads = [threading.Thread(target=batch, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: a.waiting == 3)
    release.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == [0, 1, 2] and (a.running, a.waiting) == (0, 0)
    with a.stream(), a.stream(), a.stream():
        assert a.streams == 3
        with pytest.raises(Refused) as full, a.stream():
            pass
        assert full.value.reason == "too_many_streams"
    assert a.streams == 0


# ---------------------------------------------------------------------------------------
# Admission as a unit


def test_admission_is_first_come_first_served_and_bounded() -> None:
    a = Admission(slots=1, max_waiting=3)
    order: list[int] = []
    hold = threading.Event()
    started = threading.Barrier(2)

    def holder() -> None:
        with a.slot():
            started.wait()
            hold.wait(10)

    def waiter(i: int) -> None:
        with a.slot():
            order.append(i)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    started.wait()
    for i in range(3):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        wait_for(lambda i=i: a.waiting == i + 1)
    with pytest.raises(Refused) as exc, a.slot():
        pass
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.value.trailers[0][0] == "retry-after-ms"
    hold.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2]
    assert (a.running, a.waiting) == (0, 0)


def test_admission_never_leaks_a_slot_under_churn() -> None:
    a = Admission(slots=2, max_waiting=4)
    outcomes: dict[str, int] = {"ok": 0, "full": 0, "expired": 0}
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    plans = [(float(rng.uniform(0, 0.004)), float(rng.choice([0.002, 0.05, 10.0])))
             for _ in range(400)]

    def one(work: float, budget: float) -> None:
        end = time.monotonic() + budget
        state = CallState(time_remaining=lambda: end - time.monotonic())
        try:
            with a.slot(state):
                time.sleep(work)
            kind = "ok"
        except Refused as exc:
            kind = "full" if exc.reason == "queue_full" else "expired"
        with lock:
            outcomes[kind] += 1

    with futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda p: one(*p), plans))
    assert sum(outcomes.values()) == 400 and outcomes["ok"] > 0
    assert (a.running, a.waiting) == (0, 0)
    # Every slot is free again: two can be held at once, a third waits.
    with a.slot(), a.slot():
        assert a.running == 2


def test_limit_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--max-waiting"):
        Settings(max_waiting=-1).check()
    with pytest.raises(ValueError, match="--concurrency"):
        Settings(concurrency=0).check()
    with pytest.raises(ValueError, match="--max-streams"):
        Settings(max_streams=-1).check()
    # Threads for every running and waiting evaluation, every open stream, every call
    # waiting for its request message (--max-receiving 32), and two spare.
    assert Settings(workers=8, concurrency=2, max_waiting=16).stream_limit == 32
    assert Settings(workers=8, concurrency=2, max_waiting=16).threads == 2 + 16 + 32 + 32 + 2
    assert Settings(workers=128).stream_limit == 128 - 2 - 16 - 32 - 2
    assert Settings(workers=128).threads == 128
    assert Settings(workers=64).stream_limit == 32  # at least 32
    assert Settings(workers=64).threads == 2 + 16 + 32 + 32 + 2
    assert Settings(max_streams=4).threads == 2 + 16 + 4 + 32 + 2
    assert Settings(workers=8, max_rpcs=0).rpc_limit == 2 * 84
