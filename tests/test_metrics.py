"""Metrics after real traffic: every counter and histogram moves by exactly what was sent."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import lossd
from lossd import LossClient
from lossd.requests import Requests
from lossd_server.app import LossdServer
from lossd_server.metrics import DEFAULT_LOSS_BUCKETS, KNOWN_CODES, METHODS, TagPolicy
from tests.conftest import start_server


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture
def metered() -> Iterator[LossdServer]:
    srv = start_server(metrics_port=0, tags="resnet,vit")
    yield srv
    srv.stop(0)


def test_traffic_moves_metrics_by_exactly_what_was_sent(metered: LossdServer) -> None:
    assert metered.metrics_port
    before = scrape(metered.metrics_port)
    assert 'loss="cross_entropy"' not in before  # series appear when they first happen
    rng = np.random.default_rng(0)
    sizes = [5, 7, 11]
    sent_bytes = 0
    per_sample = []
    with LossClient(f"127.0.0.1:{metered.port}") as client:
        for n in sizes:
            x = rng.standard_normal((n, 4)).astype(np.float32)
            t = rng.integers(0, 4, n)
            [req] = Requests(2**26).build("cross_entropy", x, t, None, "resnet", {})
            sent_bytes += len(req)
            r = client.evaluate(x, t, tag="resnet")
            per_sample.append(r.per_sample)
        with pytest.raises(lossd.InvalidArgument):
            client.evaluate(np.zeros((2, 4), np.float32), np.array([0, 9]), tag="resnet")
        stream = [(rng.standard_normal((3, 4)).astype(np.float32), rng.integers(0, 4, 3))
                  for _ in range(2)]
        streamed = list(client.evaluate_stream(stream, tag="unlisted"))
        last_mean = r.mean

    text = scrape(metered.metrics_port)
    total_ok = sum(sizes)
    assert value(text, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                 code="OK") == 3
    assert value(text, "lossd_requests_total", method="Evaluate", loss="cross_entropy",
                 code="INVALID_ARGUMENT") == 1
    assert value(text, "lossd_requests_total", method="EvaluateStream", loss="cross_entropy",
                 code="OK") == 1
    assert value(text, "lossd_samples_total", loss="cross_entropy") == total_ok + 6
    assert value(text, "lossd_request_duration_seconds_count", method="Evaluate",
                 loss="cross_entropy") == 4
    # decode ran for every Evaluate message (4) and both stream batches.
    assert value(text, "lossd_stage_duration_seconds_count", method="Evaluate",
                 stage="decode") == 4
    assert value(text, "lossd_stage_duration_seconds_count", method="EvaluateStream",
                 stage="compute") == 2
    assert value(text, "lossd_requests_in_flight", method="Evaluate") == 0
    invalid_bytes = value(text, "lossd_received_bytes_total", method="Evaluate") - sent_bytes
    assert invalid_bytes > 0  # the rejected request was received too
    assert value(text, "lossd_request_size_bytes_count", method="Evaluate") == 4

    # Loss histogram: the per-sample values, bucketed exactly as numpy says.
    values = np.concatenate(per_sample).astype(np.float64)
    assert value(text, "lossd_sample_loss_count", loss="cross_entropy", tag="resnet") == total_ok
    assert value(text, "lossd_sample_loss_sum", loss="cross_entropy",
                 tag="resnet") == pytest.approx(values.sum(), rel=1e-6)
    for bound in DEFAULT_LOSS_BUCKETS:
        assert value(text, "lossd_sample_loss_bucket", loss="cross_entropy", tag="resnet",
                     le=repr(bound)) == int((values <= bound).sum())
    # A tag outside the allow-list is counted as "other".
    assert value(text, "lossd_sample_loss_count", loss="cross_entropy", tag="other") == 6
    assert ("lossd_sample_loss_count",
            frozenset({("loss", "cross_entropy"), ("tag", "unlisted")})) not in samples(text)
    assert value(text, "lossd_batch_mean_loss", loss="cross_entropy",
                 tag="resnet") == pytest.approx(last_mean)
    assert value(text, "lossd_batch_mean_loss", loss="cross_entropy",
                 tag="other") == pytest.approx(streamed[-1].mean)


IDLE_LINES = 600
"""Most lines an idle, fresh server's /metrics may have, whatever its catalogue holds."""
LINES_PER_LOSS = 80
"""Most lines one more loss adds when one method evaluates it with one tag: its requests by
code, latency, samples, loss histogram, batch mean (and device time on CUDA)."""


