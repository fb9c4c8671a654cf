"""Stuck work, frozen workers and the metrics directory (issue 19, items 3, 4, 6, 14b).

Real ``lossd serve`` subprocesses: a plugin loss that never returns (written to a temporary
directory on ``PYTHONPATH``), a worker stopped with SIGSTOP, a metrics filesystem that is
full (a real 8 MiB tmpfs: these tests run as root; skipped where mounting is refused), a
supervisor killed with SIGKILL. Each bound is the issue's.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import stat
import subprocess
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2

import lossd
from lossd import LossClient
from lossd_server.serve.host import POD_DIRECTORY_PREFIX
from tests.conftest import ServeProcess, batch, health, metric_value, wait_for
from tests.test_serve import evaluate_on_fresh_channels, worker_pids

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING

HANGING = """
    import threading

    from lossd_server.plugins import register

    def hang(input, target):
        threading.Event().wait()  # never returns

    register("stuck_hang", hang, options={}, targets="values")
"""


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a server that loads the hanging plugin."""
    (tmp_path / "stuckplugin.py").write_text(textwrap.dedent(HANGING))
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "LOSSD_PLUGINS": "stuckplugin"}


def serving(port: int) -> bool:
    """Whether health says SERVING (False too while the kernel still hands connections to
    a worker being replaced, which resets them)."""
    try:
        return bool(health(port) == SERVING)
    except grpc.RpcError:
        return False


def hang_calls(address: str, channels: int) -> None:
    """One call to the hanging loss on each of ``channels`` new connections, abandoned
    after 0.5 s (each gets DEADLINE_EXCEEDED; its computation goes on)."""
    x = np.zeros((4, 3), np.float32)

    def call() -> grpc.StatusCode:
        with LossClient(address, retry_attempts=1) as client:
            with pytest.raises(lossd.LossdError) as err:
                client.evaluate(x, x, loss="stuck_hang", timeout=0.5)
            return err.value.code

    with futures.ThreadPoolExecutor(channels) as pool:  # all at once: none meets a stall
        codes = list(pool.map(lambda _: call(), range(channels)))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * channels


def test_stuck_work_turns_health_not_serving_and_sigterm_still_ends_the_process(
        plugin_env: dict[str, str]) -> None:
    """Both compute slots stuck in a loss that never returns: health reports it within
    --stall-seconds (plus the watchdog's poll), and SIGTERM ends the process within
    grace + 10 s although two threads never come back."""
    with ServeProcess("--processes", "1", "--stall-seconds", "2", "--grace-seconds", "2",
                      "--metrics-port", "0", env=plugin_env) as pod:
        assert health(pod.port) == SERVING
        start = time.monotonic()
        hang_calls(pod.address, channels=2)  # --concurrency 2: every slot is stuck
        wait_for(lambda: health(pod.port) == NOT_SERVING, timeout=10)
        assert time.monotonic() - start < 10
        stalled = pod.record("compute stalled")
        assert stalled["running"] == 2 and stalled["stall_seconds"] == 2
        assert pod.metrics_port is not None
        assert metric_value(pod.metrics_port, "lossd_compute_stalls_total") == 1
        assert metric_value(pod.metrics_port, "lossd_compute_stalled") == 1
        pod.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert pod.wait(2 + 10) == 1  # exited, with the calls it could not finish
        assert time.monotonic() - signalled < 2 + 10
        assert pod.records("lossd stopped with calls still computing; exiting without them")


def test_a_worker_with_stuck_work_is_replaced_and_new_calls_succeed(
        plugin_env: dict[str, str]) -> None:
    with ServeProcess("--processes", "2", "--stall-seconds", "2", "--metrics-port", "0",
                      env=plugin_env) as pod:
        before = worker_pids(pod)
        start = time.monotonic()
        hang_calls(pod.address, channels=4)  # fresh connections: the kernel spreads them
        wait_for(lambda: bool(pod.records("worker replaced")), timeout=10)
        assert time.monotonic() - start < 10
        replaced = pod.record("worker replaced")
        assert replaced["reason"] == "stalled" and replaced["pid"] in before.values()
        wait_for(lambda: serving(pod.port) and len(worker_pids(pod)) == 2
                 and set(worker_pids(pod).values()) != set(before.values()), timeout=60)
        evaluate_on_fresh_channels(pod.address, channels=4, calls=2)
        assert pod.metrics_port is not None
        assert metric_value(pod.metrics_port, "lossd_worker_replaced_total",
                            worker=str(replaced["worker"]), reason="stalled") >= 1


