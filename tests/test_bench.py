"""The benchmark suite (bench/): a quick smoke run, the floor's request bytes and the
Triton peer's model repository.

No timing is asserted: only that one run goes end to end (floor servers, lossd, compute
floor, stages, client copies) and writes results with the expected shape. The Triton peer
runs live only where its virtualenv has been built (``python -m bench.triton --setup``),
and its client only in a subprocess: tritonclient cannot share a process with lossd's Open
Inference protos, which other test modules import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import floor_server, triton  # noqa: E402
from bench.workloads import (  # noqa: E402
    WORKLOADS,
    arrays_for_wire,
    make_data,
    request_bytes,
    wire_bytes,
)
from lossd import LossClient  # noqa: E402
from lossd.requests import Requests  # noqa: E402
from lossd.v1 import loss_service_pb2 as pb  # noqa: E402
from lossd_server import native  # noqa: E402


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_floor_sends_the_message_lossd_sends(name: str) -> None:
    w = WORKLOADS[name]
    w = replace(w, n=min(w.n, 5), classes=min(w.classes, 7), seq=min(w.seq, 6))
    pred, targ, weights = make_data(w).torch()
    builder = Requests(64 * 2**20)
    reqs = builder.build(w.loss, pred, targ, weights, None, builder.options(w.options))
    assert len(reqs) == 1
    lossd_bytes = wire_bytes(reqs[0])
    floor_bytes = request_bytes(w, *arrays_for_wire(pred, targ, weights))
    assert len(floor_bytes) == len(lossd_bytes)
    assert pb.EvaluateRequest.FromString(floor_bytes) == pb.EvaluateRequest.FromString(lossd_bytes)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--workloads", "small", "--out", str(out),
         "--machine", "test-box", "--wait-quiet", "0", "--silent"],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    for key in ("machine", "config", "workloads", "cases", "summary", "targets", "rss",
                "stages", "client_copies", "elapsed_s"):
        assert key in result, key
    assert result["machine"]["name"] == "test-box"
    assert result["config"]["quick"] is True
    kinds = {(c["kind"], c["concurrency"]) for c in result["cases"]}
    for kind in ("floor_sync", "floor_async", "compute", "lossd", "lossd_1copy"):
        assert {(kind, 1), (kind, 8)} <= kinds, kind
    for case in result["cases"]:
        for key in ("p50_ms", "p99_ms", "calls_per_s", "samples_per_s", "mb_per_s", "calls"):
            assert case[key] is not None and case["calls"] > 0, (case["kind"], key)
    row = next(r for r in result["summary"] if r["concurrency"] == 1)
    for key in ("floor_p50_ms", "compute_p50_ms", "lossd_p50_ms", "lossd_over_floor_p50",
                "lossd_over_floor_plus_compute_p50", "lossd_over_combined_calls"):
        assert row[key] is not None, key
    targets = {t["target"].split(":")[0] for t in result["targets"]}
    assert {"small", "client"} <= targets
    assert {"idle_fresh", "c1", "c8"} <= set(result["rss"]["small"])
    assert "loss" in result["stages"]["small"]
    assert all("build" in c for c in result["client_copies"]), result["client_copies"]

    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| workload | clients | measured | p50 ms |" in md
    assert (out / "bench.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_analysis_quick_run_writes_ratios(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.analysis", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "analysis.json").read_text())
    for part in ("end_to_end", "in_process"):
        assert set(result[part]) >= {"plain", "per_class", "diagnostics", "hardest"}
        assert result[part]["plain"]["ratio"] == 1.0
        assert all(v["ratio"] > 0 for v in result[part].values())
    assert "| per_class |" in (tmp_path / "analysis.md").read_text()


def test_the_bare_torch_service_answers_what_lossd_answers(client: LossClient) -> None:
    """bench.small's bare torch service does the work lossd does for a plain request (the
    same per-sample losses, bit for bit), so what lossd costs beyond it is its own."""
    w = WORKLOADS["small"]
    pred, targ, weights = make_data(w).torch()
    got = pb.EvaluateResponse.FromString(
        floor_server.computed(request_bytes(w, *arrays_for_wire(pred, targ, weights))))
    want = client.evaluate(pred, targ, loss=w.loss, weights=weights, **w.options)
    assert got.per_sample.data == want.per_sample.astype("<f4").tobytes()
    assert list(got.per_sample.shape) == [w.n] and got.aggregates.count == w.n
    assert got.aggregates.sum == pytest.approx(want.sum, rel=1e-12)
    assert got.aggregates.mean == pytest.approx(want.mean, rel=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_small_quick_run_measures_every_server_and_the_targets(tmp_path: Path) -> None:
    """bench.small end to end (without MLServer and Triton, whose virtualenvs are built on
    first use): the floors and lossd with 1 and 2 processes on both fronts, the targets,
    the table and the plot."""
    try:
        native.load()
        fronts = ["native", "grpcio"]
    except native.NativeUnavailable:  # (`make test` installs gRPC C++ where it can)
        fronts = ["grpcio"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.small", "--quick", "--no-mlserver", "--no-triton",
         "--processes", "1,2", "--fronts", ",".join(fronts),
         "--out", str(tmp_path), "--machine", "test-box", "--wait-quiet", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=230, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "small.json").read_text())
    servers = {(c["server"], c["concurrency"]) for c in result["cases"]}
    assert {("floor_sync", 1), ("bare torch service", 8), ("lossd p=1", 8),
            ("lossd p=2", 8)} <= servers
    if len(fronts) == 2:  # the second front's cases are labelled with it
        assert {("lossd p=1 grpcio", 8), ("lossd p=2 grpcio", 8)} <= servers
    assert {c["front"] for c in result["cases"] if c["server"].startswith("lossd")} == set(
        fronts)
    assert all(c["calls"] > 0 and c["server_cpu_ms_per_call"] > 0 for c in result["cases"])
    targets = {t["target"].split(" (")[0] for t in result["targets"]}
    assert "scaling: 2 processes >= 0.7 x linear" in targets
    assert (tmp_path / "small.md").read_text().startswith("# Small calls: test-box")
    assert (tmp_path / "small.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_quick_run_measures_both_placements_and_the_peak_rss(tmp_path: Path) -> None:
    """bench.training end to end on a tiny configuration: every Lightning variant in both
    placements (each callback run counting every sample), the Hugging Face variants' peak
    RSS, the targets and the table. Shapes only, no timings."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.training", "--quick", "--out", str(tmp_path),
         "--machine", "test-box"],
        cwd=ROOT, capture_output=True, text=True, timeout=290, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "training.json").read_text())
    assert result["machine"]["name"] == "test-box" and result["config"]["quick"] is True
    placements = result["lightning"]["placements"]
    assert set(placements) == ({"shared", "pinned"} if len(os.sched_getaffinity(0)) > 1
                               else {"shared"})
    for p in placements.values():
        summary = p["summary"]
        assert set(summary) == {"none", "loss only", "default", "every analysis"}
        assert all(s["rounds"] == 2 and s["epoch_s"] > 0 for s in summary.values())
        for name in ("loss only", "default", "every analysis"):
            s = summary[name]
            assert s["counted_every_sample"] and s["lossd_warnings"] == 0, (name, s)
            for key in ("added", "hook_ms", "wait_s", "log_s", "server_cpu_s"):
                assert isinstance(s[key], float), (name, key)
    hf = result["hf"]["summary"]
    assert set(hf) == {"none", "default", "lossd"}
    assert all(s["peak_above_start_mib"] >= 0 and s["runs"] == 1 for s in hf.values())
    lossd_run = next(r for r in result["hf"]["runs"] if r["variant"] == "lossd")
    assert lossd_run["metrics"]["eval_lossd/count"] == result["hf"]["samples"]
    assert len(result["targets"]) == 3 * len(placements)
    md = (tmp_path / "training.md").read_text()
    assert md.startswith("# Training integrations: test-box") and "## Targets" in md


