"""``lossd serve``: worker processes on one port under a supervisor (lossd_server.serve).

Real ``lossd serve --processes 2`` subprocesses on free ports; workers are killed with
real signals. What a caller or an operator relies on is checked across processes:
metrics totals, the tag bound, health, restarts, drain, retries, tokens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

import lossd
from lossd import LossClient
from lossd_server.health import SERVICES
from lossd_server.metrics import FLUSH_SECONDS
from lossd_server.serve import Supervisor, host
from lossd_server.settings import Settings
from tests.conftest import (
    ServeProcess,
    batch,
    health,
    held_stream,
    sigterm_with_streams_in_flight,
    start_server,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def scrape(port: int | None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str,
          **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def settled(pod: ServeProcess, requests: float
            ) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The pod's metrics once ``requests`` OK Evaluate calls show: workers write their
    values to the shared files every ``FLUSH_SECONDS``, so the supervisor's exposition
    trails the calls by that much."""
    ok = dict(method="Evaluate", loss="cross_entropy", code="OK")
    wait_for(lambda: value(scrape(pod.metrics_port), "lossd_requests_total", **ok) >= requests)
    time.sleep(2 * FLUSH_SECONDS)  # the rest of that flush
    return scrape(pod.metrics_port)


def worker_pids(pod: ServeProcess) -> dict[int, int]:
    """worker index -> pid of its live process, from the supervisor's log."""
    pids: dict[int, int] = {}
    for line in pod.lines:
        if line["msg"] == "worker ready":
            pids[int(line["worker"])] = int(line["pid"])
    return pids


def evaluate_on_fresh_channels(address: str, channels: int, calls: int, *,
                               tag: str = "", token: str | None = None) -> int:
    """``calls`` evaluations on each of ``channels`` new channels (new connections, which
    the kernel spreads over the workers); returns the samples sent."""
    x, t, want = batch(3, n=16)
    for _ in range(channels):
        with LossClient(address, timeout=30, token=token) as client:
            for _ in range(calls):
                np.testing.assert_allclose(client.evaluate(x, t, tag=tag).per_sample, want,
                                           rtol=1e-6)
    return channels * calls * 16


@pytest.fixture(scope="module")
def pod() -> Iterator[ServeProcess]:
    """A two-worker server shared by the tests that do not kill or stop it."""
    with ServeProcess("--processes", "2", "--metrics-port", "0", "--max-tags", "2",
                      "--health-port", "0", "--log-level", "debug") as p:
        yield p


def test_the_pod_serves_health_on_its_health_port_for_every_service(pod: ServeProcess
                                                                     ) -> None:
    """The supervisor's own ``--health-port``: SERVING for the server and both fronts (the
    services one server reports on), and health checks only."""
    port = pod.record("lossd serving")["health_port"]
    assert port
    for name in ("", *SERVICES):
        assert health(port, name) == SERVING
    with LossClient(f"127.0.0.1:{port}", timeout=5) as client, \
            pytest.raises(lossd.Unimplemented):
        client.evaluate(*batch(1, n=4)[:2])
    srv = start_server()
    try:
        assert srv.health.names == ("", *SERVICES)
    finally:
        srv.stop(0)


def test_two_workers_serve_and_metrics_total_every_call_exactly(pod: ServeProcess) -> None:
    before = scrape(pod.metrics_port)
    samples = 0
    for i, tag in enumerate(("a", "b", "c", "d")):
        samples += evaluate_on_fresh_channels(pod.address, channels=4, calls=3 + i, tag=tag)
    calls = 4 * (3 + 4 + 5 + 6)
    ok = dict(method="Evaluate", loss="cross_entropy", code="OK")
    after = settled(pod, value(before, "lossd_requests_total", **ok) + calls)
    assert value(after, "lossd_requests_total", **ok) - value(
        before, "lossd_requests_total", **ok) == calls
    assert value(after, "lossd_samples_total", loss="cross_entropy") - value(
        before, "lossd_samples_total", loss="cross_entropy") == samples
    # --max-tags 2 holds for the pod: two of the four tags, the rest counted as "other".
    tags = {dict(labels)["tag"] for (name, labels) in after
            if name == "lossd_sample_loss_count"}
    assert len(tags - {"other", "none"}) == 2 and "other" in tags
    assert sum(v for (name, _), v in after.items() if name == "lossd_sample_loss_count") \
        - sum(v for (name, _), v in before.items() if name == "lossd_sample_loss_count") \
        == samples
    # Both workers served (the debug request log names the worker of each call).
    served = {line["worker"] for line in pod.lines if line["msg"] == "request"}
    assert served == {0, 1}
    # Per-process figures carry the worker label; in-flight adds up over the workers.
    for worker in ("supervisor", "0", "1"):
        assert value(after, "process_resident_memory_bytes", worker=worker) > 0
    assert value(after, "lossd_worker_up", worker="0") == 1
    assert value(after, "lossd_requests_in_flight", method="Evaluate") == 0
    assert value(after, "lossd_device_info", worker="1", type="cpu", index="0", name="cpu",
                 torch_version=torch.__version__, cuda_version="") == 1


