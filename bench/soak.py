"""Bounded soak: N concurrent clients for T seconds against a real ``lossd serve``.

    .venv/bin/python -m bench.soak                          # 32 clients, 60 s
    .venv/bin/python -m bench.soak --clients 8 --seconds 10 --out /tmp/soak

Not part of the test suite. It starts ``lossd serve`` in its own process (CPU unless
``--device``), then runs ``--clients`` clients, each a thread with its own ``LossClient``
(its own channel), spread over ``--procs`` client processes, calling in a loop for
``--seconds`` seconds. Each call is, at random:

* 70 % a valid ``evaluate`` (one of several losses, N up to 512), its per-sample values
  checked against torch.nn.functional;
* 10 % a valid ``evaluate_stream`` of three batches, checked the same way;
* 5 % ``losses()`` (ListLosses);
* 15 % an invalid ``evaluate`` (class index out of range, shapes that do not match, an
  unknown loss, NaN with ``nan_policy='raise'``), which must end INVALID_ARGUMENT.

A RESOURCE_EXHAUSTED answer (the server's admission queue is full) is counted as shed and
the call is sent again after the server's ``retry-after-ms`` hint, up to 20 times.

Reported (``soak.json`` and ``soak.md`` under ``--out``, default
``bench/results/<machine>/``): calls by kind and final outcome, errors by code, lost calls
(sent but never answered: a deadline or connection failure, or a valid call answered with
wrong numbers or an unexpected code; must be 0), latency percentiles of answered calls, and
the server's RSS sampled every second, with its growth after a warm-up (target: < 5 %).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 30.0
MAX_SHED_RETRIES = 20
MIX = (("evaluate", 0.70), ("stream", 0.10), ("losses", 0.05), ("invalid", 0.15))


# ---- workloads -----------------------------------------------------------------------


def _cases(seed: int) -> list[dict[str, Any]]:
    """Valid calls with their torch reference values (computed here, once per process)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    out = []
    for i in range(24):
        n = int(rng.choice([8, 64, 256, 512]))
        kind = i % 4
        if kind == 0:
            c = int(rng.choice([10, 100]))
            x = rng.standard_normal((n, c)).astype(np.float32)
            t = rng.integers(0, c, n)
            want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none",
                                   label_smoothing=0.1)
            out.append({"loss": "cross_entropy", "x": x, "t": t,
                        "opts": {"label_smoothing": 0.1}, "want": want.numpy()})
        elif kind == 1:
            x = rng.standard_normal((n, 16)).astype(np.float32)
            t = rng.standard_normal((n, 16)).astype(np.float32)
            want = F.mse_loss(torch.from_numpy(x), torch.from_numpy(t),
                              reduction="none").mean(dim=1)
            out.append({"loss": "mse_loss", "x": x, "t": t, "opts": {}, "want": want.numpy()})
        elif kind == 2:
            x = rng.standard_normal((n, 8)).astype(np.float32)
            t = (rng.random((n, 8)) > 0.5).astype(np.float32)
            want = F.binary_cross_entropy_with_logits(
                torch.from_numpy(x), torch.from_numpy(t), reduction="none").mean(dim=1)
            out.append({"loss": "binary_cross_entropy_with_logits", "x": x, "t": t,
                        "opts": {}, "want": want.numpy()})
        else:
            x = rng.standard_normal(n).astype(np.float32)
            t = rng.standard_normal(n).astype(np.float32)
            want = F.huber_loss(torch.from_numpy(x), torch.from_numpy(t), reduction="none",
                                delta=0.5)
            out.append({"loss": "huber_loss", "x": x, "t": t, "opts": {"delta": 0.5},
                        "want": want.numpy()})
    return out


def _invalid(rng: np.random.Generator) -> dict[str, Any]:
    which = int(rng.integers(0, 4))
    x = rng.standard_normal((16, 5)).astype(np.float32)
    if which == 0:
        return {"loss": "cross_entropy", "x": x, "t": np.full(16, 7), "opts": {}}
    if which == 1:
        return {"loss": "mse_loss", "x": x, "t": np.zeros((16, 4), np.float32), "opts": {}}
    if which == 2:
        return {"loss": "no_such_loss", "x": x, "t": np.zeros(16, np.int64), "opts": {}}
    x[3, 2] = np.nan
    return {"loss": "cross_entropy", "x": x, "t": np.zeros(16, np.int64),
            "opts": {"nan_policy": "raise"}}


# ---- one client ----------------------------------------------------------------------


