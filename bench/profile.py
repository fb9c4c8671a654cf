"""Profile a server under one workload with py-spy and split its CPU samples by stage.

    python -m bench.profile --server lossd --workload large --seconds 10
    python -m bench.profile --server floor_sync --workload small --client lossd

Starts the server (``lossd`` or a transport floor) as a subprocess, drives it from this
process (requests pre-serialised once with the floor's encoder, or ``--client lossd`` for
``LossClient``), records it with ``py-spy record --native --format raw`` and sorts each
sample's stack into a stage by the frames it holds (first rule that matches):

  idle            leaf is a wait (epoll, lock, condition, queue): not CPU
  bytesize        PyUpb_Message_ByteSize (the servicer's size metrics re-serialise)
  parse           the request deserializer (FromString, or lossd's ParsedRequest)
  decode          servicer.decode_request (message -> tensors: the bytes-field copy)
  compute         Engine.evaluate (validation, the loss, per-sample, aggregates)
  encode          encode_response / SerializeToString of the response
  monitor         metrics/CallRecord bookkeeping
  grpc_receive    the grpc server's polling thread (_serve): socket reads, and joining
                  the message into one bytes object for the deserializer
  grpc_other      other grpcio frames (_unary_response_in_pool, send)
  other

py-spy samples by stopping the process (``--native`` needs it), so absolute times run a
little long; the shares are what to read. Needs ``py-spy`` (a dev dependency).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RULES: list[tuple[str, tuple[str, ...]]] = [
    ("bytesize", ("PyUpb_Message_ByteSize",)),
    ("parse", ("PyUpb_Message_FromString", "PyUpb_Message_MergeFromString",
               "ParsedRequest", "parse_evaluate_request")),
    ("decode", ("decode_request",)),
    ("compute", ("Engine.evaluate", "Engine._compute")),
    ("encode", ("encode_response", "PyUpb_Message_SerializeToString",
                "PyUpb_Message_SerializeInternal")),
    ("monitor", ("CallRecord", "Metrics.", "observe", "_logged")),
    ("grpc_receive", ("_serve",)),
    ("grpc_other", ("_unary_response_in_pool", "_call_behavior", "_send_response",
                    "_stream_response_in_pool", "cygrpc")),
]
IDLE_LEAVES = ("epoll_wait", "PyThread_acquire_lock_timed", "Condition.wait", "select",
               "_queue_SimpleQueue_get", "poll", "pthread_cond", "futex", "nanosleep",
               "Event.wait", "sem_wait", "sem_timedwait", "lock_PyThread_acquire_lock")


def categorise(stack: str) -> str:
    frames = [f.split(" (")[0] for f in stack.split(";")]
    named = [f for f in frames if not f.startswith("0x")]
    leaf = named[-1] if named else ""
    if any(leaf.startswith(x) or leaf == x for x in IDLE_LEAVES):
        return "idle"
    joined = ";".join(frames)
    for name, keys in RULES:
        if any(k in joined for k in keys):
            return name
    return "other"


def summarise(raw: Path, rate: int, calls: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[categorise(stack)] += int(n)
    busy = sum(v for k, v in counts.items() if k != "idle")
    out: dict[str, Any] = {"samples": sum(counts.values()), "busy_samples": busy,
                           "calls": calls, "stages": {}}
    for k, v in counts.most_common():
        if k == "idle":
            continue
        out["stages"][k] = {"share_of_busy": round(v / max(1, busy), 3),
                            "ms_per_call": round(v / rate * 1e3 / max(1, calls), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="lossd", choices=("lossd", "floor_sync", "floor_async"))
    p.add_argument("--workload", default="large")
    p.add_argument("--client", default="raw", choices=("raw", "lossd"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="keep the raw profile here")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the server (experiments, e.g. OMP_WAIT_POLICY=passive)")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2

    import os

    import grpc

    from bench import run as br
    from bench.workloads import WORKLOADS, arrays_for_wire, make_data, request_bytes
    from lossd.channel import channel_options
    from lossd.v1 import loss_service_pb2 as pb

    w = WORKLOADS[a.workload]
    data = make_data(w)
    env = dict(e.split("=", 1) for e in a.env)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = br.Server(a.server, "cpu", 8, Path(tempfile.gettempdir()) / "bench-profile.log")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        br._wait_ready(server.address, 60)
        if a.client == "lossd":
            from lossd import LossClient

            client = LossClient(server.address)
            pred, targ, wts = data.torch()

            def call() -> None:
                client.evaluate(pred, targ, loss=w.loss, weights=wts, **w.options)
        else:
            body = request_bytes(w, *arrays_for_wire(*data.torch()))
            ch = grpc.insecure_channel(server.address, options=channel_options(64 << 20))
            unary = ch.unary_unary("/lossd.v1.LossService/Evaluate",
                                   response_deserializer=pb.EvaluateResponse.FromString)

            def call() -> None:
                unary(body, timeout=120)
        for _ in range(3):
            call()
        raw = a.out or Path(tempfile.mkdtemp()) / "profile.txt"
        spy_proc = subprocess.Popen(
            [spy, "record", "--pid", str(server.pid), "--native", "--rate", str(a.rate),
             "--duration", str(int(a.seconds)), "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        lat = []
        t_end = time.monotonic() + a.seconds
        while time.monotonic() < t_end and spy_proc.poll() is None:
            t0 = time.perf_counter()
            call()
            lat.append(time.perf_counter() - t0)
        spy_proc.wait(60)
        lat.sort()
        result = summarise(raw, a.rate, len(lat))
        result.update(server=a.server, workload=w.name, client=a.client, env=env,
                      p50_ms_under_profiler=round(lat[len(lat) // 2] * 1e3, 1) if lat else None)
        print(json.dumps(result, indent=1))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
