"""Server instructions per small call, counted by callgrind (issue 18's Keep, issue 20).

    python -m bench.callgrind                          # lossd and the transport floor
    python -m bench.callgrind --server lossd --save    # writes callgrind.json

Wall-clock timings on a shared 2-core VM move by more than a refactor's effect; the
instructions a call costs the server move by ~0.3% between runs. Each server (``lossd serve
--processes 1`` or ``bench.floor_server``'s sync floor, the transport floor) runs as one
process under ``valgrind --tool=callgrind`` with a fixed hash seed; this process is its
client and makes the ``small`` workload's Evaluate calls (N=32, C=10, float32
cross_entropy; ``bench.run``'s calls: ``lossd.LossClient`` for lossd, the floor's prebuilt
request bytes for the floor), one at a time. After ``--warmup`` calls it zeroes the
counters (``callgrind_control``), makes K1 calls and dumps, makes K2 calls and dumps:
instructions per call = (I(K2) - I(K1)) / (K2 - K1), every thread of the server counted;
what a segment costs besides its calls (the dump, idle wake-ups) cancels in the difference.
Prints one JSON line; ``--save`` also writes it to ``callgrind.json`` under ``--out``
(default ``bench/results/<machine>/``). Under valgrind torch takes its AVX2 kernels
(valgrind has no AVX-512), and a call runs ~50x slower: about 2 minutes of start-up and
calls per server.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import run as bench_run
from bench.small import WORKLOAD, _grpc_wait, _serving
from bench.workloads import make_data

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"lossd": "lossd", "floor": "floor_sync"}
"""``--server`` names -> ``bench.run`` server and call kinds."""
STARTUP_TIMEOUT = 600.0
"""Seconds for a server to answer under valgrind (importing torch alone takes ~1 minute)."""


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   capture_output=True, timeout=120)


def _total(path: Path) -> int:
    """The instruction count (Ir) of one callgrind dump: its ``totals:`` line."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"{path}: no totals line")


def measure(name: str, k1: int, k2: int, warmup: int, workdir: Path) -> dict[str, Any]:
    """Instructions per call of server ``name`` (a key of ``SERVERS``)."""
    kind = SERVERS[name]
    out = workdir / f"{name}.%p"
    server = bench_run.Server(
        kind, "cpu", None, workdir / f"{name}.log", env={"PYTHONHASHSEED": "0"},
        wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    try:
        call, close = bench_run._make_call(kind, WORKLOAD, server.address)
        try:
            if kind == "lossd":
                _grpc_wait(server.address, _serving, STARTUP_TIMEOUT)
            else:
                _grpc_wait(server.address, lambda ch: call() == WORKLOAD.n, STARTUP_TIMEOUT)
            for _ in range(warmup):
                call()
            _control(server.pid, "--zero")
            seconds = []
            for k in (k1, k2):
                t0 = time.monotonic()
                for _ in range(k):
                    call()
                seconds.append(time.monotonic() - t0)
                _control(server.pid, "--dump")
        finally:
            close()
        i1, i2 = (_total(Path(f"{str(out).replace('%p', str(server.pid))}.{n}"))
                  for n in (1, 2))
    finally:
        server.stop()
    return {"instructions_per_call": round((i2 - i1) / (k2 - k1)),
            "instructions": [i1, i2], "seconds": [round(s, 1) for s in seconds]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.callgrind",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="lossd,floor",
                   help="comma-separated: lossd, floor (the sync transport floor)")
    p.add_argument("--k1", type=int, default=200)
    p.add_argument("--k2", type=int, default=1200)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--save", action="store_true", help="write callgrind.json under --out")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--machine", default=None)
    a = p.parse_args(argv)
    if a.k2 <= a.k1:
        p.error("--k2 must exceed --k1")
    names = a.server.split(",")
    if unknown := set(names) - set(SERVERS):
        p.error(f"unknown --server {', '.join(sorted(unknown))}")
    bench_run.DATA[WORKLOAD.name] = make_data(WORKLOAD)
    machine = bench_run.machine_info("cpu")
    if a.machine:
        machine["name"] = a.machine
    result: dict[str, Any] = {
        "bench": "callgrind", "machine": machine["name"], "workload": WORKLOAD.name,
        "k1": a.k1, "k2": a.k2, "warmup": a.warmup, "git": bench_run.git_state(),
        "servers": {}}
    with tempfile.TemporaryDirectory(prefix="lossd-callgrind-") as tmp:
        for name in names:
            result["servers"][name] = measure(name, a.k1, a.k2, a.warmup, Path(tmp))
    line = json.dumps(result)
    print(line)
    if a.save:
        out = a.out or ROOT / "bench" / "results" / machine["name"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "callgrind.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
