"""Shared-memory path: same results as the socket, checked references, scoped sessions."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch

import lossd
from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.app import LossdServer


def test_shared_memory_equals_socket(client: LossClient) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)).astype(np.float32)
    t = rng.integers(0, 7, 300)
    w = rng.random(300).astype(np.float32)
    with client.shared_memory(1 << 20) as shm:
        for args in ({}, {"weights": w}, {"weights": w, "label_smoothing": 0.2}):
            a = shm.evaluate(x, t, **args)
            b = client.evaluate(x, t, **args)
            assert np.array_equal(a.per_sample, b.per_sample)
            assert a.aggregates == b.aggregates
        bf = torch.from_numpy(x).bfloat16()
        assert np.array_equal(shm.evaluate(bf, t).per_sample, client.evaluate(bf, t).per_sample)


def test_call_larger_than_region_is_refused_locally(client: LossClient) -> None:
    with client.shared_memory(4096) as shm, pytest.raises(ValueError, match="needs"):
        shm.evaluate(np.zeros((100, 10), np.float32), np.zeros(100, np.int64))


class RawSession:
    """A SharedMemorySession driven by hand."""

    def __init__(self, stub: pb_grpc.LossServiceStub) -> None:
        self.outbox: queue.Queue[pb.SharedMemoryRequest | None] = queue.Queue()
        self.replies = stub.SharedMemorySession(self._requests(), timeout=30)
        self.id = next(self.replies).session

    def _requests(self) -> Iterator[pb.SharedMemoryRequest]:
        while (item := self.outbox.get()) is not None:
            yield item

    def act(self, **kwargs: object) -> pb.SharedMemoryResponse:
        self.outbox.put(pb.SharedMemoryRequest(**kwargs))  # type: ignore[arg-type]
        return next(self.replies)

    def close(self) -> None:
        self.outbox.put(None)
        list(self.replies)


@pytest.fixture
def region() -> Iterator[shared_memory.SharedMemory]:
    shm = shared_memory.SharedMemory(create=True, size=4096)
    yield shm
    shm.close()
    shm.unlink()


@pytest.fixture
def stub(server: LossdServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.LossServiceStub(ch)


def ref_request(session: str, offset: int = 0, byte_size: int = 16,
                region: str = "r") -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        loss="mse_loss", shared_memory_session=session,
        predictions=pb.Tensor(dtype=pb.FLOAT32, shape=[4], shared_memory=pb.SharedMemoryRef(
            region=region, offset=offset, byte_size=byte_size)),
        targets=pb.Tensor(dtype=pb.FLOAT32, shape=[4], data=np.zeros(4, np.float32).tobytes()))


def invalid(stub: pb_grpc.LossServiceStub, req: pb.EvaluateRequest) -> str:
    with pytest.raises(grpc.RpcError) as exc:
        stub.Evaluate(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(exc.value.details())


def test_references_are_checked_against_the_registered_size(
        stub: pb_grpc.LossServiceStub, region: shared_memory.SharedMemory) -> None:
    np.frombuffer(region.buf, np.float32, count=4)[:] = [1, 2, 3, 4]
    s = RawSession(stub)
    try:
        assert not s.act(register=pb.RegisterRegion(name="r", key=region.name.lstrip("/"),
                                                    byte_size=64)).error
        r = stub.Evaluate(ref_request(s.id), timeout=10)
        assert r.aggregates.sum == 1 + 4 + 9 + 16
        assert invalid(stub, ref_request(s.id, offset=56)).startswith(
            "predictions.shared_memory: bytes [56, 72) outside region 'r' of 64 bytes")
        assert invalid(stub, ref_request(s.id, offset=-4)).startswith("predictions.shared_memory")
        assert invalid(stub, ref_request(s.id, byte_size=12)).startswith("predictions.data: 12")
        assert invalid(stub, ref_request(s.id, region="x")).startswith(
            "predictions.shared_memory.region: no region 'x'")
    finally:
        s.close()


def test_sessions_scope_names_and_end_with_the_stream(
        stub: pb_grpc.LossServiceStub, region: shared_memory.SharedMemory) -> None:
    a, b = RawSession(stub), RawSession(stub)
    key = region.name.lstrip("/")
    assert not a.act(register=pb.RegisterRegion(name="r", key=key, byte_size=64)).error
    # b cannot use a's region by name: names resolve in the quoted session only.
    assert "no region 'r'" in invalid(stub, ref_request(b.id))
    assert invalid(stub, ref_request("f" * 32)).startswith(
        "shared_memory_session: unknown or closed session")
    a.close()
    assert invalid(stub, ref_request(a.id)).startswith("shared_memory_session: unknown")
    b.close()


@pytest.mark.parametrize(("key", "size", "needle"), [
    ("../../etc/passwd", 64, "register.key: '../../etc/passwd' is not a plain"),
    ("lossd-test-no-such-object", 64, "register.key: no shared-memory object"),
    (None, 1 << 20, "register.byte_size: 1048576 bytes asked, but"),
    (None, 0, "register.byte_size: must be positive"),
])
def test_bad_registrations_are_refused_and_the_session_goes_on(
        stub: pb_grpc.LossServiceStub, region: shared_memory.SharedMemory, key: str | None,
        size: int, needle: str) -> None:
    s = RawSession(stub)
    try:
        reply = s.act(register=pb.RegisterRegion(
            name="r", key=key or region.name.lstrip("/"), byte_size=size))
        assert reply.error.startswith(needle) and list(reply.regions) == []
        ok = s.act(register=pb.RegisterRegion(name="r", key=region.name.lstrip("/"),
                                              byte_size=64))
        assert not ok.error and list(ok.regions) == ["r"]
        twice = s.act(register=pb.RegisterRegion(name="r", key=region.name.lstrip("/"),
                                                 byte_size=64))
        assert twice.error.startswith("register.name: 'r' is already registered")
        assert list(s.act(unregister="r").regions) == []
        assert s.act(unregister="r").error.startswith("unregister: no region 'r'")
    finally:
        s.close()


def test_client_errors_are_typed(client: LossClient) -> None:
    with client.shared_memory(1 << 16) as shm, pytest.raises(lossd.InvalidArgument) as exc:
        shm.evaluate(np.zeros((2, 3), np.float32), np.array([0, 5]))
    assert exc.value.message.startswith("targets: class index 5")
