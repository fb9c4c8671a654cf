"""The transport floor: a minimal gRPC service that does no computation.

It serves ``lossd.v1.LossService/Evaluate`` (and ``EvaluateStream``) through grpcio's
generic handlers with raw-bytes (de)serializers: it receives the same request bytes lossd
receives, reads N (the first dimension of ``predictions``) by walking the message's wire
format (no copy of the payload, no protobuf parse), and answers an ``EvaluateResponse``
holding N float32 zeros (serialised once per N). What a call costs beyond this is not
transport: parsing, decoding, validation, compute, aggregation, encoding, scheduling.

Two variants, chosen with ``--mode``: ``sync`` (``grpc.server`` on a thread pool of
``--workers`` threads, like lossd) and ``async`` (``grpc.aio.server``). A third, ``torch``,
is the least a Python service computing the loss does: the sync server, whose Evaluate
views the request's predictions and targets in place (numpy, then torch, no copy), runs
``torch.nn.functional.cross_entropy(reduction="none")`` on one torch thread and answers the
per-sample losses, their count, sum and mean; no checks, no metrics, no options (it serves
the plain ``small`` and ``large`` workloads). What lossd costs beyond it is lossd's own
work. Run as a subprocess by ``bench.run``::

    python -m bench.floor_server --mode sync --port 50100
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from lossd.v1 import loss_service_pb2 as pb

SERVICE = "lossd.v1.LossService"
_responses: dict[int, bytes] = {}


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """The same server channel options lossd uses (lossd_server.app.create_server)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1)]


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Any:
    """(field number, wire type, value or (start, end) of a length-delimited field)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(buf, i)
            yield number, kind, value
        elif kind == 2:
            length, i = _varint(buf, i)
            yield number, kind, (i, i + length)
            i += length
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            raise ValueError(f"wire type {kind}")


def n_of(raw: bytes) -> int:
    """First dimension of EvaluateRequest.predictions (field 2; Tensor.shape is field 2)."""
    buf = memoryview(raw)
    for number, kind, where in _fields(buf, 0, len(buf)):
        if number == 2 and kind == 2:
            for sub, sub_kind, value in _fields(buf, *where):
                if sub == 2:
                    return int(value if sub_kind == 0 else _varint(buf, value[0])[0])
    return 0


def reply(raw: bytes) -> bytes:
    """A serialised EvaluateResponse with N float32 zeros, N from the request's shape."""
    n = n_of(raw)
    out = _responses.get(n)
    if out is None:
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(dtype=pb.FLOAT32, shape=[n],
                                                        data=bytes(4 * n)))
        resp.aggregates.count = n
        out = _responses[n] = resp.SerializeToString()
    return out


_NUMPY = {pb.FLOAT32: "<f4", pb.INT64: "<i8"}


def _tensor(buf: memoryview, start: int, end: int) -> Any:
    """A Tensor message's data as a numpy view of its shape (dtype 1, shape 2, data 3)."""
    import numpy as np  # (imported once by main: a dictionary lookup here)

    dtype, shape, data = pb.DTYPE_UNSPECIFIED, [], (0, 0)
    for number, kind, value in _fields(buf, start, end):
        if number == 1:
            dtype = value
        elif number == 2 and kind == 0:
            shape.append(value)
        elif number == 2:  # packed
            i, stop = value
            while i < stop:
                dim, i = _varint(buf, i)
                shape.append(dim)
        elif number == 3:
            data = value
    return np.frombuffer(buf[data[0]:data[1]], dtype=_NUMPY[dtype]).reshape(shape)


def computed(raw: bytes) -> bytes:
    """cross_entropy of the request's predictions (field 2) and targets (field 3), and
    the answer lossd gives a plain request: per-sample losses, count, sum and mean."""
    import torch  # (imported once by main: a dictionary lookup here)
    import torch.nn.functional as F

    buf = memoryview(raw)
    tensors = {number: _tensor(buf, *where) for number, kind, where in _fields(buf, 0, len(buf))
               if number in (2, 3) and kind == 2}
    losses = F.cross_entropy(torch.from_numpy(tensors[2]), torch.from_numpy(tensors[3]),
                             reduction="none")
    values = losses.numpy()
    total = float(values.sum(dtype="f8"))
    resp = pb.EvaluateResponse(per_sample=pb.Tensor(dtype=pb.FLOAT32, shape=[len(values)],
                                                    data=values.tobytes()))
    agg = resp.aggregates
    agg.count, agg.sum, agg.mean = len(values), total, total / max(1, len(values))
    return bytes(resp.SerializeToString())


def _identity(b: bytes) -> bytes:
    return b


def sync_handler(answer: Callable[[bytes], bytes] = reply) -> grpc.GenericRpcHandler:
    def evaluate(req: bytes, context: grpc.ServicerContext) -> bytes:
        return answer(req)

    def evaluate_stream(reqs: Iterator[bytes], context: grpc.ServicerContext
                        ) -> Iterator[bytes]:
        for req in reqs:
            yield answer(req)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            evaluate, request_deserializer=_identity, response_serializer=_identity),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            evaluate_stream, request_deserializer=_identity, response_serializer=_identity),
    })


def async_handler() -> grpc.GenericRpcHandler:
    async def evaluate(req: bytes, context: Any) -> bytes:
        return reply(req)

    async def evaluate_stream(reqs: AsyncIterator[bytes], context: Any
                              ) -> AsyncIterator[bytes]:
        async for req in reqs:
            yield reply(req)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            evaluate, request_deserializer=_identity, response_serializer=_identity),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            evaluate_stream, request_deserializer=_identity, response_serializer=_identity),
    })


def serve_sync(host: str, port: int, workers: int, options: list[tuple[str, Any]],
               answer: Callable[[bytes], bytes] = reply) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    server.add_generic_rpc_handlers((sync_handler(answer),))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"floor sync serving on {host}:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()


async def serve_async(host: str, port: int, options: list[tuple[str, Any]]) -> None:
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((async_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"floor async serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("sync", "async", "torch"), default="sync")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=8, help="sync: thread pool size")
    p.add_argument("--max-message-mb", type=float, default=64.0)
    p.add_argument("--option", action="append", default=[], metavar="NAME=INT",
                   help="extra integer server channel option (experiments)")
    a = p.parse_args(argv)
    options = server_options(int(a.max_message_mb * 1024 * 1024))
    for kv in a.option:
        name, _, value = kv.partition("=")
        options.append((name, int(value)))
    if a.mode == "torch":
        import torch

        torch.set_num_threads(1)  # a small batch gains nothing from a second thread
        serve_sync(a.host, a.port, a.workers, options, computed)
    elif a.mode == "sync":
        serve_sync(a.host, a.port, a.workers, options)
    else:
        asyncio.run(serve_async(a.host, a.port, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
