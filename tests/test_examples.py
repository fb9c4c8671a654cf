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

examples/sharded_eval.py (docs/deploy.md, "Sharded evaluation"; the Indexed Job of
k8s/jobs/sharded-eval/): three shards run as Kubernetes runs them, then ``lossd merge``
over their files, equal to one evaluation of the whole set, bit for bit.

examples/ddp_eval.py (docs/training.md, DDP), under ``torchrun --standalone
--nproc_per_node 2`` on gloo: rank 0 prints the merge of both ranks' shards, checked
against local torch over the example's own whole set and model (the loss, accuracy and
each class's, the hardest samples by dataset index).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import lossd
from examples import sharded_eval
from lossd import Batch, LossClient
from lossd._cli import main as lossd_main
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


def test_sharded_eval_reads_its_shard_like_an_indexed_job() -> None:
    """The shard from JOB_COMPLETION_INDEX and SHARDS, flags over them; the shards cover
    the set once, in order; their files sort in index order, however many."""
    env = {"JOB_COMPLETION_INDEX": "2", "SHARDS": "3"}
    args = sharded_eval.parse_args([], environ=env)
    assert (args.index, args.shards) == (2, 3)
    args = sharded_eval.parse_args(["--index", "1", "--shards", "4"], environ=env)
    assert (args.index, args.shards) == (1, 4)
    for argv, environ in (([], {}), (["--index", "3"], env), (["--predictions", "x.npy"], env)):
        with pytest.raises(SystemExit) as exc:
            sharded_eval.parse_args(argv, environ=environ)
        assert exc.value.code == sharded_eval.EXIT_USAGE
    for samples, shards in ((10_000, 3), (7, 3), (5, 5), (1_000, 12)):
        bounds = [sharded_eval.shard_bounds(i, shards, samples) for i in range(shards)]
        assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(samples))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
        names = [sharded_eval.shard_path(Path("r"), i, shards).name for i in range(shards)]
        assert sorted(names) == names


def test_sharded_eval_shards_merge_into_one_evaluation(train_server: LossdServer,
                                                        tmp_path: Path) -> None:
    """Three shards, each a process with the environment an Indexed Job's pod gets, then
    ``lossd merge`` over their files (as the merge Job globs them): the merged result is one
    ``evaluate_all`` over the whole set, bit for bit (sum, mean, per class, accuracy,
    quantiles, the hardest samples by data-set index); the JSON says the same and the
    report is written. A shard read from .npy files saves the same result."""
    address = f"127.0.0.1:{train_server.port}"
    out, shards = tmp_path / "results", 3
    script = [sys.executable, str(ROOT / "examples" / "sharded_eval.py"), "--address", address]
    pods = [subprocess.Popen([*script, "--out-dir", str(out)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**ENV, "JOB_COMPLETION_INDEX": str(i), "SHARDS": str(shards)})
            for i in range(shards)]
    x, y = sharded_eval.synthetic_dataset()
    for i, pod in enumerate(pods):
        stdout, stderr = pod.communicate(timeout=240)
        assert pod.returncode == 0, stderr
        lo, hi = sharded_eval.shard_bounds(i, shards, len(x))
        assert stdout.startswith(f"shard {i} of {shards}: samples {lo} to {hi - 1}, "), stdout
    files = sorted(out.glob("shard-*.lossd"))
    assert [f.name for f in files] == [f"shard-{i}.lossd" for i in range(shards)]
    merged_json, report = out / "merged.json", out / "report.html"
    assert lossd_main(["merge", *map(str, files), "--json", str(merged_json),
                       "--report", str(report)]) == 0

    size = sharded_eval.BATCH
    with LossClient(address) as client:
        whole = client.evaluate_all(
            (Batch(x[a:a + size], y[a:a + size], sample_ids=np.arange(a, min(a + size, len(x))))
             for a in range(0, len(x), size)),
            per_class=True, accuracy=True, hardest=sharded_eval.HARDEST, quantiles=True)
    merged = lossd.merge(lossd.load_result(f) for f in files)
    assert merged.count == whole.count == len(x)
    assert (merged.sum, merged.mean, merged.accuracy) == (whole.sum, whole.mean, whole.accuracy)
    assert merged.per_class is not None and whole.per_class is not None
    assert merged.per_class.to_dict() == whole.per_class.to_dict()
    assert merged.quantiles is not None and whole.quantiles is not None
    assert dict(merged.quantiles.items()) == dict(whole.quantiles.items())
    assert merged.quantiles.max == whole.quantiles.max
    assert merged.hardest is not None and whole.hardest is not None
    assert list(merged.hardest.sample_ids) == list(whole.hardest.sample_ids)
    assert list(merged.hardest.indices) == list(merged.hardest.sample_ids)  # in order
    assert list(merged.hardest.losses) == list(whole.hardest.losses)
    figures = json.loads(json.dumps(whole.to_dict(), default=str))
    assert json.loads(merged_json.read_text()) == figures
    assert "lossd evaluation: cross_entropy" in report.read_text()

    # The same shard from .npy files, mapped: the same saved result.
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    from_files = subprocess.run(
        [*script, "--index", "1", "--shards", str(shards), "--out-dir", str(tmp_path / "npy"),
         "--predictions", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=240, env=ENV)
    assert from_files.returncode == 0, from_files.stderr
    assert (tmp_path / "npy" / "shard-1.lossd").read_bytes() == files[1].read_bytes()


def test_ddp_eval_merges_both_ranks_shards(train_server: LossdServer) -> None:
    import torch
    import torch.nn.functional as F

    from examples import ddp_eval as example  # here: it imports torch.distributed

    script = ROOT / "examples" / "ddp_eval.py"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(script), "--address", f"127.0.0.1:{train_server.port}"],
        capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ranks 2 (gloo), rank 0's shard 500 samples, merged 1000 samples"
    hardest_at = lines.index("hardest samples (dataset index, loss, target, predicted):")
    logged = metrics(lines[1:hardest_at])
    assert len(logged) == hardest_at - 1, lines

    # The whole set, in one process, with the example's own data and model.
    x, y, _ = example.make_data(1000).tensors
    with torch.no_grad():
        logits = example.make_model()(x)
    losses = F.cross_entropy(logits, y, reduction="none").double()
    hit = (logits.argmax(dim=1) == y).double()
    assert logged["count"] == 1000
    assert logged["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert logged["accuracy"] == pytest.approx(hit.mean().item(), abs=1e-6)
    assert 0.7 < logged["accuracy"] < 0.95, lines        # a classifier, not a constant
    for c, name in enumerate(example.CLASSES):
        assert logged[f"class/{name}/loss"] == pytest.approx(
            losses[y == c].mean().item(), abs=1e-6), name
        assert logged[f"class/{name}/accuracy"] == pytest.approx(
            hit[y == c].mean().item(), abs=1e-6), name
    rows = [line.split() for line in lines[hardest_at + 1:]]
    top = torch.topk(losses, 5)
    assert [int(r[0]) for r in rows] == top.indices.tolist()
    assert [float(r[1]) for r in rows] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert [r[2] for r in rows] == [example.CLASSES[int(y[i])] for i in top.indices]
