"""NVIDIA Triton Inference Server 2.51 (python backend), the peer platform teams run beside
lossd, as a peer in the benchmarks (issue 20).

``tritonserver`` and its python backend come from the ``nvidia-pytriton`` wheel, which
ships them with a backend stub per Python version. They live in a virtualenv of their own
outside the repository (``LOSSD_BENCH_TRITON_VENV``, default ``/tmp/lossd-bench-triton``),
built here on first use with a Python that has a shared libpython (the stub embeds it):
pyenv's 3.11 where present, since the only local CPU torch wheel is for 3.11. The
wheel's own Python dependencies (pytriton's client side) are not installed: the server
needs none of them, and the stub needs only numpy and torch.

The model (``bench/triton_model.py``, a ``TritonPythonModel``) computes the same
``cross_entropy`` with torch and answers ``PER_SAMPLE``, ``SUM`` and ``MEAN``, as the
MLServer peer does. Clients call it through ``tritonclient.grpc`` with raw tensors
(:func:`make_call`), in processes that never import lossd's own Open Inference protos:
both register the ``inference.*`` protobuf symbols, so one process cannot hold both.

    python -m bench.triton --setup           # build the virtualenv (about a minute)
    python -m bench.triton --serve 2         # serve with 2 instances, print the ports
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers import free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LOSSD_BENCH_TRITON_VENV", "/tmp/lossd-bench-triton"))
PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 and its python backend
MODEL_NAME = "cross_entropy"
# Interpreters with a shared libpython, most preferred first; the stub must match one.
PYTHONS = (Path("/root/.pyenv/versions/3.11.7/bin/python3"),
           Path("/root/.pyenv/versions/3.12.1/bin/python3"))

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "PREDICTIONS", data_type: TYPE_FP32, dims: [ -1, -1 ] }},
  {{ name: "TARGETS", data_type: TYPE_INT64, dims: [ -1 ] }}
]
output [
  {{ name: "PER_SAMPLE", data_type: TYPE_FP32, dims: [ -1 ] }},
  {{ name: "SUM", data_type: TYPE_FP64, dims: [ 1 ] }},
  {{ name: "MEAN", data_type: TYPE_FP64, dims: [ 1 ] }}
]
instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
parameters: {{ key: "torch_threads", value: {{ string_value: "{threads}" }} }}
"""


def requirements() -> list[str]:
    """What the virtualenv holds: the wheel with tritonserver, torch as lossd's own set-up
    picks it (the CPU build where no NVIDIA driver is present), and the numpy it needs."""
    gpu = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")
    torch = os.environ.get("LOSSD_TORCH_SPEC") or ("torch>=2.4" if gpu else "torch==2.13.0")
    return [PYTRITON, torch, "numpy<2"]


def base_python() -> Path:
    """The interpreter the virtualenv is built from: the first of :data:`PYTHONS` present
    (``LOSSD_BENCH_TRITON_PYTHON`` overrides), else this one if its libpython is shared."""
    if os.environ.get("LOSSD_BENCH_TRITON_PYTHON"):
        return Path(os.environ["LOSSD_BENCH_TRITON_PYTHON"])
    for p in PYTHONS:
        if p.exists():
            return p
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return Path(sys.executable)
    raise RuntimeError("Triton's python backend needs a Python built with a shared libpython; "
                       "set LOSSD_BENCH_TRITON_PYTHON to one")


