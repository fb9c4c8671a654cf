"""The scripts under examples/ run as their docstrings say, against a real server, and print
what they claim.

examples/train_loop.py: a training loop with lossd in it (README, Quick start). Its data
are seeded, so what it prints is checked against what the data hold: 4 classes, 1000
validation samples, 90 flipped training labels, which the per-sample losses must find far
above chance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lossd_server.app import LossdServer
from tests.conftest import ROOT, start_server

EPOCHS = 3
EPOCH_LINE = re.compile(
    r"epoch (\d+): train loss ([\d.]+), hardest (\d+): (\d+) flipped labels; "
    r"validation loss ([\d.]+), accuracy ([\d.]+)")
CLASS_LINE = re.compile(r"\s*(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)")


@pytest.fixture(scope="module")
def train_server() -> Iterator[LossdServer]:
    srv = start_server()
    yield srv
    srv.stop(0)


def test_train_loop_finds_the_flipped_labels_and_reports_per_class(
        train_server: LossdServer) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # a tiny model; the machine is shared
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_loop.py"),
         "--address", f"127.0.0.1:{train_server.port}", "--epochs", str(EPOCHS)],
        capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()

    epochs = [EPOCH_LINE.fullmatch(line) for line in lines[:EPOCHS]]
    assert all(epochs), out.stdout
    for n, m in enumerate(epochs, 1):
        assert m is not None
        assert int(m[1]) == n
        assert int(m[3]) == 90                     # 3 % of 3000 training samples
        # The hardest 90 of 3000 by loss are mostly the 90 flipped labels (chance: ~3).
        assert int(m[4]) >= 45, m[0]
        assert float(m[5]) > 0
        assert 0.75 < float(m[6]) <= 1.0, m[0]   # the majority class alone: ~0.70

    assert lines[EPOCHS] == f"validation per class (after epoch {EPOCHS}):"
    rows = [CLASS_LINE.fullmatch(line) for line in lines[EPOCHS + 2:]]
    assert len(rows) == 4 and all(rows), out.stdout
    classes = [int(r[1]) for r in rows if r is not None]
    counts = [int(r[3]) for r in rows if r is not None]
    assert classes == [0, 1, 2, 3]
    assert sum(counts) == 1000
    assert counts == sorted(counts, reverse=True)   # imbalanced as CLASS_SHARES says