def test_soak_cuts_honest_latency_into_before_and_during() -> None:
    from bench.soak import _phase_latency

    start = 1000.0
    timeline = [(start + 1, "evaluate", "ok", 0.010, 0.010),
                (start + 2, "evaluate", "ok", 0.010, 0.010),
                (start + 3, "stream", "refused", 0.5, 9.0),
                (start + 6, "evaluate", "ok", 0.030, 0.030),
                (start + 7, "evaluate", "lost", 0.1, 0.1),
                (start + 8, "stream", "ok", 0.020, 4.020)]
    phases = _phase_latency(timeline, start, start + 5, 10.0)
    before, during = phases["before"]["by_kind"], phases["during"]["by_kind"]
    assert (before["all"]["calls"], during["all"]["calls"]) == (3, 3)
    assert before["all"]["calls_per_s"] == 0.6 and before["stream"]["refused"] == 1
    assert during["evaluate"]["lost"] == 1 and during["evaluate"]["p50"] == 30.0
    assert during["stream"]["e2e_p50"] == 4020.0
    assert phases["ratio_during_over_before"]["evaluate"]["p50"] == 3.0
    assert phases["ratio_during_over_before"]["stream"]["p50"] is None  # none answered before


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_soak_hostile_smoke_run(tmp_path: Path) -> None:
    """bench.soak for a few seconds, hostile callers from the third: every hostile kind
    sent and answered as expected, no honest call lost, both phases measured."""
    from bench.soak import HOSTILE_EXPECTED

    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "8", "--hostile-after", "3",
         "--clients", "2", "--procs", "1", "--processes", "1", "--shm-clients", "1",
         "--long-streams", "1", "--kill-every", "0", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=85, check=False)
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["lost_calls"] == 0 and result["server_crashes"] == 0, proc.stdout[-3000:]
    hostile = result["hostile"]
    assert hostile["unexpected"] == [] and hostile["hung_threads"] == 0
    assert {k.split(":")[0] for k in hostile["outcomes"]} == set(HOSTILE_EXPECTED)
    phases = result["honest_latency_ms"]
    assert phases["before"]["by_kind"]["all"]["p50"] is not None
    assert phases["during"]["by_kind"]["all"]["calls"] > 0
    assert "## Hostile calls by outcome" in (tmp_path / "soak.md").read_text()


