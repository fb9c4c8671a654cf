"""What lossd costs a training job (issue 21): the wall time ``LossdCallback`` adds to a
PyTorch Lightning validation epoch, and the peak memory of a Hugging Face
``Trainer.evaluate`` with ``LossdMetrics`` against the Trainer's default
``compute_metrics`` path. Target: the callback adds at most 2 % to the epoch (server local).

    .venv/bin/python -m bench.training                 # 5-15 min on 2 cores
    .venv/bin/python -m bench.training --quick --out /tmp/t   # smoke run, 1-2 min

**Lightning.** ``lossd serve`` (``bench.run.Server``: a subprocess on a loopback port,
CPU, one serving process) and a job process (spawned) that runs ``Trainer.validate`` on
one CPU model over one DataLoader (MODEL_HIDDEN below: an MLP whose validation step costs
what a small real model's does, 10-20 ms here), with each variant of ``VARIANTS``: no callback,
and ``LossdCallback`` asking for the loss only, for its defaults, and for every analysis.
Variants alternate run by run (the order rotating each round, after one warm-up run
each), so a neighbour's load hits them alike; per variant the medians over rounds, and the
epoch time each callback variant adds over the no-callback run of the same round (median
of those ratios). Two placements: the server sharing the job's cores, and the server
pinned to its own cores (``taskset``) with the job on the others (``sched_setaffinity``;
on 2 cores one each). Each run records where the time goes: the model's forward passes,
the callback's batch hook (the step-side cost: the copy to host memory, a no-op for CPU
tensors, and the queue put), its epoch end (waiting for the last answers, logging), and
CPU seconds: the job's training thread, its other threads (the callback's sender), the
server and every other process on the machine. CPU time is what the machine's other load
inflates least, so each callback variant's CPU added over the same round's no-callback
run, split by part, says which part costs what where wall times are noisy.

**Hugging Face.** ``Trainer.evaluate`` over HF_SAMPLES samples x HF_CLASSES classes (a
one-layer ``nn.Module`` producing the logits: nothing downloaded), each run in a fresh
spawned process: no ``compute_metrics`` (the floor: the Trainer keeps no logits), the
default path (a ``compute_metrics`` computing accuracy over every logit, which the Trainer
gathers first) and ``LossdMetrics`` with ``batch_eval_metrics=True``. Peak RSS (sampled
every 5 ms, and VmHWM reset at the start) above the RSS just before ``evaluate``.

Writes ``training.json`` and ``training.md`` under ``--out`` (default
``bench/results/<machine>/``); ``--render training.json`` writes the table again.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
TARGET_ADDED = 0.02
"""Issue 21's target: the callback adds at most 2 % to a validation epoch's wall time."""

MODEL_FEATURES, MODEL_HIDDEN, MODEL_CLASSES = 256, 1024, 100
"""The Lightning job's model: an MLP 256 -> 1024 -> 1024 -> 100 (1.4 M parameters, 1.4
GFLOP per batch of 512): on one core of the 2-core Xeon VM its forward pass takes 10-20
ms, what a small real model's validation step costs."""
BATCH, BATCHES = 512, 40
"""A validation epoch: 40 batches of 512 samples, so 512 x 100 float32 logits (200 kB) a
batch go to the server."""
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "loss only": {"per_class": False, "accuracy": False, "calibration": False,
                  "hardest": 0, "quantiles": False},
    "default": {},
    "every analysis": {"top_k": (1, 5), "hardest": 100},
}
"""The Lightning variants: no callback, then ``LossdCallback``'s keyword arguments. Its
defaults already take per_class, accuracy and ECE (class-index targets), the 10 hardest
samples and the loss quantiles; "every analysis" adds top-1/top-5 and 100 hardest."""

HF_SAMPLES, HF_CLASSES, HF_FEATURES, HF_BATCH = 50_000, 1_000, 16, 500
"""The Hugging Face evaluation: 50,000 samples x 1,000 classes (200 MB of float32 logits
over the set), 100 batches of 500."""
HF_VARIANTS = ("none", "default", "lossd")
MIB = 2**20


