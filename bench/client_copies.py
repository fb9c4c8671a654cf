"""How many copies of the payload the client makes while building a request.

Each measurement runs in a fresh interpreter (``python -m bench.client_copies --kind K``,
with ``MALLOC_MMAP_THRESHOLD_`` fixed so glibc maps every large block anew) so the heap
holds nothing from earlier work and every large allocation touches new pages.
Three independent readings, each divided by the payload (predictions + targets bytes):

* ``hwm``: growth of the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``)
  over the RSS before the step: every copy alive at the same time;
* ``faults``: minor page faults x page size: every byte of new memory the step touched,
  including copies freed before the step ended;
* ``retained``: RSS growth after the step: what the finished request holds.

Steps: ``build`` is ``lossd.requests.Requests.build`` (array or tensor -> request, the
conversion the issue's target is about); ``serialize`` is what grpcio still has to do with
it (``SerializeToString`` of a message; nothing when build already returns bytes);
``floor`` is the benchmark's one-copy request encoder (``bench.workloads.request_bytes``)
for comparison.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

KINDS = ("torch_float32", "numpy_float32", "torch_bfloat16")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _minflt() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn: Any, payload: int) -> tuple[Any, dict[str, float]]:
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    rss0 = _status("VmRSS")
    reset = _reset_hwm()
    f0 = _minflt()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    f1 = _minflt()
    hwm = _status("VmHWM")
    rss1 = _status("VmRSS")
    m = {"ms": round(dt * 1e3, 2),
         "faults": round((f1 - f0) * page / payload, 2),
         "retained": round((rss1 - rss0) / payload, 2)}
    if reset:
        m["hwm"] = round((hwm - rss0) / payload, 2)
    return out, m


def measure(kind: str, n: int, classes: int) -> dict[str, Any]:
    """Copies made by each step for one input kind (run in a fresh process)."""
    import torch  # noqa: F401  (loaded before the baseline is read)

    from bench.workloads import Workload, arrays_for_wire, make_data, request_bytes, wire_bytes
    from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests

    dtype = "bfloat16" if kind.endswith("bfloat16") else "float32"
    w = Workload("copies", "", n, classes, dtype=dtype)
    data = make_data(w)
    pred, targ, _ = data.torch()
    if kind.startswith("numpy"):
        pred, targ = data.predictions, data.targets
    payload = w.payload_bytes
    builder = Requests(DEFAULT_MAX_MESSAGE_BYTES)
    # Warm the code paths on a tiny batch so only the payload's cost is measured.
    wire_bytes(builder.build("cross_entropy", pred[:2], targ[:2], None, None, {})[0])
    reqs, build = _measure(lambda: builder.build("cross_entropy", pred, targ, None, None, {}),
                           payload)
    # What grpcio sends: the message's serialisation (nothing more if build made bytes).
    wire, ser = _measure(functools.partial(wire_bytes, reqs[0]), payload)
    del reqs, wire
    p, t, _ = arrays_for_wire(*data.torch())
    _, floor = _measure(lambda: request_bytes(w, p, t, None), payload)
    return {"kind": kind, "payload_bytes": payload, "messages": 1,
            "build": build, "serialize": ser, "floor_request_bytes": floor}


def run_all(n: int, classes: int, kinds: tuple[str, ...] = KINDS,
            env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each kind in its own fresh interpreter."""
    out = []
    # A fixed mmap threshold stops glibc from reusing freed large blocks, so every
    # payload-sized allocation is new memory and the page-fault count sees each copy.
    env = dict(os.environ if env is None else env, MALLOC_MMAP_THRESHOLD_="131072")
    for kind in kinds:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.client_copies", "--kind", kind, "--n", str(n),
             "--classes", str(classes)], capture_output=True, text=True, env=env,
            timeout=300, check=False)
        if proc.returncode != 0:
            out.append({"kind": kind, "error": proc.stderr.strip()[-2000:]})
        else:
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="client-side payload copies (one kind)")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--classes", type=int, default=1000)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.kind, a.n, a.classes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
