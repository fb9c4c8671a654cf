"""lossd benchmark suite (issue 5): transport floor, compute floor and lossd, side by side.

    .venv/bin/python -m bench.run                      # full run, a few minutes
    .venv/bin/python -m bench.run --quick --workloads small --out /tmp/b

For every workload and concurrency (1 and 8 clients) it measures:

* the transport floor: ``bench.floor_server`` (a grpcio service that parses the same
  EvaluateRequest bytes and answers N float32 zeros), sync and asyncio variants, each in
  its own process; the floor is the better of the two;
* the compute floor: the same loss with torch in this process on the same device
  (``bench.workloads.compute_floor_fn``), 1 or 8 threads;
* lossd end to end through ``lossd.LossClient``, against ``lossd serve`` in its own
  process (a fresh server per workload, so its idle and peak RSS are the workload's);
* the Triton peer (``bench.triton``: tritonserver 2.51, python backend, the same loss with
  torch) with 1 and 2 CPU instances, through ``tritonclient.grpc``, on the workloads of
  ``--triton`` (default large and xl).

Clients run in forked processes (8 for concurrency 8: Python client threads would share
one GIL and measure the client, not the server); each has its own channel with the same
options, warms up, waits for a common start, then calls in a loop for ``duration``
seconds and at least ``min_calls`` times. Outputs ``results.json``, ``results.md`` and
``bench.png`` under ``--out`` (default ``bench/results/<machine>/``). See bench/README.md.
"""

from __future__ import annotations

import argparse
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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.peers import free_port
from bench.workloads import WORKLOADS, Data, Workload, make_data

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8)
# lossd_1copy: the floor's one-copy client against lossd's server (server cost alone).
KINDS = ("floor_sync", "floor_async", "lossd", "lossd_1copy")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CALL_TIMEOUT = 300.0
FLOOR_WORKERS = 8  # the sync floor's thread pool (lossd's default --workers)
TRITON_INSTANCES = (1, 2)  # the Triton peer's CPU model instances (one stub process each)
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK = os.sysconf("SC_CLK_TCK")

# Workload arrays, made before the client processes fork so they share the pages.
DATA: dict[str, Data] = {}


# ---- machine ------------------------------------------------------------------------

def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # pragma: no cover - any torch/driver trouble means "no GPU"
        return None
    return None


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith\b.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_state() -> dict[str, Any] | None:
    """The commit measured, and the files of client/ server/ protos/ that differ from it.

    ``LOSSD_BENCH_GIT`` (that JSON) stands in where the checkout has no .git (a copy).
    """
    if os.environ.get("LOSSD_BENCH_GIT"):
        with contextlib.suppress(ValueError):
            return dict(json.loads(os.environ["LOSSD_BENCH_GIT"]))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "client", "server",
                                 "protos"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "uncommitted": [line[3:] for line in status]}


def machine_info(device: str) -> dict[str, Any]:
    import google.protobuf
    import grpc
    import torch

    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    gpu = _gpu_name() if device.startswith("cuda") else None
    cores = os.cpu_count() or 1
    name = f"{_slug(_cpu_model())}-{cores}c"
    if gpu:
        name = f"{_slug(gpu)}-{name}"
    return {"name": name, "hostname": socket.gethostname(), "cpu": _cpu_model(),
            "cores": cores, "memory_gib": round(mem / 2**30, 1), "gpu": gpu,
            "device": device, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "grpcio": grpc.__version__,
            "protobuf": google.protobuf.__version__, "numpy": np.__version__}


# ---- system load (the benchmark box may be shared) -----------------------------------

def _system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        return 0.0


def _descendants(pid: int) -> list[int]:
    """Live child processes of ``pid``, their children, and so on (a server's workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of every live process below it (a supervisor and its
    workers, MLServer and its inference pool)."""
    return sum(_proc_cpu(p) for p in [pid, *_descendants(pid)])


