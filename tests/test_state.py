"""The exact merge (lossd.state, lossd.merge, saved results, ``lossd merge``), against a real
server: results of disjoint parts of a data set merge into what one stream over all of it
gives, bit for bit, whatever the split; mismatched parts are refused by name.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import lossd
from lossd import Aggregates, Batch, LossClient, MergeError
from lossd._cli import main
from lossd._eval import REPORT_HARDEST
from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests
from lossd.state import Aggregate, encode_aggregate, from_proto, to_proto
from lossd.v1 import loss_service_pb2 as pb
from lossd_server import analysis
from lossd_server.app import LossdServer
from lossd_server.errors import RequestError
from lossd_server.service import StreamState

ANALYSES = dict(per_class=True, top_k=(1, 3), diagnostics=True, hardest=7,
                quantiles=(0.1, 0.5, 0.9, 0.99), hardest_batches=4)


def dataset(seed: int = 0, n: int = 600, c: int = 6) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    targets = rng.integers(0, c, n).astype(np.int64)
    weights = rng.random(n).astype(np.float32) + 0.1
    ids = rng.permutation(10_000)[:n].astype(np.int64) + 5_000
    return logits, targets, weights, ids


def batches(lo: int, hi: int, size: int, *, ids: bool = True, named: bool = False,
            seed: int = 0) -> Iterator[Batch]:
    x, y, w, sid = dataset(seed)
    for start in range(lo, hi, size):
        stop = min(hi, start + size)
        yield Batch(x[start:stop], y[start:stop], w[start:stop],
                    sample_ids=sid[start:stop] if ids else None,
                    batch_id=1000 + start if named else None)


def figures(a: Aggregates) -> dict[str, object]:
    """Everything a user reads from the aggregates, as plain values (NaN-safe compare)."""
    return json.loads(json.dumps(a.to_dict(), default=str))


def assert_same(merged: Aggregates, whole: Aggregates) -> None:
    assert merged.sum == whole.sum and merged.count == whole.count
    assert merged.mean == whole.mean
    assert merged.weighted_sum == whole.weighted_sum
    assert merged.weighted_mean == whole.weighted_mean
    assert figures(merged) == figures(whole)


@pytest.mark.parametrize("cuts", [[0, 600], [0, 200, 450, 600], [0, 1, 599, 600]])
def test_merged_parts_equal_one_stream(client: LossClient, cuts: list[int]) -> None:
    whole = client.evaluate_all(batches(0, 600, 64), **ANALYSES)
    assert whole.state is not None
    parts = [client.evaluate_all(batches(a, b, 64), **ANALYSES)
             for a, b in itertools.pairwise(cuts)]
    # Batch boundaries differ from the whole stream's where a cut is not a multiple of 64:
    # every figure but the hardest batches is split-independent.
    merged = lossd.merge(parts)
    if all(c % 64 == 0 or c == 600 for c in cuts):
        assert_same(merged, whole)
    else:
        whole_d, merged_d = figures(whole), figures(merged)
        whole_d.pop("hardest_batches"), merged_d.pop("hardest_batches")
        assert merged_d == whole_d
    assert merged.hardest is not None and whole.hardest is not None
    assert list(merged.hardest.sample_ids) == list(whole.hardest.sample_ids)
    assert list(merged.hardest.indices) == list(whole.hardest.indices)


def test_hardest_batches_shift_ordinals_and_keep_named_ids(client: LossClient) -> None:
    for named in (False, True):
        whole = client.evaluate_all(batches(0, 600, 50, named=named), **ANALYSES)
        merged = lossd.merge([client.evaluate_all(batches(a, b, 50, named=named), **ANALYSES)
                              for a, b in [(0, 150), (150, 400), (400, 600)]])
        assert merged.hardest_batches is not None and whole.hardest_batches is not None
        assert [b.to_dict() for b in merged.hardest_batches] == \
            [b.to_dict() for b in whole.hardest_batches]


def test_unary_results_merge_like_a_stream(client: LossClient) -> None:
    x, y, w, _sid = dataset(3)
    options = {k: v for k, v in ANALYSES.items() if k != "hardest_batches"}
    whole = client.evaluate_all(((x[a:a + 100], y[a:a + 100], w[a:a + 100])
                                 for a in range(0, 600, 100)), **options)
    parts = [client.evaluate(x[a:a + 100], y[a:a + 100], weights=w[a:a + 100],
                             mergeable=True, **options) for a in range(0, 600, 100)]
    assert parts[0].aggregates.state is not None
    assert client.evaluate(x[:10], y[:10]).aggregates.state is None  # only when asked
    assert_same(lossd.merge(parts), whole)


def test_a_stream_iterated_by_hand_keeps_its_state(client: LossClient) -> None:
    results = list(client.evaluate_stream(batches(0, 300, 100), per_class=True))
    last = results[-1]
    assert last.running is not None and last.running.state is not None
    assert last.whole is last.running
    assert lossd.merge([last]).to_dict() == last.running.to_dict()


def test_saved_results_round_trip_and_merge(client: LossClient, tmp_path: Path) -> None:
    names = [f"class-{i}" for i in range(6)]
    whole = client.evaluate_all(batches(0, 600, 64), class_names=names, **ANALYSES)
    paths = []
    for i, (a, b) in enumerate([(0, 192), (192, 384), (384, 600)]):
        part = client.evaluate_all(batches(a, b, 64), class_names=names, **ANALYSES)
        paths.append(tmp_path / f"shard-{i}.lossd")
        part.save(paths[-1])
        loaded = lossd.load_result(paths[-1])
        assert figures(loaded) == figures(part)
    merged = lossd.merge(lossd.load_result(p) for p in paths)
    assert_same(merged, whole)
    assert merged.per_class is not None and merged.per_class.class_names == tuple(names)
    assert paths[0].read_bytes().startswith(b"lossd-result\n")


def test_the_state_round_trips_its_message_exactly(client: LossClient) -> None:
    a = client.evaluate_all(batches(0, 300, 64), **ANALYSES)
    assert a.state is not None
    again = from_proto(to_proto(a.state))
    assert to_proto(again).SerializeToString() == to_proto(a.state).SerializeToString()
    assert figures(again.aggregates()) == figures(a)


def test_mismatched_parts_are_refused_by_name(client: LossClient, tmp_path: Path) -> None:
    base = client.evaluate_all(batches(0, 100, 50), per_class=True)
    cases = {
        "loss 'nll_loss'": client.evaluate_all(
            ((np.log(np.full((4, 6), 1 / 6, np.float32)), np.zeros(4, np.int64)),),
            loss="nll_loss", per_class=True),
        "options": client.evaluate_all(batches(0, 100, 50), per_class=True,
                                       label_smoothing=0.1),
        "analyses differ: hardest": client.evaluate_all(batches(0, 100, 50), per_class=True,
                                                        hardest=3),
    }
    for needle, other in cases.items():
        with pytest.raises(MergeError, match=needle):
            lossd.merge([base, other])
    no_weights = client.evaluate_all(((x, y) for x, y, *_ in batches(0, 100, 50)),
                                     per_class=True)
    with pytest.raises(MergeError, match="weights"):
        lossd.merge([base, no_weights])
    with pytest.raises(MergeError, match="part 1 carries no mergeable state"):
        lossd.merge([base, client.evaluate_all(batches(0, 100, 50), per_class=True,
                                               mergeable=False)])
    with pytest.raises(MergeError, match="no parts"):
        lossd.merge([])
    bad = tmp_path / "bad.lossd"
    bad.write_bytes(b"PK\x03\x04 not a result")
    with pytest.raises(MergeError, match="not a saved lossd result"):
        lossd.load_result(bad)
    newer = tmp_path / "newer.lossd"
    base.save(newer)
    newer.write_bytes(newer.read_bytes().replace(b"\x08\x01", b"\x08\x02", 1))
    with pytest.raises(MergeError, match="format 2"):
        lossd.load_result(newer)


def test_a_mergeable_stream_keeps_one_set_of_options() -> None:
    stream = StreamState()
    stream.check("cross_entropy", False, analysis.NONE, mergeable=True, options=lambda: "a=1")
    with pytest.raises(RequestError, match="options"):
        stream.check("cross_entropy", False, analysis.NONE, mergeable=True,
                     options=lambda: "a=2")
    with pytest.raises(RequestError, match="mergeable"):
        stream.check("cross_entropy", False, analysis.NONE, mergeable=False)


def test_lossd_merge_command(client: LossClient, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    whole = client.evaluate_all(batches(0, 600, 64), **ANALYSES)
    paths = []
    for i, (a, b) in enumerate([(0, 192), (192, 384), (384, 600)]):
        paths.append(str(tmp_path / f"shard-{i}.lossd"))
        client.evaluate_all(batches(a, b, 64), **ANALYSES).save(paths[-1])
    out, report = tmp_path / "merged.json", tmp_path / "merged.html"
    assert main(["merge", *paths, "--json", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "merged 3 results: 600 samples, 10 batches" in printed
    assert f"{whole.mean:.6g}" in printed
    got = json.loads(out.read_text())
    assert got["sum"] == whole.sum and got["mean"] == whole.mean
    assert got == figures(whole)
    assert "lossd evaluation: cross_entropy" in report.read_text()
    # A missing shard or a file that is not a result: named, exit 2, no traceback.
    assert main(["merge", paths[0], str(tmp_path / "missing.lossd")]) == 2
    assert "missing.lossd" in capsys.readouterr().err
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY")
    assert main(["merge", paths[0], str(tmp_path / "x.npy")]) == 2
    assert "x.npy: not a saved lossd result" in capsys.readouterr().err


def test_lossd_eval_saves_a_shard(server: LossdServer, client: LossClient,
                                  tmp_path: Path) -> None:
    x, y, *_ = dataset(0)
    np.save(tmp_path / "x.npy", x[:300])
    np.save(tmp_path / "y.npy", y[:300])
    saved = tmp_path / "shard.lossd"
    assert main(["eval", "--target", f"127.0.0.1:{server.port}", str(tmp_path / "x.npy"),
                 str(tmp_path / "y.npy"), "--batch-size", "64", "--save", str(saved)]) == 0
    # A saved shard keeps the analyses a report shows, so a merged report has them all.
    whole = client.evaluate_all(((x[a:min(300, a + 64)], y[a:min(300, a + 64)])
                                 for a in range(0, 300, 64)), hardest=REPORT_HARDEST,
                                quantiles=True, per_class=True, diagnostics=True, top_k=(1, 5))
    assert figures(lossd.load_result(saved)) == figures(whole)


def test_encode_aggregate() -> None:
    out = pb.Aggregates()
    encode_aggregate(Aggregate.of_batch(np.array([1.0, 3.0]), None,
                                             ignored=np.array([False, False])), out)
    assert (out.sum, out.mean, out.count, out.ignored, out.omitted) == (4.0, 2.0, 2, 0, 0)
    assert not out.HasField("weighted_sum") and not out.HasField("weighted_mean")
    assert not out.HasField("weight_sum")
    out = pb.Aggregates()
    encode_aggregate(Aggregate.of_batch(np.array([1.0, 3.0, 5.0]), np.array([1.0, 0.0, 2.0]),
                                             omitted=np.array([False, False, True])), out)
    assert (out.count, out.omitted, out.sum) == (2, 1, 4.0)
    assert (out.weighted_sum, out.weight_sum, out.weighted_mean) == (1.0, 1.0, 1.0)
    empty = pb.Aggregates()
    encode_aggregate(Aggregate.of_batch(np.array([1.0]), np.array([0.0]),
                                             ignored=np.array([True])), empty)
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.weighted_mean)
    assert empty.HasField("weight_sum") and empty.weight_sum == 0.0


def test_shared_memory_results_merge_too(client: LossClient) -> None:
    x, y, w, _ = dataset(5)
    whole = client.evaluate_all(((x[a:a + 200], y[a:a + 200], w[a:a + 200])
                                 for a in range(0, 600, 200)), per_class=True, hardest=5)
    with client.shared_memory(1 << 20) as shm:
        parts = [shm.evaluate(x[a:a + 200], y[a:a + 200], weights=w[a:a + 200],
                              per_class=True, hardest=5, mergeable=True)
                 for a in range(0, 600, 200)]
    assert_same(lossd.merge(parts), whole)


def test_a_stream_can_leave_its_figures_to_its_end(client: LossClient) -> None:
    every = list(client.evaluate_stream(batches(0, 300, 64), **ANALYSES))
    at_end = list(client.evaluate_stream(batches(0, 300, 64), running=False, **ANALYSES))
    assert [r.per_sample.tolist() for r in at_end] == [r.per_sample.tolist() for r in every]
    assert [r.sum for r in at_end] == [r.sum for r in every]          # each batch's own
    assert all(r.running is None and r.per_class is None for r in at_end[:-1])
    assert at_end[-1].running is not None and every[-1].running is not None
    assert_same(at_end[-1].running, every[-1].running)
    assert at_end[-1].running.state is not None
    with pytest.raises(ValueError, match="running=False needs mergeable=True"):
        list(client.evaluate_stream(batches(0, 64, 64), running=False, mergeable=False))


def test_the_server_keeps_analyses_at_end_to_mergeable_streams(client: LossClient) -> None:
    x, y, *_ = dataset(2)
    [raw] = Requests(DEFAULT_MAX_MESSAGE_BYTES).build("cross_entropy", x[:8], y[:8], None,
                                                      None, {})
    req = pb.EvaluateRequest.FromString(raw)
    with grpc.insecure_channel(client.target) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate",
                                       request_serializer=pb.EvaluateRequest.SerializeToString,
                                       response_deserializer=pb.EvaluateResponse.FromString)
        stream = channel.stream_stream(
            "/lossd.v1.LossService/EvaluateStream",
            request_serializer=pb.EvaluateRequest.SerializeToString,
            response_deserializer=pb.EvaluateResponse.FromString)
        req.analyses_at_end = True
        with pytest.raises(grpc.RpcError) as unary:
            evaluate(req)
        assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "analyses_at_end" in str(unary.value.details())
        with pytest.raises(grpc.RpcError) as streamed:
            list(stream(iter([req])))
        assert "needs mergeable" in str(streamed.value.details())
        req.mergeable = True
        replies = list(stream(iter([req, req])))
        assert len(replies) == 3 and not replies[0].HasField("running")
        assert replies[-1].HasField("state") and replies[-1].running.count == 16


def test_parts_named_differently_do_not_merge(client: LossClient) -> None:
    a = client.evaluate_all(batches(0, 100, 50), per_class=True,
                            class_names=[f"a{i}" for i in range(6)])
    b = client.evaluate_all(batches(100, 200, 50), per_class=True,
                            class_names=[f"b{i}" for i in range(6)])
    with pytest.raises(MergeError, match="class_names differ between part 0, part 1"):
        lossd.merge([a, b])
    unnamed = client.evaluate_all(batches(100, 200, 50), per_class=True)
    assert lossd.merge([a, unnamed]).per_class.class_names == a.per_class.class_names
