"""Client-side load balancing: round robin over every address of a target, and retries on
UNAVAILABLE so a replica that goes away mid-run loses no call."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from lossd import LossClient
from lossd.channel import KEEPALIVE_SECONDS, channel_options, service_config
from lossd_server.app import LossdServer, server_options
from lossd_server.settings import Settings
from tests.conftest import metric_value, start_server


def served(srv: LossdServer) -> int:
    """Evaluate calls answered OK, from the server's own metrics."""
    assert srv.metrics_port
    return int(metric_value(srv.metrics_port, "lossd_requests_total", method="Evaluate",
                            loss="cross_entropy", code="OK"))


@pytest.fixture
def three() -> Iterator[list[LossdServer]]:
    servers = [start_server(metrics_port=0) for _ in range(3)]
    yield servers
    for srv in servers:
        srv.stop(0)


def target(servers: list[LossdServer]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def case(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    t = rng.integers(0, 5, 4)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                             reduction="none").numpy()
    return x, t, want


def test_round_robin_spreads_calls_over_every_address(three: list[LossdServer]) -> None:
    n = 300
    with LossClient(target(three), timeout=10) as client:
        grpc.channel_ready_future(client._raw_channel).result(timeout=10)
        x, t, _ = case(0)
        for _ in range(30):  # every subchannel connects (round robin picks ready ones)
            client.evaluate(x, t)
        before = [served(s) for s in three]
        for i in range(n):
            x, t, want = case(i)
            np.testing.assert_allclose(client.evaluate(x, t).per_sample, want, rtol=1e-6)
    counts = [served(s) - b for s, b in zip(three, before, strict=True)]
    assert sum(counts) == n
    for c in counts:
        assert abs(c - n / 3) <= 0.1 * n / 3, counts


def test_a_replica_stopped_mid_run_loses_no_call(three: list[LossdServer]) -> None:
    n, clients = 600, 6
    done = 0
    lock = threading.Lock()
    halfway = threading.Event()
    results: dict[int, np.ndarray] = {}

    def work(k: int, client: LossClient) -> None:
        nonlocal done
        for i in range(k, n, clients):
            x, t, _ = case(i)
            results[i] = client.evaluate(x, t).per_sample
            with lock:
                done += 1
                if done == n // 3:
                    halfway.set()

    with LossClient(target(three), timeout=30) as client, \
            futures.ThreadPoolExecutor(clients) as pool:
        runs = [pool.submit(work, k, client) for k in range(clients)]
        assert halfway.wait(60)
        before_stop = served(three[1])
        # Drain as on SIGTERM: for a while new calls there get UNAVAILABLE (and are retried
        # on the others) while its connections stay up; then it stops and they close.
        three[1].drain()
        time.sleep(0.3)
        three[1].stop(5)
        for r in runs:
            r.result(120)  # raises if any call failed
    assert len(results) == n
    for i, got in results.items():
        np.testing.assert_allclose(got, case(i)[2], rtol=1e-6)
    # Each call was answered OK exactly once, by one of the three (the stopped one's count
    # read from its registry: its metrics port closed with it).
    counts = [int(s.metrics.registry.get_sample_value(
        "lossd_requests_total", {"method": "Evaluate", "loss": "cross_entropy", "code": "OK"})
        or 0) for s in three]
    assert sum(counts) == n
    assert before_stop <= counts[1] < min(counts[0], counts[2]), counts
    refused = three[1].metrics.registry.get_sample_value(
        "lossd_rejected_requests_total", {"method": "Evaluate", "reason": "draining"})
    assert refused, "no call met the draining replica; the retries went untested"


def test_a_dns_target_resolves_and_serves() -> None:
    srv = start_server()
    try:
        x, t, want = case(1)
        with LossClient(f"dns:///localhost:{srv.port}", timeout=10) as client:
            np.testing.assert_allclose(client.evaluate(x, t).per_sample, want, rtol=1e-6)
    finally:
        srv.stop(0)


def test_client_and_server_keepalive_settings_agree() -> None:
    client = dict(channel_options(1 << 20))
    server = dict(server_options(Settings()))
    # The client pings no more often than the server accepts (else GOAWAY too_many_pings).
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_SECONDS * 1000
    assert (client["grpc.keepalive_time_ms"]
            >= server["grpc.http2.min_recv_ping_interval_without_data_ms"])
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.enable_retries"] == 1
    cfg = json.loads(client["grpc.service_config"])
    assert cfg == json.loads(service_config())
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = cfg["methodConfig"]
    assert {m["method"] for m in method["name"]} == {"Evaluate", "EvaluateStream",
                                                     "ListLosses"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "grpc.max_connection_age_ms" in server
    no_retries = dict(channel_options(1 << 20, retry_attempts=1))
    assert no_retries["grpc.enable_retries"] == 0
    assert "methodConfig" not in json.loads(no_retries["grpc.service_config"])