def _proc_minflt(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0


def wait_quiet(limit_s: float, threshold: float = 0.15, window: float = 1.0,
               quiet: bool = False) -> float:
    """Wait (up to ``limit_s``) for the other processes to leave the CPUs mostly idle.

    Returns the busy fraction last seen over a ``window`` (0..1, all CPUs).
    """
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = _system_jiffies()
        time.sleep(window)
        b1, t1 = _system_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        if not quiet:
            print(f"bench: machine busy ({busy:.0%} of all CPUs); waiting", flush=True)


# ---- RSS ------------------------------------------------------------------------------

def _status_bytes(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a thread; VmHWM at the end."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        path = f"/proc/{self.pid}/statm"
        while not self._stop.is_set():
            try:
                with open(path) as f:
                    rss = int(f.read().split()[1]) * PAGE
            except (OSError, IndexError, ValueError):
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.before = _status_bytes(self.pid, "VmRSS")
        self.hwm_reset = _reset_hwm(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = _status_bytes(self.pid, "VmRSS")
        self.hwm = _status_bytes(self.pid, "VmHWM")
        if self.hwm_reset:
            self.peak = max(self.peak, self.hwm)

    def result(self) -> dict[str, Any]:
        return {"before": self.before, "peak": self.peak, "after": self.after,
                "hwm": self.hwm if self.hwm_reset else None, "samples": self.samples}


# ---- servers ---------------------------------------------------------------------------



def _subprocess_env() -> dict[str, str]:
    """This interpreter's import path for the servers (works without an installed lossd)."""
    import lossd
    import lossd_server

    paths = [str(ROOT), str(Path(lossd.__file__).parent.parent),
             str(Path(lossd_server.__file__).parent.parent)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*dict.fromkeys(paths),
                                         *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    """A server subprocess on a free loopback port."""

    def __init__(self, kind: str, device: str, workers: int | None, log: Path,
                 extra: list[str] | None = None, env: dict[str, str] | None = None, *,
                 processes: str = "1", wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command the server runs under (e.g. valgrind and its flags)."""
        self.kind = kind
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        mb = str(MAX_MESSAGE_BYTES / 2**20)
        self.metrics_port: int | None = None
        if kind == "lossd":
            # Metrics on (lossd's default): its stage histograms say where server time goes.
            self.metrics_port = free_port()
            cmd = [sys.executable, "-m", "lossd_server.serve", "--processes", processes,
                   "--host", "127.0.0.1",
                   "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                   "--device", device, "--max-message-mb", mb, "--log-level", "warning"]
            if workers is not None:  # else lossd's own default
                cmd += ["--workers", str(workers)]
        else:
            cmd = [sys.executable, "-m", "bench.floor_server", "--mode",
                   kind.removeprefix("floor_"), "--port", str(self.port), "--workers",
                   str(workers or FLOOR_WORKERS), "--max-message-mb", mb]
        cmd += extra or []
        self._log = log.open("ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*wrapper, *cmd], cwd=ROOT,
                                     env={**_subprocess_env(), **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a supervisor drains its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_METRIC = re.compile(r'^lossd_(stage|request)_duration_seconds_(sum|count)\{([^}]*)\} (\S+)$')


def scrape_stages(port: int | None) -> dict[str, float] | None:
    """Cumulative Evaluate stage and request seconds/counts from lossd's /metrics."""
    if port is None:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m or 'method="Evaluate"' not in m.group(3):
            continue
        what, agg, labels, value = m.groups()
        stage = re.search(r'stage="(\w+)"', labels)
        if what != "request" and stage is None:
            continue
        name = "request" if what == "request" or stage is None else stage.group(1)
        key = f"{name}_{agg}"
        out[key] = out.get(key, 0.0) + float(value)
    return out


def stage_means(before: dict[str, float] | None, after: dict[str, float] | None
                ) -> dict[str, float] | None:
    """Mean ms per call of each server stage between two scrapes (lossd's own timers)."""
    if not before or not after:
        return None
    calls = after.get("request_count", 0) - before.get("request_count", 0)
    if calls <= 0:
        return None
    out = {}
    for key in after:
        if key.endswith("_sum"):
            name = key.removesuffix("_sum")
            out[name] = round((after[key] - before.get(key, 0.0)) * 1e3 / calls, 3)
    staged = sum(v for k, v in out.items() if k != "request")
    if "request" in out:
        out["handler_other"] = round(out["request"] - staged, 3)
    return out


# ---- client processes ---------------------------------------------------------------

def _make_call(kind: str, w: Workload, address: str
               ) -> tuple[Callable[[], int], Callable[[], None]]:
    """A function making one call and returning N, and a closer."""
    import grpc

    from lossd.channel import channel_options
    from lossd.requests import ENVELOPE_BYTES

    pred, targ, weights = DATA[w.name].torch()
    if kind.partition("/")[0] == "lossd":  # "lossd/grpcio": through that client transport
        from lossd import LossClient

        client = LossClient(address, timeout=CALL_TIMEOUT, max_message_bytes=MAX_MESSAGE_BYTES,
                            transport=kind.partition("/")[2] or None)

        def call() -> int:
            r = client.evaluate(pred, targ, loss=w.loss, weights=weights, **w.options)
            return int(r.per_sample.shape[0])

        return call, client.close

    if kind == "kserve":
        return _kserve_call(w, address, pred, targ)
    if kind == "triton":
        if w.seq or w.weighted or w.dtype != "float32" or w.options:
            raise ValueError(f"the Triton peer serves plain fp32 workloads, not {w.name}")
        from bench.triton import make_call

        return make_call(address, pred, targ, CALL_TIMEOUT)

    from bench.workloads import arrays_for_wire, request_bytes
    from lossd.v1 import loss_service_pb2 as pb

    channel = grpc.insecure_channel(address, options=channel_options(MAX_MESSAGE_BYTES))
    unary = channel.unary_unary("/lossd.v1.LossService/Evaluate",
                                response_deserializer=pb.EvaluateResponse.FromString)
    stream = channel.stream_stream("/lossd.v1.LossService/EvaluateStream",
                                   response_deserializer=pb.EvaluateResponse.FromString)
    arrays = arrays_for_wire(pred, targ, weights)
    rows = w.n
    if w.payload_bytes + ENVELOPE_BYTES > MAX_MESSAGE_BYTES:  # split as LossClient does
        rows = max(1, (MAX_MESSAGE_BYTES - ENVELOPE_BYTES) // math.ceil(w.payload_bytes / w.n))

    def floor_call() -> int:
        if rows >= w.n:
            resp = unary(request_bytes(w, *arrays), timeout=CALL_TIMEOUT)
            return int(np.frombuffer(resp.per_sample.data, "<f4").copy().shape[0])
        reqs = (request_bytes(w, *(None if a is None else a[i:i + rows] for a in arrays))
                for i in range(0, w.n, rows))
        out = [np.frombuffer(r.per_sample.data, "<f4")
               for r in stream(reqs, timeout=CALL_TIMEOUT)]
        return int(np.concatenate(out).shape[0])

    return floor_call, channel.close


def _kserve_call(w: Workload, address: str, pred: Any, targ: Any
                 ) -> tuple[Callable[[], int], Callable[[], None]]:
    """One Open Inference Protocol ModelInfer per call (model = the loss, inputs
    PREDICTIONS and TARGETS as raw contents), answered by lossd's KServe face or by the
    MLServer peer (``bench.mlserver``); the request is built per call, as the others are."""
    import grpc

    from lossd.channel import channel_options
    from lossd.kserve.v2 import grpc_service_pb2 as kpb

    if w.seq or w.weighted or w.dtype != "float32" or w.options:
        raise ValueError(f"the kserve client measures plain fp32 workloads, not {w.name}")
    channel = grpc.insecure_channel(address, options=channel_options(MAX_MESSAGE_BYTES))
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=kpb.ModelInferRequest.SerializeToString,
                                response_deserializer=kpb.ModelInferResponse.FromString)
    x, t = pred.numpy(), targ.numpy()

    def call() -> int:
        request = kpb.ModelInferRequest(model_name=w.loss, inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="PREDICTIONS", datatype="FP32",
                                                   shape=x.shape),
            kpb.ModelInferRequest.InferInputTensor(name="TARGETS", datatype="INT64",
                                                   shape=t.shape)],
            raw_input_contents=[x.tobytes(), t.tobytes()])
        resp = infer(request, timeout=CALL_TIMEOUT)
        i = next(i for i, o in enumerate(resp.outputs) if o.name == "PER_SAMPLE")
        if resp.raw_output_contents:
            losses = np.frombuffer(resp.raw_output_contents[i], "<f4").copy()
        else:
            losses = np.asarray(resp.outputs[i].contents.fp32_contents, np.float32)
        return int(losses.shape[0])

    return call, channel.close


def _wait_ready(address: str, timeout: float) -> float:
    """Block until a gRPC server answers on ``address``; seconds waited."""
    import grpc

    t0 = time.monotonic()
    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
        probe = ch.unary_unary("/lossd.v1.LossService/ListLosses")
        with contextlib.suppress(grpc.RpcError):  # the floor answers UNIMPLEMENTED
            probe(b"", timeout=timeout, wait_for_ready=True)
    return time.monotonic() - t0


def _call_loop(call: Callable[[], int], lat: list[float], min_calls: int,
               deadline: float) -> None:
    """Calls until ``deadline`` and at least ``min_calls`` times, appending latencies."""
    while len(lat) < min_calls or time.monotonic() < deadline:
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)


def _worker(index: int, conn: Any) -> None:
    """A client process: runs cases on command until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "ready":
                conn.send(("ok", _wait_ready(msg[1], msg[2])))
                continue
            _, kind, w, address, warmup, min_calls, threads = msg
            if w.name not in DATA:  # a spawned client process (see Pool)
                DATA[w.name] = make_data(w)
            # One client (and channel) per thread, as one per process otherwise.
            clients = [_make_call(kind, w, address) for _ in range(threads)]
            warm = []
            try:
                for call, _close in clients:
                    for _ in range(warmup):
                        t0 = time.perf_counter()
                        n = call()
                        warm.append(time.perf_counter() - t0)
                        if n != w.n:
                            raise RuntimeError(f"{kind}: {n} results, expected {w.n}")
                conn.send(("warm", warm))
                _, deadline = conn.recv()
                lats: list[list[float]] = [[] for _ in clients]
                cpu0 = time.process_time()
                start = time.monotonic()
                if threads == 1:
                    _call_loop(clients[0][0], lats[0], min_calls, deadline)
                else:
                    pool = [threading.Thread(target=_call_loop,
                                             args=(call, lat, min_calls, deadline))
                            for (call, _close), lat in zip(clients, lats, strict=True)]
                    for t in pool:
                        t.start()
                    for t in pool:
                        t.join()
                end = time.monotonic()
                conn.send(("done", {"lat": [x for lat in lats for x in lat], "start": start,
                                    "end": end, "warm": warm,
                                    "cpu": time.process_time() - cpu0}))
            finally:
                for _call, close in clients:
                    close()
        except Exception as exc:  # reported to the parent, which fails the run
            conn.send(("error", f"worker {index}: {type(exc).__name__}: {exc}"))


class Pool:
    """Client processes, forked once before any gRPC channel exists in this process.

    ``start="spawn"``: fresh interpreters that make the workloads' data themselves, for
    clients that must not inherit what this process or its other clients imported
    (tritonclient and lossd's Open Inference protos cannot share a process).
    """

    def __init__(self, size: int, start: str = "fork") -> None:
        ctx = mp.get_context(start)
        self.conns = []
        self.procs = []
        for i in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(i, child), daemon=True, name=f"client-{i}")
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def _recv(self, conn: Any, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise TimeoutError("a client process did not answer in time")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    def wait_ready(self, address: str, timeout: float = 120.0) -> float:
        self.conns[0].send(("ready", address, timeout))
        return float(self._recv(self.conns[0], timeout + 10)[1])

    def run(self, kind: str, w: Workload, address: str, clients: int, warmup: int,
            min_calls: int, duration: float, on_start: Callable[[], None] | None = None,
            threads: int = 1) -> list[dict[str, Any]]:
        """Runs a case on ``clients`` processes, each calling from ``threads`` threads."""
        conns = self.conns[:clients]
        for c in conns:
            c.send(("case", kind, w, address, warmup, min_calls, threads))
        for c in conns:
            self._recv(c, CALL_TIMEOUT * max(1, warmup))
        if on_start:
            on_start()
        deadline = time.monotonic() + duration
        for c in conns:
            c.send(("go", deadline))
        return [self._recv(c, CALL_TIMEOUT * max(1, min_calls) + duration)[1] for c in conns]

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send(("stop",))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


# ---- statistics ------------------------------------------------------------------------

def stats(w: Workload, lat: list[float], wall: float) -> dict[str, Any]:
    a = np.asarray(lat) * 1e3
    cps = len(lat) / wall if wall > 0 else 0.0
    return {"calls": len(lat), "wall_s": round(wall, 3),
            "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "min_ms": round(float(a.min()), 3),
            "max_ms": round(float(a.max()), 3), "calls_per_s": round(cps, 2),
            "samples_per_s": round(cps * w.n, 1),
            "mb_per_s": round(cps * w.payload_bytes / 1e6, 2)}


# ---- the run ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workloads: list[Workload], out: Path) -> None:
        self.args = args
        self.workloads = workloads
        self.out = out
        self.cases: list[dict[str, Any]] = []
        self.servers: dict[str, Any] = {}
        self.rss: dict[str, Any] = {}
        # Server output (warnings, tracebacks) goes to a log beside the results' temp files.
        self.log = Path(tempfile.gettempdir()) / f"lossd-bench-servers-{os.getpid()}.log"
        self.machine: dict[str, Any] = {}
        self._triton_pool: Pool | None = None

    def say(self, text: str) -> None:
        if not self.args.silent:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def durations(self, w: Workload, clients: int) -> tuple[float, int, int]:
        """(duration, min calls per client, warm-up calls per client) for one case."""
        a = self.args
        duration = a.duration if a.duration is not None else w.duration
        min_calls = a.iters if a.iters is not None else w.min_calls
        warmup = 3 if w.payload_bytes < 8e6 else 2
        if a.quick:
            duration, min_calls, warmup = min(duration, 0.3), min(min_calls, 3), 1
        if clients > 1:
            min_calls = max(1, math.ceil(min_calls / clients))
            warmup = max(1, warmup - 1)
        return duration, min_calls, warmup

    @contextlib.contextmanager
    def _load(self, record: dict[str, Any], pids: list[int]) -> Iterator[None]:
        """Records the CPU seconds used by our processes and by everything else.

        Before the case, waits (up to 10 s, within --wait-quiet) for a quiet machine: this
        box may be shared, and a busy neighbour skews a 2-second case.
        """
        waited = 0.0
        if self.args.wait_quiet > 0 and not self.args.quick:
            t = time.monotonic()
            wait_quiet(10.0, window=0.25, quiet=True)
            waited = time.monotonic() - t
        b0, t0 = _system_jiffies()
        ours0 = sum(_proc_cpu(p) for p in pids)
        yield
        b1, t1 = _system_jiffies()
        ours1 = sum(_proc_cpu(p) for p in pids)
        cores = os.cpu_count() or 1
        span = (t1 - t0) / CLK / cores  # seconds of wall time the window covered
        busy = (b1 - b0) / CLK
        record["load"] = {"waited_for_quiet_s": round(waited, 2),
                          "window_s": round(span, 3), "cpu_s_all": round(busy, 3),
                          "cpu_s_ours": round(ours1 - ours0, 3),
                          "other_cpu_frac": round(max(0.0, busy - (ours1 - ours0))
                                                  / max(1e-9, span * cores), 3)}

    def grpc_case(self, pool: Pool, kind: str, w: Workload, clients: int,
                  server: Server, threads: bool = False) -> dict[str, Any]:
        """One case with ``clients`` callers: client processes, or with ``threads`` the
        threads of one client process (each with its own client and channel)."""
        processes, per_process = (1, clients) if threads else (clients, 1)
        duration, min_calls, warmup = self.durations(w, clients)
        record: dict[str, Any] = {"workload": w.name, "concurrency": clients,
                                  "client_processes": processes, "kind": kind}
        marks: dict[str, float] = {}

        scraped: dict[str, Any] = {}

        def on_start() -> None:  # after the warm-up calls
            scraped["before"] = scrape_stages(server.metrics_port)
            marks["cpu"] = tree_cpu(server.pid)
            marks["flt"] = _proc_minflt(server.pid)

        pids = [server.pid, *_descendants(server.pid), os.getpid(),
                *(p.pid or 0 for p in pool.procs[:processes])]
        # RSS is watched from before the first (warm-up) call: its peak covers them all.
        with RssSampler(server.pid) as sampler, self._load(record, pids):
            results = pool.run(kind, w, server.address, processes, warmup, min_calls,
                               duration, on_start, per_process)
        lat = [x for r in results for x in r["lat"]]
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        record.update(stats(w, lat, wall))
        means = stage_means(scraped.get("before"), scrape_stages(server.metrics_port))
        if means:
            # Client-observed mean minus the handler's own time: client library, grpcio on
            # both sides and the wire.
            means["outside_handler"] = round(record["mean_ms"] - means.get("request", 0.0), 3)
        record["server_stages_ms"] = means
        record["warmup_ms"] = [round(x * 1e3, 2) for x in results[0]["warm"]]
        calls = max(1, len(lat))
        record["server_cpu_ms_per_call"] = round(
            (tree_cpu(server.pid) - marks["cpu"]) * 1e3 / calls, 2)
        record["client_cpu_ms_per_call"] = round(
            sum(r["cpu"] for r in results) * 1e3 / calls, 2)
        record["server_page_faults_per_call"] = round(
            (_proc_minflt(server.pid) - marks["flt"]) / calls, 1)
        record["server_rss"] = sampler.result()
        return record

    def compute_case(self, w: Workload, clients: int) -> dict[str, Any]:
        from bench.workloads import compute_floor_fn

        duration, min_calls, warmup = self.durations(w, clients)
        fn = compute_floor_fn(w, DATA[w.name], self.args.device)
        for _ in range(warmup):
            fn()
        record: dict[str, Any] = {"workload": w.name, "concurrency": clients,
                                  "kind": "compute"}
        results: list[tuple[list[float], float, float]] = []
        deadline = 0.0

        def loop() -> None:
            lat: list[float] = []
            start = time.monotonic()
            while len(lat) < min_calls or time.monotonic() < deadline:
                t0 = time.perf_counter()
                fn()
                lat.append(time.perf_counter() - t0)
            results.append((lat, start, time.monotonic()))

        import torch

        threads_before = torch.get_num_threads()
        if clients > 1:
            # Several callers: each gets its share of the cores, so OpenMP teams do not
            # oversubscribe them (8 teams of 2 spinning threads on 2 cores starve each other).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // clients))
        record["torch_threads"] = torch.get_num_threads()
        try:
            with self._load(record, [os.getpid()]):
                deadline = time.monotonic() + duration
                threads = [threading.Thread(target=loop) for _ in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        finally:
            torch.set_num_threads(threads_before)
        lat = [x for r in results for x in r[0]]
        wall = max(r[2] for r in results) - min(r[1] for r in results)
        record.update(stats(w, lat, wall))
        return record

    def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        a = self.args
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        quiet = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
        for w in self.workloads:
            DATA[w.name] = make_data(w)
        self.say(f"data made for {len(self.workloads)} workload(s)")
        pool = Pool(max(a.concurrency))  # fork before any gRPC object exists here
        floors: dict[str, Server] = {}
        try:
            for kind in ("floor_sync", "floor_async"):
                floors[kind] = Server(kind, a.device, a.workers, self.log)
            for kind, s in floors.items():
                waited = pool.wait_ready(s.address)
                self.servers[kind] = {"startup_s": round(waited, 2),
                                      "idle_rss": _status_bytes(s.pid, "VmRSS")}
            self.say("transport floor servers ready")
            for w in self.workloads:
                self._workload(pool, w, floors)
        finally:
            for s in floors.values():
                s.stop()
            pool.close()
            self.close_triton_pool()
        self.say("measuring stages and client copies")
        stages = self._stages()
        copies = self._copies()
        elapsed = time.monotonic() - self.t0
        from bench import report

        return report.assemble(
            machine=self.machine, started=started, elapsed_s=round(elapsed, 1),
            config={"quick": a.quick, "duration": a.duration, "iters": a.iters,
                    "concurrency": list(a.concurrency), "workers": a.workers,
                    "device": a.device, "max_message_bytes": MAX_MESSAGE_BYTES,
                    "busy_before_start": quiet, "git": git_state(),
                    "server_env": a.server_env,
                    "server_args": a.server_arg, "triton": sorted(a.triton),
                    "client": "one forked process per client, own channel",
                    "server_log": str(self.log),
                    "argv": sys.argv[1:]},
            workloads=self.workloads, cases=self.cases, servers=self.servers,
            rss=self.rss, stages=stages, copies=copies)

    def _workload(self, pool: Pool, w: Workload, floors: dict[str, Server]) -> None:
        a = self.args
        lossd = Server("lossd", a.device, a.workers, self.log, a.server_arg, a.server_env)
        try:
            startup = pool.wait_ready(lossd.address)
            time.sleep(0.2)
            idle = _status_bytes(lossd.pid, "VmRSS")
            self.rss[w.name] = {"idle_fresh": idle, "startup_s": round(startup, 2)}
            self.say(f"{w.name}: lossd ready in {startup:.1f}s, idle RSS {idle / 2**20:.0f} MiB")
            for clients in a.concurrency:
                for kind in KINDS:
                    server = lossd if kind.startswith("lossd") else floors[kind]
                    rec = self.grpc_case(pool, kind, w, clients, server)
                    self.cases.append(rec)
                    self.say(f"{w.name} c={clients} {kind:11s} p50 {rec['p50_ms']:9.2f} ms  "
                             f"{rec['calls_per_s']:9.1f} calls/s  ({rec['calls']} calls)")
                    if kind == "lossd":
                        self.rss[w.name][f"c{clients}"] = rec["server_rss"]
                    if rec.get("server_stages_ms"):
                        st = rec["server_stages_ms"]
                        self.say("    lossd stages (ms/call): " + ", ".join(
                            f"{k} {v:.2f}" for k, v in st.items()))
                rec = self.compute_case(w, clients)
                self.cases.append(rec)
                self.say(f"{w.name} c={clients} {'compute':11s} p50 {rec['p50_ms']:9.2f} ms  "
                         f"{rec['calls_per_s']:9.1f} calls/s  ({rec['calls']} calls)")
        finally:
            lossd.stop()
        if w.name in a.triton:
            self._triton(w)

    def triton_pool(self) -> Pool:
        """The spawned client processes every Triton case uses (see :class:`Pool`)."""
        if self._triton_pool is None:
            self._triton_pool = Pool(max(self.args.concurrency), start="spawn")
        return self._triton_pool

    def close_triton_pool(self) -> None:
        """Ends :meth:`triton_pool`'s client processes, if they were started."""
        if self._triton_pool is not None:
            self._triton_pool.close()
            self._triton_pool = None

    def _triton(self, w: Workload) -> None:
        """The Triton peer on ``w`` with 1 and 2 instances, a fresh server for each."""
        from bench.triton import Triton

        for instances in TRITON_INSTANCES:
            try:
                server = Triton(instances, self.log)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                # No Python with a shared libpython, or no package index: lossd's own
                # figures still stand; the run records why the peer is missing.
                self.servers["triton"] = {"skipped": f"{type(exc).__name__}: {exc}"}
                self.say(f"Triton peer skipped: {exc}")
                return
            try:
                startup = server.wait_ready()
                self.servers[f"{server.kind} ({w.name})"] = {"startup_s": round(startup, 2)}
                for clients in self.args.concurrency:
                    rec = self.grpc_case(self.triton_pool(), "triton", w, clients, server)
                    rec["kind"] = server.kind
                    self.cases.append(rec)
                    self.say(f"{w.name} c={clients} {server.kind:11s} p50 "
                             f"{rec['p50_ms']:9.2f} ms  {rec['calls_per_s']:9.1f} calls/s  "
                             f"server CPU {rec['server_cpu_ms_per_call']:.1f} ms/call")
            finally:
                server.stop()

    def _stages(self) -> dict[str, Any]:
        if self.args.no_stages:
            return {}
        from bench.stages import breakdown

        out: dict[str, Any] = {}
        for w in self.workloads:
            try:
                out[w.name] = breakdown(w, DATA[w.name], self.args.device,
                                        reps=2 if self.args.quick else 5)
            except Exception as exc:  # the stage probe reaches into lossd internals
                out[w.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def _copies(self) -> Any:
        if self.args.no_copies:
            return []
        from bench.client_copies import run_all

        big = max(self.workloads, key=lambda w: w.payload_bytes)
        n, c = (1024, 1000) if self.args.quick else (big.n, big.classes)
        if big.seq:
            n, c = (1024, 1000) if self.args.quick else (16384, 1000)
        return run_all(n, c, env=_subprocess_env())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 0.3 s and at most 3 calls per case, 1 warm-up call")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (lossd and compute floor)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/<machine>/)")
    p.add_argument("--machine", default=None,
                   help="machine name for the results (default: from CPU model, cores, GPU)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per case (default per workload, 1.5 to 2)")
    p.add_argument("--iters", type=int, default=None,
                   help="minimum calls per case at concurrency 1 (split over clients at 8)")
    p.add_argument("--concurrency", default="1,8", help="client counts (default 1,8)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"server threads: lossd's --workers (default: lossd's own) and the "
                        f"sync floor's pool (default {FLOOR_WORKERS})")
    p.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                   help="wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the lossd server only (experiments, e.g. "
                        "MALLOC_MMAP_MAX_=0); repeatable")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument to `lossd serve` (e.g. --server-arg=--concurrency=4)")
    p.add_argument("--triton", default="large,xl", metavar="WORKLOADS",
                   help="comma-separated workloads to measure the Triton peer on, with "
                        f"{' and '.join(map(str, TRITON_INSTANCES))} instances (default "
                        "large,xl; '' for none; builds its virtualenv on first use)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--no-copies", action="store_true", help="skip the client-copies probe")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")
    p.add_argument("--silent", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    a.concurrency = tuple(int(x) for x in str(a.concurrency).split(","))
    bad = [e for e in a.server_env if "=" not in e]
    if bad:
        p.error(f"--server-env wants NAME=VALUE, got {', '.join(bad)}")
    a.server_env = dict(e.split("=", 1) for e in a.server_env)
    names = [x.strip() for x in a.workloads.split(",") if x.strip()]
    unknown = [x for x in names if x not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    a.workload_list = [WORKLOADS[x] for x in names]
    a.triton = {x.strip() for x in a.triton.split(",") if x.strip()}
    unknown = sorted(a.triton - set(WORKLOADS))
    if unknown:
        p.error(f"unknown --triton workload(s) {', '.join(unknown)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    machine = machine_info(a.device)
    if a.machine:
        machine["name"] = _slug(a.machine) or a.machine
    out = a.out or ROOT / "bench" / "results" / machine["name"]
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(a, a.workload_list, out)
    bench.machine = machine
    result = bench.run()
    from bench import report

    report.write(result, out, plot=not a.no_plot)
    print(report.markdown(result))
    print(f"bench: wrote {out / 'results.json'}, results.md"
          f"{'' if a.no_plot else ', bench.png'} in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
