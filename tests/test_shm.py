"""Shared memory: same results as the socket, sealed memfds only, checked references,
scoped sessions, and no sequence of actions by a caller that crashes the server, corrupts
another caller's answer or leaks a mapping or a descriptor.

The hostile cases run against ``lossd serve`` in its own process (``served``), so a crash
shows as the process dying instead of taking pytest with it; leaks are counted in that
process's /proc/<pid>/fd and /proc/<pid>/maps.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import inspect
import json
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import lossd
from lossd import LossClient
from lossd._shm import SEALS, pass_descriptor
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.app import LossdServer
from tests.conftest import EngineBlocker, start_server

ROOT = Path(__file__).resolve().parent.parent
F_SEAL_FUTURE_WRITE = 0x10


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def memfd(size: int, seals: int = SEALS, name: str = "lossd-test") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class RawSession:
    """A SharedMemorySession driven by hand."""

    def __init__(self, stub: pb_grpc.LossServiceStub, timeout: float = 60) -> None:
        self.outbox: queue.Queue[pb.SharedMemoryRequest | None] = queue.Queue()
        self.replies = stub.SharedMemorySession(self._requests(), timeout=timeout)
        first = next(self.replies)
        self.id, self.socket = first.session, first.descriptor_socket

    def _requests(self) -> Iterator[pb.SharedMemoryRequest]:
        while (item := self.outbox.get()) is not None:
            yield item

    def act(self, **kwargs: Any) -> pb.SharedMemoryResponse:
        self.outbox.put(pb.SharedMemoryRequest(**kwargs))
        return next(self.replies)

    def register(self, name: str, fd: int, size: int) -> pb.SharedMemoryResponse:
        handle = pass_descriptor(self.socket, self.id, fd)
        return self.act(register=pb.RegisterRegion(name=name, descriptor=handle,
                                                   byte_size=size))

    def evaluate(self, req: pb.EvaluateRequest, timeout: float = 0) -> pb.SharedMemoryResponse:
        return self.act(evaluate=req, timeout_seconds=timeout)

    def close(self) -> None:
        self.outbox.put(None)
        list(self.replies)


@contextlib.contextmanager
def session(stub: pb_grpc.LossServiceStub) -> Iterator[RawSession]:
    s = RawSession(stub)
    try:
        yield s
    finally:
        s.close()


def ref_request(session: str = "", offset: int = 0, byte_size: int = 16, region: str = "r",
                out: int | None = None) -> pb.EvaluateRequest:
    """mse_loss of 4 float32 predictions in the region against zeros: sum of squares."""
    req = pb.EvaluateRequest(
        loss="mse_loss", shared_memory_session=session,
        predictions=pb.Tensor(dtype=pb.FLOAT32, shape=[4], shared_memory=pb.SharedMemoryRef(
            region=region, offset=offset, byte_size=byte_size)),
        targets=pb.Tensor(dtype=pb.FLOAT32, shape=[4], data=np.zeros(4, np.float32).tobytes()))
    if out is not None:
        req.per_sample_output.CopyFrom(pb.SharedMemoryRef(region=region, offset=out,
                                                          byte_size=16))
    return req


def invalid(stub: pb_grpc.LossServiceStub, req: pb.EvaluateRequest) -> str:
    with pytest.raises(grpc.RpcError) as exc:
        stub.Evaluate(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(exc.value.details())


@pytest.fixture
def stub(server: LossdServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.LossServiceStub(ch)


def fill(fd: int, values: list[float], offset: int = 0) -> None:
    os.pwrite(fd, np.asarray(values, np.float32).tobytes(), offset)


# ---------------------------------------------------------------------------------------
# The client


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


def test_shared_memory_takes_every_option_evaluate_takes(client: LossClient) -> None:
    """Analyses, the gradient, extra inputs and the tag go through shared memory as over
    the socket (the server answers them on the session's stream), with the same result."""
    def keywords(method: Callable[..., Any]) -> dict[str, Any]:
        return {name: (p.kind, p.default) for name, p in
                inspect.signature(method).parameters.items()}

    with client.shared_memory(1 << 20) as shm:
        assert keywords(shm.evaluate) == keywords(client.evaluate)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((64, 5)).astype(np.float32)
        t = rng.integers(0, 5, 64)
        w = rng.random(64).astype(np.float32)
        for kw in ({"per_class": True, "accuracy": True, "top_k": (1, 3)},
                   {"diagnostics": True, "hardest": 4, "quantiles": True, "weights": w},
                   {"gradient": "weighted_mean", "weights": w, "tag": "shm"}):
            a, b = shm.evaluate(x, t, **kw), client.evaluate(x, t, **kw)
            assert np.array_equal(a.per_sample, b.per_sample)
            assert json.dumps(a.to_dict()) == json.dumps(b.to_dict()), kw  # NaN bins too
        assert a.gradient is not None and a.gradient.shape == x.shape
        assert a.per_class is None and b.per_class is None  # not asked on the last call
        var = rng.random((64, 5)).astype(np.float32) + 0.1
        a = shm.evaluate(x, x + 1, loss="gaussian_nll_loss", inputs={"var": var},
                         hardest=2)
        b = client.evaluate(x, x + 1, loss="gaussian_nll_loss", inputs={"var": var},
                            hardest=2)
        assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
        assert a.hardest is not None and len(a.hardest) == 2


def test_the_region_is_a_sealed_memfd_with_no_name_in_dev_shm(client: LossClient) -> None:
    before = set(os.listdir("/dev/shm"))
    with client.shared_memory(1 << 16, name="sealed-check") as shm:
        assert set(os.listdir("/dev/shm")) == before
        assert Path(shm.descriptor_socket).is_socket()
        maps = Path("/proc/self/maps").read_text()
        assert "/memfd:lossd-sealed-check (deleted)" in maps


def test_call_larger_than_region_is_refused_locally(client: LossClient) -> None:
    with client.shared_memory(4096) as shm, pytest.raises(ValueError, match="needs"):
        shm.evaluate(np.zeros((100, 10), np.float32), np.zeros(100, np.int64))


def test_client_errors_are_typed(client: LossClient) -> None:
    with client.shared_memory(1 << 16) as shm:
        with pytest.raises(lossd.InvalidArgument) as exc:
            shm.evaluate(np.zeros((2, 3), np.float32), np.array([0, 5]))
        assert exc.value.message.startswith("targets: class index 5")
        # The session goes on after an error.
        r = shm.evaluate(np.zeros((2, 3), np.float32), np.array([0, 2]))
        assert np.allclose(r.per_sample, np.log(3))


def test_a_server_elsewhere_is_a_clear_error(server: LossdServer, tmp_path: Path) -> None:
    with LossClient(f"127.0.0.1:{server.port}") as client, \
            pytest.raises(lossd.FailedPrecondition) as exc:
        client.shared_memory(4096, socket_dir=tmp_path)
    assert "cannot be reached from here" in exc.value.message
    assert "socket_dir=" in exc.value.message


def test_socket_dir_maps_the_servers_directory_as_mounted_here(
        server: LossdServer, tmp_path: Path) -> None:
    """A caller container that mounts the shared emptyDir elsewhere names its own path."""
    assert server.descriptor_socket is not None
    (tmp_path / server.descriptor_socket.path.name).symlink_to(server.descriptor_socket.path)
    with LossClient(f"127.0.0.1:{server.port}") as client, \
            client.shared_memory(4096, socket_dir=tmp_path) as shm:
        assert shm.descriptor_socket == str(tmp_path / server.descriptor_socket.path.name)
        assert shm.evaluate(np.ones(4, np.float32), np.zeros(4, np.float32),
                            loss="mse_loss").aggregates.sum == 4


def test_shared_memory_can_be_switched_off() -> None:
    srv = start_server(shared_memory=False)
    try:
        with LossClient(f"127.0.0.1:{srv.port}") as client, \
                pytest.raises(lossd.FailedPrecondition, match="shared memory is off"):
            client.shared_memory(4096)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            assert "shared memory is off" in invalid(pb_grpc.LossServiceStub(ch),
                                                     ref_request("f" * 32))
    finally:
        srv.stop(0)


# ---------------------------------------------------------------------------------------
# Sessions, references, registrations


def test_references_are_checked_against_the_registered_size(
        stub: pb_grpc.LossServiceStub) -> None:
    fd = memfd(4096)
    fill(fd, [1, 2, 3, 4])
    with session(stub) as s:
        assert not s.register("r", fd, 64).error
        # On the session's stream (the client's way) and as a unary call in this process.
        assert s.evaluate(ref_request()).evaluation.aggregates.sum == 1 + 4 + 9 + 16
        assert stub.Evaluate(ref_request(s.id), timeout=10).aggregates.sum == 30
        bad = s.evaluate(ref_request(offset=56))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert bad.error.startswith(
            "predictions.shared_memory: bytes [56, 72) outside region 'r' of 64 bytes")
        assert invalid(stub, ref_request(s.id, offset=56)).startswith(
            "predictions.shared_memory: bytes [56, 72)")
        assert s.evaluate(ref_request(offset=-4)).error.startswith("predictions.shared_memory")
        assert s.evaluate(ref_request(byte_size=12)).error.startswith("predictions.data: 12")
        assert s.evaluate(ref_request(region="x")).error.startswith(
            "predictions.shared_memory.region: no region 'x'")
        assert s.evaluate(ref_request(out=60)).error.startswith(
            "per_sample_output: bytes [60, 76) outside region 'r'")
        assert s.evaluate(ref_request(session="e" * 32)).error.startswith(
            "shared_memory_session: not this stream's session")
        # Per-sample losses written back into the region.
        ok = s.evaluate(ref_request(out=32))
        assert not ok.error and not ok.evaluation.per_sample.data
        assert np.frombuffer(os.pread(fd, 16, 32), np.float32).tolist() == [1, 4, 9, 16]
    os.close(fd)


def test_sessions_scope_names_and_end_with_the_stream(stub: pb_grpc.LossServiceStub) -> None:
    fd = memfd(4096)
    a, b = RawSession(stub), RawSession(stub)
    assert not a.register("r", fd, 64).error
    # b cannot use a's region by name: names resolve in the quoted session only.
    assert "no region 'r'" in b.evaluate(ref_request()).error
    assert "no region 'r'" in invalid(stub, ref_request(b.id))
    detail = invalid(stub, ref_request("f" * 32))
    assert detail.startswith("shared_memory_session: unknown or closed session")
    assert "evaluate on that stream" in detail
    # b cannot claim a descriptor passed for a.
    handle = pass_descriptor(a.socket, a.id, fd)
    assert b.act(register=pb.RegisterRegion(name="r", descriptor=handle, byte_size=64)
                 ).error.startswith("register.descriptor: no descriptor")
    a.close()
    assert invalid(stub, ref_request(a.id)).startswith("shared_memory_session: unknown")
    with pytest.raises(lossd.InvalidArgument, match="unknown or closed session"):
        pass_descriptor(a.socket, a.id, fd)
    b.close()
    os.close(fd)


@pytest.mark.parametrize(("register", "needle"), [
    ({"key": "psm_0123"}, "register.key: plain /dev/shm names are refused"),
    ({"key": "../../etc/passwd"}, "register.key: plain /dev/shm names are refused"),
    ({}, "register.descriptor: missing"),
    ({"descriptor": "0123456789abcdef"}, "register.descriptor: no descriptor '0123456789abcdef'"),
    ({"descriptor": None, "byte_size": 1 << 20}, "register.byte_size: 1048576 bytes asked, but "
                                                 "the memfd holds 4096"),
    ({"descriptor": None, "byte_size": 0}, "register.byte_size: must be positive"),
    ({"descriptor": None, "name": ""}, "register.name: missing"),
])
def test_bad_registrations_are_refused_and_the_session_goes_on(
        stub: pb_grpc.LossServiceStub, register: dict[str, Any], needle: str) -> None:
    fd = memfd(4096)
    with session(stub) as s:
        fields: dict[str, Any] = {"name": "r", "byte_size": 64, **register}
        if "descriptor" in fields and fields["descriptor"] is None:
            fields["descriptor"] = pass_descriptor(s.socket, s.id, fd)
        reply = s.act(register=pb.RegisterRegion(**fields))
        assert reply.error.startswith(needle), reply.error
        assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert list(reply.regions) == []
        ok = s.register("r", fd, 64)
        assert not ok.error and list(ok.regions) == ["r"]
        assert s.register("r", fd, 64).error.startswith("register.name: 'r' is already")
        assert list(s.act(unregister="r").regions) == []
        assert s.act(unregister="r").error.startswith("unregister: no region 'r'")
        assert s.act().error.startswith("action: missing")
    os.close(fd)


def test_the_mapped_total_is_bounded_per_process() -> None:
    srv = start_server(shm_max_mb=1)
    fd = memfd(1 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch, \
                session(pb_grpc.LossServiceStub(ch)) as s:
            assert not s.register("a", fd, 1 << 19).error
            over = s.register("b", fd, (1 << 19) + 1)
            assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "--shm-max-mb" in over.error
            assert not s.register("b", fd, 1 << 19).error
            assert not s.act(unregister="a").error
            assert not s.register("c", fd, 1 << 19).error
    finally:
        os.close(fd)
        srv.stop(0)


def _libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _descriptor_cases() -> list[tuple[str, Callable[[Path], list[int]], str]]:
    def unsealed(_: Path) -> list[int]:
        return [memfd(4096, seals=0)]

    def shrink_only(_: Path) -> list[int]:
        return [memfd(4096, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)]

    def not_frozen(_: Path) -> list[int]:
        return [memfd(4096, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)]

    def write_sealed(_: Path) -> list[int]:
        return [memfd(4096, seals=SEALS | fcntl.F_SEAL_WRITE)]

    def future_write_sealed(_: Path) -> list[int]:
        return [memfd(4096, seals=SEALS | F_SEAL_FUTURE_WRITE)]

    def empty(_: Path) -> list[int]:
        return [memfd(0)]

    def dev_shm(_: Path) -> list[int]:
        shm = shared_memory.SharedMemory(create=True, size=4096)
        fd = os.dup(shm._fd)  # type: ignore[attr-defined]
        shm.close()
        shm.unlink()
        return [fd]

    def regular_file(tmp: Path) -> list[int]:
        path = tmp / "plain"
        path.write_bytes(b"\0" * 4096)
        return [os.open(path, os.O_RDWR)]

    def pipe(_: Path) -> list[int]:
        r, w = os.pipe()
        os.close(w)
        return [r]

    def two(_: Path) -> list[int]:
        return [memfd(4096), memfd(4096)]

    def read_only(_: Path) -> list[int]:
        fd = memfd(4096)
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        os.close(fd)
        return [ro]

    return [
        ("unsealed", unsealed, "descriptor: not sealed with F_SEAL_SHRINK | F_SEAL_GROW | "
                               "F_SEAL_SEAL"),
        ("shrink-only", shrink_only, "descriptor: not sealed with F_SEAL_GROW"),
        ("seals-not-sealed", not_frozen, "descriptor: not sealed with F_SEAL_SEAL"),
        ("write-sealed", write_sealed, "descriptor: write-sealed"),
        ("future-write-sealed", future_write_sealed, "descriptor: write-sealed"),
        ("empty", empty, "descriptor: the memfd is empty"),
        ("dev-shm-object", dev_shm, "descriptor: not sealed with F_SEAL_SHRINK"),
        # "not a memfd (the file does not take seals)", or "not sealed" on a tmpfs /tmp.
        ("regular-file", regular_file, "descriptor: not "),
        ("pipe", pipe, "descriptor: not a memfd (not a regular file)"),
        ("two-descriptors", two, "descriptor: send exactly one descriptor"),
        ("read-only", read_only, "register.descriptor: cannot map the memfd read-write"),
    ]


@pytest.mark.parametrize(("make", "needle"), [(m, n) for _, m, n in _descriptor_cases()],
                         ids=[i for i, _, _ in _descriptor_cases()])
def test_descriptors_that_are_not_safe_to_map_are_refused(
        stub: pb_grpc.LossServiceStub, tmp_path: Path, make: Callable[[Path], list[int]],
        needle: str) -> None:
    fds = make(tmp_path)
    with session(stub) as s:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(s.socket)
            socket.send_fds(sock, [s.id.encode()], fds)
            reply = sock.recv(4096).decode()
        if reply.startswith("ok "):  # refused only when mapped (a read-only descriptor)
            reply = s.act(register=pb.RegisterRegion(name="r", descriptor=reply[3:],
                                                     byte_size=4096)).error
        else:
            assert reply.startswith("error ")
            reply = reply[6:]
        assert reply.startswith(needle), reply
        # The session and the socket go on.
        good = memfd(4096)
        fill(good, [1, 1, 1, 1])
        assert not s.register("ok", good, 4096).error
        assert s.evaluate(ref_request(region="ok")).evaluation.aggregates.sum == 4
        os.close(good)
    for fd in fds:
        os.close(fd)


def test_messages_without_a_session_or_a_descriptor_are_refused(
        server: LossdServer, stub: pb_grpc.LossServiceStub) -> None:
    assert server.descriptor_socket is not None
    path = os.fspath(server.descriptor_socket.path)
    fd = memfd(4096)

    def send(payload: bytes, fds: list[int]) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            if fds:
                socket.send_fds(sock, [payload], fds)
            else:
                sock.send(payload)
            return sock.recv(4096).decode()

    assert send(b"not a session", [fd]).startswith("error session: the message must be")
    assert send(b"0" * 32, [fd]).startswith("error session: unknown or closed session")
    with session(stub) as s:
        assert send(s.id.encode(), []).startswith("error descriptor: send exactly one")
        # A connection that sends nothing is closed by the server; others are served.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as idle:
            idle.connect(path)
            assert send(s.id.encode(), [fd]).startswith("ok ")
            idle.settimeout(30)
            assert idle.recv(16) == b""
    os.close(fd)


def test_shared_targets_are_copied_before_validation(
        server: LossdServer, stub: pb_grpc.LossServiceStub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller rewriting its targets after validation cannot get unchecked class indices
    to the kernel (on CUDA that would poison the device for every caller)."""
    blocker = EngineBlocker(server.engine, monkeypatch)
    x = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    t = np.arange(8, dtype=np.int64) % 5
    fd = memfd(4096)
    os.pwrite(fd, x.tobytes(), 0)
    os.pwrite(fd, t.tobytes(), 1024)
    req = pb.EvaluateRequest(
        loss="cross_entropy",
        predictions=pb.Tensor(dtype=pb.FLOAT32, shape=[8, 5], shared_memory=pb.SharedMemoryRef(
            region="r", offset=0, byte_size=x.nbytes)),
        targets=pb.Tensor(dtype=pb.INT64, shape=[8], shared_memory=pb.SharedMemoryRef(
            region="r", offset=1024, byte_size=t.nbytes)))
    with session(stub) as s, futures.ThreadPoolExecutor(1) as pool:
        assert not s.register("r", fd, 4096).error
        answer = pool.submit(s.evaluate, req)
        wait_for(lambda: blocker.entered == 1)
        os.pwrite(fd, np.full(8, 1 << 40, np.int64).tobytes(), 1024)  # far out of range
        blocker.release.set()
        got = answer.result(30)
    assert not got.error, got.error
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                             reduction="none")
    assert np.array_equal(np.frombuffer(got.evaluation.per_sample.data, np.float32),
                          want.numpy())
    os.close(fd)


def _server_maps(name: str) -> int:
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines()
               if f"/memfd:{name} " in line)


def test_a_session_closed_mid_request_keeps_the_mapping_until_the_request_ends(
        server: LossdServer, stub: pb_grpc.LossServiceStub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = EngineBlocker(server.engine, monkeypatch)
    fd = memfd(4096, name="lossd-mid-request")
    fill(fd, [1, 2, 3, 4])
    mine = mmap.mmap(fd, 4096)  # the caller's own mapping
    s = RawSession(stub)
    assert not s.register("r", fd, 4096).error
    assert _server_maps("lossd-mid-request") == 2
    with futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(stub.Evaluate, ref_request(s.id, out=64), timeout=30)
        wait_for(lambda: blocker.entered == 1)
        s.close()  # the session ends while the request computes
        assert server.servicer is not None and server.servicer.shared_memory is not None
        wait_for(lambda: not server.servicer.shared_memory.holds(s.id))  # type: ignore[union-attr]
        assert _server_maps("lossd-mid-request") == 2  # still viewed by the request
        blocker.release.set()
        reply = answer.result(30)
    assert reply.aggregates.sum == 30
    assert np.frombuffer(mine[64:80], np.float32).tolist() == [1, 4, 9, 16]
    wait_for(lambda: _server_maps("lossd-mid-request") == 1)  # only the caller's now
    mine.close()
    os.close(fd)


def test_evaluations_on_the_session_wait_for_a_slot_and_keep_their_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(concurrency=1, max_waiting=0)
    blocker = EngineBlocker(srv.engine, monkeypatch)
    fd = memfd(4096)
    fill(fd, [1, 2, 3, 4])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch, \
                futures.ThreadPoolExecutor(2) as pool:
            stub = pb_grpc.LossServiceStub(ch)
            a, b = RawSession(stub), RawSession(stub)
            assert not a.register("r", fd, 4096).error
            assert not b.register("r", fd, 4096).error
            first = pool.submit(a.evaluate, ref_request())
            wait_for(lambda: blocker.entered == 1)
            # The only slot is taken and no call may wait: a unary call is refused...
            with pytest.raises(grpc.RpcError) as busy:
                stub.Evaluate(ref_request(a.id), timeout=10)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # ... an admitted session's evaluation waits, with its own deadline.
            late = b.evaluate(ref_request(), timeout=0.3)
            assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], late
            second = pool.submit(b.evaluate, ref_request())
            wait_for(lambda: srv.admission.waiting == 1)
            blocker.release.set()
            assert first.result(30).evaluation.aggregates.sum == 30
            assert second.result(30).evaluation.aggregates.sum == 30
            a.close()
            b.close()
    finally:
        blocker.release.set()
        os.close(fd)
        srv.stop(0)


# ---------------------------------------------------------------------------------------
# Hostile callers against a server in its own process


class Served:
    """``lossd serve`` in a subprocess, with its pid, address and descriptor socket."""

    def __init__(self, *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="lossd-shm-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
        env.update(LOSSD_PORT="0", LOSSD_METRICS_PORT="-1", LOSSD_DEVICE="cpu",
                   LOSSD_LOG_FORMAT="json", LOSSD_SHM_SOCKET_DIR=self.dir)
        args = args if "--processes" in args else ("--processes", "1", *args)
        self.proc = subprocess.Popen([sys.executable, "-m", "lossd_server.serve", *args],
                                     env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = json.loads(raw)
            if line["msg"] == "lossd serving":
                break
        else:
            raise AssertionError(f"lossd serve exited {self.proc.wait()}")
        self.address = str(line["address"])
        self.socket = str(line.get("descriptor_socket") or "")  # (one process)
        self.workers = [int(pid) for pid in line.get("workers") or []]  # (several)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr or ()),
                         daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return out

    def memfds(self) -> int:
        return sum(1 for target in self.fds() if target.startswith("/memfd:"))

    def memfd_maps(self) -> int:
        text = Path(f"/proc/{self.pid}/maps").read_text()
        return sum(1 for line in text.splitlines() if "/memfd:" in line)

    def answers_correctly(self) -> None:
        x, t = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32), np.array([0, 2])
        want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                                 reduction="none").numpy()
        with LossClient(self.address, timeout=30) as client:
            assert np.array_equal(client.evaluate(x, t).per_sample, want)
            with client.shared_memory(1 << 16) as shm:
                assert np.array_equal(shm.evaluate(x, t).per_sample, want)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    srv = Served("--grace-seconds", "1")
    yield srv
    assert srv.alive(), "the server died"
    assert srv.stop() == 0
    assert not os.listdir(srv.dir), "the descriptor socket was left behind"


def test_a_truncated_dev_shm_object_no_longer_crashes_the_server(served: Served) -> None:
    """The issue's reproduction: register a plain /dev/shm object, ftruncate it to 0,
    evaluate into it. That killed the server with SIGBUS; the name is now refused."""
    shm = shared_memory.SharedMemory(create=True, size=8 << 20)
    try:
        with grpc.insecure_channel(served.address) as ch:
            stub = pb_grpc.LossServiceStub(ch)
            with session(stub) as s:
                reply = s.act(register=pb.RegisterRegion(name="r", key=shm.name.lstrip("/"),
                                                         byte_size=8 << 20))
                assert reply.error.startswith("register.key: plain /dev/shm names are refused")
                os.ftruncate(shm._fd, 0)  # type: ignore[attr-defined]
                assert s.evaluate(ref_request()).error.startswith(
                    "predictions.shared_memory.region: no region 'r'")
                assert invalid(stub, ref_request(s.id)).startswith(
                    "predictions.shared_memory.region: no region 'r'")
                # Passing the object's descriptor instead: it cannot be sealed.
                with pytest.raises(lossd.InvalidArgument, match="not sealed"):
                    pass_descriptor(s.socket, s.id, shm._fd)  # type: ignore[attr-defined]
    finally:
        shm.close()
        shm.unlink()
    assert served.alive()
    served.answers_correctly()


def test_a_sealed_region_cannot_shrink_or_grow_and_holes_read_as_zeros(
        served: Served) -> None:
    fd = memfd(1 << 20)
    fill(fd, [1, 2, 3, 4])
    with grpc.insecure_channel(served.address) as ch, \
            session(pb_grpc.LossServiceStub(ch)) as s:
        assert not s.register("r", fd, 1 << 20).error
        for size in (0, 4096, 2 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert os.fstat(fd).st_size == 1 << 20
        assert s.evaluate(ref_request()).evaluation.aggregates.sum == 30
        # Punching a hole frees the pages; the server reads zeros there, no fault.
        _libc_fallocate(fd, 0x02 | 0x01, 0, 1 << 20)  # PUNCH_HOLE | KEEP_SIZE
        assert s.evaluate(ref_request(out=1 << 19)).evaluation.aggregates.sum == 0
        assert os.pread(fd, 16, 1 << 19) == bytes(16)
    os.close(fd)
    assert served.alive()
    served.answers_correctly()


def test_refused_descriptors_and_closed_sessions_leak_nothing(served: Served,
                                                              tmp_path: Path) -> None:
    served.answers_correctly()  # warm: the first calls open lazily created descriptors
    wait_for(lambda: served.memfds() == 0 and served.memfd_maps() == 0)
    baseline = len(served.fds())
    with grpc.insecure_channel(served.address) as ch:
        stub = pb_grpc.LossServiceStub(ch)
        for _ in range(3):
            for _, make, _ in _descriptor_cases():
                with session(stub) as s:
                    fds = make(tmp_path)
                    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                        sock.connect(s.socket)
                        socket.send_fds(sock, [s.id.encode()], fds)
                        sock.recv(4096)
                    for fd in fds:
                        os.close(fd)
                    # Passed but never registered: released with the session.
                    good = memfd(1 << 16)
                    pass_descriptor(s.socket, s.id, good)
                    os.close(good)
            for _ in range(10):  # registered, used, and left for the session's end
                with session(stub) as s:
                    fd = memfd(1 << 16)
                    fill(fd, [1, 2, 3, 4])
                    assert not s.register("r", fd, 1 << 16).error
                    assert not s.register("q", fd, 1 << 15).error
                    os.close(fd)
                    assert s.evaluate(ref_request(out=64)).evaluation.aggregates.sum == 30
    wait_for(lambda: served.memfds() == 0 and served.memfd_maps() == 0)
    wait_for(lambda: len(served.fds()) <= baseline)
    assert served.alive()


_DYING_CALLER = textwrap.dedent("""
    import sys, numpy as np
    from lossd import LossClient
    with LossClient(sys.argv[1]) as client, client.shared_memory(4 << 20) as shm:
        x = np.random.default_rng(0).standard_normal((4096, 100)).astype(np.float32)
        t = np.zeros(4096, np.int64)
        shm.evaluate(x, t)
        print("ready", flush=True)
        while True:
            shm.evaluate(x, t)
""")


def test_callers_killed_mid_call_leave_nothing_behind(served: Served) -> None:
    served.answers_correctly()
    wait_for(lambda: served.memfds() == 0 and served.memfd_maps() == 0)
    baseline = len(served.fds())
    for i in range(4):
        caller = subprocess.Popen([sys.executable, "-c", _DYING_CALLER, served.address],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert caller.stdout is not None and caller.stdout.readline() == "ready\n"
        time.sleep(0.05 * i)
        caller.send_signal(signal.SIGKILL)
        caller.wait(30)
    wait_for(lambda: served.memfds() == 0 and served.memfd_maps() == 0, timeout=60)
    wait_for(lambda: len(served.fds()) <= baseline, timeout=60)
    assert served.alive()
    served.answers_correctly()


def test_racing_unregister_and_close_against_evaluations(served: Served) -> None:
    """Sessions closed and regions unregistered while evaluations use them: every answer
    is right or an error naming the session or region; the server goes on."""
    fd = memfd(1 << 16)
    fill(fd, [1, 2, 3, 4])
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(served.address) as ch:
        stub = pb_grpc.LossServiceStub(ch)
        for _ in range(20):
            s = RawSession(stub)
            assert not s.register("r", fd, 1 << 16).error
            stop = threading.Event()

            def hammer(sid: str = s.id, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    try:
                        r = stub.Evaluate(ref_request(sid, out=64), timeout=10)
                        assert r.aggregates.sum == 30
                        outcomes["ok"] = outcomes.get("ok", 0) + 1
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                        assert (exc.details() or "").startswith((
                            "shared_memory_session: unknown", "predictions.shared_memory.region",
                            "per_sample_output.region")), exc.details()
                        outcomes["refused"] = outcomes.get("refused", 0) + 1

            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            s.act(unregister="r")
            s.close()
            time.sleep(0.02)
            stop.set()
            for t in threads:
                t.join(30)
    os.close(fd)
    assert outcomes.get("ok", 0) > 0 and outcomes.get("refused", 0) > 0, outcomes
    wait_for(lambda: served.memfds() == 0 and served.memfd_maps() == 0)
    assert served.alive()
    served.answers_correctly()


def test_a_broken_session_is_opened_again_transparently() -> None:
    """The stream of a session breaks when its server goes (a restart, or a connection
    past --max-connection-age and its grace): the next evaluate opens a new session on
    whichever process answers now, registers the region there, and succeeds."""
    first = start_server()
    port = first.port
    x, t = np.ones((4, 3), np.float32), np.array([0, 1, 2, 0])
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                             reduction="none").numpy()
    with LossClient(f"127.0.0.1:{port}", timeout=30) as client, \
            client.shared_memory(1 << 16) as shm:
        assert np.array_equal(shm.evaluate(x, t).per_sample, want)
        old_session, old_socket = shm.session, shm.descriptor_socket
        first.stop(0)
        second = start_server(port=port)
        try:
            assert np.array_equal(shm.evaluate(x, t).per_sample, want)
            assert shm.session != old_session and shm.descriptor_socket != old_socket
            assert second.servicer is not None and second.servicer.shared_memory is not None
            assert second.servicer.shared_memory.holds(shm.session)
        finally:
            second.stop(0)


def test_sessions_and_their_evaluations_reach_the_process_holding_them() -> None:
    """`lossd serve --processes 2`: two worker processes on one port. Each session, and
    every evaluation on it, reaches the worker holding it (each has its own descriptor
    socket); a unary call quoting a session held by the other worker is told so."""
    srv = Served("--processes", "2")
    try:
        pids = set(srv.workers)
        assert len(pids) == 2
        port = int(srv.address.rsplit(":", 1)[1])
        address = f"127.0.0.1:{port}"
        x = np.random.default_rng(3).standard_normal((64, 10)).astype(np.float32)
        t = np.arange(64) % 10
        want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                                 reduction="none").numpy()
        reached: set[int] = set()
        held = []
        own_connection = [("grpc.use_local_subchannel_pool", 1)]  # not shared in-process
        for _ in range(16):  # each client its own connection, spread by the kernel
            client = LossClient(address, timeout=30, channel=grpc.insecure_channel(
                address, options=own_connection))
            shm = client.shared_memory(1 << 16)
            reached.add(int(Path(shm.descriptor_socket).name.split("-")[2]))
            for _ in range(3):
                assert np.array_equal(shm.evaluate(x, t).per_sample, want)
            held.append((client, shm))
        assert reached == pids
        # A unary call quoting a session reaches either process: the one holding it
        # answers, the other names the problem and the way out.
        client, shm = held[0]
        np.frombuffer(shm.buffer, np.float32, count=4)[:] = [1, 2, 3, 4]
        answers: dict[str, int] = {}
        for _ in range(40):
            with grpc.insecure_channel(address, options=own_connection) as ch:
                try:
                    r = pb_grpc.LossServiceStub(ch).Evaluate(
                        ref_request(shm.session, region="lossd"), timeout=30)
                    assert r.aggregates.sum == 30
                    answers["held"] = answers.get("held", 0) + 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "evaluate on that stream" in (exc.details() or "")
                    answers["elsewhere"] = answers.get("elsewhere", 0) + 1
        assert set(answers) == {"held", "elsewhere"}, answers
        for client, shm in held:
            shm.close()
            client.close()
    finally:
        assert srv.stop() == 0
    assert not os.listdir(srv.dir)  # each worker removed its descriptor socket


def test_descriptors_held_are_bounded_per_process() -> None:
    """Every region and every passed descriptor holds one descriptor in the server (mmap
    keeps a duplicate): a process holds at most max_descriptors, so no caller can run it
    out of descriptors."""
    from lossd_server.errors import RequestError
    from lossd_server.shm import SharedMemoryRegistry

    registry = SharedMemoryRegistry(max_descriptors=2)
    a, b = registry.open_session(), registry.open_session()
    before = len(os.listdir("/proc/self/fd"))
    first = registry.deposit(a.id, memfd(4096))
    registry.deposit(b.id, memfd(4096))
    with pytest.raises(RequestError) as exc:
        registry.deposit(a.id, memfd(4096))  # refused, and closed
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    registry.register(a, "r", 4096, descriptor=first)  # a passed one becomes a region
    assert len(os.listdir("/proc/self/fd")) == before + 2
    registry.close_session(b.id)
    registry.deposit(a.id, memfd(4096))  # room again
    registry.close_session(a.id)
    assert len(os.listdir("/proc/self/fd")) == before
    assert registry.mapped_bytes == 0
