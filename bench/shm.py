"""Shared memory vs the socket on the extra-large workload (N=16384, C=1000, 65 MB).

    python -m bench.shm --out bench/results/<machine>/shm.json

One run, side by side, one client: the transport floor (``bench.floor_server``, sync), lossd
through the socket, lossd through a shared-memory region, and the compute floor (the loss
in-process). MB/s counts the request payload. ``transfer`` for shared memory is its end
to end time minus the compute floor: what moving the data costs on that path.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torch.nn.functional as F

from bench.workloads import WORKLOADS as BENCH_WORKLOADS
from bench.workloads import request_bytes
from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], ready: Callable[[int], bool]) -> tuple[subprocess.Popen[bytes], int]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ready(port):
            return proc, port
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def _grpc_ready(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=1)
        return True
    except grpc.FutureTimeoutError:
        return False


def _timed(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args()
    w = BENCH_WORKLOADS["xl"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16384, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 16384)
    payload = x.nbytes + t.nbytes
    raw = request_bytes(w, x, t, None)

    floor, floor_port = _start(["bench.floor_server", "--mode", "sync"], _grpc_ready)
    lossd, lossd_port = _start(["lossd_server.serve", "--processes", "1",
                                "--metrics-port", "-1",
                                "--device", "cpu"], _grpc_ready)
    rows: dict[str, list[float]] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{floor_port}", options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1)]) as ch:
            call = ch.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=None,
                                  response_deserializer=pb.EvaluateResponse.FromString)
            rows["transport floor"] = _timed(lambda: call(raw, timeout=60), args.reps)
        with LossClient(f"127.0.0.1:{lossd_port}") as client:
            rows["lossd, socket"] = _timed(lambda: client.evaluate(x, t), args.reps)
            with client.shared_memory(payload + 4 * 16384 + 4096) as shm:
                rows["lossd, shared memory"] = _timed(lambda: shm.evaluate(x, t), args.reps)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        rows["compute floor"] = _timed(
            lambda: F.cross_entropy(xt, tt, reduction="none").double().sum(), args.reps)
    finally:
        for proc in (floor, lossd):
            proc.terminate()
            proc.wait(timeout=30)
    p50 = {k: statistics.median(v) for k, v in rows.items()}
    mb_s = {k: payload / v / 1e6 for k, v in p50.items()}
    transfer = p50["lossd, shared memory"] - p50["compute floor"]
    result = {
        "workload": "xl: N=16384, C=1000, fp32", "payload_bytes": payload,
        "p50_s": p50, "mb_s": mb_s,
        "shm_over_floor_mb_s": mb_s["lossd, shared memory"] / mb_s["transport floor"],
        "shm_transfer_s": transfer,
        "shm_transfer_over_floor_mb_s": p50["transport floor"] / transfer if transfer > 0
        else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| path (xl, 65 MB, 1 client) | p50 ms | MB/s |")
    print("| --- | --- | --- |")
    for k in rows:
        print(f"| {k} | {1e3 * p50[k]:.1f} | {mb_s[k]:.0f} |")
    print(f"shared memory end to end / transport floor MB/s: {result['shm_over_floor_mb_s']:.2f}")
    if transfer > 0:
        print(f"shared memory transfer ({1e3 * transfer:.1f} ms) vs floor: "
              f"{result['shm_transfer_over_floor_mb_s']:.1f}x")


if __name__ == "__main__":
    main()