def _venv_info(venv: Path) -> dict[str, str]:
    """The virtualenv's Python version ("3.11"), libpython folder and site-packages."""
    code = ("import json, sys, sysconfig; print(json.dumps({'version': '%d.%d' % "
            "sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'site': sysconfig.get_paths()['purelib']}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, check=True).stdout
    return dict(json.loads(out))


def ensure_venv(venv: Path = VENV, *, quiet: bool = True) -> dict[str, str]:
    """The virtualenv's :func:`_venv_info`, building it when it is missing or was built
    with other requirements. The wheel goes in without its dependencies (see above)."""
    stamp = venv / ".lossd-bench"
    want = json.dumps(requirements())
    if not (stamp.exists() and stamp.read_text() == want):
        if not (venv / "bin" / "python").exists():
            subprocess.run([str(base_python()), "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install",
               "--disable-pip-version-check", *(["--quiet"] if quiet else [])]
        wheel, *rest = requirements()
        subprocess.run([*pip, "--no-deps", wheel], check=True)
        subprocess.run([*pip, *rest], check=True)
        stamp.write_text(want)
    return _venv_info(venv)


def torch_threads(instances: int) -> int:
    """Intra-op threads of each instance: the cores divided among the instances, the rule
    lossd applies to its serving processes. With torch's default (every core in every
    stub), OpenMP threads spinning between calls made 2 instances on 2 cores cost 4-11 ms
    of CPU per small call instead of about 1."""
    return max(1, len(os.sched_getaffinity(0)) // instances)


def config_text(instances: int, name: str = MODEL_NAME) -> str:
    """The model's ``config.pbtxt``: raw FP32/INT64 inputs, ``instances`` CPU instances,
    each with :func:`torch_threads` threads."""
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    return CONFIG.format(name=name, instances=instances, threads=torch_threads(instances))


def write_repository(folder: Path, instances: int) -> Path:
    """A model repository under ``folder`` holding the cross_entropy model (version 1)."""
    repo = folder / "models"
    model = repo / MODEL_NAME
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config_text(instances))
    shutil.copy(ROOT / "bench" / "triton_model.py", model / "1" / "model.py")
    return repo


def write_backends(folder: Path, site: Path, version: str) -> Path:
    """A backend directory with the wheel's python backend and the stub for ``version``
    (the backend looks for ``triton_python_backend_stub`` beside its library)."""
    server = site / "pytriton" / "tritonserver"
    backends = folder / "backends"
    shutil.copytree(server / "backends" / "python", backends / "python")
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"{PYTRITON} ships no python backend stub for Python {version}")
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends




class Triton:
    """``tritonserver`` on free loopback ports serving the model with ``instances`` CPU
    instances, from a fresh folder. ``pid`` is tritonserver's; the python backend's stub
    processes (one per instance) are its children, so ``bench.run.tree_cpu`` counts them."""

    def __init__(self, instances: int, log: Path, *, venv: Path = VENV) -> None:
        info = ensure_venv(venv)
        site = Path(info["site"])
        self.kind = f"triton-{instances}"
        self.folder = Path(tempfile.mkdtemp(prefix="lossd-bench-triton-"))
        repo = write_repository(self.folder, instances)
        backends = write_backends(self.folder, site, info["version"])
        self.port, self.http_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = None  # lossd's stage scraping does not apply
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        # The stub embeds the shared libpython and, copied out of the wheel, finds the
        # wheel's bundled libraries (libcudart, loaded even on CPU) only through this path;
        # The stub's interpreter is isolated (PYTHONPATH is ignored) and finds its prefix
        # from the first python3 on PATH: the venv's, so numpy and torch come from there.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [
            info["libdir"], str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
        cmd = [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
               "--model-repository", str(repo), "--backend-directory", str(backends),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.port),
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--metrics-port", str(free_port()), "--allow-metrics", "false",
               "--allow-gpu-metrics", "false", "--log-verbose", "0"]
        self._log = log.open("ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.folder, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until the model answers ready (over HTTP: this process must not load
        tritonclient's protos, see the module docstring)."""
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL_NAME}/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; see "
                                   f"{self._log.name}")
            if time.monotonic() - self.started > timeout:
                raise TimeoutError(f"Triton not ready after {timeout} s; see {self._log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_group(self.proc, 30)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def make_call(address: str, pred: Any, targ: Any, timeout: float
              ) -> tuple[Callable[[], int], Callable[[], None]]:
    """One ``ModelInfer`` per call through ``tritonclient.grpc`` (inputs set from numpy as
    raw tensors, built per call as the other clients build theirs), and a closer.

    Before returning, checks one answer against torch's in this process: per-sample losses
    bit for bit, sum and mean as float64 sums of them.
    """
    import numpy as np
    import torch
    import tritonclient.grpc as tc

    x, t = pred.numpy(), targ.numpy()
    client = tc.InferenceServerClient(address)
    outputs = [tc.InferRequestedOutput(name) for name in ("PER_SAMPLE", "SUM", "MEAN")]

    def infer() -> Any:
        inputs = [tc.InferInput("PREDICTIONS", list(x.shape), "FP32"),
                  tc.InferInput("TARGETS", list(t.shape), "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(t)
        return client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=timeout)

    def call() -> int:
        return int(infer().as_numpy("PER_SAMPLE").shape[0])

    got = infer()
    with torch.inference_mode():
        want = torch.nn.functional.cross_entropy(pred, targ, reduction="none").numpy()
    per_sample = got.as_numpy("PER_SAMPLE")
    total = want.astype(np.float64).sum()
    if not (per_sample.dtype == want.dtype and per_sample.tobytes() == want.tobytes()
            and got.as_numpy("SUM")[0] == total
            and got.as_numpy("MEAN")[0] == total / len(want)):
        client.close()
        raise RuntimeError("Triton's answer differs from torch's cross_entropy")
    return call, client.close


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.triton",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--setup", action="store_true", help="build the virtualenv")
    p.add_argument("--serve", type=int, default=None, metavar="INSTANCES",
                   help="serve until interrupted, with this many CPU instances")
    a = p.parse_args(argv)
    if a.setup:
        print(ensure_venv(a.venv, quiet=False))
    if a.serve is not None:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop Triton on TERM too
        log = Path(tempfile.gettempdir()) / "lossd-bench-triton.log"
        server = Triton(a.serve, log, venv=a.venv)
        try:
            server.wait_ready()
            print(f"Triton ({server.kind}) on {server.address} (gRPC), HTTP port "
                  f"{server.http_port}; log {log}", flush=True)
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
