"""The distribution as a user installs it (docs/install.md): the sdist and wheel that
``make dist`` builds, the wheel installed into a fresh virtualenv that sees neither this
checkout nor .venv (no ``--system-site-packages``, no ``PYTHONPATH``). First the client
alone, which must work without torch; then, by the command the CLI's hint names, the
``server`` extra, and the README's Quick start runs as written against ``lossd serve``
started from that virtualenv. Last, docs/plugins.md's walkthrough in that virtualenv, as
in the ``.venv/`` of ``make serve``: its package written out, installed and served.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, health
from grpc_health.v1 import health_pb2

from lossd import LossClient

# The torch of the server step: the pinned CPU build, as scripts/bootstrap.sh installs on a
# machine without a driver (and with the same override).
TORCH_SPEC = os.environ.get("LOSSD_TORCH_SPEC", "torch==2.13.0")
QUICK_START_PORT = 50051


def fenced(text: str, lang: str) -> list[str]:
    """The fenced blocks of one language in a Markdown text, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def quick_start() -> str:
    """The README's first Python block: the Quick start."""
    return fenced((ROOT / "README.md").read_text(), "python")[0]


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A command in an environment without this process's PYTHONPATH (the checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass(frozen=True)
class Venv:
    """A fresh virtualenv in ``root`` with ``make dist``'s output in ``root/dist``."""

    root: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def lossd(self) -> Path:
        return self.root / "venv" / "bin" / "lossd"

    def pip_install(self, *args: str | Path) -> None:
        proc = run(self.python, "-m", "pip", "install", "--quiet",
                   "--disable-pip-version-check", *args, cwd=self.root, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """``make dist``'s command into ``dist/``, then a fresh virtualenv with the wheel: the
    client alone (its dependencies only)."""
    root = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--outdir", root / "dist", ROOT, cwd=root)
    assert built.returncode == 0, (built.stdout[-3000:] + built.stderr[-3000:]
                                   + "\n(python -m build: the dev extra, scripts/bootstrap.sh dev)")
    [wheel] = (root / "dist").glob("lossd-*.whl")
    assert len(list((root / "dist").glob("lossd-*.tar.gz"))) == 1
    assert run(sys.executable, "-m", "venv", root / "venv", cwd=root).returncode == 0
    env = Venv(root, wheel)
    env.pip_install(wheel)
    return env


def test_the_client_alone_needs_no_torch(venv: Venv) -> None:
    proc = run(venv.python, "-c", "import lossd, lossd.v1; print(lossd.__file__)",
               cwd=venv.root)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(venv.root / "venv"), proc.stdout
    proc = run(venv.python, "-c", "import torch", cwd=venv.root)
    assert "No module named 'torch'" in proc.stderr, proc.stderr


def test_the_hinted_server_install_serves_the_quick_start(venv: Venv) -> None:
    """``lossd serve`` without the server names the command that installs it; that command
    (with the pinned torch) makes ``lossd serve`` work, and the Quick start runs."""
    proc = run(venv.lossd, "serve", cwd=venv.root)
    assert proc.returncode == 2, proc.stderr
    hint = re.search(r"pip install '(dist/lossd-[^']+\.whl\[server\])'", proc.stderr)
    assert hint is not None, proc.stderr
    assert venv.root / hint.group(1).removesuffix("[server]") == venv.wheel
    venv.pip_install(hint.group(1), TORCH_SPEC)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1", LOSSD_PROCESSES="1")
    log_path = venv.root / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen([venv.lossd, "serve", "--host", "127.0.0.1", "--port",
                                   str(QUICK_START_PORT)], cwd=venv.root, env=env,
                                  stderr=log_file, text=True)
    try:
        try:
            wait_serving(server, QUICK_START_PORT)
        except AssertionError:
            log = log_path.read_text()
            if "Address already in use" in log or "Failed to bind" in log:
                pytest.skip("port 50051 is taken on this machine; the Quick start uses it")
            raise AssertionError(log) from None
        proc = run(venv.python, "-c", quick_start(), cwd=venv.root, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
    finally:
        server.terminate()
        server.wait(60)


@dataclass(frozen=True)
class Walkthrough:
    """docs/plugins.md's "Write one" and "Install it": the project layout (a text block),
    the package's files (the blocks headed by a ``# path`` comment) and the commands."""

    files: dict[str, str]
    install: str
    serve: str

    @classmethod
    def of_page(cls) -> Walkthrough:
        page = (ROOT / "docs" / "plugins.md").read_text()
        write = page[page.index("## Write one"):page.index("## When it goes wrong")]
        install = page[page.index("## Install it"):page.index("## Ship it")]
        [layout] = fenced(write, "text")
        # "my-losses/", then "└── mypkg/", then its files: the tree's names, by indentation.
        names = re.findall(r"^([│ ├└─]*)([\w.-]+/?)", layout, flags=re.M)
        project = names[0][1].rstrip("/")
        paths, parents = [], [project]
        for prefix, name in names[1:]:
            depth = len(prefix) // 4          # "├── " per level
            del parents[depth:]
            if name.endswith("/"):
                parents.append(name.rstrip("/"))
            else:
                paths.append("/".join([*parents[1:], name]))
        blocks = fenced(write, "python") + fenced(install, "toml")
        files = {}
        for path in paths:
            [body] = [b for b in blocks if b.startswith(f"# {path}\n")] or [""]
            assert body or path.endswith("__init__.py"), f"no block for {path}"
            files[f"{project}/{path}"] = body
        [commands] = fenced(install, "bash")
        install_line, serve_line = [line.split("#")[0].strip()
                                    for line in commands.splitlines() if line.strip()]
        return cls(files, install_line, serve_line)


def test_plugin_walkthrough_serves_the_new_loss(venv: Venv, tmp_path: Path) -> None:
    """docs/plugins.md followed verbatim in an environment like ``make serve``'s (the
    wheel with its server extra, no example plugin): the package written as its layout
    says, installed by its command, and the server its next command starts (with a free
    port) serves ``charbonnier`` from the entry point, equal to a local computation."""
    venv.pip_install(f"{venv.wheel}[server]", TORCH_SPEC)   # as the hinted install left it
    page = Walkthrough.of_page()
    assert set(page.files) == {"my-losses/pyproject.toml", "my-losses/mypkg/__init__.py",
                               "my-losses/mypkg/losses.py"}, page.files
    checkout = tmp_path / "checkout"          # the page's commands run in the checkout
    checkout.mkdir()
    (checkout / ".venv").symlink_to(venv.root / "venv")
    for path, body in page.files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    installed = run("bash", "-c", page.install, cwd=checkout, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    assert page.serve == ".venv/bin/lossd serve"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Not flags: the test machine's share (CPU, one process, no metrics port to clash).
    env.update(LOSSD_DEVICE="cpu", LOSSD_METRICS_PORT="-1", LOSSD_PROCESSES="1")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen([*page.serve.split(), "--port", str(port)], cwd=checkout,
                                  env=env, stderr=log_file, text=True)
    try:
        try:
            wait_serving(server, port)
        except AssertionError:
            raise AssertionError(log_path.read_text()) from None
        x = np.array([[0.0, 3.0], [1.0, -1.0], [2.5, 0.5]], np.float32)
        t = np.array([[0.0, -1.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
        with LossClient(f"127.0.0.1:{port}") as client:
            info = {i.name: i for i in client.losses()}["charbonnier"]
            r = client.evaluate(x, t, loss="charbonnier", eps=0.1)
    finally:
        server.terminate()
        server.wait(60)
    assert info.source.startswith("mypkg.losses (entry point 'mypkg'"), info.source
    np.testing.assert_allclose(r.per_sample, np.sqrt((x - t) ** 2 + 0.01).mean(axis=1),
                               rtol=1e-6)
