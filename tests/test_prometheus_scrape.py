"""A real Prometheus server scrapes a real lossd server; PromQL sees the request count, and
every panel of dashboards/lossd.json shows data."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lossd import LossClient
from lossd_server.app import LossdServer
from tests.conftest import start_server

DASHBOARD = Path(__file__).parent.parent / "dashboards" / "lossd.json"


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


@contextmanager
def prometheus_of(srv: LossdServer, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                     int]]:
    """A Prometheus scraping ``srv`` every second: its process and its port."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: scripts/bootstrap_system.sh installs it"
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
        yield proc, prom_port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_prometheus_scrapes_request_count(tmp_path: Path) -> None:
    srv = start_server(metrics_port=0)
    try:
        with prometheus_of(srv, tmp_path) as (proc, prom_port), \
                LossClient(f"127.0.0.1:{srv.port}") as client:
            promql = 'sum(lossd_requests_total{method="Evaluate",code="OK"})'

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
        srv.stop(0)


def dashboard_queries() -> tuple[list[str], list[str]]:
    """The dashboard's template variable queries and panel queries, as PromQL: every
    variable matches anything, ``$__rate_interval`` is a minute."""
    dashboard = json.loads(DASHBOARD.read_text())

    def promql(expr: str) -> str:
        for name in ("job", "loss", "tag"):
            expr = expr.replace(f"${name}", ".+")
        return expr.replace("$__rate_interval", "1m")

    variables = [v["query"]["query"] for v in dashboard["templating"]["list"]
                 if v["type"] == "query"]
    # label_values(metric, label): the values of label on the series of metric.
    as_promql = [re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)", q)
                 for q in variables]
    panels = [promql(t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    return as_promql, panels


def test_every_dashboard_panel_shows_data(tmp_path: Path) -> None:
    """Series appear when they first happen: the panels (an error ratio of 0 included)
    and the $job list (from an idle server) still show data."""
    variables, panels = dashboard_queries()
    cuda_only = ("lossd_device_compute_seconds", "lossd_device_memory_")
    srv = start_server(metrics_port=0, device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        with prometheus_of(srv, tmp_path) as (proc, prom_port):
            wait_for(proc, prom_port, variables[0], lambda v: True)  # $job, server idle
            with LossClient(f"127.0.0.1:{srv.port}") as client:
                def send() -> None:
                    for _ in range(5):
                        client.evaluate(np.eye(3, dtype=np.float32), np.array([0, 1, 1]),
                                        weights=[1.0, 1.0, 2.0], tag="vit")

                send()
                wait_for(proc, prom_port, 'sum(lossd_requests_total{code="OK"})',
                         lambda v: v == 5)
                send()  # after a scrape: rate() sees the increase
            for expr in variables + panels:
                if not torch.cuda.is_available() and any(m in expr for m in cuda_only):
                    continue
                seen = wait_for(proc, prom_port, expr, lambda v: v == v)  # a value, not NaN
                if "code!=" in expr:
                    assert seen == 0, expr  # no errors: a ratio of 0, not an empty panel
    finally:
        srv.stop(0)