def test_the_exposition_passes_promtool(pod: ServeProcess) -> None:
    import shutil

    evaluate_on_fresh_channels(pod.address, channels=2, calls=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.metrics_port}/metrics",
                                timeout=10) as resp:
        text = resp.read().decode()
    promtool = shutil.which("promtool")
    assert promtool
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_streams_and_every_method_work_across_workers(pod: ServeProcess) -> None:
    cases = [batch(10 + i, n=32) for i in range(3)]
    for _ in range(4):
        with LossClient(pod.address, timeout=30) as client:
            results = list(client.evaluate_stream((x, t) for x, t, _ in cases))
            assert [len(r.per_sample) for r in results] == [32, 32, 32]
            all_losses = np.concatenate([want for _, _, want in cases]).astype(np.float64)
            assert results[-1].running is not None
            assert results[-1].running.count == 96
            np.testing.assert_allclose(results[-1].running.sum, all_losses.sum(), rtol=1e-6)
            assert "cross_entropy" in {info.name for info in client.losses()}


def test_a_killed_worker_is_restarted_health_follows_and_no_count_is_lost() -> None:
    with ServeProcess("--processes", "2", "--metrics-port", "0", "--health-port", "0") as pod:
        health_port = pod.record("lossd serving")["health_port"]
        sent = evaluate_on_fresh_channels(pod.address, channels=6, calls=2)
        settled(pod, 12)  # what the victim served is in the shared files
        victim = worker_pids(pod)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: bool(pod.records("worker died")))
        died = pod.record("worker died")
        assert died["worker"] == 0 and died["how"] == "signal SIGKILL"
        # Health: NOT_SERVING while a worker is missing, SERVING again once it is back.
        wait_for(lambda: health(pod.port) == NOT_SERVING, timeout=10)
        wait_for(lambda: health(health_port) == NOT_SERVING, timeout=10)
        wait_for(lambda: len(pod.records("worker ready")) == 3, timeout=120)
        wait_for(lambda: health(pod.port) == SERVING, timeout=10)
        wait_for(lambda: health(health_port) == SERVING, timeout=10)
        assert worker_pids(pod)[0] != victim
        sent += evaluate_on_fresh_channels(pod.address, channels=6, calls=2)
        metrics = settled(pod, 24)
        assert value(metrics, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                     code="OK") == 24  # the dead worker's counts survive it
        assert value(metrics, "lossd_samples_total", loss="cross_entropy") == sent
        assert value(metrics, "lossd_worker_restarts_total", worker="0") == 1
        assert value(metrics, "lossd_worker_up", worker="0") == 1


def test_calls_on_a_worker_that_dies_are_retried_and_none_hangs() -> None:
    """8 callers keep calling while one worker is killed under them: every call comes back
    right (a call cut off with UNAVAILABLE is retried by the client on a new connection,
    which lands on the live worker)."""
    with ServeProcess("--processes", "2") as pod:
        stop = threading.Event()
        x, t, want = batch(5, n=256)

        def caller() -> int:
            done = 0
            with LossClient(pod.address, timeout=60) as client:
                while not stop.is_set() or done < 20:
                    np.testing.assert_allclose(client.evaluate(x, t).per_sample, want,
                                               rtol=1e-6)
                    done += 1
            return done

        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(caller) for _ in range(8)]
            time.sleep(1.0)
            os.kill(worker_pids(pod)[1], signal.SIGKILL)
            time.sleep(1.0)
            stop.set()
            done = [c.result(timeout=120) for c in calls]
        assert all(n >= 20 for n in done)
        assert pod.record("worker died")["worker"] == 1


def test_sigterm_drains_every_worker_with_streams_in_flight_and_exits_0() -> None:
    pod = ServeProcess("--processes", "2", "--grace-seconds", "30")

    def refused() -> None:
        with LossClient(pod.address, timeout=10) as client, \
                pytest.raises(lossd.Unavailable, match="draining"):
            client.evaluate(*batch(0)[:2])

    sigterm_with_streams_in_flight(pod, 8, refused, exit_within=60)
    assert pod.record("draining")["signal"] == "SIGTERM"
    assert sum(x["in_flight"] for x in pod.records("drain started")) == 8
    assert {x["worker"] for x in pod.records("worker stopped")} == {0, 1}
    assert pod.lines[-1]["msg"] == "lossd stopped"


def test_a_draining_pod_keeps_every_listener_open_until_the_pod_is_idle() -> None:
    """One stream in flight leaves a worker with nothing to finish: it must not close its
    listener early, or the kernel resets the connections it still hands that worker."""
    pod = ServeProcess("--processes", "2", "--grace-seconds", "30")
    go_on = threading.Event()
    answered = threading.Semaphore(0)
    case = batch(7)
    x, t, want = case

    try:
        with futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(held_stream, pod.address, [case, case], go_on, answered)
            assert answered.acquire(timeout=60)
            pod.signal(signal.SIGTERM)
            time.sleep(1.5)  # a worker with nothing in flight has had time to stop
            for _ in range(24):  # fresh connections, spread over both listeners
                assert health(pod.port) == NOT_SERVING
                with LossClient(pod.address, timeout=10, retry_attempts=1) as client, \
                        pytest.raises(lossd.Unavailable, match="draining"):
                    client.evaluate(x, t)
            assert pod.records("worker stopped") == []
            go_on.set()
            for got in call.result(60):
                np.testing.assert_allclose(got, want, rtol=1e-6)
        assert pod.wait(60) == 0
    finally:
        go_on.set()
        pod.kill()
    assert {x["worker"] for x in pod.records("worker stopped")} == {0, 1}


