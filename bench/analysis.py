"""What the analyses cost on the large workload (N=8192, C=1000, fp32): per_class,
diagnostics, hardest (and accuracy, top-k, quantiles, everything at once), as ratios to
the plain evaluation measured in the same run. Target (issue 12): per_class, diagnostics
and hardest each add <= 10 %.

    .venv/bin/python -m bench.analysis                 # ~3 min on 2 cores
    .venv/bin/python -m bench.analysis --quick --out /tmp/a   # smoke run

Two measurements, each interleaving the variants round by round (A B C ... A B C ...) so a
neighbour's load hits them alike:

* **end to end**: ``lossd serve`` in its own process (``bench.run.Server``), one client
  process (``bench.run.Pool``) calling ``LossClient.evaluate`` with the variant's keyword
  arguments; p50 per variant pooled over rounds, and the median over rounds of each round's
  p50 ratio to the plain call; also the CPU seconds per call of server plus client.
* **server handler in-process**: ``LossServicer.Evaluate`` on the parsed request bytes the
  client sends (decode, validation, loss, analyses, aggregates, encoding; no grpcio, no
  client) plus the client's ``LossResult.from_proto`` of the reply: the analyses' own cost
  without the transport's noise.

Writes ``analysis.json`` and ``analysis.md`` under ``--out`` (default
``bench/results/<machine>/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import run as bench_run
from bench.workloads import WORKLOADS, Workload, make_data

BASE = "large"
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "per_class": {"per_class": True},
    "diagnostics": {"diagnostics": True},
    "hardest": {"hardest": 100},
    "accuracy": {"accuracy": True},
    "top_k": {"top_k": (1, 5)},
    "quantiles": {"quantiles": True},
    "everything": {"per_class": True, "diagnostics": True, "hardest": 100, "top_k": (1, 5),
                   "quantiles": True},
}
TARGETED = ("per_class", "diagnostics", "hardest")
TARGET = 1.10


def variants(base: Workload) -> dict[str, Workload]:
    return {name: dataclasses.replace(base, name=f"{base.name}+{name}",
                                      options={**base.options, **kw})
            for name, kw in VARIANTS.items()}


def _mark_cpu(marks: list[float], pid: int) -> None:
    marks.append(bench_run._proc_cpu(pid))


def end_to_end(ws: dict[str, Workload], rounds: int, duration: float, min_calls: int,
               device: str, log: Path) -> dict[str, Any]:
    pool = bench_run.Pool(1)  # forks before any gRPC object exists here
    server = bench_run.Server("lossd", device, None, log)
    per_round: dict[str, list[float]] = {name: [] for name in ws}
    latencies: dict[str, list[float]] = {name: [] for name in ws}
    cpu: dict[str, list[float]] = {name: [] for name in ws}  # server + client s per call
    try:
        pool.wait_ready(server.address)
        for w in ws.values():  # an unmeasured round: every variant's memory is warm
            pool.run("lossd", w, server.address, 1, 1, 1, 0.0)
        for _ in range(rounds):
            bench_run.wait_quiet(5.0, window=0.25, quiet=True)
            for name, w in ws.items():
                mark: list[float] = []  # the server's CPU seconds after the warm-up calls
                result = pool.run("lossd", w, server.address, 1, 2, min_calls, duration,
                                  on_start=functools.partial(_mark_cpu, mark, server.pid))[0]
                server_cpu = bench_run._proc_cpu(server.pid) - mark[0]
                latencies[name] += result["lat"]
                per_round[name].append(statistics.median(result["lat"]))
                cpu[name].append((server_cpu + result["cpu"]) / len(result["lat"]))
    finally:
        server.stop()
        pool.close()
    out: dict[str, Any] = {}
    for name in ws:
        ratios = [v / b for v, b in zip(per_round[name], per_round["plain"], strict=True)]
        cpu_ratios = [v / b for v, b in zip(cpu[name], cpu["plain"], strict=True)]
        out[name] = {"p50_ms": round(statistics.median(latencies[name]) * 1e3, 3),
                     "calls": len(latencies[name]),
                     "round_p50_ms": [round(v * 1e3, 3) for v in per_round[name]],
                     "ratio": round(statistics.median(ratios), 4),
                     "round_ratios": [round(r, 4) for r in ratios],
                     "cpu_ms_per_call": round(statistics.median(cpu[name]) * 1e3, 3),
                     "cpu_ratio": round(statistics.median(cpu_ratios), 4)}
    return out


def in_process(ws: dict[str, Workload], rounds: int, reps: int, device: str
               ) -> dict[str, Any]:
    import torch

    from lossd import LossResult
    from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests, analysis_fields
    from lossd.v1 import loss_service_pb2 as pb
    from lossd_server import wire
    from lossd_server.engine import Engine
    from lossd_server.metrics import Metrics
    from lossd_server.serve import tune_allocator
    from lossd_server.service import EvaluationService
    from lossd_server.servicer import LossServicer

    tune_allocator()  # as `lossd serve` does at start: keep freed memory (--malloc-reuse)
    handler = LossServicer(EvaluationService(Engine(torch.device(device)),
                                             metrics=Metrics(process=False)),
                           max_message_bytes=2**31)
    builder = Requests(DEFAULT_MAX_MESSAGE_BYTES)
    requests: dict[str, bytes] = {}
    for name, w in ws.items():
        pred, targ, weights = bench_run.DATA[w.name].torch()
        kw = dict(VARIANTS[name])
        options = {k: v for k, v in w.options.items() if k not in kw}
        (requests[name],) = builder.build(w.loss, pred, targ, weights, None,
                                          builder.options(options),
                                          analyses=analysis_fields(**kw))

    def call(raw: bytes) -> None:
        reply = handler.Evaluate(wire.ParsedRequest(raw), None)  # serialised
        LossResult.from_proto(pb.EvaluateResponse.FromString(reply))

    times: dict[str, list[float]] = {name: [] for name in ws}
    for name in ws:  # warm up
        call(requests[name])
    for _ in range(rounds):
        for name in ws:
            for _ in range(reps):
                t0 = time.perf_counter()
                call(requests[name])
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    return {name: {"median_ms": round(statistics.median(t) * 1e3, 3),
                   "added_ms": round((statistics.median(t) - base) * 1e3, 3),
                   "ratio": round(statistics.median(t) / base, 4), "calls": len(t)}
            for name, t in times.items()}


def markdown(result: dict[str, Any]) -> str:
    e2e, inproc = result["end_to_end"], result["in_process"]
    commit = (result["config"]["git"] or {}).get("commit", "?")[:12]
    lines = [f"# Analyses' cost: {result['workload']['description']}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; device "
             f"`{result['config']['device']}`; commit `{commit}`. "
             f"{result['config']['rounds']} interleaved rounds. Command: "
             f"`{result['config']['command']}`.", "",
             "| variant | end to end p50 ms | ratio to plain | CPU ms per call (server + client) "
             "| ratio | server handler + client decode ms | added ms | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        a, b = e2e[name], inproc[name]
        lines.append(f"| {name} | {a['p50_ms']:.2f} | {a['ratio']:.3f} | "
                     f"{a['cpu_ms_per_call']:.2f} | {a['cpu_ratio']:.3f} | {b['median_ms']:.2f} "
                     f"| {b['added_ms']:+.2f} | {b['ratio']:.3f} |")
    lines += ["", "## Target: per_class, diagnostics and hardest each add <= 10 % end to end",
              "", "| variant | p50 ratio (median of rounds) | met | CPU per call ratio |",
              "|---|---|---|---|"]
    for name in TARGETED:
        r = e2e[name]["ratio"]
        lines.append(f"| {name} | {r:.3f} | {'yes' if r <= TARGET else '**no**'} | "
                     f"{e2e[name]['cpu_ratio']:.3f} |")
    lines += ["", "CPU per call: the server process's CPU seconds over the measured calls plus "
              "the client's, per call (less sensitive to a busy machine than wall time).", ""]
    lines += ["", "Variants: " + "; ".join(f"{k}: `{v}`" for k, v in VARIANTS.items() if v),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.analysis",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per variant per round")
    p.add_argument("--reps", type=int, default=5, help="in-process calls per variant per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, short cases")
    a = p.parse_args(argv)
    rounds, duration, reps, min_calls = a.rounds, a.duration, a.reps, 5
    if a.quick:
        rounds, duration, reps, min_calls = 1, 0.2, 1, 2
    machine = bench_run.machine_info(a.device)
    out = a.out or bench_run.ROOT / "bench" / "results" / machine["name"]
    out.mkdir(parents=True, exist_ok=True)
    base = WORKLOADS[BASE]
    data = make_data(base)
    ws = variants(base)
    for w in ws.values():
        bench_run.DATA[w.name] = data
    bench_run.wait_quiet(0 if a.quick else 60.0, quiet=a.quick)
    log = Path(tempfile.gettempdir()) / f"lossd-bench-analysis-{os.getpid()}.log"
    started = time.monotonic()
    e2e = end_to_end(ws, rounds, duration, min_calls, a.device, log)
    inproc = in_process(ws, rounds, reps, a.device)
    result = {"machine": machine, "workload": base.describe(),
              "config": {"rounds": rounds, "duration": duration, "reps": reps,
                         "device": a.device, "quick": a.quick, "git": bench_run.git_state(),
                         "command": "python -m bench.analysis " + " ".join(argv or sys.argv[1:])},
              "variants": {k: {kk: list(vv) if isinstance(vv, tuple) else vv
                               for kk, vv in v.items()} for k, v in VARIANTS.items()},
              "end_to_end": e2e, "in_process": inproc,
              "elapsed_s": round(time.monotonic() - started, 1)}
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "analysis.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
