"""Sample ids and hardest batches (issue 21, items 1 and 2), against real servers.

Sample ids: the caller's int64 id of each sample travels with the batch (``evaluate``, a
stream of ``lossd.Batch``es, shared memory, KServe's ``SAMPLE_IDS``) and comes back on the
hardest samples; a wrong dtype or shape is INVALID_ARGUMENT naming the field. Hardest
batches: a stream's K batches of the largest mean loss, equal to a brute-force ranking of
the batches' per-sample losses, with a server state of K batches whatever the stream's
length.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

import lossd
from lossd import LossClient
from lossd.kserve.v2 import grpc_service_pb2 as kpb
from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from lossd_server import analysis
from lossd_server.app import LossdServer
from lossd_server.engine import Batch, Engine
from lossd_server.errors import RequestError
from lossd_server.service import StreamState

REFUSED = "^INVALID_ARGUMENT: "  # how the clients' InvalidArgument message starts


def data(seed: int, n: int = 40, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c)).astype(np.float32) * 3,
            rng.integers(0, c, n).astype(np.int64))


def ids_for(n: int, seed: int = 0) -> np.ndarray:
    """Shuffled, non-contiguous dataset ids, so a position is never mistaken for an id."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64) * 7 + 1000


def test_evaluate_carries_the_ids_into_the_hardest_samples(client: LossClient) -> None:
    x, t = data(1)
    ids = ids_for(len(t))
    r = client.evaluate(x, t, hardest=5, diagnostics=True, sample_ids=ids)
    plain = client.evaluate(x, t, hardest=5, diagnostics=True)
    assert r.hardest is not None and plain.hardest is not None
    np.testing.assert_array_equal(r.hardest.indices, plain.hardest.indices)  # positions
    np.testing.assert_array_equal(r.hardest.sample_ids, ids[r.hardest.indices])
    assert [h.sample_id for h in r.hardest] == ids[r.hardest.indices].tolist()
    assert plain.hardest.sample_ids is None and "sample_id" not in plain.hardest.to_dict()[0]
    assert r.hardest.to_dict()[0]["sample_id"] == ids[r.hardest.indices[0]]
    assert list(r.hardest.to_pandas()["sample_id"]) == ids[r.hardest.indices].tolist()
    # The per-sample diagnostics carry them too: the result's rows are keyed by id.
    np.testing.assert_array_equal(r.sample_ids, ids)
    frame = r.to_pandas()
    assert frame.index.name == "sample_id" and list(frame.index) == ids.tolist()
    assert frame.loc[ids[3], "predicted"] == r.predicted[3]  # type: ignore[index]
    assert r.to_dict()["sample_ids"] == ids.tolist()
    np.testing.assert_array_equal(r.per_sample, plain.per_sample)


def test_split_batch_keeps_its_ids(server: LossdServer) -> None:
    """A batch split along N over a stream keeps each part's ids in place."""
    x, t = data(2, n=6000, c=100)
    ids = ids_for(len(t), 2)
    with LossClient(f"127.0.0.1:{server.port}", split_bytes=256 * 1024) as c:
        r = c.evaluate(x, t, hardest=50, sample_ids=ids)
    assert r.hardest is not None
    np.testing.assert_array_equal(r.hardest.sample_ids, ids[r.hardest.indices])
    np.testing.assert_array_equal(r.sample_ids, ids)


def batches(seed: int, sizes: list[int], c: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    return [data(seed + i, n, c) for i, n in enumerate(sizes)]


def test_a_stream_of_batches_carries_ids_across_batches(client: LossClient) -> None:
    parts = batches(10, [13, 7, 21])
    ids = ids_for(41, 3)
    bounds = np.cumsum([0, 13, 7, 21])
    stream = [lossd.Batch(x, t, sample_ids=ids[a:b])
              for (x, t), a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)]
    results = list(client.evaluate_stream(stream, hardest=8))
    running = results[-1].running
    assert running is not None and running.hardest is not None
    # Indices are stream positions; ids are the caller's, whichever batch they came in.
    np.testing.assert_array_equal(running.hardest.sample_ids, ids[running.hardest.indices])
    losses = np.concatenate([r.per_sample for r in results]).astype(np.float64)
    order = np.lexsort((np.arange(41), -losses))[:8]
    np.testing.assert_array_equal(running.hardest.indices, order)
    for r, a, b in zip(results, bounds[:-1], bounds[1:], strict=True):
        np.testing.assert_array_equal(r.sample_ids, ids[a:b])
        assert r.hardest is not None
        np.testing.assert_array_equal(r.hardest.sample_ids, ids[a:b][r.hardest.indices])