def test_a_stream_still_open_when_the_grace_period_ends_is_cancelled_and_the_pod_exits_0(
        ) -> None:
    pod = ServeProcess("--processes", "2", "--grace-seconds", "2")
    go_on = threading.Event()
    answered = threading.Semaphore(0)
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(held_stream, pod.address, [batch(7), batch(8)], go_on,
                               answered)
            assert answered.acquire(timeout=60)
            start = time.monotonic()
            pod.signal(signal.SIGTERM)
            with pytest.raises(lossd.LossdError):
                call.result(30)
            assert pod.wait(30) == 0
            assert time.monotonic() - start < 12  # the grace period, not the supervisor's
    finally:
        go_on.set()
        pod.kill()
    assert pod.record("grace period over; cancelling calls still running")["in_flight"] == 1
    assert {x["worker"] for x in pod.records("worker stopped")} == {0, 1}


def test_rotated_tokens_are_taken_up_by_every_worker(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\n")
    with ServeProcess("--processes", "2", "--auth-tokens-file", str(tokens)) as pod:
        evaluate_on_fresh_channels(pod.address, channels=4, calls=1, token="first-token")
        tokens.write_text("second-token\n")
        time.sleep(1.5)  # tokens files are re-read at most once a second
        evaluate_on_fresh_channels(pod.address, channels=6, calls=1, token="second-token")
        for _ in range(6):
            with LossClient(pod.address, timeout=10, token="first-token") as client, \
                    pytest.raises(lossd.Unauthenticated):
                client.evaluate(*batch(0)[:2])


def test_a_worker_that_cannot_start_stops_everything_with_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "lossd._cli", "serve", "--processes", "2",
                           "--port", "0", "--metrics-port", "-1", "--device", "cuda:7"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "--device" in proc.stderr and "worker failed to start" in proc.stderr


def test_a_taken_port_fails_loudly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "lossd._cli", "serve", "--processes",
                               "2", "--port", str(port), "--metrics-port", "-1"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}" in proc.stderr


# ---------------------------------------------------------------------------------------
# How many processes, on which devices


def test_processes_auto_is_the_cores_on_a_cpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "available_cpus", lambda: 6)
    monkeypatch.setattr(host, "visible_gpus", lambda: 0)
    assert host.resolve_processes(Settings(processes="auto", device="auto")) == 6
    assert host.resolve_processes(Settings(processes="3")) == 3
    assert host.torch_threads(Settings(), 4) == 1
    assert host.torch_threads(Settings(), 2) == 3
    assert host.torch_threads(Settings(torch_threads=5), 2) == 5


def test_processes_auto_is_four_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "visible_gpus", lambda: 2)
    assert host.resolve_processes(Settings(processes="auto", device="auto")) == 8
    assert host.resolve_processes(Settings(processes="auto", device="cuda:1")) == 4
    assert host.resolve_processes(Settings(processes="auto", device="cpu")) == \
        host.available_cpus()
    sup = Supervisor(Settings(processes="4", device="cuda"), 4)
    assert [w.device for w in sup.workers] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    sup = Supervisor(Settings(device="cuda:2,cuda:3"), 3)
    assert [w.device for w in sup.workers] == ["cuda:2", "cuda:3", "cuda:2"]


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2,GPU-1234")
    assert host.visible_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")  # CUDA stops at an invalid entry
    assert host.visible_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert host.visible_gpus() == 0


def test_a_cgroup_cpu_limit_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert host.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpu_quota(tmp_path) is None
    assert host.available_cpus() >= 1


def test_bad_process_settings_are_refused() -> None:
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError, match="--processes"):
            Settings(processes=bad).check()


def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_hang() -> None:
    """A SIGTERM handled just as the main thread wakes from ``Event.wait`` (holding the
    event's lock): ``Event.set`` in the handler would wait for that lock for ever, as it
    did for workers left on the port after their supervisor exited. The handlers set their
    events through ``host.set_from_signal``, which must return at once and set them soon."""
    stop, close = threading.Event(), threading.Event()
    logged: list[str] = []
    with stop._cond:  # what the interrupted main thread holds (Event's own lock)
        started = time.monotonic()
        host.set_from_signal(stop, close, then=lambda: logged.append("draining"))
        assert time.monotonic() - started < 1.0
        assert not stop.is_set()  # it waits for the lock, on its own thread
    assert stop.wait(5) and close.wait(5)
    wait_for(lambda: logged == ["draining"])
