"""The distribution as a user installs it (docs/install.md): the sdist and wheel that
``make dist`` builds, the wheel installed into a fresh virtualenv that sees neither this
checkout nor .venv (no ``--system-site-packages``, no ``PYTHONPATH``). First the client
alone, which must work without torch; then, by the command the CLI's hint names, the
``server`` extra, and the README's Quick start runs as written against ``lossd serve``
started from that virtualenv.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, health
from grpc_health.v1 import health_pb2

# The torch of the server step: the pinned CPU build, as scripts/bootstrap.sh installs on a
# machine without a driver (and with the same override).
TORCH_SPEC = os.environ.get("LOSSD_TORCH_SPEC", "torch==2.13.0")
QUICK_START_PORT = 50051


def quick_start() -> str:
    """The README's first Python block: the Quick start."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, flags=re.S)
    assert block is not None
    return block.group(1)


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A command in an environment without this process's PYTHONPATH (the checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_serving(proc: subprocess.Popen[str], port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"lossd serve exited {proc.returncode}"
        try:
            if health(port, "") == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    pytest.fail("lossd serve not SERVING in time")


def test_wheel_installs_client_then_server_and_runs_the_quick_start(tmp_path: Path) -> None:
    built = run(sys.executable, "-m", "build", "--outdir", tmp_path / "dist", ROOT, cwd=tmp_path)
    assert built.returncode == 0, (built.stdout[-3000:] + built.stderr[-3000:]
                                   + "\n(python -m build: the dev extra, scripts/bootstrap.sh dev)")
    [wheel] = (tmp_path / "dist").glob("lossd-*.whl")
    assert len(list((tmp_path / "dist").glob("lossd-*.tar.gz"))) == 1

    venv = tmp_path / "venv"
    python, lossd = venv / "bin" / "python", venv / "bin" / "lossd"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")

    # The client alone: no torch, and lossd imported from the virtualenv.
    proc = run(*pip, wheel, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(python, "-c", "import lossd, lossd.v1; print(lossd.__file__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout
    proc = run(python, "-c", "import torch", cwd=tmp_path)
    assert "No module named 'torch'" in proc.stderr, proc.stderr
    # `lossd serve` names the command that installs the server; that command is run next.
    proc = run(lossd, "serve", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    hint = re.search(r"pip install '(dist/lossd-[^']+\.whl\[server\])'", proc.stderr)
    assert hint is not None, proc.stderr
    assert (tmp_path / hint.group(1).removesuffix("[server]")) == wheel

    proc = run(*pip, hint.group(1), TORCH_SPEC, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1", LOSSD_PROCESSES="1")
    server = subprocess.Popen([lossd, "serve", "--host", "127.0.0.1", "--port",
                               str(QUICK_START_PORT)], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_serving(server, QUICK_START_PORT)
        except AssertionError:
            assert server.stderr is not None
            log = server.stderr.read()
            if "Address already in use" in log or "Failed to bind" in log:
                pytest.skip("port 50051 is taken on this machine; the Quick start uses it")
            raise AssertionError(log) from None
        proc = run(python, "-c", quick_start(), cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
    finally:
        server.terminate()
        server.wait(60)