def test_plain_tuples_and_batches_mix(client: LossClient) -> None:
    (x1, t1), (x2, t2) = batches(20, [5, 6])
    mixed = list(client.evaluate_stream([(x1, t1), lossd.Batch(x2, t2), (x1, t1, None)]))
    assert mixed[-1].running is not None and mixed[-1].running.count == 16
    assert lossd.Batch(x1, t1) == (x1, t1, None, None, None, None)


def test_ids_on_some_batches_only_are_refused(client: LossClient) -> None:
    (x1, t1), (x2, t2) = batches(30, [5, 6])
    with pytest.raises(lossd.InvalidArgument, match=REFUSED + r"sample_ids: .*every batch"):
        list(client.evaluate_stream([lossd.Batch(x1, t1, sample_ids=np.arange(5)),
                                     lossd.Batch(x2, t2)], hardest=2))


@pytest.mark.parametrize(("ids", "problem"), [
    (np.arange(40, dtype=np.int32), "dtype int32"),
    (np.arange(40, dtype=np.float64), "dtype float64"),
    (np.arange(39, dtype=np.int64), r"shape \(39\)"),
    (np.arange(80, dtype=np.int64).reshape(40, 2), r"shape \(40, 2\)"),
])
def test_wrong_dtype_or_shape_is_refused_naming_the_field(client: LossClient, ids: np.ndarray,
                                                          problem: str) -> None:
    x, t = data(4)
    with pytest.raises(lossd.InvalidArgument, match=REFUSED + rf"sample_ids: {problem}"):
        client.evaluate(x, t, hardest=3, sample_ids=ids)
    with pytest.raises(lossd.InvalidArgument, match=REFUSED + rf"sample_ids: {problem}"):
        list(client.evaluate_stream([lossd.Batch(x, t, sample_ids=ids)]))


def test_refused_before_any_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(torch.device("cpu"))

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(engine, "_run", no_kernel)
    x, t = data(5)
    with pytest.raises(RequestError, match="sample_ids"):
        engine.evaluate(Batch("cross_entropy", torch.from_numpy(x), torch.from_numpy(t),
                              sample_ids=torch.arange(3)))


def test_shared_memory_carries_the_ids(client: LossClient) -> None:
    x, t = data(6)
    ids = ids_for(len(t), 6)
    with client.shared_memory(1 << 20) as shm:
        r = shm.evaluate(x, t, hardest=6, sample_ids=ids)
        with pytest.raises(lossd.InvalidArgument, match=REFUSED + r"sample_ids: dtype int32"):
            shm.evaluate(x, t, sample_ids=ids.astype(np.int32))
    assert r.hardest is not None
    np.testing.assert_array_equal(r.hardest.sample_ids, ids[r.hardest.indices])
    np.testing.assert_array_equal(r.sample_ids, ids)


