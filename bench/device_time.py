"""Device time of the loss computation per batch, against the bytes it must read.

    python -m bench.device_time --out bench/results/<machine>/device_time.json

For each workload: the kernel-only time (data already on the device; CUDA events, median of
many runs, inputs rotated so the L2 cache does not hold them), the engine's whole device
path (pinned host staging, host-to-device copy, compute, one synchronisation, results back),
and the fraction of the device's copy bandwidth (measured in the same run) that the
kernel-only time reaches. The floor for a loss is reading the predictions once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lossd_server.engine import Batch, Engine
from lossd_server.losses import LOSSES
from lossd_server.reduce import per_sample

CROSS_ENTROPY = LOSSES["cross_entropy"]

WORKLOADS = {
    "large": dict(n=8192, c=1000, dtype=torch.float32, t=None),
    "extra-large": dict(n=16384, c=1000, dtype=torch.float32, t=None),
    "large-bf16": dict(n=8192, c=1000, dtype=torch.bfloat16, t=None),
    "sequence-bf16": dict(n=8, c=8000, dtype=torch.bfloat16, t=512),
}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.randn(256 * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * src.numel() * 4 / statistics.median(times)


def make(w: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if w["t"] is None:
        x = torch.randn(w["n"], w["c"], generator=g).to(w["dtype"])
        t = torch.randint(0, w["c"], (w["n"],), generator=g)
    else:
        x = torch.randn(w["n"], w["c"], w["t"], generator=g).to(w["dtype"])
        t = torch.randint(0, w["c"], (w["n"], w["t"]), generator=g)
        t[:, -64:] = 0  # padding, ignored
    return x, t


def kernel_time(device: torch.device, w: dict[str, Any], reps: int = 30) -> float:
    """Median seconds of the catalogue's cross_entropy with its upcast and per-sample
    reduction (what the engine runs), inputs already on the device."""
    sets = [tuple(a.to(device) for a in make(w, s)) for s in range(4)]
    ignore = 0 if w["t"] is not None else -100
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps + 3):
        x, t = sets[i % len(sets)]
        start.record()
        with torch.inference_mode():
            v = CROSS_ENTROPY.fn(x.float(), t, class_weights=None, ignore_index=ignore,
                                 label_smoothing=0.0)
            per_sample(v, t != ignore)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def engine_time(engine: Engine, w: dict[str, Any], reps: int = 20) -> float:
    x, t = make(w, 0)
    opts = {"ignore_index": 0} if w["t"] is not None else {}
    batch = Batch("cross_entropy", x, t, None, opts)
    for _ in range(3):
        engine.evaluate(batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.evaluate(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    engine = Engine(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, w in WORKLOADS.items():
        x, t = make(w, 0)
        read = x.numel() * x.element_size() + t.numel() * t.element_size()
        k = kernel_time(device, w)
        e = engine_time(engine, w)
        rows.append({"workload": name, "bytes_read": read, "kernel_s": k,
                     "kernel_gb_s": read / k / 1e9, "bandwidth_fraction": read / k / bandwidth,
                     "engine_s": e, "engine_gb_s": read / e / 1e9})
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "host": platform.node(), "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {result['device']}")
    print("| workload | bytes read | kernel | kernel GB/s | of copy bw "
          "| engine (H2D+compute+D2H) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workload']} | {r['bytes_read'] / 1e6:.1f} MB | {r['kernel_s'] * 1e3:.3f} ms"
              f" | {r['kernel_gb_s']:.0f} | {r['bandwidth_fraction']:.0%} |"
              f" {r['engine_s'] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
