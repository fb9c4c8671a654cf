"""Dynamic batching: coalesced callers get exactly their own results."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lossd_server.batching import Batcher, coalesce_key
from lossd_server.engine import Batch, Engine, Evaluation
from lossd_server.errors import RequestError


def batch(seed: int, n: int = 8, *, weights: bool = True, **options: object) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch("cross_entropy", torch.randn(n, 5, generator=g),
                 torch.randint(0, 5, (n,), generator=g),
                 torch.rand(n, generator=g) if weights else None, options)


def run_concurrently(batcher: Batcher, batches: list[Batch]) -> list[object]:
    results: list[object] = [None] * len(batches)
    barrier = threading.Barrier(len(batches))

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = batcher.evaluate(batches[i])
        except RequestError as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_coalesced_results_equal_separate_evaluations() -> None:
    engine = Engine(torch.device("cpu"))
    batches = [batch(i, n=3 + i, label_smoothing=0.1) for i in range(8)]
    in_flight = len(batches)
    batcher = Batcher(engine, max_samples=10_000, max_delay=2.0, in_flight=lambda: in_flight)
    results = run_concurrently(batcher, batches)
    assert batcher.coalesced_calls >= 1
    for b, r in zip(batches, results, strict=True):
        alone = engine.evaluate(b)
        assert torch.equal(r.per_sample, alone.per_sample)  # type: ignore[union-attr]
        assert r.aggregate == alone.aggregate  # type: ignore[union-attr]


def test_a_bad_request_fails_alone() -> None:
    engine = Engine(torch.device("cpu"))
    good = [batch(i) for i in range(3)]
    bad = Batch("cross_entropy", torch.zeros(2, 5), torch.tensor([0, 9]))
    batcher = Batcher(engine, max_samples=10_000, max_delay=0.5, in_flight=lambda: 4)
    results = run_concurrently(batcher, [*good, bad])
    assert isinstance(results[3], RequestError) and results[3].field == "targets"
    for b, r in zip(good, results[:3], strict=True):
        assert torch.equal(r.per_sample, engine.evaluate(b).per_sample)  # type: ignore[union-attr]


def test_lone_caller_does_not_wait() -> None:
    engine = Engine(torch.device("cpu"))
    batcher = Batcher(engine, max_samples=10_000, max_delay=30.0, in_flight=lambda: 1)
    r = batcher.evaluate(batch(0))
    assert np.isfinite(r.aggregate.mean)


@pytest.mark.parametrize("change", ["options", "classes", "weights", "raise", "gradient"])
def test_incompatible_batches_do_not_share_a_key(change: str) -> None:
    engine = Engine(torch.device("cpu"))
    base = engine.check(batch(0))
    if change == "options":
        other = engine.check(batch(0, label_smoothing=0.2))
    elif change == "classes":
        other = engine.check(Batch("cross_entropy", torch.zeros(2, 6), torch.tensor([0, 1]),
                                   torch.ones(2)))
    elif change == "weights":
        other = engine.check(batch(0, weights=False))
    elif change == "raise":
        assert coalesce_key(engine.check(batch(0, nan_policy="raise"))) is None
        return
    else:
        b = batch(0)
        assert coalesce_key(engine.check(Batch(b.loss, b.predictions, b.targets, b.weights,
                                               gradient="mean"))) is None
        return
    assert coalesce_key(base) != coalesce_key(other)
    assert coalesce_key(base) == coalesce_key(engine.check(batch(1)))


def test_server_with_batching_serves_concurrent_clients_exactly() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lossd import LossClient
    from tests.conftest import start_server

    srv = start_server(batching="on", batch_delay_us=20_000, concurrency=1)
    try:
        assert srv.service is not None and srv.service.batcher is not None
        batches = [batch(i, n=4 + i) for i in range(16)]
        engine = Engine(torch.device("cpu"))
        with LossClient(f"127.0.0.1:{srv.port}") as client, ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda b: client.evaluate(
                b.predictions, b.targets, weights=b.weights), batches))
        for b, r in zip(batches, results, strict=True):
            alone = engine.evaluate(b)
            assert np.array_equal(r.per_sample, alone.per_sample.numpy())
            assert r.sum == alone.aggregate.sum and r.weighted_mean == alone.aggregate.weighted_mean
        assert srv.service.batcher.coalesced_calls >= 1
    finally:
        srv.stop(0)


def test_a_leader_refused_admission_leaves_its_followers_to_their_own() -> None:
    """A leader whose call is refused (queue full, cancelled, deadline) fails alone: its
    followers run under their own admission (a stream's batch is never refused)."""
    import grpc

    from lossd_server.errors import Refused

    engine = Engine(torch.device("cpu"))
    batcher = Batcher(engine, max_samples=10_000, max_delay=5.0, in_flight=lambda: 2)
    leader_batch, follower_batch = batch(1), batch(2)
    outcome: dict[str, object] = {}

    def refuse(device_call: Callable[[], list[Evaluation]]) -> list[Evaluation]:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", reason="queue_full")

    def lead() -> None:
        try:
            batcher.evaluate(leader_batch, run=refuse)
        except Refused as exc:
            outcome["leader"] = exc.reason

    leader = threading.Thread(target=lead)
    leader.start()
    deadline = 10.0
    while not batcher._open and deadline > 0:  # the leader's group is open, waiting
        threading.Event().wait(0.01)
        deadline -= 0.01
    ran_alone: list[int] = []

    def own(device_call: Callable[[], list[Evaluation]]) -> list[Evaluation]:
        ran_alone.append(1)
        return device_call()

    result = batcher.evaluate(follower_batch, run=own)
    leader.join(10)
    assert outcome == {"leader": "queue_full"} and ran_alone == [1]
    alone = engine.evaluate(follower_batch)
    assert torch.equal(result.per_sample, alone.per_sample)
    assert result.aggregate == alone.aggregate
