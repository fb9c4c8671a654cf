"""The README's examples run as written."""

from __future__ import annotations

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
