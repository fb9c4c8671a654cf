"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_server

README = (Path(__file__).parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_top_of_readme_has_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (Path(__file__).parent.parent / ".ci/run").read_text()
    assert "make test" in ci


def runnable_examples() -> list[str]:
    """The quick start and the Triton client example: self-contained, port 50051."""
    blocks = python_blocks()
    triton = [b for b in blocks if "import tritonclient" in b]
    assert len(triton) == 1
    return [blocks[0], triton[0]]


@pytest.mark.parametrize("index", [0, 1], ids=["quick-start", "tritonclient"])
def test_example_runs_as_written(index: int) -> None:
    example = runnable_examples()[index]
    assert '("127.0.0.1:50051")' in example
    try:
        srv = start_server(port=50051)
    except OSError:
        pytest.skip("port 50051 is taken on this machine; the example hard-codes it")
    try:
        out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                             timeout=120)
    finally:
        srv.stop(0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_plugin_example_is_served_as_written(tmp_path: Path) -> None:
    """The Plugins section's mypkg/losses.py, installed as a module and loaded with --plugin
    (entry points off: the example plugin's charbonnier would take the name), computes the
    Charbonnier loss; its Dockerfile block is examples/plugin/Dockerfile."""
    [module] = [b for b in python_blocks() if b.startswith("# mypkg/losses.py")]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "losses.py").write_text(module)
    check = """
import numpy as np
from lossd import LossClient
from lossd_server.app import create_server
from lossd_server.settings import Settings

server = create_server(Settings(port=0, metrics_port=-1, device="cpu",
                                plugins=("mypkg.losses",), entry_points=False)).start()
x = np.array([[0.0, 3.0], [1.0, -1.0]], np.float32)
t = np.array([[0.0, -1.0], [1.0, 1.0]], np.float32)
with LossClient(f"127.0.0.1:{server.port}") as client:
    info = {i.name: i for i in client.losses()}["charbonnier"]
    r = client.evaluate(x, t, loss="charbonnier", eps=0.5)
server.stop(0)
want = np.sqrt((x - t) ** 2 + 0.25).mean(axis=1)
assert info.description == "Charbonnier (smooth L1) loss", info
assert info.source == "mypkg.losses (--plugin)", info.source
assert np.allclose(r.per_sample, want, rtol=1e-6), (r.per_sample, want)
print("served")
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "served"
    [dockerfile] = re.findall(r"```dockerfile\n(.*?)```", README, flags=re.S)
    example = (Path(__file__).parent.parent / "examples" / "plugin" / "Dockerfile").read_text()
    assert dockerfile == example
