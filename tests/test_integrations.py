"""The framework integrations with the real packages on CPU, against a real server: what
each reports equals one ``evaluate_all`` over the same data, and a dead server never
stops the run (a warning, the metrics left out; ``strict`` raises).

lossd.integrations.lightning (a ``Trainer.fit`` with the callback), .hf (a
``Trainer.evaluate`` of a tiny BERT built from a config, no download) and .torchmetrics.
"""

from __future__ import annotations

import json
import math
import pickle
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lossd import Aggregates, LossClient, Unavailable
from lossd.integrations import LossdWarning, flat_metrics
from tests.conftest import ROOT, EngineBlocker, start_server

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")  # lightning on torch 2.13

CLASSES = ("cat", "dog", "emu")
FEATURES = 8
BATCH = 16
N_VAL = 80   # 5 validation batches


@pytest.fixture
def dead_address() -> str:
    """An address where nothing listens (a port bound and closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, len(CLASSES), (n,),
                                                                generator=g)


def direct(address: str, batches: list[tuple[Any, Any]], **analyses: Any) -> Aggregates:
    with LossClient(address) as client:
        return client.evaluate_all(batches, class_names=CLASSES, **analyses)


def same(a: Aggregates | None, b: Aggregates | None) -> bool:
    """Equal aggregates, every field (NaN equal to NaN)."""
    return json.dumps(a and a.to_dict(), sort_keys=True) == \
        json.dumps(b and b.to_dict(), sort_keys=True)


def assert_same(logged: dict[str, float], want: dict[str, float]) -> None:
    assert set(logged) == set(want)
    for k, v in want.items():
        assert logged[k] == v or (math.isnan(v) and math.isnan(logged[k])), k


# --- Lightning ------------------------------------------------------------------------------

class Tiny(pl.LightningModule):
    """A linear classifier that keeps its validation logits (at module level, so that a
    spawned DDP process can unpickle it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(FEATURES, len(CLASSES))
        self.seen: list[torch.Tensor] = []   # the validation logits, to check against

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        self.seen.append(logits.detach().clone())
        return {"logits": logits, "targets": y}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TableLogger:
    """A Lightning logger that keeps what it is given, tables included."""

    def __new__(cls) -> Any:
        from lightning.pytorch.loggers import Logger

        class Recorder(Logger):
            def __init__(self) -> None:
                super().__init__()
                self.metrics: list[dict[str, float]] = []
                self.tables: list[tuple[str, list[str], list[list[Any]]]] = []

            @property
            def name(self) -> str:
                return "recorder"

            @property
            def version(self) -> int:
                return 0

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

            def log_metrics(self, metrics: dict[str, float], step: int | None = None
                            ) -> None:
                self.metrics.append(dict(metrics))

            def log_table(self, key: str, columns: list[str], data: list[list[Any]]
                          ) -> None:
                self.tables.append((key, columns, data))

        return Recorder()


def fit(tmp_path: Path, callback: Any, epochs: int = 2) -> tuple[Any, Any, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Tiny()
    logger = TableLogger()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[callback],
        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=2,
        log_every_n_steps=1)
    train = DataLoader(TensorDataset(*data(64, 1)), batch_size=BATCH)
    val = DataLoader(TensorDataset(*data(N_VAL, 2)), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train, val)
    return trainer, model, logger


def test_lightning_logs_what_one_stream_gives(address: str, tmp_path: Path) -> None:
    from lossd.integrations.lightning import LossdCallback

    callback = LossdCallback(address, class_names=CLASSES, hardest=5, top_k=2,
                             report_dir=tmp_path / "reports")
    trainer, model, logger = fit(tmp_path, callback)
    # The last epoch's validation, the sanity check's two batches left out.
    _, y = data(N_VAL, 2)
    logits = model.seen[-N_VAL // BATCH:]
    batches = [(x, y[i * BATCH:(i + 1) * BATCH]) for i, x in enumerate(logits)]
    want = direct(address, batches, per_class=True, accuracy=True, diagnostics=True,
                  top_k=2, hardest=5, quantiles=True)
    assert same(callback.last["val"], want)
    expected = flat_metrics(want, "lossd/val/")
    assert {"lossd/val/loss", "lossd/val/accuracy", "lossd/val/ece", "lossd/val/loss_q0.99",
            "lossd/val/class/emu/loss", "lossd/val/class/cat/accuracy"} <= set(expected)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()
              if k.startswith("lossd/")}
    headline = {k: v for k, v in expected.items() if "/class/" not in k}
    assert_same(logged, headline)            # monitorable: the per-class keys are not
    per_class = {k: v for k, v in expected.items() if "/class/" in k}
    assert per_class and any(m.keys() == per_class.keys() for m in logger.metrics)
    assert_same(next(m for m in reversed(logger.metrics) if m.keys() == per_class.keys()),
                per_class)
    assert any(set(headline) <= set(m) for m in logger.metrics)
    key, columns, rows = logger.tables[-1]
    assert key == "lossd/val/hardest" and columns[:2] == ["index", "loss"]
    assert [r[0] for r in rows] == [h.index for h in want.hardest or ()]
    assert {r[2] for r in rows} <= set(CLASSES)              # targets by name
    assert len(logger.tables) == 2                           # one per epoch, no sanity check
    reports = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert reports == ["val-epoch0.html", "val-epoch1.html"]
    assert "Hardest samples (5)" in (tmp_path / "reports" / "val-epoch1.html").read_text()


def test_lightning_ddp_merges_every_ranks_shard(address: str, tmp_path: Path) -> None:
    """Two DDP processes (ddp_spawn, gloo on CPU): each streams its shard of the validation
    set (Lightning's DistributedSampler; N_VAL divides evenly, so no padding) and the
    epoch's metrics merge across them: the whole set counted, every metric as one
    evaluation of the whole set with the trained model gives it, the report's histogram
    over every rank's losses."""
    from torch.utils.data import DataLoader, TensorDataset

    from lossd.integrations.lightning import LossdCallback

    torch.manual_seed(0)
    model = Tiny()
    callback = LossdCallback(address, class_names=CLASSES, hardest=5, top_k=2,
                             report_dir=tmp_path / "reports")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=2)
    train = DataLoader(TensorDataset(*data(64, 1)), batch_size=BATCH)
    val = DataLoader(TensorDataset(*data(N_VAL, 2)), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train, val)                       # rank 0's weights come back
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()
              if k.startswith("lossd/")}
    assert logged["lossd/val/count"] == N_VAL
    x, y = data(N_VAL, 2)
    with torch.no_grad():
        want = direct(address, [(model(x), y)], per_class=True, accuracy=True,
                      diagnostics=True, top_k=2, hardest=5, quantiles=True)
    expected = {k: v for k, v in flat_metrics(want, "lossd/val/").items()
                if "/class/" not in k}           # per class: straight to the loggers
    assert set(logged) == set(expected)
    for k, v in expected.items():                # the logits of other batch shapes
        assert logged[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    page = (tmp_path / "reports" / "val-epoch0.html").read_text()
    assert f'<div class="v">{N_VAL}</div><div class="l">samples</div>' in page
    assert 'alt="loss histogram"' in page                   # every rank's losses, on rank 0


def test_lightning_dead_server_warns_and_training_completes(dead_address: str,
                                                            tmp_path: Path) -> None:
    from lossd.integrations.lightning import LossdCallback

    callback = LossdCallback(dead_address, timeout=20, client_options={"retry_attempts": 1})
    with pytest.warns(LossdWarning, match="left out"):
        trainer, _, _ = fit(tmp_path, callback)
    assert trainer.current_epoch == 2                        # both epochs trained
    assert not any(k.startswith("lossd/") for k in trainer.callback_metrics)


def test_lightning_stuck_server_costs_one_timeout_per_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes every batch and never answers: each epoch's end waits
    ``timeout`` once, warns, and abandons the stream; training completes."""
    from lossd.integrations.lightning import LossdCallback

    srv = start_server()
    blocker = EngineBlocker(srv.engine, monkeypatch, must_release=False)
    try:
        callback = LossdCallback(f"127.0.0.1:{srv.port}", timeout=1.0)
        started = time.monotonic()
        with pytest.warns(LossdWarning, match="did not answer every batch in time"):
            trainer, _, _ = fit(tmp_path, callback)
        assert time.monotonic() - started < 20
        assert trainer.current_epoch == 2 and blocker.entered >= 1
        assert not any(k.startswith("lossd/") for k in trainer.callback_metrics)
    finally:
        blocker.release.set()
        srv.stop(0)


def test_lightning_strict_raises(dead_address: str, tmp_path: Path) -> None:
    from lossd.integrations.lightning import LossdCallback

    callback = LossdCallback(dead_address, strict=True, client_options={"retry_attempts": 1})
    with pytest.raises(Unavailable):
        fit(tmp_path, callback, epochs=1)


def test_lightning_select_and_unreadable_outputs(address: str) -> None:
    """``select`` picks from any output; an output it cannot read is skipped with one
    warning (strict: TypeError). Under DDP every rank streams its own batches."""
    from lossd.integrations.lightning import LossdCallback, pick

    x, y = data(8, 3)
    assert pick({"predictions": x, "targets": y}) == (x, y)
    assert pick((x, y)) == (x, y)
    assert pick(x) is None and pick({"logits": x}) is None
    single = SimpleNamespace(world_size=1, global_rank=0, sanity_checking=False)
    callback = LossdCallback(address, select=lambda out, batch: (out["z"], batch[1]))
    callback.on_test_batch_end(single, None, {"z": x}, (x, y), 0)   # type: ignore[arg-type]
    with LossClient(address) as client:
        want = client.evaluate_all([(x, y)], per_class=True, accuracy=True, diagnostics=True,
                                   hardest=10, quantiles=True)
    assert same(callback.metrics.close(), want)
    callback = LossdCallback(address)
    with pytest.warns(LossdWarning, match="returned a Tensor"):
        callback.on_test_batch_end(single, None, x, (x, y), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned a Tensor"):
        LossdCallback(address, strict=True).on_test_batch_end(
            single, None, x, (x, y), 0)  # type: ignore[arg-type]
    for rank in (0, 1):
        ddp = SimpleNamespace(world_size=2, global_rank=rank, sanity_checking=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.on_test_batch_end(ddp, None, (x, y), (x, y), 0)  # type: ignore[arg-type]
        assert same(callback.metrics.close(), want)
    callback.on_test_batch_end(single, None, (x, y), (x, y), 0)  # type: ignore[arg-type]
    copy = pickle.loads(pickle.dumps(callback))     # a stream open: it stays behind
    assert copy.metrics.close() is None and callback.metrics.close() is not None


# --- Hugging Face ---------------------------------------------------------------------------

def test_hf_trainer_evaluate_streams_every_batch(address: str, tmp_path: Path) -> None:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    from lossd.integrations.hf import LossdMetrics

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        num_labels=len(CLASSES))
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (40, 6), generator=g)
    labels = torch.randint(0, len(CLASSES), (40,), generator=g)
    dataset = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels,
                                                                      strict=True)]
    metrics = LossdMetrics(address, class_names=CLASSES)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16,
                             batch_eval_metrics=True, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    out = Trainer(model=model, args=args, eval_dataset=dataset,
                  compute_metrics=metrics).evaluate()

    model.eval()
    with torch.no_grad():
        batches = [(model(input_ids=ids[i:i + 16]).logits, labels[i:i + 16])
                   for i in range(0, 40, 16)]
    want = direct(address, batches, per_class=True, accuracy=True, diagnostics=True,
                  hardest=10, quantiles=True)
    assert metrics.last.count == 40
    for k, v in flat_metrics(want, "eval_lossd/").items():
        assert out[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_hf_token_logits_follow_the_per_sample_rule(address: str) -> None:
    """(N, T, C) token logits with -100 labels: each sequence's loss is the mean over its
    unmasked positions; an all-masked one is ignored."""
    from lossd.integrations.hf import LossdMetrics

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 5, 3, generator=g)
    labels = torch.randint(0, 3, (4, 5), generator=g)
    labels[0, 2:] = -100
    labels[3] = -100
    metrics = LossdMetrics(address, hardest=0, quantiles=None)
    for i in (0, 2):
        metrics(SimpleNamespace(predictions=(logits[i:i + 2],), label_ids=labels[i:i + 2]),
                compute_result=i == 2)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                  reduction="none")
    valid = labels != -100
    per_seq = [per_token[i][valid[i]].mean() for i in range(3)]
    assert metrics.last.count == 3 and metrics.last.ignored == 1
    assert metrics.last.mean == pytest.approx(float(sum(per_seq) / 3), rel=1e-6)
    assert metrics.last.accuracy_count == int(valid.sum())


def test_hf_dead_server_returns_no_metrics(dead_address: str) -> None:
    from lossd.integrations.hf import LossdMetrics

    x, y = data(8, 6)
    metrics = LossdMetrics(dead_address, client_options={"retry_attempts": 1})
    with pytest.warns(LossdWarning, match="evaluation left out"):
        assert metrics(SimpleNamespace(predictions=x, label_ids=y)) == {}


# --- torchmetrics ---------------------------------------------------------------------------

def test_torchmetrics_over_batches_equals_one_stream(address: str) -> None:
    from lossd.integrations.torchmetrics import LossdMetric

    batches = [data(BATCH, seed) for seed in range(10, 14)]
    batches = [(torch.randn(BATCH, len(CLASSES), generator=torch.Generator().manual_seed(s)),
                y) for s, (_, y) in enumerate(batches)]
    metric = LossdMetric(address, class_names=CLASSES, top_k=2)
    for x, y in batches[:2]:
        metric(x, y)
    half = metric.compute()
    want_half = direct(address, batches[:2], per_class=True, accuracy=True, diagnostics=True,
                       top_k=2, quantiles=True)
    assert {k: v.item() for k, v in half.items()} == flat_metrics(want_half)
    for x, y in batches[2:]:
        metric.update(x, y)                                   # update goes on after compute
    full = metric.compute()
    want = direct(address, batches, per_class=True, accuracy=True, diagnostics=True, top_k=2,
                  quantiles=True)
    assert same(metric.last, want)
    assert {k: v.item() for k, v in full.items()} == flat_metrics(want)
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in full.values())
    metric.reset()
    metric.update(*batches[0])
    assert metric.compute()["count"].item() == BATCH          # a new stream after reset
    copy = pickle.loads(pickle.dumps(metric))                 # e.g. a spawned process
    copy.update(*batches[1])
    assert copy.compute()["count"].item() == BATCH            # its own stream


def test_mergeable_flushes_cover_the_whole_evaluation(address: str) -> None:
    """A mergeable flush ends the stream for its state and keeps its result; the flushes
    and the close after it still cover every batch since the last close, as one stream."""
    from lossd.integrations._stream import StreamedMetrics

    batches = [data(BATCH, seed) for seed in range(20, 24)]
    batches = [(torch.randn(BATCH, len(CLASSES), generator=torch.Generator().manual_seed(s)),
                y) for s, (_, y) in enumerate(batches)]
    metrics = StreamedMetrics(address, loss="cross_entropy", options={}, per_class=None,
                              accuracy=None, calibration=None, top_k=2, hardest=3,
                              quantiles=True, class_names=CLASSES)
    analyses = dict(per_class=True, accuracy=True, diagnostics=True, top_k=2, hardest=3,
                    quantiles=True)
    for b in batches[:2]:
        metrics.put(*b)
    first = metrics.flush()
    assert first is not None and first.state is not None
    assert same(first, direct(address, batches[:2], **analyses))
    assert same(metrics.flush(), first)       # nothing new: what is kept
    metrics.put(*batches[2])
    assert same(metrics.flush(), direct(address, batches[:3], **analyses))  # merges too
    metrics.put(*batches[3])
    assert same(metrics.close(), direct(address, batches, **analyses))
    assert metrics.close() is None and metrics.failure is None


def test_torchmetrics_dead_server(dead_address: str) -> None:
    from lossd.integrations.torchmetrics import LossdMetric

    metric = LossdMetric(dead_address, client_options={"retry_attempts": 1})
    with pytest.warns(LossdWarning, match="LossdMetric left out"):
        metric.update(*data(8, 7))
        assert metric.compute() == {}


def test_import_lossd_integrations_needs_no_framework() -> None:
    """``lossd.integrations`` itself imports no framework and no torch."""
    code = ("import sys, lossd.integrations, lossd.integrations.hf; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'torchmetrics') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