@pytest.fixture
def kserve(server: LossdServer) -> Iterator[kpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


def _infer(stub: kpb_grpc.GRPCInferenceServiceStub, ids: np.ndarray | None,
           datatype: str = "INT64") -> kpb.ModelInferResponse:
    x, t = data(7)
    req = kpb.ModelInferRequest(model_name="cross_entropy")
    inputs = [("PREDICTIONS", "FP32", x), ("TARGETS", "INT64", t)]
    if ids is not None:
        inputs.append(("SAMPLE_IDS", datatype, ids))
    for name, dtype, a in inputs:
        req.inputs.add(name=name, datatype=dtype, shape=a.shape)
        req.raw_input_contents.append(a.tobytes())
    req.outputs.add(name="PER_SAMPLE")
    return stub.ModelInfer(req, timeout=30)


def test_kserve_takes_an_optional_sample_ids_input(
        kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    with_ids = _infer(kserve, ids_for(40))
    assert with_ids.raw_output_contents == _infer(kserve, None).raw_output_contents
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="cross_entropy"), timeout=30)
    assert any(i.name == "SAMPLE_IDS" and i.datatype == "INT64" for i in meta.inputs)
    for ids, datatype, problem in ((ids_for(40).astype(np.int32), "INT32", "dtype int32"),
                                   (ids_for(39), "INT64", "shape")):
        with pytest.raises(grpc.RpcError) as info:
            _infer(kserve, ids, datatype)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"SAMPLE_IDS: {problem}")


# --- hardest batches -----------------------------------------------------------------------

def brute_force(per_batch: list[np.ndarray], k: int) -> list[int]:
    """Ordinals of the k batches of largest mean loss (sum in float64 / count), NaN first,
    ties by ordinal: the ranking the server promises, from the per-sample losses."""
    means = [math.fsum(losses.astype(np.float64).tolist()) / len(losses)
             for losses in per_batch]
    return sorted(range(len(means)), key=lambda i: (not np.isnan(means[i]),
                                                    -np.nan_to_num(means[i]), i))[:k]


def test_hardest_batches_equal_a_brute_force_ranking(client: LossClient) -> None:
    rng = np.random.default_rng(8)
    sizes = rng.integers(1, 30, 25).tolist()
    parts = batches(40, sizes)
    results = list(client.evaluate_stream(parts, hardest_batches=6, hardest=10))
    per_batch = [r.per_sample for r in results]
    running = results[-1].running
    assert running is not None and running.hardest_batches is not None
    hb = running.hardest_batches
    want = brute_force(per_batch, 6)
    assert [b.ordinal for b in hb] == want
    assert [b.batch_id for b in hb] == want  # no ids given: the ordinals
    for b in hb:
        assert b.count == sizes[b.ordinal]
        assert b.mean == results[b.ordinal].mean  # exact: the batch's own aggregate
    # in_hardest: how many of each batch's samples are among the stream's hardest 10.
    assert running.hardest is not None
    starts = np.cumsum([0, *sizes])
    for b in hb:
        inside = ((running.hardest.indices >= starts[b.ordinal])
                  & (running.hardest.indices < starts[b.ordinal + 1]))
        assert b.in_hardest == int(inside.sum())
    frame = hb.to_pandas()
    assert list(frame.columns) == ["batch_id", "ordinal", "count", "mean", "in_hardest"]
    assert hb.to_dict()[0] == {"batch_id": want[0], "ordinal": want[0], "count": hb[0].count,
                               "mean": hb[0].mean, "in_hardest": hb[0].in_hardest}


def test_hardest_batches_take_the_callers_batch_ids(client: LossClient) -> None:
    parts = batches(60, [4, 9, 3, 12, 5])
    stream = [lossd.Batch(x, t, batch_id=500 + 10 * i) for i, (x, t) in enumerate(parts)]
    r = client.evaluate_all(stream, hardest_batches=3)
    assert r.hardest_batches is not None
    per_batch = [client.evaluate(x, t).per_sample for x, t in parts]
    want = brute_force(per_batch, 3)
    assert [b.ordinal for b in r.hardest_batches] == want
    np.testing.assert_array_equal(r.hardest_batches.batch_ids, [500 + 10 * i for i in want])
    assert all(b.in_hardest is None for b in r.hardest_batches)  # hardest not asked


def test_a_split_batch_is_ranked_as_one(server: LossdServer) -> None:
    x, t = data(70, n=6000, c=100)
    small = data(71, n=50, c=100)
    with LossClient(f"127.0.0.1:{server.port}", split_bytes=256 * 1024) as c:
        results = list(c.evaluate_stream([(x, t), small, (x[:10], t[:10])],
                                         hardest_batches=3))
    hb = results[-1].running.hardest_batches  # type: ignore[union-attr]
    assert hb is not None and sorted(b.count for b in hb) == [10, 50, 6000]
    assert {b.ordinal: b.mean for b in hb} == {i: r.mean for i, r in enumerate(results)}