# ---- the Lightning job (runs in a spawned process) ------------------------------------

def _pin(cpus: list[int] | None) -> list[int]:
    """Bind this process to ``cpus`` (None: leave it) and give torch one thread per CPU
    it may use."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    mine = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(len(mine))
    return mine


def _cpu_self() -> float:
    """CPU seconds of this process, all its threads (the callback's sender among them)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def lightning_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: every variant's validation epochs against the server at
    ``cfg["address"]``, alternating; returns each run's timings."""
    cpus = _pin(cfg["cpus"])
    import lightning.pytorch as pl
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

    from lossd.integrations.lightning import LossdCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    class Classifier(pl.LightningModule):
        """The model; its validation step times its forward pass."""

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(MODEL_FEATURES, cfg["hidden"]), torch.nn.ReLU(),
                torch.nn.Linear(cfg["hidden"], cfg["hidden"]), torch.nn.ReLU(),
                torch.nn.Linear(cfg["hidden"], MODEL_CLASSES))
            self.step_s: list[float] = []

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                            batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            t = time.perf_counter()
            logits = self.net(x)
            self.step_s.append(time.perf_counter() - t)
            return {"logits": logits, "targets": y}

    class EpochTimer(pl.Callback):
        """From the epoch's start to the end of every epoch-end hook before it (it goes
        last), the callback's wait for the last answers included."""

        def on_validation_epoch_start(self, trainer: pl.Trainer,
                                      pl_module: pl.LightningModule) -> None:
            self.t0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer: pl.Trainer,
                                    pl_module: pl.LightningModule) -> None:
            self.elapsed = time.perf_counter() - self.t0

    class TimedCallback(LossdCallback):
        """LossdCallback, its batch hook (the step's cost) and epoch end timed."""

        hook_s: list[float]
        hook_cpu_s: float
        end_s: float
        end_cpu_s: float
        wait_s: float

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            close = self.metrics.close

            def timed_close() -> Any:
                """The epoch end's wait for the last answers, apart from its logging."""
                t = time.perf_counter()
                try:
                    return close()
                finally:
                    self.wait_s = time.perf_counter() - t

            self.metrics.close = timed_close  # type: ignore[method-assign]

        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            t, c = time.perf_counter(), time.thread_time()
            super().on_validation_batch_end(*args, **kwargs)
            self.hook_s.append(time.perf_counter() - t)
            self.hook_cpu_s += time.thread_time() - c

        def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            t, c = time.perf_counter(), time.thread_time()
            super().on_validation_epoch_end(*args, **kwargs)
            self.end_s = time.perf_counter() - t
            self.end_cpu_s = time.thread_time() - c

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = BATCH * cfg["batches"]
    data = TensorDataset(torch.randn(n, MODEL_FEATURES, generator=g),
                         torch.randint(0, MODEL_CLASSES, (n,), generator=g))
    # Whole batches indexed at once: loading costs one gather, so the model's work is
    # what the epoch's time is made of.
    loader = DataLoader(data, batch_size=None,
                        sampler=BatchSampler(SequentialSampler(data), BATCH, drop_last=False))
    model = Classifier()
    trainers: dict[str, tuple[pl.Trainer, EpochTimer, TimedCallback | None]] = {}
    for name, kwargs in VARIANTS.items():
        timer = EpochTimer()
        cb = None if kwargs is None else TimedCallback(cfg["address"], **kwargs)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             callbacks=[timer] if cb is None else [cb, timer])
        trainers[name] = (trainer, timer, cb)

    def one(name: str) -> dict[str, Any]:
        trainer, timer, cb = trainers[name]
        model.step_s = []
        if cb is not None:
            cb.hook_s, cb.hook_cpu_s, cb.end_s, cb.end_cpu_s, cb.wait_s = [], 0.0, 0.0, 0.0, 0.0
            cb.last.clear()
        server0, job0 = bench_run.tree_cpu(cfg["server_pid"]), _cpu_self()
        all0, _ = bench_run._system_jiffies()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t, c = time.perf_counter(), time.thread_time()
            trainer.validate(model, loader, verbose=False)
            wall, train_s = time.perf_counter() - t, time.thread_time() - c
        all1, _ = bench_run._system_jiffies()
        server_s = bench_run.tree_cpu(cfg["server_pid"]) - server0
        job_s = _cpu_self() - job0
        run: dict[str, Any] = {
            "variant": name, "validate_s": wall, "epoch_s": timer.elapsed,
            "steps_s": sum(model.step_s), "step_ms": 1e3 * statistics.median(model.step_s),
            "server_cpu_s": server_s, "job_cpu_s": job_s, "train_cpu_s": train_s,
            "threads_cpu_s": job_s - train_s,
            "other_cpu_s": max(0.0, (all1 - all0) / bench_run.CLK - server_s - job_s),
            "lossd_warnings": sum("lossd" in str(w.message).lower() for w in caught)}
        if cb is not None:
            result = cb.last.get("val")
            run.update(hook_s=sum(cb.hook_s), hook_ms=1e3 * statistics.median(cb.hook_s),
                       hook_cpu_s=cb.hook_cpu_s, end_s=cb.end_s, wait_s=cb.wait_s,
                       log_s=cb.end_s - cb.wait_s, end_cpu_s=cb.end_cpu_s,
                       counted=None if result is None else result.count)
        return run

    for name in VARIANTS:  # warm-up: connections, allocator, first stream
        one(name)
    runs = []
    names = list(VARIANTS)
    for r in range(cfg["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            runs.append({"round": r, **one(name)})
    return {"job_cpus": cpus, "torch_threads": torch.get_num_threads(), "runs": runs}


# ---- the Hugging Face job (each run in a fresh spawned process) -----------------------

class Logits(torch.nn.Module):
    """A Trainer-compatible model: one linear layer from the features to the classes'
    logits, the mean cross entropy as ``loss`` when labels come."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        logits = self.linear(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` random feature vectors with random labels, one dict per sample as the
    Trainer's default collator takes them."""

    def __init__(self, n: int, features: int, classes: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, features, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def accuracy(p: Any) -> dict[str, float]:
    """The default path's ``compute_metrics``: accuracy over every gathered logit."""
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def hf_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one ``Trainer.evaluate`` of variant ``cfg["variant"]``,
    its peak RSS above the RSS just before it, and its metrics."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from lossd.integrations.hf import LossdMetrics

    logging.getLogger("transformers").setLevel(logging.ERROR)
    variant, n, classes = cfg["variant"], cfg["samples"], cfg["classes"]
    torch.manual_seed(0)
    compute = {"none": None, "default": accuracy,
               "lossd": LossdMetrics(cfg["address"])}[variant]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=HF_BATCH,
                                 use_cpu=True, report_to=[], disable_tqdm=True,
                                 batch_eval_metrics=variant == "lossd",
                                 dataloader_num_workers=0)
        trainer = Trainer(model=Logits(HF_FEATURES, classes), args=args,
                          eval_dataset=Samples(n, HF_FEATURES, classes),
                          compute_metrics=compute)
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's: prints every metric
        start = bench_run._status_bytes(os.getpid(), "VmRSS")
        with bench_run.RssSampler(os.getpid()) as rss:
            t = time.perf_counter()
            metrics = trainer.evaluate()
            wall = time.perf_counter() - t
    r = rss.result()
    return {"variant": variant, "rss_start": start, "peak": r["peak"], "hwm": r["hwm"],
            "after": r["after"], "peak_above_start_mib": (r["peak"] - start) / MIB,
            "evaluate_s": wall, "metrics": {k: float(v) for k, v in metrics.items()
                                            if k in ("eval_loss", "eval_accuracy",
                                                     "eval_lossd/loss", "eval_lossd/count",
                                                     "eval_lossd/accuracy")}}


# ---- the run ---------------------------------------------------------------------------

def _spawn(fn: Any, cfg: dict[str, Any], timeout: float) -> Any:
    """``fn(cfg)`` in a fresh spawned process (its own affinity, imports and peak RSS)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, cfg).result(timeout=timeout)


def _server(cpus: list[int] | None, log: Path) -> bench_run.Server:
    """``lossd serve`` on a loopback port, bound to ``cpus`` (None: every core), ready."""
    from lossd import LossClient

    wrapper = ("taskset", "-c", ",".join(map(str, cpus))) if cpus else ()
    server = bench_run.Server("lossd", "cpu", None, log, wrapper=wrapper)
    try:
        client = LossClient(server.address)
        client.wait_for_ready(120)
        client.close()
    except BaseException:
        server.stop()
        raise
    return server


def placements() -> dict[str, tuple[list[int] | None, list[int] | None]]:
    """(server CPUs, job CPUs) per placement: shared (both on every core) and, with two
    cores or more, pinned (the server on the first half, the job on the rest)."""
    cores = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[list[int] | None, list[int] | None]] = {"shared": (None, None)}
    if len(cores) >= 2:
        half = len(cores) // 2
        out["pinned"] = (cores[:half], cores[half:])
    return out


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(runs: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Per variant: medians over rounds; for the callback's variants, paired with the
    no-callback run of the same round (medians of the rounds' differences): the epoch time
    added (ratio minus 1), the CPU seconds added (job and server) and their ratio to the
    no-callback job's CPU, split into the training thread, the job's other threads (the
    callback's sender, grpc's) and the server; and whether every run counted all
    ``samples`` (its metrics were not left out)."""
    base = {r["round"]: r for r in runs if r["variant"] == "none"}
    out: dict[str, Any] = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        s: dict[str, Any] = {"rounds": len(mine)}
        for key in ("epoch_s", "validate_s", "steps_s", "step_ms", "server_cpu_s",
                    "job_cpu_s", "train_cpu_s", "threads_cpu_s", "other_cpu_s", "hook_s",
                    "hook_ms", "hook_cpu_s", "end_s", "wait_s", "log_s", "end_cpu_s"):
            if all(key in r for r in mine):
                s[key] = _median([r[key] for r in mine])
        if name != "none":
            pairs = [(r, base[r["round"]]) for r in mine]

            def paired(f: Any, pairs: list[tuple[dict[str, Any], dict[str, Any]]] = pairs
                       ) -> float:
                return _median([f(r, b) for r, b in pairs])

            s["added"] = paired(lambda r, b: r["epoch_s"] / b["epoch_s"] - 1)
            s["added_validate"] = paired(lambda r, b: r["validate_s"] / b["validate_s"] - 1)
            s["steps_added_s"] = paired(lambda r, b: r["steps_s"] - b["steps_s"])
            for part in ("train_cpu_s", "threads_cpu_s", "server_cpu_s"):
                s[part.removesuffix("_s") + "_added_s"] = _median([r[part] - b[part]
                                                             for r, b in pairs])
            s["cpu_added_s"] = paired(lambda r, b: r["job_cpu_s"] + r["server_cpu_s"]
                                      - b["job_cpu_s"] - b["server_cpu_s"])
            s["cpu_added"] = paired(lambda r, b: (r["job_cpu_s"] + r["server_cpu_s"]
                                                  - b["job_cpu_s"] - b["server_cpu_s"])
                                    / b["job_cpu_s"])
            s["counted_every_sample"] = all(r["counted"] == samples for r in mine)
            s["lossd_warnings"] = sum(r["lossd_warnings"] for r in mine)
        out[name] = s
    return out


def run_lightning(a: argparse.Namespace, log: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": f"MLP {MODEL_FEATURES} -> {a.hidden} -> {a.hidden} -> {MODEL_CLASSES}",
        "batch": BATCH, "batches": a.batches, "rounds": a.rounds,
        "variants": dict(VARIANTS), "placements": {}}
    for name, (server_cpus, job_cpus) in placements().items():
        load0 = os.getloadavg()
        server = _server(server_cpus, log)
        try:
            job = _spawn(lightning_job, {"cpus": job_cpus, "address": server.address,
                                         "server_pid": server.pid, "hidden": a.hidden,
                                         "batches": a.batches, "rounds": a.rounds},
                         timeout=3600)
        finally:
            server.stop()
        out["placements"][name] = {
            "server_cpus": server_cpus or sorted(os.sched_getaffinity(0)),
            "job_cpus": job["job_cpus"], "job_torch_threads": job["torch_threads"],
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "runs": job["runs"], "summary": summarise(job["runs"], BATCH * a.batches)}
        s = out["placements"][name]["summary"]
        print(f"bench.training: {name}: " + ", ".join(
            f"{v} {s[v]['epoch_s']:.3f} s" + (f" (+{100 * s[v]['added']:.1f} %)"
                                             if "added" in s[v] else "")
            for v in VARIANTS), flush=True)
    return out


def run_hf(a: argparse.Namespace, log: Path) -> dict[str, Any]:
    load0 = os.getloadavg()
    server = _server(None, log)
    runs = []
    try:
        for r in range(a.hf_rounds):
            for variant in HF_VARIANTS:
                rec = _spawn(hf_job, {"variant": variant, "address": server.address,
                                      "samples": a.hf_samples, "classes": a.hf_classes},
                             timeout=1800)
                runs.append({"round": r, **rec})
                print(f"bench.training: HF {variant}: peak +{rec['peak_above_start_mib']:.0f}"
                      f" MiB, {rec['evaluate_s']:.1f} s", flush=True)
    finally:
        server.stop()
    summary: dict[str, dict[str, Any]] = {}
    for variant in HF_VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            "peak_above_start_mib": _median([r["peak_above_start_mib"] for r in mine]),
            "rss_start_mib": _median([r["rss_start"] / MIB for r in mine]),
            "evaluate_s": _median([r["evaluate_s"] for r in mine]), "runs": len(mine)}
    # LossdMetrics' mean loss against the Trainer's own eval_loss (the mean of equal
    # batches' means): the streamed evaluation saw every logit.
    agree = [abs(r["metrics"]["eval_lossd/loss"] / r["metrics"]["eval_loss"] - 1)
             for r in runs if r["variant"] == "lossd"]
    summary["lossd"]["loss_rel_diff"] = max(agree)
    logits_mib = a.hf_samples * a.hf_classes * 4 / MIB
    return {"samples": a.hf_samples, "classes": a.hf_classes, "batch": HF_BATCH,
            "logits_mib": logits_mib, "rounds": a.hf_rounds,
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "runs": runs, "summary": summary}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The 2 % target for each placement and callback variant."""
    out = []
    for placement, p in result["lightning"]["placements"].items():
        for variant, s in p["summary"].items():
            if "added" in s:
                out.append({"target": f"epoch time added <= 2 % ({placement}, {variant})",
                            "value": round(s["added"], 4), "limit": TARGET_ADDED,
                            "met": s["added"] <= TARGET_ADDED})
    return out


# ---- results --------------------------------------------------------------------------

def _cell(s: dict[str, Any], key: str, spec: str, scale: float = 1.0, unit: str = ""
          ) -> str:
    """``s[key]`` times ``scale`` in format ``spec`` with ``unit``; "-" where absent."""
    return "-" if key not in s else f"{scale * s[key]:{spec}}{unit}"


def where_it_goes(lt: dict[str, Any]) -> list[str]:
    """Markdown: what each callback variant added, per batch and per epoch, by part (the
    medians of the paired differences, CPU time, so the machine's load does not inflate
    them)."""
    n = lt["batches"]
    lines = ["### Where the added time goes", "",
             f"Per batch (the epoch's figure / {n}) and per epoch; CPU time, medians of the "
             "differences from the same round's run without the callback. Server: its CPU "
             "per batch. Sender: the job's other threads (encoding, gRPC, decoding the "
             "answers). Training thread: what the callback added to the thread running the "
             "steps (the hook, the logging, Lightning's handling of the logged scalars, "
             "interference with the sender); the hook and the logging (`log_dict`) apart.",
             "", "| placement | variant | server ms/batch | sender ms/batch | training thread "
             "ms/batch | hook CPU ms/batch | logging ms/epoch | wait ms/epoch (wall) |",
             "|---|---|---|---|---|---|---|---|"]
    for placement, p in lt["placements"].items():
        for variant, s in p["summary"].items():
            if "added" not in s:
                continue
            lines.append(
                f"| {placement} | {variant} | {1e3 * s['server_cpu_added_s'] / n:.2f} | "
                f"{1e3 * s['threads_cpu_added_s'] / n:.2f} | "
                f"{1e3 * s['train_cpu_added_s'] / n:.2f} | {1e3 * s['hook_cpu_s'] / n:.3f} | "
                f"{1e3 * s['end_cpu_s']:.0f} | {1e3 * s['wait_s']:.0f} |")
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    m, cfg, lt, hf = result["machine"], result["config"], result["lightning"], result["hf"]
    lines = [f"# Training integrations: {m['name']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, grpcio "
             f"{m['grpcio']}. Run {result['started']}, {result['elapsed_s']:.0f} s. Code "
             f"measured: commit `{(cfg.get('git') or {}).get('commit', '?')[:12]}`. Load "
             f"average (1 min) {result['loadavg_before'][0]:.2f} before, "
             f"{result['loadavg_after'][0]:.2f} after (other work on the machine). "
             f"Reproduce: `{cfg['command']}`.", "",
             "## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {100 * t['value']:+.1f} % | "
                     f"{100 * t['limit']:.0f} % | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Lightning validation epoch, LossdCallback against none", "",
              f"`Trainer.validate` over {lt['batches']} batches of {lt['batch']} samples, "
              f"{lt['model']} (float32 logits {lt['batch']} x {MODEL_CLASSES} a batch), "
              f"{lt['rounds']} rounds after a warm-up run each, variants alternating; "
              "medians over rounds, and for each callback variant the median of its "
              "differences from the same round's run without the callback.", "",
              "*Wall time per epoch.* Epoch: from the epoch's start to the callback's epoch "
              "end; added: over the run without the callback. Forward: the model's forward "
              "passes (the median step). Hook: the callback's batch hook, the step-side cost "
              "(pick, host copy, a no-op for CPU tensors, and queue put). End: the "
              "callback's epoch end, the wait for the last answers (the stream's close) "
              "and the logging (`log_dict` of every scalar, the per-class ones included).", "",
              "*CPU seconds per epoch*, which the other work on the machine does not "
              "inflate as it does wall time: the job's training thread (forward passes, "
              "Lightning, the hook, the logging), the job's other threads (the callback's "
              "sender: request encoding, gRPC, decoding the answers; torch's other "
              "intra-op threads), the server, and every other process on the machine. "
              "Added: job and server over the run without the callback, and that as a "
              "share of the no-callback job's CPU.", ""]
    for placement, p in lt["placements"].items():
        lines += [f"### Server {'sharing the job' if placement == 'shared' else 'pinned'}"
                  f": server CPUs {p['server_cpus']}, job CPUs {p['job_cpus']} "
                  f"(torch threads {p['job_torch_threads']}); load average "
                  f"{p['loadavg_before'][0]:.2f} -> {p['loadavg_after'][0]:.2f}", "",
                  "| variant | epoch s | added | forward s (step ms) | forward added s | "
                  "hook ms/batch | end: wait ms | end: log ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, s in p["summary"].items():
            lines.append(
                f"| {variant} | {s['epoch_s']:.3f} | {_cell(s, 'added', '+.1f', 100, ' %')} | "
                f"{s['steps_s']:.3f} ({s['step_ms']:.1f}) | {_cell(s, 'steps_added_s', '+.3f')}"
                f" | {_cell(s, 'hook_ms', '.3f')} | {_cell(s, 'wait_s', '.1f', 1e3)} | "
                f"{_cell(s, 'log_s', '.1f', 1e3)} |")
        lines += ["", "| variant | training thread | job's other threads | server | "
                  "others | added | added / job | of which logging |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, s in p["summary"].items():
            lines.append(
                f"| {variant} | {s['train_cpu_s']:.3f} | {s['threads_cpu_s']:.3f} | "
                f"{s['server_cpu_s']:.3f} | {s['other_cpu_s']:.2f} | "
                f"{_cell(s, 'cpu_added_s', '+.3f')} | {_cell(s, 'cpu_added', '+.1f', 100, ' %')}"
                f" | {_cell(s, 'end_cpu_s', '.3f')} |")
        lines.append("")
    lines += where_it_goes(lt)
    hs = hf["summary"]
    lines += ["## Hugging Face Trainer.evaluate, peak RSS", "",
              f"{hf['samples']:,} samples x {hf['classes']:,} classes (logits "
              f"{hf['logits_mib']:.0f} MiB over the set), batches of {hf['batch']}; each run "
              f"a fresh process, {hf['rounds']} rounds; peak RSS above the RSS just before "
              f"`evaluate` (median). Load average {hf['loadavg_before'][0]:.2f} -> "
              f"{hf['loadavg_after'][0]:.2f}.", "",
              "| compute_metrics | peak above start MiB | RSS at start MiB | evaluate s |",
              "|---|---|---|---|"]
    names = {"none": "none (the Trainer keeps no logits)",
             "default": "default path (accuracy over every gathered logit)",
             "lossd": "LossdMetrics, batch_eval_metrics=True"}
    for v, s in hs.items():
        lines.append(f"| {names[v]} | {s['peak_above_start_mib']:.0f} | "
                     f"{s['rss_start_mib']:.0f} | {s['evaluate_s']:.1f} |")
    lines += ["", "LossdMetrics' `eval_lossd/loss` against the Trainer's `eval_loss`: relative "
              f"difference {hs['lossd']['loss_rel_diff']:.1e} at most.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=11, help="Lightning rounds per placement")
    p.add_argument("--batches", type=int, default=BATCHES, help="batches per epoch")
    p.add_argument("--hidden", type=int, default=MODEL_HIDDEN, help="the MLP's width")
    p.add_argument("--hf-rounds", type=int, default=3)
    p.add_argument("--hf-samples", type=int, default=HF_SAMPLES)
    p.add_argument("--hf-classes", type=int, default=HF_CLASSES)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 rounds of 4 small batches, HF 2,000 x 100 once")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--machine", default=None)
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only write training.md again beside this training.json")
    a = p.parse_args(argv)
    if a.render:
        (a.render.parent / "training.md").write_text(markdown(json.loads(a.render.read_text())))
        return 0
    if a.quick:
        a.rounds, a.batches, a.hidden = 2, 4, 64
        a.hf_rounds, a.hf_samples, a.hf_classes = 1, 2_000, 100
    machine = bench_run.machine_info("cpu")
    if a.machine:
        machine["name"] = a.machine
    a.out = a.out or ROOT / "bench" / "results" / machine["name"]
    a.out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / f"lossd-bench-servers-{os.getpid()}.log"
    t0 = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load0 = os.getloadavg()
    result: dict[str, Any] = {
        "machine": machine, "started": started,
        "config": {"quick": a.quick, "git": bench_run.git_state(), "argv": sys.argv[1:],
                   "command": " ".join([".venv/bin/python -m bench.training",
                                        *sys.argv[1:]]).strip()},
        "loadavg_before": [round(x, 2) for x in load0]}
    result["lightning"] = run_lightning(a, log)
    result["hf"] = run_hf(a, log)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["targets"] = targets(result)
    (a.out / "training.json").write_text(json.dumps(result, indent=1))
    (a.out / "training.md").write_text(markdown(result))
    print(markdown(result))
    print(f"bench.training: wrote {a.out}/training.json, training.md; server log {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
