"""Shared memory for callers on the same host or in the same pod as the server.

Large batches skip the socket: the client writes its tensors into a POSIX shared-memory
object that it registers once with the server, and each call carries only offsets. The
server writes the per-sample losses back into the region::

    with LossClient("127.0.0.1:50051") as client, client.shared_memory(256 << 20) as shm:
        r = shm.evaluate(logits, targets, loss="cross_entropy")

The region lives as long as the ``SharedMemory`` object: closing it (or the process
going away) unregisters it on the server and removes the object. The server must see the
same ``/dev/shm`` (same host, or a shared ``emptyDir`` with ``medium: Memory`` in a pod).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lossd._errors import InvalidArgument, from_rpc_error
from lossd._result import Aggregates, LossResult
from lossd._wire import as_array
from lossd.v1 import loss_service_pb2 as pb

if TYPE_CHECKING:
    from lossd._client import LossClient

_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class SharedMemory:
    """A shared-memory region registered with the server for this client (see module doc).

    ``size`` is the region's size in bytes: it must hold predictions, targets, weights and
    the (N,) float32 per-sample output of the largest call.
    """

    def __init__(self, client: LossClient, size: int, *, name: str = "lossd") -> None:
        self._client = client
        self.name = name
        self._shm = shared_memory.SharedMemory(create=True, size=size)
        self.size = size
        self._outbox: queue.Queue[pb.SharedMemoryRequest | None] = queue.Queue()
        self._lock = threading.Lock()
        try:
            self._replies = client._stub.SharedMemorySession(self._requests())
            self.session = next(self._replies).session
            self._act(pb.SharedMemoryRequest(register=pb.RegisterRegion(
                name=name, key=self._shm.name.lstrip("/"), byte_size=size)))
        except grpc.RpcError as exc:
            self._release()
            raise from_rpc_error(exc) from exc
        except BaseException:
            self._release()
            raise

    def _requests(self) -> Iterator[pb.SharedMemoryRequest]:
        while (item := self._outbox.get()) is not None:
            yield item

    def _act(self, request: pb.SharedMemoryRequest) -> pb.SharedMemoryResponse:
        with self._lock:
            self._outbox.put(request)
            reply: pb.SharedMemoryResponse = next(self._replies)
        if reply.error:
            raise InvalidArgument(reply.error)
        return reply

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (to fill in place, e.g. ``np.frombuffer(shm.buffer, ...)``)."""
        buf = self._shm.buf
        assert buf is not None
        return buf

    def evaluate(self, predictions: Any, targets: Any = None, *, loss: str = "cross_entropy",
                 weights: Any = None, inputs: Mapping[str, Any] | None = None,
                 tag: str | None = None, timeout: float | None = None,
                 **options: Any) -> LossResult:
        """As ``LossClient.evaluate``, with the tensors passed through the region.

        Each input (extra ``inputs`` too) is copied once, into the region; the per-sample
        losses come back through it. Calls on one ``SharedMemory`` are serialised (they
        share the region).
        """
        named = {"predictions": predictions, "targets": targets, "weights": weights,
                 **{f"inputs.{k}": v for k, v in (inputs or {}).items()}}
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
        with self._lock:
            buf = self.buffer
            request = pb.EvaluateRequest(
                loss=loss, tag=tag or "", options=self._client._requests.options(options),
                shared_memory_session=self.session,
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
            try:
                reply = self._client._stub.Evaluate(request,
                                                    timeout=self._client._timeout(timeout))
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
            per_sample = np.frombuffer(buf, dtype="<f4", count=n, offset=out_offset).copy()
        return LossResult(per_sample=per_sample,
                          aggregates=Aggregates.from_proto(reply.aggregates))

    def close(self) -> None:
        """Unregister the region, end the session and remove the shared-memory object."""
        try:
            self._act(pb.SharedMemoryRequest(unregister=self.name))
        except (grpc.RpcError, InvalidArgument, StopIteration):
            pass  # the session's end releases it anyway
        finally:
            self._release()

    def _release(self) -> None:
        self._outbox.put(None)
        replies = getattr(self, "_replies", None)
        if replies is not None:
            replies.cancel()
        self._shm.close()
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
