"""One caller cannot cost the server far more than it sends (issue 19, items 5, 7, 8, 9).

Each test sends what a hostile caller would, as raw bytes through a real ``lossd serve
--processes 1`` on loopback (the client would refuse some of it first), and measures what
the bound is about: the growth of the server process's peak RSS, the time to an answer, or
the size of a scrape. Then an honest call is still served.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np
import psutil
import pytest
import torch

from lossd.v1 import loss_service_pb2 as pb
from tests.conftest import ServeProcess, metric_value

T = TypeVar("T")
MiB = 1 << 20


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with ServeProcess("--processes", "1", env={"LOSSD_METRICS_PORT": "0"}) as server:
        yield server


def tensor(a: np.ndarray) -> pb.Tensor:
    dtypes = {np.float32: pb.FLOAT32, np.float16: pb.FLOAT16, np.int64: pb.INT64,
              np.int32: pb.INT32}
    return pb.Tensor(dtype=dtypes[a.dtype.type], shape=a.shape, data=a.tobytes())


def call(srv: ServeProcess, method: str, raw: bytes, timeout: float = 20.0
         ) -> tuple[grpc.StatusCode, str, bytes]:
    """A unary call of ``method`` with ``raw`` as the request's bytes, as any gRPC client
    could send them: (code, details, response bytes)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[
            ("grpc.max_receive_message_length", 64 * MiB)]) as ch:
        stub = ch.unary_unary(f"/lossd.v1.LossService/{method}",
                              request_serializer=None, response_deserializer=None)
        try:
            return grpc.StatusCode.OK, "", stub(raw, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""


class PeakRss:
    """The growth of a process's peak RSS while a block runs: the kernel's high-water mark
    (VmHWM, reset through /proc/<pid>/clear_refs) where Linux allows, else psutil's RSS
    sampled every millisecond."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0
        self._proc = psutil.Process(pid)

    def _hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def measure(self, fn: Callable[[], T]) -> T:
        before = self._proc.memory_info().rss
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts from the RSS of now
            exact = True
        except OSError:
            exact = False
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                peak[0] = max(peak[0], self._proc.memory_info().rss)

        sampler = None if exact else threading.Thread(target=sample, daemon=True)
        if sampler is not None:
            sampler.start()
        try:
            result = fn()
        finally:
            done.set()
            if sampler is not None:
                sampler.join()
        self.growth = (self._hwm() if exact else peak[0]) - before
        return result


def honest_call_served(srv: ServeProcess) -> None:
    x = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    t = np.array([0, 2], np.int64)
    req = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x), targets=tensor(t))
    code, details, raw = call(srv, "Evaluate", req.SerializeToString(), timeout=10)
    assert code == grpc.StatusCode.OK, details
    got = pb.EvaluateResponse.FromString(raw).aggregates.mean
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    assert got == pytest.approx(float(want), rel=1e-6)


# --- item 5: tag length ----------------------------------------------------------------


def test_long_tags_keep_a_scrape_small(srv: ServeProcess) -> None:
    """Six calls with 2 MiB tags (and one with a newline) are served, counted under the
    tag 'invalid', and the scrape stays under 10 MB (it was 240 MB)."""
    assert srv.metrics_port
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1], np.int64)
    base = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x), targets=tensor(t))
    tags = [f"{i}" + "x" * (2 * MiB) for i in range(6)] + ["two\nlines"]
    for tag in tags:
        req = pb.EvaluateRequest()
        req.CopyFrom(base)
        req.tag = tag
        code, details, _ = call(srv, "Evaluate", req.SerializeToString())
        assert code == grpc.StatusCode.OK, details
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics",
                                timeout=30) as resp:
        scrape = resp.read()
    assert len(scrape) < 10_000_000, f"{len(scrape)} bytes"
    assert time.monotonic() - started < 5
    assert metric_value(srv.metrics_port, "lossd_sample_loss_count", loss="cross_entropy",
                        tag="invalid") == 2 * len(tags)
    honest_call_served(srv)


# --- item 7: map entries --------------------------------------------------------------


@pytest.mark.parametrize(("field", "entry"), [("inputs", b"\x5a\x00"),
                                              ("options", b"\x2a\x00")])
def test_a_request_of_empty_map_entries_is_refused_at_once(
        srv: ServeProcess, field: str, entry: bytes) -> None:
    """8 MiB of empty ``inputs`` (or ``options``) entries: refused RESOURCE_EXHAUSTED
    naming the map and --max-map-entries, within 5 s and with the peak RSS growing less
    than 10x the request (it cost 5-20 s and +730 MiB)."""
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1], np.int64)
    raw = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x),
                             targets=tensor(t)).SerializeToString() + entry * (4 * MiB)
    rss = PeakRss(srv.proc.pid)
    started = time.monotonic()
    code, details, _ = rss.measure(lambda: call(srv, "Evaluate", raw))
    took = time.monotonic() - started
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details[:200])
    assert details.startswith(f"{field}: more than 64 entries (--max-map-entries)")
    assert took < 5, f"{took:.1f} s"
    assert rss.growth < 10 * len(raw), f"+{rss.growth / MiB:.0f} MiB"
    assert metric_value(srv.metrics_port or 0, "lossd_rejected_requests_total",
                        method="Evaluate", reason="too_large") >= 1
    honest_call_served(srv)


@pytest.mark.parametrize(("kind", "body"), [
    ("a known field", b"\x50\x00" * (4 * MiB)),  # `more = false`, 4M times
    ("an unknown field", b"\xf8\x01\x00" * (3 * MiB)),
    ("a group of unknown fields", b"\xfb\x01" + b"\xf8\x01\x00" * (3 * MiB) + b"\xfc\x01")])
def test_a_request_of_millions_of_small_fields_is_refused_at_once(
        srv: ServeProcess, kind: str, body: bytes) -> None:
    """Not only map entries: 8 MiB of any two-byte field cost the parser's walk seconds of
    CPU (18-21 s on the 2-core VM). The walk has a budget; past it the request is refused
    RESOURCE_EXHAUSTED within 5 s, the peak RSS growing less than 10x the request."""
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1], np.int64)
    raw = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x),
                             targets=tensor(t)).SerializeToString() + body
    rss = PeakRss(srv.proc.pid)
    started = time.monotonic()
    code, details, _ = rss.measure(lambda: call(srv, "Evaluate", raw))
    took = time.monotonic() - started
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (kind, code, details[:200])
    assert details.startswith("request: more than 3072 fields and shape values"), details
    assert "--max-map-entries 64" in details
    assert took < 5, f"{took:.1f} s"
    assert rss.growth < 10 * len(raw), f"+{rss.growth / MiB:.0f} MiB"
    honest_call_served(srv)


def test_a_stream_of_many_map_entries_is_refused_naming_the_limit(srv: ServeProcess) -> None:
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1], np.int64)
    raw = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x),
                             targets=tensor(t)).SerializeToString() + b"\x5a\x00" * 40_000
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stream = ch.stream_stream("/lossd.v1.LossService/EvaluateStream",
                                  request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as exc:
            list(stream(iter([raw]), timeout=20))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "inputs: more than 64 entries (--max-map-entries)" in (exc.value.details() or "")


# --- item 8: ctc_loss working memory --------------------------------------------------


def ctc_request(n: int, steps: int, classes: int, labels: int) -> pb.EvaluateRequest:
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((n, steps, classes)).astype(np.float32))
    log_probs = torch.log_softmax(logits, dim=-1).numpy()
    targets = rng.integers(1, classes, (n, labels)).astype(np.int64)
    return pb.EvaluateRequest(
        loss="ctc_loss", predictions=tensor(log_probs), targets=tensor(targets),
        inputs={"input_lengths": tensor(np.full(n, steps, np.int64)),
                "target_lengths": tensor(np.full(n, labels, np.int64))})


def test_ctc_working_memory_is_counted_before_the_loss_runs(srv: ServeProcess) -> None:
    """A ~130 kB ctc_loss request whose alpha table would be 8250 x 16501 floats (+544 MiB)
    is refused RESOURCE_EXHAUSTED naming --max-elements, its peak RSS growing less than
    20x its size; a legal one is still served, with torch's value."""
    req = ctc_request(1, 8250, 2, 8250)
    raw = req.SerializeToString()
    rss = PeakRss(srv.proc.pid)
    code, details, _ = rss.measure(lambda: call(srv, "Evaluate", raw))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "ctc_loss needs 136133250 working elements" in details
    assert "(--max-elements)" in details
    assert rss.growth < 20 * len(raw), f"+{rss.growth / MiB:.1f} MiB"

    legal = ctc_request(2, 50, 5, 10)
    code, details, out = call(srv, "Evaluate", legal.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    x = torch.from_numpy(np.frombuffer(legal.predictions.data, np.float32).reshape(2, 50, 5))
    t = torch.from_numpy(np.frombuffer(legal.targets.data, np.int64).reshape(2, 10))
    want = torch.nn.functional.ctc_loss(x.transpose(0, 1), t, torch.full((2,), 50),
                                        torch.full((2,), 10), reduction="none")
    got = np.frombuffer(pb.EvaluateResponse.FromString(out).per_sample.data, np.float32)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    honest_call_served(srv)


# --- item 9: per-class and top-k state ------------------------------------------------


def test_per_class_and_top_k_state_stay_within_the_request_size(srv: ServeProcess) -> None:
    """One sample with C = 8M classes (16 MiB of float16) asking for per_class and top_k
    1..16, twice on a stream: served, with the peak RSS growing less than 20x the request
    (it grew by 2.6 GiB), and the per-class table holds the one class present."""
    c = 8 * MiB
    x = np.zeros((1, c), np.float16)
    x[0, 3] = 1.0
    req = pb.EvaluateRequest(loss="cross_entropy", predictions=tensor(x),
                             targets=tensor(np.array([3], np.int64)), per_class=True,
                             top_k=list(range(1, 17)))
    raw = req.SerializeToString()
    del x, req
    rss = PeakRss(srv.proc.pid)

    def stream() -> list[bytes]:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[
                ("grpc.max_receive_message_length", 64 * MiB)]) as ch:
            evaluate = ch.stream_stream("/lossd.v1.LossService/EvaluateStream",
                                        request_serializer=None,
                                        response_deserializer=None)
            return list(evaluate(iter([raw, raw]), timeout=25))

    answers = rss.measure(stream)
    assert rss.growth < 20 * len(raw), f"+{rss.growth / MiB:.0f} MiB"
    last = pb.EvaluateResponse.FromString(answers[-1])
    table = last.running_analysis.per_class
    assert list(table.classes) == [3] and list(table.count) == [2]
    assert list(table.top_k_correct) == [2] * 16
    honest_call_served(srv)