def test_triton_config_serves_the_loss_on_cpu_instances() -> None:
    text = triton.config_text(2)
    assert 'name: "cross_entropy"' in text and 'backend: "python"' in text
    assert "max_batch_size: 0" in text
    assert "instance_group [ { count: 2, kind: KIND_CPU } ]" in text
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared out, as lossd does
    assert f'key: "torch_threads", value: {{ string_value: "{threads}" }}' in text
    for line in ('name: "PREDICTIONS", data_type: TYPE_FP32, dims: [ -1, -1 ]',
                 'name: "TARGETS", data_type: TYPE_INT64, dims: [ -1 ]',
                 'name: "PER_SAMPLE", data_type: TYPE_FP32, dims: [ -1 ]',
                 'name: "SUM", data_type: TYPE_FP64, dims: [ 1 ]',
                 'name: "MEAN", data_type: TYPE_FP64, dims: [ 1 ]'):
        assert line in text, line
    with pytest.raises(ValueError, match="instances"):
        triton.config_text(0)


def test_triton_repository_and_backends_are_laid_out_as_triton_reads_them(
        tmp_path: Path) -> None:
    repo = triton.write_repository(tmp_path, 1)
    model = repo / triton.MODEL_NAME
    assert (model / "config.pbtxt").read_text() == triton.config_text(1)
    code = (model / "1" / "model.py").read_text()
    assert "class TritonPythonModel" in code and 'reduction="none"' in code

    site = tmp_path / "site"  # the wheel's layout, with stand-in files
    server = site / "pytriton" / "tritonserver"
    (server / "backends" / "python").mkdir(parents=True)
    (server / "backends" / "python" / "libtriton_python.so").write_bytes(b"lib")
    (server / "python_backend_stubs" / "3.11").mkdir(parents=True)
    (server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub").write_bytes(
        b"stub")
    backends = triton.write_backends(tmp_path / "b", site, "3.11")
    assert (backends / "python" / "libtriton_python.so").read_bytes() == b"lib"
    assert (backends / "python" / "triton_python_backend_stub").read_bytes() == b"stub"
    with pytest.raises(RuntimeError, match=r"no python backend stub for Python 3\.9"):
        triton.write_backends(tmp_path / "c", site, "3.9")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not (triton.VENV / ".lossd-bench").exists(),
                    reason="the Triton virtualenv is not built (python -m bench.triton --setup)")
def test_triton_answers_torch_bit_for_bit(tmp_path: Path) -> None:
    """tritonserver with 2 instances answers small and medium batches with torch's
    per-sample losses bit for bit (``make_call`` checks them), through tritonclient."""
    server = triton.Triton(2, tmp_path / "triton.log")
    try:
        server.wait_ready()
        code = ("import sys; from bench.triton import make_call; "
                "from bench.workloads import WORKLOADS, make_data\n"
                "for name in ('small', 'medium'):\n"
                "    w = WORKLOADS[name]; pred, targ, _ = make_data(w).torch()\n"
                "    call, close = make_call(sys.argv[1], pred, targ, 60.0)\n"
                "    assert call() == w.n; close()\n")
        proc = subprocess.run([sys.executable, "-c", code, server.address], cwd=ROOT,
                              capture_output=True, text=True, timeout=180, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.stop()