def test_an_idle_server_exports_what_readers_need_and_no_loss(metered: LossdServer) -> None:
    assert metered.metrics_port
    text = scrape(metered.metrics_port)
    assert len(text.splitlines()) <= IDLE_LINES
    assert "loss=" not in text  # no series per catalogue entry (plugins add entries)
    for method in METHODS:  # read from idle pods too: the autoscaler, the dashboard's $job
        assert value(text, "lossd_requests_in_flight", method=method) == 0
    info = [s for f in text_string_to_metric_families(text) if f.name == "lossd_device_info"
            for s in f.samples]
    assert info and info[0].labels["type"] == "cpu" and info[0].value == 1
    assert samples(text)[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_open_fds", frozenset()) in samples(text)


def test_each_loss_used_adds_a_bounded_number_of_lines(metered: LossdServer) -> None:
    assert metered.metrics_port
    x, t = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0])
    with LossClient(f"127.0.0.1:{metered.port}") as client:
        client.evaluate(x, t, tag="vit")  # the method's own series appear with its first call
        first = scrape(metered.metrics_port)
        client.evaluate(x, t, loss="nll_loss", tag="vit")
        second = scrape(metered.metrics_port)
    assert 0 < len(second.splitlines()) - len(first.splitlines()) <= LINES_PER_LOSS
    # A loss in use starts every known code at 0, so rate() sees its first error.
    for code in KNOWN_CODES:
        assert value(second, "lossd_requests_total", method="Evaluate", loss="nll_loss",
                     code=code) == (code == "OK")
    assert 'loss="huber_loss"' not in second  # a loss nobody used has no series
    assert value(second, "lossd_samples_total", loss="nll_loss") == 4


def test_list_losses_is_counted_under_no_loss(metered: LossdServer) -> None:
    assert metered.metrics_port
    with LossClient(f"127.0.0.1:{metered.port}") as client:
        client.losses()
    text = scrape(metered.metrics_port)
    assert value(text, "lossd_requests_total", method="ListLosses", loss="", code="OK") == 1
    assert 'loss="invalid"' not in text


def test_unknown_loss_is_counted_under_a_bounded_label(metered: LossdServer) -> None:
    assert metered.metrics_port
    with LossClient(f"127.0.0.1:{metered.port}") as client, pytest.raises(lossd.InvalidArgument):
        client.evaluate([[0.0, 1.0]], [0], loss="no-such-loss-1234")
    text = scrape(metered.metrics_port)
    assert "no-such-loss-1234" not in text
    assert value(text, "lossd_requests_total", method="Evaluate", loss="invalid",
                 code="INVALID_ARGUMENT") == 1


def test_tag_policy_bounds_distinct_tags() -> None:
    policy = TagPolicy(max_tags=2)
    assert [policy.resolve(t) for t in ("a", "b", "c", "a", "")] == ["a", "b", "other", "a",
                                                                      "none"]
    allow = TagPolicy(allow=["x"], max_tags=100)
    assert [allow.resolve(t) for t in ("x", "y")] == ["x", "other"]