def test_a_frozen_worker_is_noticed_within_15_s_and_replaced() -> None:
    """SIGSTOP on a worker of a default pod: within 15 s it is reported down and killed,
    and calls on fresh connections (some of which the kernel hands the frozen worker's
    listener until then) succeed once it is replaced."""
    with ServeProcess("--processes", "2", "--metrics-port", "0") as pod:
        victim = worker_pids(pod)[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            wait_for(lambda: bool(pod.records("worker replaced")), timeout=15)
            assert time.monotonic() - stopped < 15
            replaced = pod.record("worker replaced")
            assert replaced["reason"] == "frozen" and replaced["pid"] == victim
            assert pod.metrics_port is not None
            wait_for(lambda: len(pod.records("worker ready")) == 3, timeout=60)
            wait_for(lambda: serving(pod.port), timeout=10)
            evaluate_on_fresh_channels(pod.address, channels=6, calls=1)
            assert metric_value(pod.metrics_port, "lossd_worker_replaced_total",
                                worker="0", reason="frozen") == 1
            assert metric_value(pod.metrics_port, "lossd_worker_up", worker="0") == 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (mounting needs root; skipped where it is refused)."""
    directory = tmp_path / "tmpfs"
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(directory)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_full_metrics_filesystem_kills_no_worker(small_tmpfs: Path) -> None:
    """The pod's metrics directory on a tmpfs filled to the last block: new tag series
    need their files to grow, which fails; the series are dropped and counted, every call
    succeeds and no worker dies (prometheus-client alone dies of SIGBUS)."""
    env = {"TMPDIR": str(small_tmpfs)}
    with ServeProcess("--processes", "2", "--metrics-port", "0", "--max-tags", "1000",
                      "--max-tag-length", "128", env=env) as pod:
        evaluate_on_fresh_channels(pod.address, channels=2, calls=1)
        with open(small_tmpfs / "filler", "wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        x, t, want = batch(7, n=8)
        for i in range(30):  # ~1 MiB more histogram series per worker: past its file
            with LossClient(pod.address, timeout=30) as client:
                for j in range(10):
                    got = client.evaluate(x, t, tag=f"tag-{i}-{j}-" + "x" * 100).per_sample
                    np.testing.assert_allclose(got, want, rtol=1e-6)
        time.sleep(0.5)  # the workers' metric flushes
        assert not pod.records("worker died"), pod.records("worker died")
        assert pod.metrics_port is not None
        assert metric_value(pod.metrics_port, "lossd_metric_series_dropped_total") > 0
        assert metric_value(pod.metrics_port, "lossd_worker_restarts_total", worker="0") == 0
        assert metric_value(pod.metrics_port, "lossd_worker_restarts_total", worker="1") == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def left_behind(temp: Path, pod: ServeProcess, killed: float) -> str:
    """What is left under ``temp``, for a failure message: each path with its kind, size,
    change time relative to the SIGKILL (``killed``, epoch seconds) and its maker (a pid in
    its name; the pod directory and its lock file are the supervisor's), then the pod's
    log from the kill on, its worker lines (a worker replaced or still starting) and any
    line that is not a log record (a traceback)."""
    makers = {pod.proc.pid: "supervisor"}
    for line in pod.records("worker started"):
        makers[int(line["pid"])] = f"worker {line['worker']}"
    entries = []
    for path in sorted(temp.rglob("*")):
        try:
            st = path.lstat()
        except FileNotFoundError:  # removed meanwhile
            continue
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "file")
        pids = [int(n) for n in re.findall(r"\d+", path.name) if int(n) in makers]
        if pids:
            maker = makers[pids[0]]
        elif path.name.startswith(POD_DIRECTORY_PREFIX) or path.name == ".owners":
            maker = "supervisor"
        else:
            maker = "a worker"  # the tags directory and its files
        entries.append(f"{path.relative_to(temp)} ({kind}, {st.st_size} B, changed "
                       f"{st.st_ctime - killed:+.3f} s after the kill, by {maker})")
    log = [line for line in pod.lines if line.get("raw") or str(line["msg"]).startswith(
        "worker") or ("ts" in line and _timestamp(line["ts"]) > killed - 0.5)]
    return f"left in TMPDIR: {entries}; pids: {makers}; log: {log}"


def _timestamp(ts: str) -> float:
    """A log record's time (``2026-12-03T18:40:44.373Z``) in seconds since the epoch."""
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_a_sigkilled_supervisor_leaves_no_worker_no_port_and_no_files(tmp_path: Path
                                                                      ) -> None:
    """Workers gone within grace + 5 s, the port free, nothing left in the temp
    directory."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with ServeProcess("--processes", "2", "--grace-seconds", "2",
                      env={"TMPDIR": str(temp)}) as pod:
        evaluate_on_fresh_channels(pod.address, channels=2, calls=1)
        assert len(worker_pids(pod)) == 2 and os.listdir(temp)
        # Every process of the pod, a worker the supervisor replaced under load included.
        workers = [c.pid for c in psutil.Process(pod.proc.pid).children(recursive=True)]
        pod.signal(signal.SIGKILL)
        killed = time.time()
        pod.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=2 + 5)
        # Each process removes what it made before it exits; what is left now stays.
        deadline = time.monotonic() + 2.0
        while os.listdir(temp) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.listdir(temp), left_behind(temp, pod, killed)
        with socket.socket() as s:  # no SO_REUSEPORT: free only if no one holds it
            s.bind(("127.0.0.1", pod.port))


def test_a_pod_directory_left_behind_is_swept_at_the_next_start(tmp_path: Path) -> None:
    """A pod killed with every process at once (nothing left to clean up) leaves its
    directory; the next pod in that temp directory removes it, and only it."""
    from lossd_server.serve import host

    temp = tmp_path / "tmp"
    temp.mkdir()
    os.environ["TMPDIR"] = str(temp)
    try:
        import tempfile

        tempfile.tempdir = None
        stale, stale_fd = host.make_pod_directory()
        os.close(stale_fd)  # its owner is gone (as if SIGKILLed)
        live, live_fd = host.make_pod_directory()  # sweeps the stale one
        other = temp / "lossd-metrics-not-a-pod"
        other.mkdir()
        third, third_fd = host.make_pod_directory()
        assert not os.path.exists(stale)
        assert os.path.isdir(live) and os.path.isdir(other)  # held / not a pod's
        assert host.leave_pod_directory(live, live_fd)
        assert host.leave_pod_directory(third, third_fd)
        assert sorted(os.listdir(temp)) == ["lossd-metrics-not-a-pod"]
    finally:
        del os.environ["TMPDIR"]
        tempfile.tempdir = None


def test_the_watchdog_reports_a_slot_held_past_its_bound_once_and_its_recovery() -> None:
    from prometheus_client import CollectorRegistry

    from lossd_server.limits import Admission
    from lossd_server.watchdog import StallMetrics, Watchdog

    admission = Admission(slots=2, max_waiting=0)
    changes: list[bool] = []
    registry = CollectorRegistry()
    dog = Watchdog(admission, 0.5, changes.append, StallMetrics(registry))
    assert admission.longest_hold() == 0.0 and not dog.check()
    first = admission.acquire()
    time.sleep(0.6)
    second = admission.acquire()
    assert admission.longest_hold() > 0.5
    assert dog.check() and dog.check()  # stalled, reported once
    admission.release(first)  # the one held long: the other was just taken
    assert admission.longest_hold() < 0.5
    assert not dog.check()
    admission.release(second)
    assert admission.longest_hold() == 0.0
    assert changes == [True, False]
    assert registry.get_sample_value("lossd_compute_stalls_total") == 1
    assert registry.get_sample_value("lossd_compute_stalled") == 0
