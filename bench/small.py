"""Small calls (issues 10 and 20): lossd with 1..N serving processes, the transport floor,
Triton 2.51 and MLServer 1.7.1, side by side in one run.

    python -m bench.small                                  # CPU host, ~3 min
    python -m bench.small --device cuda --processes 1,2,4,8,16
    python -m bench.small --quick --no-mlserver --no-triton --out /tmp/s   # smoke run

The workload is ``small`` (N=32, C=10, float32, cross_entropy: what a training step sends).
For each server, 1 and 8 client processes (``bench.run``'s pool: one forked process and
channel per client), then 8 threads of one client process (``--threads``: a client and
channel per thread, as a threaded trainer would call), call for ``--duration`` seconds:

* the transport floor (``bench.floor_server``, sync and asyncio; the better one counts);
* the bare torch service (``bench.floor_server --mode torch``): the sync floor computing the
  same cross_entropy with torch on zero-copy views, with no checks, limits or metrics, the
  least a Python grpcio service computing the loss does (not a target: what pure Python
  reaches, against Triton's figures);
* lossd (``lossd serve --processes P`` for each P of ``--processes``; ``auto`` is what
  ``lossd serve`` picks on this host) through ``lossd.LossClient``, with each front of
  ``--fronts`` (``native`` first: the targets are its; ``grpcio``, labelled so, is the
  baseline measured in the same run), and for the first front with each client transport
  of ``--transports`` (``auto`` first: the targets are its; ``grpcio``, labelled
  "grpcio client", is the baseline);
* Triton 2.51 (``bench.triton``: its own virtualenv under /tmp, the python backend with a
  model computing the same loss with torch) with 1 and 2 CPU instances, through
  ``tritonclient.grpc`` from spawned client processes (tritonclient and lossd's Open
  Inference protos cannot share a process);
* MLServer 1.7.1 (``bench.mlserver``: its own virtualenv under /tmp, a model computing the
  same loss with torch) with ``parallel_workers`` 0 and its default, through an Open
  Inference Protocol client (``bench.run``'s ``kserve`` kind: raw contents, built per call).

Every server process tree's CPU per call is counted (a supervisor and its workers,
tritonserver and its python stubs, MLServer and its pool). Writes ``small.json``,
``small.md`` and ``small.png`` (latency at one client; calls/s at 8 clients against the
processes, with linear scaling from one process) under ``--out`` (default
``bench/results/<machine>/``). Targets (issue 10): p50 <= 1.3 x the transport floor's;
calls/s at 8 clients >= 0.8 x the floor's and >= 2 x MLServer's best; calls/s with P
processes >= 0.7 x P x calls/s with one, up to the cores.
Issue 20's: p50 <= Triton's best; calls/s at 8 clients >= 1.2 x Triton's best.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import run as bench_run
from bench.workloads import WORKLOADS, make_data

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = WORKLOADS["small"]


def _grpc_wait(address: str, check: Any, timeout: float = 180.0) -> float:
    """Seconds until ``check(channel)`` is true (servers that bind before they are ready)."""
    import grpc

    t0 = time.monotonic()
    with grpc.insecure_channel(address) as ch:
        while True:
            with contextlib.suppress(grpc.RpcError):
                if check(ch):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{address} not ready after {timeout} s")
            time.sleep(0.1)


def _serving(ch: Any) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(status.status == health_pb2.HealthCheckResponse.SERVING)


def _model_ready(ch: Any) -> bool:
    from lossd.kserve.v2 import grpc_service_pb2 as kpb

    ready = ch.unary_unary("/inference.GRPCInferenceService/ModelReady",
                           request_serializer=kpb.ModelReadyRequest.SerializeToString,
                           response_deserializer=kpb.ModelReadyResponse.FromString)
    return bool(ready(kpb.ModelReadyRequest(name=WORKLOAD.loss), timeout=2).ready)


def client_transport(asked: str) -> str:
    """What ``LossClient(transport=asked)`` uses here (``auto``: native where it builds).
    Asked in this process only after its client processes are forked: a native channel
    must not exist in a process that forks (see ``lossd._transport``)."""
    from lossd import LossClient

    with LossClient("127.0.0.1:1", transport=asked) as client:
        return client.transport


def resolve(processes: str, device: str) -> int:
    from lossd_server.serve import resolve_processes
    from lossd_server.settings import Settings

    return resolve_processes(Settings(processes=processes, device=device))


class SmallBench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        run_argv = ["--workloads", "small", "--device", a.device,
                    "--wait-quiet", str(a.wait_quiet)]
        if a.duration is not None:
            run_argv += ["--duration", str(a.duration)]
        if a.quick:
            run_argv.append("--quick")
        self.bench = bench_run.Bench(bench_run.parse_args([*run_argv, "--triton", ""]),
                                     [WORKLOAD], a.out)
        self.bench.t0 = time.monotonic()
        self.cases: list[dict[str, Any]] = []
        self.servers: dict[str, Any] = {}
        self.transports: list[str] = []  # what each of --transports resolved to here

    def measure(self, pool: bench_run.Pool, label: str, kind: str, server: Any,
                **extra: Any) -> None:
        runs = [(c, False) for c in self.a.clients] + [(t, True) for t in self.a.threads]
        for clients, threads in runs:
            rec = self.bench.grpc_case(pool, kind, WORKLOAD, clients, server, threads=threads)
            rec.update(server=label, threads=threads, **extra)
            rec.pop("server_rss", None)
            self.cases.append(rec)
            callers = f"{clients} threads" if threads else f"c={clients}"
            self.bench.say(f"{label:16s} {callers:9s} p50 {rec['p50_ms']:7.3f} ms  "
                           f"{rec['calls_per_s']:8.1f} calls/s  server CPU "
                           f"{rec['server_cpu_ms_per_call']:.2f} ms/call")

    def triton(self) -> None:
        """The Triton peer with 1 and 2 instances, a fresh server for each."""
        from bench.triton import Triton

        for instances in bench_run.TRITON_INSTANCES:
            try:
                server = Triton(instances, self.bench.log)
            except (RuntimeError, OSError, bench_run.subprocess.CalledProcessError) as exc:
                self.servers["Triton"] = {"skipped": f"{type(exc).__name__}: {exc}"}
                self.bench.say(f"Triton peer skipped: {exc}")
                return
            try:
                label = f"Triton {instances} inst."
                self.servers[label] = {"startup_s": round(server.wait_ready(), 2)}
                self.measure(self.bench.triton_pool(), label, "triton", server,
                             instances=instances)
            finally:
                server.stop()

    def run(self) -> dict[str, Any]:
        a, log = self.a, self.bench.log
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if a.wait_quiet > 0:
            bench_run.wait_quiet(a.wait_quiet)
        bench_run.DATA[WORKLOAD.name] = make_data(WORKLOAD)
        pool = bench_run.Pool(max(a.clients))
        try:
            for kind in ("floor_sync", "floor_async", "floor_torch"):
                server = bench_run.Server(kind, a.device, None, log)
                try:
                    pool.wait_ready(server.address)
                    self.measure(pool, BARE if kind == "floor_torch" else kind, kind, server)
                finally:
                    server.stop()
            self.transports = transports = [client_transport(t) for t in a.transports]
            for front in a.fronts:
                for spec in a.processes:
                    n = resolve(spec, a.device)
                    label = (f"lossd p={n}" + ("" if front == a.fronts[0] else f" {front}")
                             + (" (auto)" if spec == "auto" else ""))
                    if spec == "auto" and str(n) in a.processes:
                        continue  # measured already under its number
                    server = bench_run.Server("lossd", a.device, None, log, processes=str(n),
                                              extra=["--front", front])
                    try:
                        startup = _grpc_wait(server.address, _serving)
                        self.servers[label] = {"startup_s": round(startup, 2)}
                        for i, (asked, used) in enumerate(zip(a.transports, transports,
                                                              strict=True)):
                            if i and front != a.fronts[0]:
                                break  # the baseline transport: on the first front only
                            self.measure(pool, label + (f" {used} client" if i else ""),
                                         f"lossd/{asked}", server, processes=n, front=front,
                                         transport=used, auto=front == a.fronts[0] and (
                                             spec == "auto"
                                             or n == resolve("auto", a.device)))
                    finally:
                        server.stop()
            if a.triton:
                self.triton()
            if a.mlserver:
                from bench.mlserver import MLServer

                for workers in (0, None):
                    server = MLServer(workers, log)
                    try:
                        startup = _grpc_wait(server.address, _model_ready)
                        label = ("MLServer pw=0" if workers == 0
                                 else "MLServer default")
                        self.servers[label] = {"startup_s": round(startup, 2)}
                        self.measure(pool, label, "kserve", server, parallel_workers=workers)
                    finally:
                        server.stop()
        finally:
            pool.close()
            self.bench.close_triton_pool()
        return {"machine": self.bench.machine, "started": started,
                "elapsed_s": round(time.monotonic() - self.bench.t0, 1),
                "workload": {"name": WORKLOAD.name, "n": WORKLOAD.n,
                             "classes": WORKLOAD.classes, "payload_bytes":
                             WORKLOAD.payload_bytes},
                "config": {"clients": list(a.clients), "threads": list(a.threads),
                           "fronts": list(a.fronts),
                           "transports": self.transports,
                           "processes": list(a.processes),
                           "device": a.device, "quick": a.quick, "git": bench_run.git_state(),
                           "cores": bench_run.os.cpu_count(), "argv": sys.argv[1:]},
                "servers": self.servers, "cases": self.cases}


# ---- results --------------------------------------------------------------------------

BARE = "bare torch service"
"""The label of ``bench.floor_server --mode torch`` (not a transport floor: its name must not
start with ``floor``, which :func:`targets` takes the best of)."""


def _cases(result: dict[str, Any], threads: bool = False) -> list[dict[str, Any]]:
    """The cases whose callers are client processes (or, with ``threads``, the threads of
    one client process)."""
    return [c for c in result["cases"] if bool(c.get("threads")) == threads]


def _case(result: dict[str, Any], server: str, clients: int) -> dict[str, Any] | None:
    return next((c for c in _cases(result) if c["server"] == server
                 and c["concurrency"] == clients), None)


def _best(result: dict[str, Any], prefix: str, clients: int, key: str,
          threads: bool = False) -> dict[str, Any]:
    cases = [c for c in _cases(result, threads) if c["server"].startswith(prefix)
             and c["concurrency"] == clients]
    pick = min if key == "p50_ms" else max
    return pick(cases, key=lambda c: c[key])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's and 20's small-call targets, from one run's cases (client processes; the
    Triton ratio at 8 callers also with client threads, where measured)."""
    out: list[dict[str, Any]] = []
    if {1, 8} - {c["concurrency"] for c in _cases(result)}:
        return out  # the targets are at 1 and 8 client processes (--clients)
    floor1 = _best(result, "floor", 1, "p50_ms")
    floor8 = _best(result, "floor", 8, "calls_per_s")
    first = (result["config"].get("fronts") or [None])[0]  # (runs before --fronts: None)
    transport = (result["config"].get("transports") or [None])[0]  # (and --transports)
    lossd = [c for c in _cases(result) if c["server"].startswith("lossd")
             and c.get("front") == first and c.get("transport") == transport]
    auto1 = next(c for c in lossd if c.get("auto") and c["concurrency"] == 1)
    auto8 = next(c for c in lossd if c.get("auto") and c["concurrency"] == 8)
    out.append({"target": f"p50 at 1 client <= 1.3 x transport floor ({auto1['server']})",
                "value": auto1["p50_ms"] / floor1["p50_ms"], "limit": 1.3, "le": True})
    out.append({"target": f"calls/s at 8 clients >= 0.8 x transport floor ({auto8['server']})",
                "value": auto8["calls_per_s"] / floor8["calls_per_s"], "limit": 0.8,
                "le": False})
    if any(c["server"].startswith("Triton") for c in result["cases"]):
        t1 = _best(result, "Triton", 1, "p50_ms")
        t8 = _best(result, "Triton", 8, "calls_per_s")
        out.append({"target": f"p50 at 1 client <= Triton's best ({auto1['server']} vs "
                              f"{t1['server']})",
                    "value": auto1["p50_ms"] / t1["p50_ms"], "limit": 1.0, "le": True})
        out.append({"target": f"calls/s at 8 clients >= 1.2 x Triton's best ({auto8['server']} "
                              f"vs {t8['server']})",
                    "value": auto8["calls_per_s"] / t8["calls_per_s"], "limit": 1.2,
                    "le": False})
        threads = [c for c in _cases(result, True) if c["concurrency"] == 8]
        lt = next((c for c in threads if c["server"] == auto8["server"]), None)
        tt = [c for c in threads if c["server"].startswith("Triton")]
        if lt and tt:
            best = max(tt, key=lambda c: c["calls_per_s"])
            out.append({"target": f"calls/s at 8 client threads >= 1.2 x Triton's best "
                                  f"({lt['server']} vs {best['server']})",
                        "value": lt["calls_per_s"] / best["calls_per_s"], "limit": 1.2,
                        "le": False})
    ml = [c for c in _cases(result) if c["server"].startswith("MLServer")
          and c["concurrency"] == 8]
    if ml:
        best = max(ml, key=lambda c: c["calls_per_s"])
        out.append({"target": f"calls/s at 8 clients >= 2 x MLServer's best ({best['server']})",
                    "value": auto8["calls_per_s"] / best["calls_per_s"], "limit": 2.0,
                    "le": False})
    one = next((c for c in lossd if c.get("processes") == 1 and c["concurrency"] == 8), None)
    cores = result["config"]["cores"]
    for c in lossd:
        p = c.get("processes", 1)
        if one is not None and c["concurrency"] == 8 and 1 < p <= cores:
            out.append({"target": f"scaling: {p} processes >= 0.7 x linear (8 clients)",
                        "value": c["calls_per_s"] / (p * one["calls_per_s"]), "limit": 0.7,
                        "le": False})
    for t in out:
        t["met"] = t["value"] <= t["limit"] if t["le"] else t["value"] >= t["limit"]
        t["value"] = round(t["value"], 3)
    return out


