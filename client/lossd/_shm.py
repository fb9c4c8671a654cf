"""Shared memory for callers on the same host or in the same pod as the server (Linux).

Large batches skip the socket: the client writes its tensors into a region of shared
memory registered once with the server, and each call carries only offsets. The server
writes the per-sample losses back into the region::

    with LossClient("127.0.0.1:50051") as client, client.shared_memory(256 << 20) as shm:
        r = shm.evaluate(logits, targets, loss="cross_entropy")

The region is a sealed memfd: created here with ``memfd_create``, sealed so that it can
never shrink or grow (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``), and passed to the
server process that holds the session over its Unix-domain descriptor socket
(SCM_RIGHTS). Nothing has a name in ``/dev/shm``, so nothing is left behind and no other
process can open or truncate it. Evaluations travel on the session's own stream, so they
reach that same process even when a pod runs several.

The region lives as long as the ``SharedMemory`` object: closing it (or the process going
away) ends the session, and the server unmaps the region. Should the session's stream
break (its connection closed: a restart, or the server's connection age after its grace),
the next ``evaluate`` opens a new session, registers the region again and retries, once.

The server's descriptor socket must be reachable from here: same host, or in a pod an
``emptyDir`` mounted in both containers (at the server's ``--shm-socket-dir``, or pass
``socket_dir=`` / ``LOSSD_SHM_SOCKET_DIR`` with where this container mounts it).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lossd._errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
    from_status,
)
from lossd._requests import Requests, analysis_fields, gradient_reduction
from lossd._result import LossResult, class_names_of
from lossd._wire import as_array
from lossd.v1 import loss_service_pb2 as pb

_ALIGN = 64
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ENV_SOCKET_DIR = "LOSSD_SHM_SOCKET_DIR"


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def sealed_memfd(size: int, name: str = "lossd") -> int:
    """A new memfd of ``size`` bytes sealed against shrinking and growing (its fd)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pass_descriptor(path: str, session: str, fd: int, *, timeout: float = 10.0) -> str:
    """Send ``fd`` for ``session`` to a server's descriptor socket; returns its handle.

    Raises FailedPrecondition when the socket cannot be reached from this process and
    InvalidArgument when the server refuses the descriptor.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            raise FailedPrecondition(
                f"shared memory needs the server on this host or in this pod: its descriptor "
                f"socket {path} cannot be reached from here ({exc.strerror}); mount the "
                f"server's --shm-socket-dir here and pass socket_dir= (or "
                f"{ENV_SOCKET_DIR}) where it is mounted") from None
        socket.send_fds(s, [session.encode()], [fd])
        reply = s.recv(4096).decode(errors="replace")
    status, _, text = reply.partition(" ")
    if status != "ok":
        raise InvalidArgument(text or "the descriptor socket closed without an answer")
    return text


@dataclass(frozen=True)
class ClientLink:
    """All that a :class:`SharedMemory` uses of its client; ``LossClient.shared_memory``
    hands it over, so this module reads no private attribute and imports no client."""

    session: Callable[[Iterator[pb.SharedMemoryRequest]], Any]
    """Opens a ``SharedMemorySession`` stream on the client's channel (token included)."""
    channel: grpc.Channel
    """The client's channel, waited on before a broken session is opened again."""
    deadline: Callable[[float | None], float | None]
    """A call's deadline: its ``timeout=``, else the client's ``timeout``."""
    requests: Requests
    """The client's request builder (loss options)."""


