"""Server RSS per stage of one large call: where the copies of a payload live.

    python -m bench.rss_stages --workload xl
    python -m bench.rss_stages --workload xl --server-env LOSSD_MALLOC_REUSE=false

A ``lossd serve --processes 1`` server runs in a subprocess with a probe that reads its
own ``VmRSS`` and ``VmHWM`` (``/proc/self/status``) at the handler's entry and at the
start and end of every stage (``lossd_server.metrics.CallRecord.stage``), and before the
response is serialised. The client (this process) sends the workload through
``LossClient`` several times; the probe's readings of the last call are printed, as MiB and
as payloads above the server's idle RSS. Everything before the handler's entry is gRPC's
receive path (its slices and the bytes handed to the deserializer); the peak inside a
stage is that stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.peers import free_port
from bench.workloads import WORKLOADS, make_data

ROOT = Path(__file__).resolve().parent.parent

# Runs in the server process: patches the stage timer and the handler to record RSS.
PROBE = r'''
import json, os, sys, threading
from lossd_server import metrics, servicer

OUT = os.environ["LOSSD_RSS_PROBE"]
marks, lock = [], threading.Lock()

def read():
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm

def mark(name):
    rss, hwm = read()
    with lock:
        marks.append({"at": name, "rss": rss, "hwm": hwm})

enter, leave = metrics._StageTimer.__enter__, metrics._StageTimer.__exit__
names = {}
def stage(self, name, _orig=metrics.CallRecord.stage):
    timer = _orig(self, name)
    names[id(timer)] = name
    return timer
def t_enter(self):
    mark("start " + names.get(id(self), "?"))
    return enter(self)
def t_exit(self, *exc):
    mark("end " + names.pop(id(self), "?"))
    return leave(self, *exc)
metrics.CallRecord.stage = stage
metrics._StageTimer.__enter__, metrics._StageTimer.__exit__ = t_enter, t_exit

evaluate = servicer.LossServicer.Evaluate
def Evaluate(self, request, context):
    with lock:
        marks.clear()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM from here on
        f.write("5")
    mark("handler entry")
    resp = evaluate(self, request, context)
    mark("handler exit")
    with lock:
        with open(OUT, "w") as f:
            json.dump(marks, f)
    return resp
servicer.LossServicer.Evaluate = Evaluate

from lossd_server.serve import main
sys.exit(main(sys.argv[1:]))
'''




def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(workload: str, calls: int, env: dict[str, str]) -> dict[str, Any]:
    import grpc

    from lossd import LossClient

    w = WORKLOADS[workload]
    pred, targ, weights = make_data(w).torch()
    port = free_port()
    probe_out = Path(tempfile.mkdtemp()) / "marks.json"
    server_env = {**os.environ, **env, "LOSSD_RSS_PROBE": str(probe_out)}
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "--processes", "1", "--port",
                             str(port), "--metrics-port", "-1", "--device", "cpu",
                             "--log-level", "warning"], env=server_env, cwd=ROOT)
    try:
        with LossClient(f"127.0.0.1:{port}", timeout=300) as client:
            grpc.channel_ready_future(client._raw_channel).result(timeout=120)
            time.sleep(0.5)
            idle = _rss(proc.pid)
            after = []
            for _ in range(calls):
                client.evaluate(pred, targ, loss=w.loss, weights=weights, **w.options)
                after.append(_rss(proc.pid))
        marks = json.loads(probe_out.read_text())
    finally:
        proc.terminate()
        proc.wait(30)
    return {"workload": workload, "payload_bytes": w.payload_bytes, "idle_rss": idle,
            "rss_after_each_call": after, "marks": marks, "env": env}


def table(result: dict[str, Any]) -> str:
    idle, payload = result["idle_rss"], result["payload_bytes"]
    mib = 2 ** 20
    lines = [f"# Server RSS per stage: {result['workload']} "
             f"({payload / 1e6:.0f} MB payload; idle RSS {idle / mib:.0f} MiB)", "",
             "| point (last call) | RSS MiB | (RSS - idle) / payload | peak so far MiB | "
             "(peak - idle) / payload |", "|---|---|---|---|---|"]
    for m in result["marks"]:
        lines.append(f"| {m['at']} | {m['rss'] / mib:.0f} | {(m['rss'] - idle) / payload:.2f}"
                     f" | {m['hwm'] / mib:.0f} | {(m['hwm'] - idle) / payload:.2f} |")
    lines += ["", "RSS after each call (MiB): " + ", ".join(
        f"{r / mib:.0f}" for r in result["rss_after_each_call"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rss_stages",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="xl", choices=sorted(WORKLOADS))
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", type=Path, default=None, help="also write this .md (and .json)")
    a = p.parse_args(argv)
    result = run(a.workload, a.calls, dict(e.split("=", 1) for e in a.server_env))
    text = table(result)
    print(text)
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
