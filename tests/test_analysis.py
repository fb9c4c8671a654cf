"""Analyses (issue 12) through a real server, every number against torch / numpy computed
independently: per class, accuracy and top-k, diagnostics and calibration, hardest,
quantiles; single batches, streams split anywhere and batches split over messages."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd import InvalidArgument, LossClient, LossResult, state
from lossd_server import analysis
from lossd_server.app import LossdServer

HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True)
ALL = {"per_class": True, "accuracy": True, "top_k": (1, 2, 3), "diagnostics": True,
       "hardest": 7, "quantiles": (0.0, 0.25, 0.5, 0.9, 0.99, 1.0)}


def fsum(values: Iterable[float]) -> float:
    return math.fsum(float(v) for v in values)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (to_dict() trees)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def data(n: int = 300, c: int = 6, seed: int = 0, imbalanced: bool = True
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.arange(1, c + 1, dtype=np.float64) ** -1.5 if imbalanced else np.ones(c)
    t = rng.choice(c, size=n, p=p / p.sum())
    x = rng.standard_normal((n, c)).astype(np.float32)
    x[np.arange(n), t] += 1.0  # a model that is right more often than chance
    w = rng.random(n).astype(np.float32)
    return x, t, w


def rank_ahead(row: np.ndarray, target: int) -> int:
    """Classes ranked ahead of ``target`` by a stable descending sort, NaN first (the
    documented definition, computed the slow way)."""
    order = sorted(range(len(row)), key=lambda j: (not math.isnan(row[j]),
                                                   -row[j] if not math.isnan(row[j]) else 0, j))
    if math.isnan(row[target]):
        return len(row)
    return order.index(target)


# ---------------------------------------------------------------------------------------
# single batches against torch


def test_per_class_against_torch(client: LossClient) -> None:
    x, t, w = data()
    t[::17] = -100  # ignored samples belong to no class
    r = client.evaluate(x, t, weights=w, per_class=True, label_smoothing=0.05)
    loss = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), label_smoothing=0.05,
                           reduction="none").numpy()
    assert r.per_class is not None
    present = sorted(set(t.tolist()) - {-100})
    assert list(r.per_class) == present
    for c in present:
        m = t == c
        pc = r.per_class[c]
        assert pc.count == int(m.sum())
        assert pc.sum == fsum(loss[m])
        assert pc.mean == fsum(loss[m]) / m.sum()
        products = w[m].astype(np.float64) * loss[m].astype(np.float64)
        assert pc.weighted_sum == fsum(products)
        assert pc.weight_sum == fsum(w[m])
        assert pc.weighted_mean == fsum(products) / fsum(w[m])
        assert pc.accuracy is None and pc.correct is None  # not asked
    # The classes' counts and sums add up to the batch aggregates.
    assert sum(r.per_class[c].count for c in present) == r.count
    assert fsum(r.per_class.sum) == pytest.approx(r.sum, rel=1e-12)


def test_per_class_dense_counts_positions(client: LossClient) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 4, 7)).astype(np.float32)
    t = rng.integers(0, 4, (5, 7))
    t[0, 3:] = 0  # ignore_index=0 here: padding
    t[1, :] = 0  # an all-ignored sample
    w = rng.random(5).astype(np.float32)
    r = client.evaluate(x, t, weights=w, per_class=True, accuracy=True, ignore_index=0)
    elem = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), ignore_index=0,
                           reduction="none").numpy()
    pred = x.argmax(axis=1)
    assert r.per_class is not None
    assert list(r.per_class) == sorted(set(t[t != 0].tolist()))
    for c in r.per_class:
        m = t == c
        pc = r.per_class[c]
        assert pc.count == int(m.sum())
        assert pc.sum == fsum(elem[m])
        ws = np.broadcast_to(w[:, None], t.shape)[m].astype(np.float64)
        assert pc.weighted_sum == fsum(ws * elem[m].astype(np.float64))
        assert pc.weight_sum == fsum(ws)
        assert pc.correct == int((pred[m] == c).sum())
    valid = t != 0
    assert r.aggregates.accuracy_count == int(valid.sum())
    assert r.accuracy == (pred[valid] == t[valid]).sum() / valid.sum()


def test_accuracy_top_k_and_ties(client: LossClient) -> None:
    x, t, _ = data(200, 8, seed=2)
    x = np.round(x * 2) / 2  # many exact ties between logits
    x[5, :] = 0.0  # all tied: only class 0 is top-1, classes < k are top-k
    x[6, 3] = np.nan  # NaN ranks ahead of every number
    x[7, t[7]] = np.nan  # a NaN target logit never hits
    r = client.evaluate(x, t, accuracy=True, top_k=(1, 3, 8), per_class=True)
    ranks = np.array([rank_ahead(x[i], int(t[i])) for i in range(len(t))])
    assert r.accuracy == (ranks == 0).sum() / len(t)
    assert r.top_k_accuracy == {k: (ranks < k).sum() / len(t) for k in (1, 3, 8)}
    assert r.aggregates.top_k_correct == {k: int((ranks < k).sum()) for k in (1, 3, 8)}
    assert r.per_class is not None
    for c in r.per_class:
        m = t == c
        assert r.per_class[c].correct == int((ranks[m] == 0).sum())
        assert r.per_class[c].top_k_correct == {k: int((ranks[m] < k).sum()) for k in (1, 3, 8)}
    # top-1 is the argmax (first index of the largest, NaN largest) being the target
    pred = torch.argmax(torch.from_numpy(x), dim=1).numpy()
    hit = (pred == t) & ~np.isnan(x[np.arange(len(t)), t])
    assert np.array_equal(hit, ranks == 0)


def test_diagnostics_and_calibration(client: LossClient) -> None:
    x, t, _ = data(500, 10, seed=3)
    x *= 2.0
    t[:4] = -100
    r = client.evaluate(x, t, diagnostics=True)
    xt = torch.from_numpy(x)
    pred = torch.argmax(xt, dim=1)
    conf = torch.softmax(xt, dim=1).gather(1, pred[:, None]).squeeze(1).numpy()
    assert r.predicted is not None and r.confidence is not None and r.correct is not None
    assert np.array_equal(r.predicted, pred.numpy())
    assert np.array_equal(r.confidence, conf)  # same kernel, same bits
    p64 = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    p64 /= p64.sum(axis=1, keepdims=True)
    assert np.allclose(r.confidence, p64.max(axis=1), rtol=1e-6, atol=0)
    valid = t != -100
    assert np.array_equal(r.correct, (pred.numpy() == t) & valid)
    assert r.accuracy == (pred.numpy() == t)[valid].mean()
    # ECE, 15 equal-width bins (b/15, (b+1)/15], computed the textbook way
    cv, hv = conf[valid].astype(np.float64), (pred.numpy() == t)[valid]
    ece = 0.0
    cal = r.calibration
    assert cal is not None
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        m = (cv > lo) & (cv <= hi) if b else (cv <= hi)
        assert cal.count[b] == m.sum() and cal.correct[b] == hv[m].sum()
        assert cal.confidence_sum[b] == fsum(cv[m])
        if m.any():
            ece += m.sum() / len(cv) * abs(hv[m].mean() - cv[m].mean())
    assert r.ece == pytest.approx(ece, rel=1e-12, abs=1e-15)
    df = cal.to_pandas() if _has_pandas() else None
    if df is not None:
        assert list(df["count"]) == cal.count.tolist()


def test_hardest_and_quantiles(client: LossClient) -> None:
    x, t, _ = data(400, 5, seed=4)
    x[10] = x[11]  # equal losses: ranked by index
    t[10] = t[11]
    x[20, 0] = np.nan  # NaN loss ranks first
    t[30] = -100  # ignored: not a candidate
    r = client.evaluate(x, t, hardest=6, quantiles=(0.0, 0.1, 0.5, 0.9, 0.99, 1.0),
                        diagnostics=True)
    loss = r.per_sample.astype(np.float64)
    counted = [i for i in range(len(t)) if t[i] != -100]
    order = sorted(counted, key=lambda i: (not math.isnan(loss[i]),
                                           -loss[i] if not math.isnan(loss[i]) else 0, i))[:6]
    assert r.hardest is not None
    assert [h.index for h in r.hardest] == order
    assert order[0] == 20 and math.isnan(r.hardest[0].loss)
    assert [h.target for h in r.hardest] == [int(t[i]) for i in order]
    assert r.predicted is not None and r.confidence is not None
    assert [h.predicted for h in r.hardest] == [int(r.predicted[i]) for i in order]
    assert same([h.confidence for h in r.hardest], [float(r.confidence[i]) for i in order])
    q = r.quantiles
    assert q is not None
    finite = loss[counted]
    finite = finite[~np.isnan(finite)]
    assert q.count == len(finite) and q.nan_count == 1
    assert q.min == finite.min() and q.max == finite.max()
    for level in q:
        exact = float(np.quantile(finite, level, method="lower"))
        assert abs(q[level] - exact) <= q.relative_accuracy * abs(exact)


def test_quantiles_negative_and_zero_losses(client: LossClient) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(2000)
    t = rng.poisson(1.0, 2000).astype(np.float64)
    r = client.evaluate(x, t, loss="poisson_nll_loss", quantiles=(0.01, 0.3, 0.5, 0.95),
                        hardest=3)
    loss = F.poisson_nll_loss(torch.from_numpy(x), torch.from_numpy(t),
                              reduction="none").numpy()
    assert (loss < 0).any()
    assert r.quantiles is not None
    for level in r.quantiles:
        exact = float(np.quantile(loss, level, method="lower"))
        assert abs(r.quantiles[level] - exact) <= 2.0 ** -8 * abs(exact)
    assert r.hardest is not None and r.hardest[0].loss == loss.max()
    assert r.hardest[0].target is None  # values, not classes


def test_nan_policy_omit_leaves_samples_out(client: LossClient) -> None:
    x, t, w = data(60, 4, seed=6)
    x[[3, 9]] = np.nan
    r = client.evaluate(x, t, weights=w, nan_policy="omit", per_class=True, accuracy=True,
                        hardest=100, quantiles=True)
    keep = np.ones(60, bool)
    keep[[3, 9]] = False
    assert r.per_class is not None and r.aggregates.accuracy_count == 58
    assert sum(r.per_class.count.tolist()) == 58
    assert r.hardest is not None and {h.index for h in r.hardest} == set(np.flatnonzero(keep))
    assert r.quantiles is not None and r.quantiles.count == 58 and r.quantiles.nan_count == 0


# ---------------------------------------------------------------------------------------
# streams: split anywhere, identical


def _stream(client: LossClient, x: np.ndarray, t: np.ndarray, w: np.ndarray | None,
            cuts: list[int], **kw: Any) -> list[LossResult]:
    bounds = [0, *cuts, len(t)]
    batches = [(x[a:b], t[a:b]) if w is None else (x[a:b], t[a:b], w[a:b])
               for a, b in itertools.pairwise(bounds) if b > a]
    return list(client.evaluate_stream(batches, **kw))


@given(st.data())
@HYPOTHESIS
def test_stream_split_anywhere_equals_one_batch(client: LossClient, data_: st.DataObject
                                                ) -> None:
    n = data_.draw(st.integers(1, 120))
    x, t, w = data(n, 5, seed=n)
    if n > 3:
        t[data_.draw(st.integers(0, n - 1))] = -100
    cuts = sorted(set(data_.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6))))
    whole = client.evaluate(x, t, weights=w, **ALL)
    results = _stream(client, x, t, w, cuts, **ALL)
    running = results[-1].running
    assert running is not None
    assert same(running.to_dict(), whole.aggregates.to_dict())
    # Per-batch analyses index within the batch; running ones within the stream.
    start = 0
    for r in results:
        assert r.hardest is not None
        for h in r.hardest:
            assert r.per_sample[h.index] == whole.per_sample[start + h.index] or math.isnan(
                h.loss)
        start += len(r.per_sample)


def test_split_batch_over_messages_equals_one_message(server: LossdServer) -> None:
    """A batch larger than a message goes as several (``more``); the result is the same."""
    x, t, w = data(3000, 40, seed=7)
    with LossClient(f"127.0.0.1:{server.port}") as one, \
            LossClient(f"127.0.0.1:{server.port}", max_message_bytes=100_000) as split:
        a = one.evaluate(x, t, weights=w, **ALL)
        b = split.evaluate(x, t, weights=w, **ALL)
        assert same(a.to_dict(), b.to_dict())
        streamed = list(split.evaluate_stream([(x[:1700], t[:1700], w[:1700]),
                                               (x[1700:], t[1700:], w[1700:])], **ALL))
    running = streamed[-1].running
    assert running is not None and same(running.to_dict(), a.aggregates.to_dict())
    assert np.array_equal(np.concatenate([s.predicted for s in streamed  # type: ignore[misc]
                                          ]), a.predicted)


def test_running_hardest_counts_from_the_first_sample(client: LossClient) -> None:
    x, t, _ = data(90, 4, seed=8)
    results = _stream(client, x, t, None, [1, 2, 50], hardest=5)
    loss = np.concatenate([r.per_sample for r in results]).astype(np.float64)
    running = results[-1].running
    assert running is not None and running.hardest is not None
    expected = sorted(range(90), key=lambda i: (-loss[i], i))[:5]
    assert list(running.hardest.indices) == expected
    assert list(running.hardest.losses) == [loss[i] for i in expected]


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("option", ["per_class", "accuracy", "top_k", "diagnostics"])
def test_class_analyses_need_class_targets(client: LossClient, option: str) -> None:
    x = np.zeros((4, 3), np.float32)
    value: Any = 1 if option == "top_k" else True
    with pytest.raises(InvalidArgument, match=f"^INVALID_ARGUMENT: {option}: needs class-index "
                                              "targets; mse_loss takes values"):
        client.evaluate(x, x, loss="mse_loss", **{option: value})
    with pytest.raises(InvalidArgument, match=f"{option}: needs class-index targets; "
                                              "cross_entropy got float32 targets"):
        client.evaluate(x, np.full((4, 3), 1 / 3, np.float32), **{option: value})


@pytest.mark.parametrize(("kw", "message"), [
    ({"top_k": 4}, "top_k: 4 out of range [1, 3]"),
    ({"top_k": (1, 1)}, "top_k: repeated value"),
    ({"top_k": tuple(range(1, 18))}, "top_k: 17 values; at most 16"),
    ({"hardest": analysis.MAX_HARDEST + 1}, "hardest: 10001 out of range"),
    ({"hardest": -1}, "hardest: -1 out of range"),
    ({"quantiles": (0.5, 1.5)}, "quantiles: level 1.5 out of range [0, 1]"),
    ({"quantiles": (float("nan"),)}, "quantiles: level nan out of range"),
])
def test_analysis_bounds(client: LossClient, kw: dict[str, Any], message: str) -> None:
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("(", r"\(")):
        client.evaluate(x, np.zeros(4, np.int64), **kw)


def test_stream_must_ask_the_same_analyses(server: LossdServer) -> None:
    from lossd.requests import Requests

    builder = Requests(1 << 20)
    x, t = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    first = builder.build("cross_entropy", x, t, None, None, {}, analyses={"hardest": 2})[0]
    second = builder.build("cross_entropy", x, t, None, None, {}, analyses={"hardest": 3})[0]
    with LossClient(f"127.0.0.1:{server.port}") as c, pytest.raises(Exception) as err:
        list(c._evaluate_stream(iter([first, second]), timeout=30))
    assert "hardest: differs from the stream's first batch" in str(err.value)
    assert "(batch 1 of the stream)" in str(err.value)


# ---------------------------------------------------------------------------------------
# the host states on their own


def test_grouped_sums_merge_exactly_past_the_bucket_bound(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from lossd_server import reduce

    monkeypatch.setattr(state, "_MAX_PIECES", 3)  # renormalise all the time
    rng = np.random.default_rng(9)
    g = rng.integers(0, 4, 500)
    v = rng.standard_normal(500) * 10.0 ** rng.integers(-20, 20, 500)
    whole = reduce.GroupedSums.of(g, v)
    merged = reduce.GroupedSums()
    for a in range(0, 500, 37):
        merged = merged.merge(reduce.GroupedSums.of(g[a:a + 37], v[a:a + 37]))
    assert (merged.counts <= 3).all()
    for k in range(4):
        assert whole.totals()[k] == merged.totals()[k] == fsum(v[g == k])


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=60),
       st.integers(0, 60))
@HYPOTHESIS
def test_grouped_sums_match_aggregate(values: list[float], cut: int) -> None:
    from lossd_server.reduce import Aggregate, GroupedSums

    v = np.array(values, np.float32)
    g = np.zeros(len(v), np.int64)
    s = GroupedSums.of(g[:cut], v[:cut]).merge(GroupedSums.of(g[cut:], v[cut:]))
    expected = Aggregate.of_batch(v, None).sum
    got = s.totals().get(0, 0.0)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


def test_sketch_collapses_lowest_buckets_split_independently(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "SKETCH_BUCKETS", 50)
    rng = np.random.default_rng(10)
    # 2000 losses spread over 25 decades, 1000 in [1, 1.2) (26 buckets): the high ones stay.
    v = rng.permutation(np.r_[10.0 ** rng.uniform(-30, -5, 2000), rng.uniform(1, 1.2, 1000)])
    whole = analysis.LossSketch.of(v)
    parts = analysis.LossSketch()
    for a in range(0, 3000, 211):
        parts = parts.merge(analysis.LossSketch.of(v[a:a + 211]))
    assert whole.collapsed and parts.collapsed and whole.keys.shape[0] == 50
    assert np.array_equal(whole.keys, parts.keys) and np.array_equal(whole.counts, parts.counts)
    for q in (0.9, 0.99):  # high levels stay within the bound
        exact = float(np.quantile(v, q, method="lower"))
        assert abs(whole.quantile(q) - exact) <= analysis.RELATIVE_ACCURACY * exact


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
def test_analyses_on_cuda_match_torch_there(gpu_client: LossClient) -> None:
    """The device part (argmax, softmax, top-k) on CUDA, against torch on CUDA; dense too."""
    x, t, w = data(2000, 50, seed=14)
    x = np.round(x * 4) / 4  # ties
    r = gpu_client.evaluate(x, t, weights=w, per_class=True, top_k=(1, 5), diagnostics=True,
                            hardest=10, quantiles=True)
    xc = torch.from_numpy(x).cuda()
    pred = torch.argmax(xc, dim=1)
    conf = torch.softmax(xc, dim=1).gather(1, pred[:, None]).squeeze(1).cpu().numpy()
    assert r.predicted is not None and np.array_equal(r.predicted, pred.cpu().numpy())
    assert r.confidence is not None and np.allclose(r.confidence, conf, rtol=1e-6, atol=0)
    ranks = np.array([rank_ahead(x[i], int(t[i])) for i in range(len(t))])
    assert r.top_k_accuracy == {k: (ranks < k).sum() / len(t) for k in (1, 5)}
    loss = r.per_sample.astype(np.float64)
    assert r.per_class is not None
    for c in r.per_class:
        assert r.per_class[c].sum == fsum(loss[t == c])
    whole = gpu_client.evaluate(x, t, weights=w, **ALL)
    streamed = _stream(gpu_client, x, t, w, [1, 999, 1500], **ALL)
    assert streamed[-1].running is not None
    assert same(streamed[-1].running.to_dict(), whole.aggregates.to_dict())
    xd = np.random.default_rng(15).standard_normal((4, 30, 64)).astype(np.float32)
    td = np.random.default_rng(16).integers(0, 30, (4, 64))
    rd = gpu_client.evaluate(xd, td, per_class=True, diagnostics=True)
    assert rd.predicted is not None and np.array_equal(
        rd.predicted, torch.argmax(torch.from_numpy(xd).cuda(), dim=1).cpu().numpy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_per_class_and_accuracy_in_every_dtype(client: LossClient, dtype: torch.dtype) -> None:
    x, t, w = data(150, 7, seed=17)
    xt = torch.from_numpy(x).to(dtype)
    r = client.evaluate(xt, t, weights=w, per_class=True, accuracy=True, hardest=3)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    xc = xt.to(compute)
    loss = F.cross_entropy(xc, torch.from_numpy(t), reduction="none").numpy()
    pred = torch.argmax(xc, dim=1).numpy()
    assert r.per_class is not None
    for c in r.per_class:
        m = t == c
        assert r.per_class[c].sum == fsum(loss[m])
        assert r.per_class[c].weighted_sum == fsum(w[m].astype(np.float64) * loss[m])
        assert r.per_class[c].correct == int((pred[m] == c).sum())
    assert r.hardest is not None and r.hardest[0].loss == loss.max()
