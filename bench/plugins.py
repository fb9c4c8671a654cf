"""Plugins and extra inputs cost nothing a built-in does not: two measurements, one run.

    python -m bench.plugins --out bench/results/<machine>/plugins.json

1. **One path.** ``mse_loss`` as a built-in and the very same torch call registered as a
   plugin (``bench_mse``, loaded by ``lossd serve --plugin bench.plugins:register_probe``),
   through one real server and one client, calls alternating; p50 per call and the ratio
   plugin / built-in, for a small (N=32, D=10) and a large (N=4096, D=1024, 33 MB) batch.
2. **Zero-copy extra inputs.** The server's request parser and decoder
   (``wire.ParsedRequest`` + ``servicer.decode_request``) on a 64 MB request whose second
   tensor is ``targets`` and on the same bytes as an ``inputs`` map entry; and protobuf's own
   parse of the latter (which copies every tensor), for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.shm import _grpc_ready, _start, _timed
from lossd import LossClient


def register_probe() -> None:
    """The plugin side: ``mse_loss``'s torch call under another name (``module:function``
    form of ``--plugin``)."""
    import torch.nn.functional as F

    from lossd_server.plugins import register

    register("bench_mse", lambda input, target: F.mse_loss(input, target, reduction="none"),
             options={}, targets="values", description="mse_loss, as a plugin")


def one_path(client: LossClient, reps: dict[str, int]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for name, (n, d) in {"small": (32, 10), "large": (4096, 1024)}.items():
        x = rng.standard_normal((n, d)).astype(np.float32)
        t = rng.standard_normal((n, d)).astype(np.float32)
        a, b = client.evaluate(x, t, loss="mse_loss"), client.evaluate(x, t, loss="bench_mse")
        assert np.array_equal(a.per_sample, b.per_sample) and a.aggregates == b.aggregates
        times: dict[str, list[float]] = {"builtin": [], "plugin": []}
        for _ in range(reps[name]):
            for label, loss in (("builtin", "mse_loss"), ("plugin", "bench_mse")):
                start = time.perf_counter()
                client.evaluate(x, t, loss=loss)
                times[label].append(time.perf_counter() - start)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"n": n, "d": d, "payload_bytes": x.nbytes + t.nbytes, "p50_s": p50,
                     "plugin_over_builtin": p50["plugin"] / p50["builtin"]}
    return out


def zero_copy_inputs(reps: int) -> dict[str, Any]:
    from lossd.v1 import loss_service_pb2 as pb
    from lossd.wire import encode_with_tensors
    from lossd_server import servicer, wire

    rng = np.random.default_rng(1)
    a = rng.standard_normal((4096, 2048)).astype(np.float32)  # 33.5 MB each
    b = rng.standard_normal((4096, 2048)).astype(np.float32)
    small = pb.EvaluateRequest(loss="margin_ranking_loss")
    as_targets = encode_with_tensors(small, [(2, a, pb.FLOAT32), (3, b, pb.FLOAT32)])
    as_input = encode_with_tensors(small, [(2, a, pb.FLOAT32)], [(11, "input2", b, pb.FLOAT32)])
    parse_decode = {
        "targets (field 3), lossd's parser": lambda: servicer.decode_request(
            wire.ParsedRequest(as_targets)),
        "inputs map entry, lossd's parser": lambda: servicer.decode_request(
            wire.ParsedRequest(as_input)),
        "inputs map entry, protobuf's parse": lambda: servicer.decode_request(
            pb.EvaluateRequest.FromString(as_input)),
    }
    p50 = {k: statistics.median(_timed(fn, reps)) for k, fn in parse_decode.items()}
    return {"request_bytes": len(as_input), "p50_s": p50,
            "inputs_over_targets": p50["inputs map entry, lossd's parser"]
            / p50["targets (field 3), lossd's parser"],
            "protobuf_over_lossd": p50["inputs map entry, protobuf's parse"]
            / p50["inputs map entry, lossd's parser"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    args = parser.parse_args()
    reps = {"small": 40, "large": 4} if args.quick else {"small": 400, "large": 30}
    proc, port = _start(["lossd_server.serve", "--processes", "1", "--metrics-port", "-1",
                         "--device", "cpu", "--plugin", "bench.plugins:register_probe"],
                        _grpc_ready)
    try:
        with LossClient(f"127.0.0.1:{port}") as client:
            path = one_path(client, reps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    parse = zero_copy_inputs(3 if args.quick else 15)
    from bench.run import machine_info

    result = {"machine": machine_info("cpu"), "one_path": path, "zero_copy_inputs": parse}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| batch (1 client) | built-in mse_loss p50 ms | plugin bench_mse p50 ms | ratio |")
    print("| --- | --- | --- | --- |")
    for name, row in path.items():
        print(f"| {name} (N={row['n']}, D={row['d']}) | {1e3 * row['p50_s']['builtin']:.3f} "
              f"| {1e3 * row['p50_s']['plugin']:.3f} | {row['plugin_over_builtin']:.2f} |")
    print(f"\n| parse + decode, {parse['request_bytes'] / 1e6:.0f} MB request | p50 ms |")
    print("| --- | --- |")
    for k, v in parse["p50_s"].items():
        print(f"| {k} | {1e3 * v:.3f} |")
    print(f"inputs / targets: {parse['inputs_over_targets']:.2f}; "
          f"protobuf / lossd: {parse['protobuf_over_lossd']:.0f}x")


if __name__ == "__main__":
    main()
