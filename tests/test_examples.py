"""The scripts under examples/ run as their docstrings say, against a real server, and print
what they claim.

examples/train_loop.py: a training loop with lossd in it (README, Quick start). Its data
are seeded, so what it prints is checked against what the data hold: 4 classes, 1000
validation samples, 90 flipped training labels, which the per-sample losses must find far
above chance.

examples/lightning_callback.py and examples/hf_trainer.py (docs/training.md): the
framework integrations, each printing the metrics its framework holds at the end; checked
for every metric, the whole validation set counted and, for the Trainer, lossd's mean
equal to the Trainer's own ``eval_loss`` of the same model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lossd_server.app import LossdServer
from tests.conftest import ROOT, start_server

EPOCHS = 3
EPOCH_LINE = re.compile(
    r"epoch (\d+): train loss ([\d.]+), hardest (\d+): (\d+) flipped labels; "
    r"validation loss ([\d.]+), accuracy ([\d.]+)")
CLASS_LINE = re.compile(r"\s*(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)")
METRIC_LINE = re.compile(r"(\S+) ([\d.]+)")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # tiny models; the machine is shared


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



def run_example(name: str, server: LossdServer, *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name),
         "--address", f"127.0.0.1:{server.port}", *args],
        capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def metrics(lines: list[str]) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in map(METRIC_LINE.fullmatch, lines) if m}


def test_lightning_callback_logs_every_metric(train_server: LossdServer,
                                              tmp_path: Path) -> None:
    lines = run_example("lightning_callback.py", train_server, "--epochs", "2",
                        "--report-dir", str(tmp_path))
    hardest_at = lines.index("hardest validation samples (index, loss, target, predicted):")
    logged = metrics(lines[:hardest_at])
    assert len(logged) == hardest_at, lines
    classes = ("common", "uncommon", "rare")
    want = {"loss", "count", "accuracy", "ece", "loss_q0.5", "loss_q0.9", "loss_q0.99",
            "loss_max", *(f"class/{c}/{m}" for c in classes for m in ("loss", "accuracy"))}
    assert set(logged) == {f"lossd/val/{k}" for k in want}
    assert logged["lossd/val/count"] == 1000
    assert 0.8 < logged["lossd/val/accuracy"] <= 1.0        # the majority class alone: ~0.75
    rows = [line.split() for line in lines[hardest_at + 1:]]
    assert len(rows) == 5 and all(r[2] in classes and r[3] in classes for r in rows)
    losses = [float(r[1]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    assert losses[0] == logged["lossd/val/loss_max"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-epoch0.html",
                                                          "val-epoch1.html"]


def test_hf_trainer_metrics_match_the_trainers_loss(train_server: LossdServer,
                                                    tmp_path: Path) -> None:
    lines = run_example("hf_trainer.py", train_server, "--output-dir", str(tmp_path))
    logged = metrics(lines)
    classes = ("zero", "one", "two")
    for key in ("loss", "count", "accuracy", "ece", "loss_q0.99", "loss_max",
                *(f"class/{c}/loss" for c in classes)):
        assert f"eval_lossd/{key}" in logged, lines
    assert logged["eval_lossd/count"] == 500
    # The Trainer's own mean of the model's loss, over 5 batches of 100: the same number.
    assert abs(logged["eval_lossd/loss"] - logged["eval_loss"]) <= 2e-4
