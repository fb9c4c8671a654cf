"""Dynamic batching: 32 concurrent clients of small requests, batching off vs on.

    python -m bench.batching --device cpu --out bench/results/<machine>/batching.json

Each configuration runs a fresh `lossd serve` subprocess; clients are processes (one
channel each) calling Evaluate with N=32, C=10 for a fixed time. Reports calls/s and
p50/p99 latency per configuration and the on/off throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.peers import free_port


def _client(port: int, seconds: float, start: Any, out: Any) -> None:
    import numpy as np

    from lossd import LossClient

    rng = np.random.default_rng(os.getpid())
    x = rng.standard_normal((32, 10)).astype(np.float32)
    t = rng.integers(0, 10, 32)
    latencies = []
    with LossClient(f"127.0.0.1:{port}") as client:
        client.evaluate(x, t)
        start.wait()
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            client.evaluate(x, t)
            latencies.append(time.perf_counter() - now)
    out.put(latencies)


def measure(device: str, batching: str, clients: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lossd_server.serve", "--processes", "1", "--port", str(port),
         "--metrics-port", "-1", "--device", device, "--batching", batching,
         "--workers", str(clients + 8), "--max-waiting", str(clients * 2)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if "lossd serving" in line:
                break
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_client, args=(port, seconds, start, out))
                 for _ in range(clients)]
        for p in procs:
            p.start()
        time.sleep(2.0)  # every client connected and warmed up
        start.set()
        latencies = [x for _ in procs for x in out.get(timeout=seconds + 120)]
        for p in procs:
            p.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    return {"batching": batching, "calls": len(latencies), "calls_per_s": len(latencies) / seconds,
            "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(args.device, b, args.clients, args.seconds) for b in ("off", "on")]
    result = {"device": args.device, "clients": args.clients, "workload": "N=32, C=10, fp32",
              "rows": rows, "on_over_off_calls_per_s": rows[1]["calls_per_s"]
              / rows[0]["calls_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"| batching ({args.device}, {args.clients} clients) | calls/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batching']} | {r['calls_per_s']:.0f} | {r['p50_ms']:.2f} "
              f"| {r['p99_ms']:.2f} |")
    print(f"on/off throughput: {result['on_over_off_calls_per_s']:.2f}")


if __name__ == "__main__":
    main()
