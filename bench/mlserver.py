"""MLServer 1.7.1, the project users compare lossd with, as a peer in the benchmarks.

It lives in a virtualenv of its own outside the repository (``--venv``, default
``/tmp/lossd-bench-mlserver``), built here on first use: MLServer pins protobuf and needs
``uvloop<0.22``, and must never share a process with tritonclient (both register the
``inference.*`` protobuf symbols). Its model (``bench/mlserver_model.py``) computes the
same ``cross_entropy`` with torch and answers on the Open Inference Protocol's gRPC
endpoint, as lossd's KServe face does, so ``bench.run``'s ``kserve`` client measures both.

    python -m bench.mlserver --setup          # build the virtualenv (a few minutes)
    python -m bench.mlserver --serve 0        # serve with parallel_workers 0, print the port

``parallel_workers``: 0 runs inference in MLServer's main process; MLServer's default (1)
runs it in a pool of worker processes beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LOSSD_BENCH_MLSERVER_VENV", "/tmp/lossd-bench-mlserver"))
MLSERVER = "mlserver==1.7.1"
MODEL_NAME = "cross_entropy"


def requirements() -> list[str]:
    """What the virtualenv holds: MLServer, the uvloop it works with, torch as lossd's
    own set-up picks it (the CPU build where no NVIDIA driver is present)."""
    gpu = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")
    torch = os.environ.get("LOSSD_TORCH_SPEC") or ("torch>=2.4" if gpu else "torch==2.13.0")
    return [MLSERVER, "uvloop<0.22", torch, "numpy"]


def ensure_venv(venv: Path = VENV, *, quiet: bool = True) -> Path:
    """The virtualenv's ``mlserver`` executable, building the virtualenv when it is missing
    or was built with other requirements."""
    stamp = venv / ".lossd-bench"
    want = json.dumps(requirements())
    exe = venv / "bin" / "mlserver"
    if exe.exists() and stamp.exists() and stamp.read_text() == want:
        return exe
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, *(["--quiet"] if quiet else []), *requirements()], check=True)
    stamp.write_text(want)
    return exe




class MLServer:
    """``mlserver start`` on free loopback ports with ``parallel_workers`` (None: MLServer's
    default), in a fresh model folder. ``pid`` is MLServer's main process."""

    def __init__(self, parallel_workers: int | None, log: Path, *, venv: Path = VENV) -> None:
        exe = ensure_venv(venv)
        self.kind = "mlserver" if parallel_workers is None else f"mlserver_pw{parallel_workers}"
        self.folder = Path(tempfile.mkdtemp(prefix="lossd-bench-mlserver-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = None  # lossd's stage scraping does not apply
        settings: dict[str, object] = {
            "host": "127.0.0.1", "grpc_port": self.port, "http_port": free_port(),
            "metrics_port": free_port(), "debug": False}
        if parallel_workers is not None:
            settings["parallel_workers"] = parallel_workers
        (self.folder / "settings.json").write_text(json.dumps(settings))
        model = self.folder / MODEL_NAME
        model.mkdir()
        shutil.copy(ROOT / "bench" / "mlserver_model.py", model / "mlserver_model.py")
        (model / "model-settings.json").write_text(json.dumps(
            {"name": MODEL_NAME, "implementation": "mlserver_model.CrossEntropy"}))
        self._log = log.open("ab")
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([str(exe), "start", str(self.folder)], cwd=self.folder,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_group(self.proc, 20)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mlserver", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--setup", action="store_true", help="build the virtualenv")
    p.add_argument("--serve", type=int, default=None, metavar="PARALLEL_WORKERS",
                   help="serve until interrupted (-1: MLServer's default)")
    a = p.parse_args(argv)
    if a.setup:
        print(ensure_venv(a.venv, quiet=False))
    if a.serve is not None:
        log = Path(tempfile.gettempdir()) / "lossd-bench-mlserver.log"
        server = MLServer(None if a.serve < 0 else a.serve, log, venv=a.venv)
        print(f"MLServer ({server.kind}) on {server.address}; log {log}", flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
