"""Idle streams pin no payloads (issue 19, item 2; bound: "idle streams pin less than 4
payloads in all").

A stream that sent one large batch and then waits for its next message must not keep that
message, its decoded batch, its evaluation or its answer alive: 16 such streams used to pin
a payload each. Checked through a real ``lossd serve --processes 1`` on loopback by the
growth of the server's RSS while the streams idle. The server keeps freed memory for reuse
(``serve.host.tune_allocator``), so memory dropped by one stream is reused by the next and
the growth is what the idle streams really hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import psutil
import pytest

from lossd.v1 import loss_service_pb2 as pb
from lossd_server import limits
from tests.conftest import ServeProcess

MiB = 1 << 20
PAYLOAD = 32 * MiB  # predictions and targets, 16 MiB of float32 each
STREAMS = 16


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with ServeProcess("--processes", "1") as server:
        yield server


def payload() -> bytes:
    n = PAYLOAD // 8
    values = np.arange(n, dtype=np.float32)
    return pb.EvaluateRequest(
        loss="mse_loss",
        predictions=pb.Tensor(dtype=pb.FLOAT32, shape=[n], data=values.tobytes()),
        targets=pb.Tensor(dtype=pb.FLOAT32, shape=[n], data=(values + 1).tobytes()),
    ).SerializeToString()


class IdleStream:
    """An EvaluateStream that sends ``raw``, reads its answer, then idles until closed."""

    def __init__(self, channel: grpc.Channel, raw: bytes) -> None:
        self._close = threading.Event()
        stub = channel.stream_stream("/lossd.v1.LossService/EvaluateStream",
                                     request_serializer=None, response_deserializer=None)

        def requests() -> Iterator[bytes]:
            yield raw
            self._close.wait(120)

        self._answers = stub(requests(), timeout=120)
        answer = pb.EvaluateResponse.FromString(next(self._answers))
        assert answer.aggregates.count == PAYLOAD // 8

    def close(self) -> None:
        self._close.set()
        assert list(self._answers) == []


def test_idle_streams_pin_less_than_4_payloads_in_all(srv: ServeProcess) -> None:
    """16 streams each send one 32 MiB batch, get its answer and idle: the server's RSS
    grows by less than 4 payloads in all (it grew by a payload per stream before)."""
    raw = payload()
    server = psutil.Process(srv.proc.pid)
    options = [("grpc.max_send_message_length", 2 * PAYLOAD),
               ("grpc.max_receive_message_length", 2 * PAYLOAD)]
    with grpc.insecure_channel(srv.address, options=options) as channel:
        IdleStream(channel, raw).close()  # warm up: the allocator's pages, torch's kernels
        time.sleep(2 * limits.TRIM_DELAY)
        before = server.memory_info().rss
        streams = [IdleStream(channel, raw) for _ in range(STREAMS)]
        time.sleep(2 * limits.TRIM_DELAY)  # idle: what the server freed is given back
        growth = server.memory_info().rss - before
        for s in streams:
            s.close()
        served = pb.EvaluateResponse.FromString(channel.unary_unary(
            "/lossd.v1.LossService/Evaluate", request_serializer=None,
            response_deserializer=None)(raw, timeout=60))
        assert served.aggregates.count == PAYLOAD // 8
    assert growth < 4 * PAYLOAD, (f"{STREAMS} idle streams pin +{growth / MiB:.0f} MiB "
                                  f"(payload {PAYLOAD / MiB:.0f} MiB)")