def _client(address: str, seed: int, stop_at: float, cases: list[dict[str, Any]],
            out: list[dict[str, Any]]) -> None:
    import lossd
    from lossd import LossClient

    rng = np.random.default_rng(seed)
    kinds, weights = zip(*MIX, strict=True)
    stats: dict[str, Any] = {"calls": collections.Counter(), "outcomes": collections.Counter(),
                             "lat_ok": [], "lat_e2e": [], "shed": 0, "lost": [],
                             "shed_final": 0}
    with LossClient(address, timeout=CALL_TIMEOUT, stream_timeout=CALL_TIMEOUT) as client:
        while time.monotonic() < stop_at:
            kind = str(rng.choice(kinds, p=weights))
            case = cases[int(rng.integers(0, len(cases)))]
            start = time.perf_counter()
            outcome, detail = "OK", ""
            for _attempt in range(MAX_SHED_RETRIES + 1):
                t0 = time.perf_counter()
                try:
                    if kind == "evaluate":
                        r = client.evaluate(case["x"], case["t"], loss=case["loss"],
                                            **case["opts"])
                        if not np.allclose(r.per_sample, case["want"], rtol=1e-5, atol=1e-6):
                            outcome, detail = "WRONG", case["loss"]
                    elif kind == "stream":
                        parts = [(case["x"], case["t"])] * 3
                        got = [r.per_sample for r in client.evaluate_stream(
                            parts, loss=case["loss"], **case["opts"])]
                        if len(got) != 3 or not all(
                                np.allclose(g, case["want"], rtol=1e-5, atol=1e-6)
                                for g in got):
                            outcome, detail = "WRONG", case["loss"]
                    elif kind == "losses":
                        if len(client.losses()) < 10:
                            outcome, detail = "WRONG", "catalogue"
                    else:
                        bad = _invalid(rng)
                        client.evaluate(bad["x"], bad["t"], loss=bad["loss"], **bad["opts"])
                        outcome, detail = "UNEXPECTED_OK", bad["loss"]
                except lossd.ResourceExhausted as exc:
                    if exc.retry_after is not None and "busy" in exc.message:
                        stats["shed"] += 1
                        time.sleep(min(1.0, exc.retry_after * (1 + rng.random())))
                        if time.monotonic() < stop_at + CALL_TIMEOUT:
                            continue
                    outcome, detail = "RESOURCE_EXHAUSTED", exc.message[:80]
                except lossd.LossdError as exc:
                    outcome, detail = exc.code.name, exc.message[:120]
                break
            else:
                stats["shed_final"] += 1
            end = time.perf_counter()
            stats["calls"][kind] += 1
            stats["outcomes"][f"{kind}:{outcome}"] += 1
            expected = "INVALID_ARGUMENT" if kind == "invalid" else "OK"
            if outcome == expected:
                stats["lat_ok"].append(end - t0)
                stats["lat_e2e"].append(end - start)
            elif outcome != "RESOURCE_EXHAUSTED":
                stats["lost"].append({"kind": kind, "outcome": outcome, "detail": detail})
    out.append(stats)


def _process(address: str, first_seed: int, clients: int, stop_at_wall: float,
             queue: Any) -> None:
    cases = _cases(first_seed)
    stop_at = time.monotonic() + (stop_at_wall - time.time())
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=_client, args=(address, first_seed + i, stop_at, cases,
                                                      results), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, stop_at - time.monotonic()) + CALL_TIMEOUT * (MAX_SHED_RETRIES + 2))
    for r in results:
        r["calls"], r["outcomes"] = dict(r["calls"]), dict(r["outcomes"])
    queue.put({"results": results, "hung_threads": sum(t.is_alive() for t in threads)})


# ---- the server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    keep = ("lossd_requests_total", "lossd_rejected_requests_total",
            "lossd_cancelled_requests_total")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in keep and s.value:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _machine(device: str) -> dict[str, Any]:
    try:
        from bench.run import machine_info

        return machine_info(device)
    except Exception:  # the benchmark module changed: a name of our own
        cores = os.cpu_count() or 1
        return {"name": f"{re.sub(r'[^a-z0-9]+', '-', platform.machine().lower())}-{cores}c",
                "cores": cores, "platform": platform.platform()}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None


