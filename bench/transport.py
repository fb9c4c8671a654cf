"""Transport experiments for one large request: first call, channel options, splitting.

Not part of the main run; used for the profiling notes in bench/README.md::

    python -m bench.transport --workload large --exp first,options,split

Against the sync transport floor (``bench.floor_server``: parse only, N zeros back) and,
for splitting, lossd itself. Requests are serialised once up front (the floor's one-copy
encoder), so what is timed is grpcio and HTTP/2 alone, plus server-side parsing.

* ``first``: latency of calls 1..4 on a fresh channel (fresh TCP connection) to a warm
  server, repeated; and the very first call to a fresh server.
* ``options``: steady-state and first-call latency with channel/server arguments
  (HTTP/2 frame size, flow-control lookahead, BDP probing, write buffer, TCP read chunks).
* ``split``: one batch as 1, 2, 4, 8 parts, sent as one stream (LossClient's split path),
  as concurrent unary calls on one channel, or on separate channels (TCP connections).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.run import (
    MAX_MESSAGE_BYTES,
    PAGE,
    Server,
    _proc_minflt,
    _subprocess_env,
    _wait_ready,
)
from bench.workloads import WORKLOADS, Workload, arrays_for_wire, make_data, request_bytes
from lossd.channel import channel_options
from lossd.v1 import loss_service_pb2 as pb

EVAL = "/lossd.v1.LossService/Evaluate"
STREAM = "/lossd.v1.LossService/EvaluateStream"

# (name, client channel options, server options) on top of the defaults both sides use.
OPTIONS: list[tuple[str, list[tuple[str, int]], list[tuple[str, int]]]] = [
    ("defaults", [], []),
    ("client max_receive_message_length=64MiB", [("grpc.max_receive_message_length",
                                                   MAX_MESSAGE_BYTES)], []),
    ("server http2.max_frame_size=16MiB", [], [("grpc.http2.max_frame_size", 16 * 2**20 - 1)]),
    ("server http2.lookahead_bytes=64MiB", [], [("grpc.http2.lookahead_bytes", 64 * 2**20)]),
    ("both http2.bdp_probe=0", [("grpc.http2.bdp_probe", 0)], [("grpc.http2.bdp_probe", 0)]),
    ("client http2.write_buffer_size=8MiB", [("grpc.http2.write_buffer_size", 8 * 2**20)], []),
    ("server tcp_read_chunk_size=4MiB", [], [("grpc.experimental.tcp_read_chunk_size", 4 * 2**20),
                                            ("grpc.experimental.tcp_max_read_chunk_size",
                                             16 * 2**20)]),
    ("server frame 16MiB + lookahead 64MiB", [], [("grpc.http2.max_frame_size", 16 * 2**20 - 1),
                                                 ("grpc.http2.lookahead_bytes", 64 * 2**20)]),
]


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


def _channel(address: str, extra: list[tuple[str, int]] | None = None,
             local: bool = False) -> grpc.Channel:
    opts: list[tuple[str, Any]] = [*channel_options(MAX_MESSAGE_BYTES), *(extra or [])]
    if local:  # a subchannel (TCP connection) of its own
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(address, options=opts)


def _unary(ch: grpc.Channel) -> Any:
    return ch.unary_unary(EVAL, response_deserializer=pb.EvaluateResponse.FromString)


def first_calls(address: str, body: bytes, reps: int) -> dict[str, Any]:
    """Calls 1..4 on fresh channels to a warm server."""
    per_call: list[list[float]] = [[] for _ in range(4)]
    for _ in range(reps):
        with _channel(address, local=True) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            call = _unary(ch)
            for i in range(4):
                per_call[i].append(_timed(lambda: call(body, timeout=120)))  # noqa: B023
    return {f"call{i + 1}_ms": _med(x) for i, x in enumerate(per_call)}


def steady(address: str, body: bytes, calls: int, extra: list[tuple[str, int]] | None = None
           ) -> dict[str, Any]:
    with _channel(address, extra, local=True) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        call = _unary(ch)
        lat = [_timed(lambda: call(body, timeout=120)) for _ in range(calls + 1)]
    return {"first_ms": round(lat[0], 1), "p50_ms": _med(lat[1:]), "min_ms": round(min(lat), 1)}


def split(address: str, w: Workload, arrays: tuple[Any, ...], parts: int, how: str,
          calls: int) -> float:
    rows = -(-w.n // parts)
    bodies = [request_bytes(w, *(None if a is None else a[i:i + rows] for a in arrays))
              for i in range(0, w.n, rows)]
    chans = [_channel(address, local=True) for _ in range(parts if how == "channels" else 1)]
    try:
        for ch in chans:
            grpc.channel_ready_future(ch).result(timeout=30)
        pool = futures.ThreadPoolExecutor(max_workers=parts)
        if how == "stream":
            st = chans[0].stream_stream(STREAM,
                                        response_deserializer=pb.EvaluateResponse.FromString)

            def once() -> None:
                out = [np.frombuffer(r.per_sample.data, "<f4") for r in st(iter(bodies),
                                                                            timeout=120)]
                assert sum(len(o) for o in out) == w.n
        else:
            calls_ = [_unary(chans[i % len(chans)]) for i in range(parts)]

            def once() -> None:
                fs = [pool.submit(calls_[i], b, timeout=120) for i, b in enumerate(bodies)]
                assert sum(len(f.result().per_sample.data) for f in fs) == 4 * w.n

        lat = [_timed(once) for _ in range(calls + 1)]
        pool.shutdown()
        return _med(lat[1:])
    finally:
        for ch in chans:
            ch.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="large", choices=list(WORKLOADS))
    p.add_argument("--exp", default="first,options,split")
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--reps", type=int, default=4)
    a = p.parse_args(argv)
    w = WORKLOADS[a.workload]
    data = make_data(w)
    arrays = arrays_for_wire(*data.torch())
    body = request_bytes(w, *arrays)
    log = Path("/tmp/bench-transport.log")
    exps = a.exp.split(",")
    print(f"workload {w.name}: {len(body) / 1e6:.1f} MB request")

    if "first" in exps:
        malloc = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
                  "MALLOC_ARENA_MAX": "1"}
        for kind, env in (("floor_sync", None), ("lossd", None), ("lossd", malloc)):
            s = Server(kind, "cpu", 8, log, env=env)
            try:
                _wait_ready(s.address, 60)
                seq = []
                with _channel(s.address, local=True) as ch:
                    call = _unary(ch)
                    for _ in range(6):
                        f0 = _proc_minflt(s.pid)
                        ms = _timed(lambda: call(body, timeout=120))  # noqa: B023
                        seq.append(f"{ms:.0f} ms/{(_proc_minflt(s.pid) - f0) * PAGE / 1e6:.0f} MB")
                label = kind + (" +malloc env" if env else "")
                print(f"[first] {label}: calls 1..6 on a fresh server (latency/new memory "
                      f"faulted in by the server): {', '.join(seq)}")
                print(f"[first] {label}: calls 1..4 on fresh channels to the warm server: "
                      f"{first_calls(s.address, body, a.reps)}", flush=True)
            finally:
                s.stop()

    if "lead" in exps:
        # The reported case: a fresh server and a fresh client process, LossClient, one
        # unary call of the whole batch vs. the split path (8 MiB messages over a stream).
        code = ("import sys, time; from bench.workloads import WORKLOADS, make_data; "
                "from lossd import LossClient; w = WORKLOADS[sys.argv[2]]; "
                "p, t, ww = make_data(w).torch(); "
                "c = LossClient(sys.argv[1], max_message_bytes=int(sys.argv[3])); out = []\n"
                "for _ in range(4):\n"
                "    t0 = time.perf_counter(); c.evaluate(p, t, weights=ww, **w.options); "
                "out.append(f'{(time.perf_counter() - t0) * 1e3:.0f}')\n"
                "print(' '.join(out))")
        for label, limit in (("unary (64 MiB limit)", MAX_MESSAGE_BYTES),
                             ("split path (8 MiB messages)", 8 * 2**20)):
            s = Server("lossd", "cpu", 8, log)
            try:
                _wait_ready(s.address, 60)
                out = subprocess.run([sys.executable, "-c", code, s.address, w.name, str(limit)],
                                     capture_output=True, text=True, env=_subprocess_env(),
                                     check=True).stdout.strip()
                print(f"[lead] fresh server, fresh client, LossClient {label}: calls 1..4 "
                      f"{out} ms", flush=True)
            finally:
                s.stop()

    if "options" in exps:
        for name, client_opts, server_opts in OPTIONS:
            extra = [f"--option={k}={v}" for k, v in server_opts]
            s = Server("floor_sync", "cpu", 8, log, extra)
            try:
                _wait_ready(s.address, 60)
                r = steady(s.address, body, a.calls, client_opts)
                print(f"[options] {name:42s} first {r['first_ms']:7.1f}  p50 {r['p50_ms']:7.1f}  "
                      f"min {r['min_ms']:7.1f} ms", flush=True)
            finally:
                s.stop()

    if "split" in exps:
        for kind in ("floor_sync", "lossd"):
            s = Server(kind, "cpu", 8, log)
            try:
                _wait_ready(s.address, 60)
                steady(s.address, body, 2)  # warm the server
                for how in ("stream", "unary", "channels"):
                    row = {parts: split(s.address, w, arrays, parts, how, a.calls)
                           for parts in (1, 2, 4, 8)}
                    print(f"[split] {kind:10s} {how:8s} " + "  ".join(
                        f"{k} parts {v:7.1f} ms" for k, v in row.items()), flush=True)
            finally:
                s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
