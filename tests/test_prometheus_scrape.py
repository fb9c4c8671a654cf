"""A real Prometheus server scrapes a real lossd server; PromQL sees the request count."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lossd import LossClient
from tests.conftest import start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def wait_for(proc: subprocess.Popen[bytes], port: int, promql: str,
             ok: Callable[[float], bool], timeout: float = 60) -> float:
    """Poll a one-series PromQL query until ``ok(value)``; return the value seen last."""
    deadline = time.monotonic() + timeout
    seen = float("nan")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            result = query(port, promql)
        except OSError:
            result = []
        if result:
            seen = float(result[0]["value"][1])  # type: ignore[index]
            if ok(seen):
                return seen
        time.sleep(0.5)
    raise AssertionError(f"{promql} stayed at {seen}")


def test_prometheus_scrapes_request_count(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: scripts/bootstrap_system.sh installs it"
    srv = start_server(metrics_port=0)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: lossd\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{srv.metrics_port}']}}]\n")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        promql = 'sum(lossd_requests_total{method="Evaluate",code="OK"})'
        with LossClient(f"127.0.0.1:{srv.port}") as client:

            def send(n: int) -> None:
                for _ in range(n):
                    client.evaluate(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0]),
                                    tag="resnet")

            send(1)
            assert wait_for(proc, prom_port, promql, lambda v: v == 1) == 1
            send(6)  # after a first scrape, so rate() sees the increase
            assert wait_for(proc, prom_port, promql, lambda v: v == 7) == 7
        # docs/monitoring.md's query: p95 per-sample loss per model (tag) over 10 minutes.
        p95 = wait_for(proc, prom_port, 'histogram_quantile(0.95, sum by (tag, le) '
                       '(rate(lossd_sample_loss_bucket{tag="resnet"}[10m])))',
                       lambda v: v == v)  # not NaN
        # All 28 samples have loss log(3) = 1.0986, inside the (1, 2] bucket.
        assert 1.0 < p95 <= 2.0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        srv.stop(0)