class SharedMemory:
    """A shared-memory region registered with the server for this client (see module doc).

    ``size`` is the region's size in bytes: it must hold predictions, targets, weights and
    the (N,) float32 per-sample output of the largest call. ``socket_dir``: where this
    process sees the server's ``--shm-socket-dir`` (default ``LOSSD_SHM_SOCKET_DIR``, else
    the path the server announced).
    """

    def __init__(self, link: ClientLink, size: int, *, name: str = "lossd",
                 socket_dir: str | os.PathLike[str] | None = None) -> None:
        self._link = link
        self.name = name
        self.size = size
        self._socket_dir = socket_dir
        self._lock = threading.Lock()
        self._outbox: queue.Queue[pb.SharedMemoryRequest | None] = queue.Queue()
        self._replies: Any = None
        self.session = ""
        self.descriptor_socket = ""
        self._fd = sealed_memfd(size, f"lossd-{name}")  # kept to register again elsewhere
        try:
            self._map = mmap.mmap(self._fd, size)
            self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> None:
        """Open a session on the server (the process the stream reaches) and register the
        region in it."""
        outbox: queue.Queue[pb.SharedMemoryRequest | None] = queue.Queue()
        self._outbox = outbox
        try:
            self._replies = self._link.session(self._requests(outbox))
            first = next(self._replies)
            self.session = first.session
            self.descriptor_socket = self._socket_path(first.descriptor_socket,
                                                       self._socket_dir)
            handle = pass_descriptor(self.descriptor_socket, self.session, self._fd)
            self._act(pb.SharedMemoryRequest(register=pb.RegisterRegion(
                name=self.name, descriptor=handle, byte_size=self.size)))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _reopen(self) -> None:
        """The session's stream broke (the connection was closed: the server's connection
        age, a restart): end what is left of it and open a new session."""
        self._end_stream()
        wait = self._link.deadline(None)
        try:  # the channel may be reconnecting: wait for it, as long as a call may take
            grpc.channel_ready_future(self._link.channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"the shared-memory session broke and the server did not "
                              f"come back within {wait} s") from None
        self._open()

    @staticmethod
    def _socket_path(announced: str, socket_dir: str | os.PathLike[str] | None) -> str:
        if not announced:
            raise FailedPrecondition("the server announced no descriptor socket (a server "
                                     "older than sealed-memfd shared memory?)")
        where = socket_dir if socket_dir is not None else os.environ.get(ENV_SOCKET_DIR)
        return os.fspath(Path(where) / Path(announced).name) if where else announced

    @staticmethod
    def _requests(outbox: queue.Queue[pb.SharedMemoryRequest | None]
                  ) -> Iterator[pb.SharedMemoryRequest]:
        while (item := outbox.get()) is not None:
            yield item

    def _act(self, request: pb.SharedMemoryRequest) -> pb.SharedMemoryResponse:
        self._outbox.put(request)
        reply: pb.SharedMemoryResponse = next(self._replies)
        if reply.error:
            raise from_status(reply.code or grpc.StatusCode.INVALID_ARGUMENT.value[0],
                              reply.error, reply.retry_after_ms)
        return reply

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (to fill in place, e.g. ``np.frombuffer(shm.buffer, ...)``)."""
        return memoryview(self._map)

    def evaluate(self, predictions: Any, targets: Any = None, *, loss: str = "cross_entropy",
                 weights: Any = None, inputs: Mapping[str, Any] | None = None,
                 tag: str | None = None, timeout: float | None = None,
                 gradient: str | None = None, per_class: bool = False,
                 accuracy: bool = False, top_k: int | Iterable[int] | None = None,
                 diagnostics: bool = False, hardest: int = 0,
                 quantiles: bool | Iterable[float] | None = None,
                 class_names: Sequence[str] | None = None, sample_ids: Any = None,
                 mergeable: bool = False, **options: Any) -> LossResult:
        """As ``LossClient.evaluate`` (the same options, analyses, ``gradient``,
        ``class_names``, ``sample_ids`` and ``mergeable`` too), with the tensors passed
        through the region.

        Each input (extra ``inputs`` too) is copied once, into the region; the per-sample
        losses come back through it (the gradient and the analyses in the reply). Calls on
        one ``SharedMemory`` are serialised (they share the region). ``timeout`` (default:
        the client's) bounds the evaluation on the server, which answers
        DEADLINE_EXCEEDED once it passed.
        """
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles, mergeable=mergeable)
        names = class_names_of(class_names)
        reduction = gradient_reduction(gradient)
        named = {"predictions": predictions, "targets": targets, "weights": weights,
                 "sample_ids": sample_ids, **{f"inputs.{k}": v for k, v in (inputs or {}).items()}}
        arrays = {field: as_array(value, field=field) for field, value in named.items()
                  if value is not None}
        first = arrays["predictions"][0]
        n = first.shape[0] if first.ndim else 0
        offsets, end = [], 0
        for arr, _ in arrays.values():
            offsets.append(end)
            end = _aligned(end + arr.nbytes)
        out_offset, end = end, end + 4 * n
        if end > self.size:
            raise ValueError(f"the call needs {end} bytes of shared memory; the region has "
                             f"{self.size}")
        deadline = self._link.deadline(timeout)
        with self._lock:
            buf = self.buffer
            request = pb.EvaluateRequest(
                loss=loss, tag=tag or "", options=self._link.requests.options(options),
                gradient=reduction, **analyses,
                per_sample_output=pb.SharedMemoryRef(region=self.name, offset=out_offset,
                                                     byte_size=4 * n))
            for (field, (arr, dtype)), offset in zip(arrays.items(), offsets, strict=True):
                np.frombuffer(buf, dtype=arr.dtype, count=arr.size, offset=offset).reshape(
                    arr.shape)[...] = arr
                tensor = pb.Tensor(dtype=dtype, shape=arr.shape, shared_memory=pb.
                                   SharedMemoryRef(region=self.name, offset=offset,
                                                   byte_size=arr.nbytes))
                if field.startswith("inputs."):
                    request.inputs[field.removeprefix("inputs.")].CopyFrom(tensor)
                else:
                    getattr(request, field).CopyFrom(tensor)
            action = pb.SharedMemoryRequest(evaluate=request, timeout_seconds=deadline or 0.0)
            reply = self._evaluate(action)
            if reply.error:
                raise from_status(reply.code, reply.error, reply.retry_after_ms)
            per_sample = np.frombuffer(buf, dtype="<f4", count=n, offset=out_offset).copy()
            del buf
        ids = arrays["sample_ids"][0] if "sample_ids" in arrays else None
        return LossResult.from_proto(reply.evaluation, per_sample=per_sample
                                     ).with_class_names(names).with_sample_ids(ids)

    def _evaluate(self, action: pb.SharedMemoryRequest) -> pb.SharedMemoryResponse:
        """Send an evaluate action; once, if the stream broke, on a new session (evaluating
        is idempotent, and the region's contents are still in place)."""
        for attempt in (1, 2):
            self._outbox.put(action)
            try:
                reply: pb.SharedMemoryResponse = next(self._replies)
                return reply
            except StopIteration:
                if attempt == 2:
                    raise Unavailable("the shared-memory session ended") from None
            except grpc.RpcError as exc:
                if attempt == 2 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(exc) from exc
            self._reopen()
        raise AssertionError("unreachable")

    def close(self) -> None:
        """End the session (the server unmaps the region) and unmap it here."""
        self._release()

    def _release(self) -> None:
        self._end_stream()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(BufferError, AttributeError):
            self._map.close()

    def _end_stream(self) -> None:
        self._outbox.put(None)
        if self._replies is not None:
            # The server ends the stream once it closed the session; a server that does
            # not within 10 s gets the stream cancelled (which closes it too).
            timer = threading.Timer(10.0, self._replies.cancel)
            timer.start()
            with contextlib.suppress(grpc.RpcError, StopIteration):
                for _ in self._replies:
                    pass
            timer.cancel()
            self._replies = None

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