def run(clients: int, seconds: float, procs: int, device: str, warmup: float,
        server_args: list[str]) -> dict[str, Any]:
    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    cmd = [sys.executable, "-m", "lossd_server.serve", "--port", str(port),
           "--metrics-port", str(metrics_port), "--device", device, "--log-level", "warning",
           *server_args]
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "lossd serve exited"
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        start_wall = time.time() + 5.0  # every process builds its cases first
        stop_wall = start_wall + seconds
        workers = [ctx.Process(target=_process, args=(address, 1000 * i, n, stop_wall, queue))
                   for i, n in enumerate(per) if n]
        for w in workers:
            w.start()
        rss: list[tuple[float, int]] = []
        while time.time() < start_wall:
            time.sleep(0.05)
        rss_idle = _rss(server.pid)
        while time.time() < stop_wall:
            rss.append((round(time.time() - start_wall, 1), _rss(server.pid)))
            time.sleep(1.0)
        parts = [queue.get(timeout=seconds + CALL_TIMEOUT * (MAX_SHED_RETRIES + 3))
                 for _ in workers]
        for w in workers:
            w.join(30)
        metrics = _scrape(metrics_port)
        rss.append((round(time.time() - start_wall, 1), _rss(server.pid)))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = server.wait()
        stderr = server.stderr.read() if server.stderr else ""
    results = [r for p in parts for r in p["results"]]
    calls: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    for r in results:
        calls.update(r["calls"])
        outcomes.update(r["outcomes"])
    lost = [x for r in results for x in r["lost"]]
    lat = [x for r in results for x in r["lat_ok"]]
    e2e = [x for r in results for x in r["lat_e2e"]]
    after = [v for t, v in rss if t >= warmup]
    base = after[0] if after else rss[0][1]
    errors: collections.Counter[str] = collections.Counter()
    for key, n in outcomes.items():
        code = key.split(":", 1)[1]
        if code != "OK":
            errors[code] += n
    total = sum(calls.values())
    return {
        "clients": clients, "seconds": seconds, "procs": procs, "device": device,
        "server_args": server_args,
        "calls": total, "calls_per_s": round(total / seconds, 1), "by_kind": dict(calls),
        "outcomes": dict(sorted(outcomes.items())), "errors_by_code": dict(errors),
        "shed_retries": sum(r["shed"] for r in results),
        "shed_final": sum(r["shed_final"] for r in results),
        "lost_calls": len(lost) + sum(p["hung_threads"] for p in parts),
        "lost_examples": lost[:10],
        "hung_client_threads": sum(p["hung_threads"] for p in parts),
        "latency_ms": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99),
                       "max": _pct(lat, 100)},
        "latency_with_shed_retries_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
        "rss_mib": {"idle": round(rss_idle / 2**20, 1),
                    "after_warmup": round(base / 2**20, 1),
                    "end": round(rss[-1][1] / 2**20, 1),
                    "max": round(max(v for _, v in rss) / 2**20, 1)},
        "rss_growth_after_warmup_pct": round(100.0 * (rss[-1][1] - base) / base, 2),
        "rss_max_growth_after_warmup_pct": round(
            100.0 * (max(after or [base]) - base) / base, 2),
        "warmup_s": warmup,
        "rss_samples": rss,
        "server_metrics": metrics,
        "server_exit_code": exit_code,
        "server_stderr_tail": stderr[-2000:],
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# lossd soak: {r['clients']} clients x {r['seconds']:g} s "
        f"({r['machine']['name']}, {r['device']})",
        "",
        f"Run {r['started']}, commit {r.get('git', {}).get('commit', '?')[:12]}; server "
        f"`lossd serve {' '.join(r['server_args']) or '(defaults)'}`; "
        f"{r['procs']} client processes.",
        "",
        "| figure | value |", "|---|---|",
        f"| calls | {r['calls']} ({r['calls_per_s']}/s) |",
        f"| lost calls (must be 0) | **{r['lost_calls']}** |",
        f"| latency p50 / p90 / p99 / max (answered attempt) | {r['latency_ms']['p50']} / "
        f"{r['latency_ms']['p90']} / {r['latency_ms']['p99']} / {r['latency_ms']['max']} ms |",
        f"| latency p50 / p99 incl. shed retries | {r['latency_with_shed_retries_ms']['p50']} "
        f"/ {r['latency_with_shed_retries_ms']['p99']} ms |",
        f"| shed (RESOURCE_EXHAUSTED queue full, retried after retry-after-ms) | "
        f"{r['shed_retries']} attempts; {r['shed_final']} calls gave up |",
        f"| server RSS idle / after {r['warmup_s']:g} s warm-up / end / max | "
        f"{r['rss_mib']['idle']} / {r['rss_mib']['after_warmup']} / {r['rss_mib']['end']} / "
        f"{r['rss_mib']['max']} MiB |",
        f"| RSS growth after warm-up (target < 5 %) | **{r['rss_growth_after_warmup_pct']} %** "
        f"(peak {r['rss_max_growth_after_warmup_pct']} %) |",
        f"| server exit code after SIGTERM | {r['server_exit_code']} |",
        "", "## Calls by kind and outcome", "", "| kind:outcome | calls |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in r["outcomes"].items()),
        "", "## Errors by code (expected: INVALID_ARGUMENT for the invalid calls)", "",
        "| code | calls |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(r["errors_by_code"].items())),
        "", "## Server counters", "", "| series | value |", "|---|---|",
        *(f"| `{k}` | {v:g} |" for k, v in sorted(r["server_metrics"].items())),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default: a sixth of the run, 5..15)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/<machine>/)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `lossd serve` argument (repeatable), e.g. --server-arg=--workers=40")
    a = p.parse_args(argv)
    if a.clients < 1 or not 0 < a.seconds <= 3600:
        p.error("--clients >= 1 and 0 < --seconds <= 3600")
    warmup = a.warmup if a.warmup is not None else min(15.0, max(5.0, a.seconds / 6))
    machine = _machine(a.device)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"soak: {a.clients} clients x {a.seconds:g} s on {machine['name']}", flush=True)
    result = run(a.clients, a.seconds, min(a.procs, a.clients), a.device, warmup,
                 a.server_arg)
    result.update(machine=machine, started=started, load_avg=os.getloadavg())
    with contextlib.suppress(Exception):
        from bench.run import git_state

        result["git"] = git_state()
    out = a.out or ROOT / "bench" / "results" / machine["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    print(f"soak: wrote {out / 'soak.json'} and soak.md")
    ok = (result["lost_calls"] == 0 and result["server_exit_code"] == 0
          and not math.isnan(result["rss_growth_after_warmup_pct"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