def test_async_client_hardest_batches_and_ids(server: LossdServer) -> None:
    parts = batches(80, [6, 8, 4])
    ids = ids_for(18, 8)
    bounds = [0, 6, 14, 18]
    stream = [lossd.Batch(x, t, sample_ids=ids[bounds[i]:bounds[i + 1]])
              for i, (x, t) in enumerate(parts)]

    async def main() -> tuple[lossd.Aggregates, lossd.LossResult]:
        async with lossd.AsyncLossClient(f"127.0.0.1:{server.port}") as c:
            return (await c.evaluate_all(stream, hardest_batches=2, hardest=4),
                    await c.evaluate(*parts[0], hardest=2, sample_ids=ids[:6]))

    r, one = asyncio.run(main())
    assert r.hardest is not None and r.hardest_batches is not None
    np.testing.assert_array_equal(r.hardest.sample_ids, ids[r.hardest.indices])
    assert len(r.hardest_batches) == 2
    assert one.hardest is not None
    np.testing.assert_array_equal(one.hardest.sample_ids, ids[:6][one.hardest.indices])


def test_hardest_batches_are_a_stream_analysis(client: LossClient) -> None:
    x, t = data(90)
    with pytest.raises(lossd.InvalidArgument, match=REFUSED + r"hardest_batches: .*out of range"):
        client.evaluate_all([(x, t)], hardest_batches=analysis.MAX_HARDEST_BATCHES + 1)
    from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests, analysis_fields
    req = Requests(DEFAULT_MAX_MESSAGE_BYTES).build(
        "cross_entropy", x, t, None, None, {}, analyses=analysis_fields(hardest_batches=2))
    with pytest.raises(grpc.RpcError) as info:
        client._evaluate(req[0], timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("hardest_batches: EvaluateStream only")


def test_server_state_holds_k_batches_whatever_the_stream_length() -> None:
    """Memory bounded: after 2,000 batches the stream keeps its K hardest, no more, and
    they are the right K."""
    engine = Engine(torch.device("cpu"))
    stream = StreamState()
    means = []
    rng = np.random.default_rng(9)
    for i in range(2000):
        stream.check("mse_loss", False, analysis.NONE, hardest_batches=4)
        n = int(rng.integers(1, 5))
        ev = engine.evaluate(Batch("mse_loss", torch.from_numpy(rng.standard_normal(n)),
                                   torch.zeros(n, dtype=torch.float64)))
        stream.add(ev, more=False)
        means.append(ev.aggregate.mean)
        kept = stream.hardest_batches
        assert kept is not None and len(kept.ordinal) == min(i + 1, 4)
    assert kept.ordinal.tolist() == np.argsort(-np.array(means), kind="stable")[:4].tolist()
    assert kept.mean.tolist() == sorted(means, reverse=True)[:4]


def test_coalesced_batches_keep_their_own_ids() -> None:
    """With --batching on, small calls are evaluated together; each keeps its own ids."""
    engine = Engine(torch.device("cpu"))
    request = analysis.Request(hardest=3)
    parts = [(torch.from_numpy(x), torch.from_numpy(t)) for x, t in batches(100, [7, 9])]
    ids = [torch.from_numpy(ids_for(7, 1)), torch.from_numpy(ids_for(9, 2))]
    checked = [engine.check(Batch("cross_entropy", x, t, analyses=request, sample_ids=i))
               for (x, t), i in zip(parts, ids, strict=True)]
    for ev, i in zip(engine.evaluate_many(checked), ids, strict=True):
        assert ev.analysis is not None and ev.analysis.hardest is not None
        h = ev.analysis.hardest
        assert h.sample_id is not None
        np.testing.assert_array_equal(h.sample_id, i.numpy()[h.index])