def test_custom_buckets_are_exposed() -> None:
    srv = start_server(metrics_port=0, loss_buckets="0.5,1,2")
    try:
        with LossClient(f"127.0.0.1:{srv.port}") as client:
            client.evaluate(torch.tensor([0.0, 1.0, 3.0]), torch.zeros(3), loss="l1_loss")
        assert srv.metrics_port
        text = scrape(srv.metrics_port)
        buckets = {le: value(text, "lossd_sample_loss_bucket", loss="l1_loss", tag="none",
                             le=le) for le in ("0.5", "1.0", "2.0", "+Inf")}
        assert buckets == {"0.5": 1, "1.0": 2, "2.0": 2, "+Inf": 3}
    finally:
        srv.stop(0)


def test_promtool_accepts_the_exposition(metered: LossdServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/bootstrap_system.sh installs Debian's prometheus"
    assert metered.metrics_port
    with LossClient(f"127.0.0.1:{metered.port}") as client:
        client.evaluate([[0.0, 1.0]], [1], tag="vit")
    text = scrape(metered.metrics_port)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_only_metrics_the_server_exports(metered: LossdServer) -> None:
    import json
    import re
    from pathlib import Path

    assert metered.metrics_port
    with LossClient(f"127.0.0.1:{metered.port}") as client:  # per-tag series need traffic
        client.evaluate([[0.0, 1.0]], [1], weights=[1.0], tag="vit")
    exported = {s[0] for s in samples(scrape(metered.metrics_port))}
    exported |= {"lossd_device_compute_seconds_bucket",  # CUDA only
                 "lossd_device_memory_allocated_bytes", "lossd_device_memory_reserved_bytes"}
    dashboard = json.loads((Path(__file__).parent.parent / "dashboards/lossd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:lossd|process)_[a-z_]+)\b", e)}
    assert used and used <= exported, used - exported


def test_histogram_writer_observes_as_prometheus_client_does() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from lossd_server.metrics import HistogramWriter, PendingHistogram

    bounds = (0.001, 0.01, 0.1, 1.0, 10.0)
    values = [0.0, 0.001, 0.0010001, 0.05, 0.1, 1.0, 3.0, 10.0, 11.0, float("inf"), -1.0]
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "h", ("a",), buckets=bounds, registry=theirs).labels("x")
    writer = HistogramWriter(Histogram("h", "h", ("a",), buckets=bounds,
                                       registry=ours).labels("x"))
    for v in values:
        reference.observe(v)
        writer.observe(v)
    bulk = CollectorRegistry()
    bulk_writer = HistogramWriter(Histogram("h", "h", ("a",), buckets=bounds,
                                            registry=bulk).labels("x"))
    counts = [0] * (len(bounds) + 1)
    for v in values:  # bucket i: the first bound v is at most (+Inf last)
        counts[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
    bulk_writer.observe_counts(counts, sum(values))

    def exposed(r: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(s.name, s.labels.get("le", "")): s.value for f in r.collect()
                for s in f.samples if not s.name.endswith("_created")}

    pending_registry = CollectorRegistry()
    pending = PendingHistogram(HistogramWriter(Histogram(
        "h", "h", ("a",), buckets=bounds, registry=pending_registry).labels("x")))
    for v in values[:1]:  # one value drains as observe does, the rest in bulk
        pending.observe(v)
    pending.drain()
    for v in values[1:]:
        pending.observe(v)
    pending.drain()

    assert exposed(ours) == exposed(theirs) == exposed(bulk)
    assert exposed(pending_registry) == exposed(theirs)


def test_flushed_values_lose_no_increment_across_threads() -> None:
    import threading

    from prometheus_client.values import MutexValue

    from lossd_server.metrics import _Flushed, flush

    target = MutexValue("counter", "c", "c", (), (), "")
    value = _Flushed(target)

    def add() -> None:
        for _ in range(20_000):
            value.inc(1)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    flush()  # a flush while threads add: the rest comes with the next one
    for t in threads:
        t.join()
    flush()
    assert target.get() == 80_000
    value.set(2.5)
    flush()
    assert target.get() == 2.5