def bare_against_triton(result: dict[str, Any]) -> list[tuple[str, float]]:
    """The bare torch service's figures over Triton's best (empty without both): how far
    a Python grpcio service gets with none of lossd's work."""
    out: list[tuple[str, float]] = []
    for what, clients, key, threads in (("p50 at 1 client", 1, "p50_ms", False),
                                        ("calls/s at 8 clients", 8, "calls_per_s", False),
                                        ("calls/s at 8 client threads", 8, "calls_per_s", True)):
        bare = [c for c in _cases(result, threads) if c["server"] == BARE
                and c["concurrency"] == clients]
        if bare and any(c["server"].startswith("Triton") for c in _cases(result, threads)):
            best = _best(result, "Triton", clients, key, threads)
            out.append((what, round(bare[0][key] / best[key], 3)))
    return out


def markdown(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [f"# Small calls: {m['name']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; device `{m['device']}`; torch "
             f"{m['torch']}, grpcio {m['grpcio']}. Run {result['started']}, "
             f"{result['elapsed_s']:.0f} s. Code measured: commit "
             f"`{(cfg.get('git') or {}).get('commit', '?')[:12]}`.", "",
             f"Workload `small`: N={result['workload']['n']}, C={result['workload']['classes']}"
             ", float32, cross_entropy. Clients: forked (Triton's: spawned) processes, one "
             "channel each; \"8 threads\": one client process calling from 8 threads, a "
             "client and channel each. Server "
             "CPU: the whole process tree (supervisor and workers; tritonserver and its python "
             "stubs; MLServer and its pool). Triton: tritonserver 2.51, python backend, "
             "KIND_CPU instances, through `tritonclient.grpc`. lossd: through `LossClient`, "
             f"transport `{(cfg.get('transports') or ['grpcio'])[0]}` (\"grpcio client\": "
             "the grpcio transport).",
             "", "## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in targets(result):
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['limit']:.2f} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    bare = bare_against_triton(result)
    if bare:
        lines += ["", f"The {BARE} (the sync transport floor computing the same "
                  "cross_entropy with torch, no checks, limits or metrics) over Triton's "
                  "best: " + "; ".join(f"{what} {v:.2f} x" for what, v in bare) + "."]
    lines += ["", "## Latency and throughput", "",
              "| server | clients | p50 ms | p99 ms | calls/s | server CPU ms/call | "
              "client CPU ms/call | calls |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        callers = f"{c['concurrency']} threads" if c.get("threads") else c["concurrency"]
        lines.append(f"| {c['server']} | {callers} | {c['p50_ms']:.3f} | "
                     f"{c['p99_ms']:.3f} | {c['calls_per_s']:.0f} | "
                     f"{c['server_cpu_ms_per_call']:.2f} | {c['client_cpu_ms_per_call']:.2f} |"
                     f" {c['calls']} |")
    lines += ["", "Server start-up (s): " + ", ".join(
        f"{k} {v['startup_s']}" for k, v in result["servers"].items() if "startup_s" in v),
        ""]
    lines += [f"{k} skipped: {v['skipped']}" for k, v in result["servers"].items()
              if "skipped" in v]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ones = [c for c in _cases(result) if c["concurrency"] == 1]
    colours = {"floor": "#999", BARE: "#bbb", "ML": "#c44", "Triton": "#6a4"}
    left.barh([c["server"] for c in ones], [c["p50_ms"] for c in ones], color=[
        next((v for k, v in colours.items() if c["server"].startswith(k)), "#36c")
        for c in ones])
    left.set_xlabel("p50 latency at 1 client (ms)")
    left.invert_yaxis()
    fronts = result["config"].get("fronts") or [None]
    ps: list[int] = []
    for front, style in zip(fronts, ("o-", "s--"), strict=False):  # one line per front
        lossd8 = sorted((c for c in _cases(result) if c["server"].startswith("lossd")
                         and c["concurrency"] == 8 and c.get("front") == front
                         and c.get("transport") == (result["config"].get("transports")
                                                    or [None])[0]),
                        key=lambda c: c["processes"])
        ps = ps or [c["processes"] for c in lossd8]
        name = "lossd" if front is None else f"lossd, {front} front"
        right.plot([c["processes"] for c in lossd8], [c["calls_per_s"] for c in lossd8],
                   style, color="#36c", label=name)
        if front == fronts[0] and lossd8 and lossd8[0]["processes"] == 1:
            right.plot(ps, [p * lossd8[0]["calls_per_s"] for p in ps], ":", color="#36c",
                       label=f"linear from 1 process ({name})")
    floor = _best(result, "floor", 8, "calls_per_s")
    right.axhline(floor["calls_per_s"], color="#999", ls="--", label="transport floor")
    ml = [c for c in _cases(result) if c["server"].startswith("MLServer")
          and c["concurrency"] == 8]
    if ml:
        right.axhline(max(c["calls_per_s"] for c in ml), color="#c44", ls="--",
                      label="MLServer 1.7.1 (best)")
    tr = [c for c in _cases(result) if c["server"].startswith("Triton")
          and c["concurrency"] == 8]
    if tr:
        right.axhline(max(c["calls_per_s"] for c in tr), color="#6a4", ls="--",
                      label="Triton 2.51 (best)")
    right.set_xlabel("lossd serving processes")
    right.set_ylabel("calls/s at 8 clients")
    right.set_xticks(ps)
    right.set_ylim(bottom=0)
    right.legend()
    fig.suptitle(f"Small calls (N=32, C=10) on {result['machine']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.small",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--processes", default=None,
                   help="comma-separated lossd process counts (default: 1 up to the cores, "
                        "and auto)")
    p.add_argument("--clients", default="1,8", help="client process counts")
    p.add_argument("--fronts", default="native,grpcio",
                   help="lossd's --front values to measure; the targets take the first")
    p.add_argument("--transports", default="auto,grpcio",
                   help="LossClient transports to measure on the first front; the targets "
                        "take the first")
    p.add_argument("--threads", default="8",
                   help="client thread counts, each in one client process ('' for none)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per case")
    p.add_argument("--mlserver", action=argparse.BooleanOptionalAction, default=True,
                   help="measure MLServer 1.7.1 (builds its virtualenv on first use)")
    p.add_argument("--triton", action=argparse.BooleanOptionalAction, default=True,
                   help="measure Triton 2.51 (builds its virtualenv on first use)")
    p.add_argument("--wait-quiet", type=float, default=60.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--machine", default=None)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    a.clients = tuple(int(x) for x in a.clients.split(","))
    a.threads = tuple(int(x) for x in a.threads.split(",") if x.strip())
    a.fronts = tuple(x.strip() for x in a.fronts.split(",") if x.strip())
    a.transports = tuple(x.strip() for x in a.transports.split(",") if x.strip())
    cores = os.cpu_count() or 1
    a.processes = (a.processes.split(",") if a.processes
                   else [*map(str, range(1, cores + 1)), "auto"])
    machine = bench_run.machine_info(a.device)
    if a.machine:
        machine["name"] = a.machine
    a.out = a.out or ROOT / "bench" / "results" / machine["name"]
    a.out.mkdir(parents=True, exist_ok=True)
    sb = SmallBench(a)
    sb.bench.machine = machine
    result = sb.run()
    result["targets"] = targets(result)
    (a.out / "small.json").write_text(json.dumps(result, indent=1))
    (a.out / "small.md").write_text(markdown(result))
    if not a.no_plot:
        plot(result, a.out / "small.png")
    print(markdown(result))
    print(f"bench.small: wrote {a.out}/small.json, small.md"
          f"{'' if a.no_plot else ', small.png'}; server logs in "
          f"{Path(tempfile.gettempdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
