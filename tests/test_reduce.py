"""Unit tests of lossd_server.reduce: the per-sample rule and exact, mergeable aggregates."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd_server.reduce import Aggregate, exact_parts, per_sample

HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True)
finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)


def exact(values: list[float]) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0))


# ---------------------------------------------------------------------------------------
# per_sample


def test_per_sample_1d() -> None:
    v = torch.tensor([1.0, 2.0, 0.0])
    out, ignored = per_sample(v, None)
    assert out is v and ignored is None
    out, ignored = per_sample(v, torch.tensor([True, True, False]))
    assert out.tolist() == [1.0, 2.0, 0.0]
    assert ignored is not None and ignored.tolist() == [False, False, True]


def test_per_sample_averages_valid_positions() -> None:
    v = torch.tensor([[1.0, 3.0, 5.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out, ignored = per_sample(v, None)
    assert out.tolist() == [3.0, float(np.float32(2.0) / np.float32(3.0)), 0.0]
    assert ignored is None
    valid = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    out, ignored = per_sample(v, valid)
    assert out.tolist() == [3.0, 2.0, 0.0]
    assert ignored is not None and ignored.tolist() == [False, False, True]


def test_per_sample_dense() -> None:
    v = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    out, _ = per_sample(v, None)
    assert out.tolist() == [5.5, 17.5]
    valid = v % 2 == 0  # zero at invalid positions, as torch's elementwise losses have
    out, _ = per_sample(torch.where(valid, v, 0.0), valid)
    assert out.tolist() == [5.0, 17.0]


def test_per_sample_sums_class_dim() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out, _ = per_sample(v, None, sum_class_dim=True)
    assert out.tolist() == [6.0, 15.0]
    dense = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)  # (N, C, d1)
    out, _ = per_sample(dense, None, sum_class_dim=True)
    assert out.tolist() == [(6 + 9) / 2, (24 + 27) / 2]


def test_per_sample_keeps_dtype() -> None:
    for dtype in (torch.float32, torch.float64):
        v = torch.ones(3, 2, dtype=dtype)
        assert per_sample(v, torch.ones(3, 2, dtype=torch.bool))[0].dtype == dtype
        assert per_sample(v, None)[0].dtype == dtype


# ---------------------------------------------------------------------------------------
# exact_parts


def test_exact_parts_cancellation() -> None:
    values = [1e16, 1.0, -1e16, 1e-20]
    parts = exact_parts(values)
    assert exact(parts) == exact(values)
    assert math.fsum(parts) == 1.0
    assert 1e16 + 1.0 - 1e16 != 1.0  # left-to-right float64 summation loses it
    assert exact_parts([]) == []
    assert exact_parts([0.0, -0.0]) == []
    assert exact_parts([0.1, 0.2, 0.3]) == [math.fsum([0.1, 0.2, 0.3]),
                                            *exact_parts([0.1, 0.2, 0.3])[1:]]


@given(st.lists(finite, max_size=40))
@HYPOTHESIS
def test_exact_parts_are_exact(values: list[float]) -> None:
    parts = exact_parts(values)
    assert exact(parts) == exact(values)
    assert all(math.isfinite(p) and p != 0.0 for p in parts)
    # Non-overlapping, largest first: each part is below the previous one's rounding.
    for a, b in itertools.pairwise(parts):
        assert abs(b) <= math.ulp(a) / 2


@given(st.lists(finite, max_size=40), st.randoms(use_true_random=False))
@HYPOTHESIS
def test_exact_parts_order_independent(values: list[float], rnd: random.Random) -> None:
    shuffled = values[:]
    rnd.shuffle(shuffled)
    assert math.fsum(exact_parts(values)) == math.fsum(exact_parts(shuffled))
    assert math.fsum(exact_parts(values)) == float(exact(values))


def test_exact_parts_non_finite() -> None:
    inf, nan = math.inf, math.nan
    assert exact_parts([1.0, inf, 2.0]) == [inf]
    assert exact_parts([-inf, 1.0]) == [-inf]
    assert math.isnan(exact_parts([1.0, nan])[0])
    both = exact_parts([inf, 1.0, -inf])  # fsum raises on inf + -inf
    assert len(both) == 1 and math.isnan(both[0])
    assert exact_parts([1e308, 1e308]) == [inf]  # overflows: fsum raises OverflowError


# ---------------------------------------------------------------------------------------
# Aggregate


def test_of_batch() -> None:
    losses = np.array([1.0, 2.0, 4.0, 8.0, np.nan], dtype=np.float32)
    ignored = np.array([False, True, False, False, False])
    omitted = np.array([False, True, False, False, True])  # sample 1 counts as ignored
    w = np.array([0.5, 9.0, 0.25, 0.0, 3.0])
    a = Aggregate.of_batch(losses, w, ignored=ignored, omitted=omitted)
    assert (a.count, a.ignored, a.omitted) == (3, 1, 1)
    assert (a.sum, a.mean) == (13.0, 13.0 / 3)
    assert (a.weighted_sum, a.weight_sum, a.weighted_mean) == (1.5, 0.75, 2.0)
    plain = Aggregate.of_batch(losses[:4], None)
    assert (plain.count, plain.sum, plain.ignored, plain.omitted) == (4, 15.0, 0, 0)
    assert (plain.weighted_sum, plain.weighted_mean, plain.weight_sum) == (None, None, None)


def test_of_batch_edge_values() -> None:
    nothing = Aggregate.of_batch(np.array([5.0]), np.array([2.0]), ignored=np.array([True]))
    assert (nothing.count, nothing.sum, nothing.weight_sum) == (0, 0.0, 0.0)
    assert math.isnan(nothing.mean) and math.isnan(nothing.weighted_mean or 0.0)
    zero_w = Aggregate.of_batch(np.array([1.0, 2.0]), np.zeros(2))
    assert zero_w.weight_sum == 0.0 and math.isnan(zero_w.weighted_mean or 0.0)
    with_nan = Aggregate.of_batch(np.array([1.0, np.nan]), np.ones(2))
    assert math.isnan(with_nan.sum) and math.isnan(with_nan.weighted_sum or 0.0)
    assert with_nan.weight_sum == 2.0
    both = Aggregate.of_batch(np.array([np.inf, -np.inf, 1.0], dtype=np.float32), np.ones(3))
    assert math.isnan(both.sum) and math.isnan(both.mean)
    assert Aggregate.of_batch(np.array([np.inf, 1.0]), None).sum == math.inf


def _values(data: st.DataObject, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    losses = data.draw(st.lists(st.floats(-2.0**100, 2.0**100, width=32), min_size=n, max_size=n))
    weights = data.draw(st.lists(st.floats(0, 1e6, width=32), min_size=n, max_size=n))
    ignored = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return (np.array(losses, np.float32), np.array(weights, np.float32).astype(np.float64),
            np.array(ignored, bool))


@given(st.data(), st.integers(1, 60))
@HYPOTHESIS
def test_merge_is_split_independent(data: st.DataObject, n: int) -> None:
    losses, w, ignored = _values(data, n)
    whole = Aggregate.of_batch(losses, w, ignored=ignored)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    bounds = [0, *cuts, n]
    chunks = [Aggregate.of_batch(losses[a:b], w[a:b], ignored=ignored[a:b])
              for a, b in itertools.pairwise(bounds)]
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged.merge(c)
    rev = chunks[-1]
    for c in reversed(chunks[:-1]):
        rev = c.merge(rev)
    for agg in (merged, rev):
        assert (agg.count, agg.ignored, agg.omitted) == (whole.count, whole.ignored, 0)
        assert agg.sum == whole.sum
        assert agg.weighted_sum == whole.weighted_sum
        assert agg.weight_sum == whole.weight_sum
        if whole.count:
            assert agg.mean == whole.mean
            assert agg.weighted_mean == whole.weighted_mean or (
                math.isnan(agg.weighted_mean or 0.0) and whole.weight_sum == 0.0)
    kept = losses[~ignored].astype(np.float64)
    assert whole.sum == float(exact(kept.tolist()))
    assert whole.weighted_sum == float(exact((kept * w[~ignored]).tolist()))


def test_merge() -> None:
    a = Aggregate.of_batch(np.array([1e16, 1.0]), np.array([1.0, 1.0]),
                           omitted=np.array([False, False]))
    b = Aggregate.of_batch(np.array([-1e16, 2.0]), np.array([2.0, 0.0]),
                           ignored=np.array([False, True]))
    m = a.merge(b)
    assert (m.count, m.ignored, m.omitted) == (3, 1, 0)
    assert m.sum == 1.0 and m.mean == 1.0 / 3
    assert m.weighted_sum == -1e16 + 1.0  # exact: 1e16 + 1 - 2e16, rounded once
    assert m.weight_sum == 4.0
    assert a.count == 2 and b.count == 1  # merge returns a new aggregate
    unweighted = Aggregate.of_batch(np.array([3.0]), None)
    mixed = a.merge(unweighted)
    assert not mixed.weighted and mixed.weighted_sum is None and mixed.count == 3


@pytest.mark.parametrize("values", [[math.inf], [-math.inf], [math.nan]])
def test_merge_non_finite(values: list[float]) -> None:
    a = Aggregate.of_batch(np.array(values), None)
    b = Aggregate.of_batch(np.array([1.0]), None)
    assert math.isnan(a.merge(b).sum) if math.isnan(values[0]) else \
        a.merge(b).sum == values[0]


def test_merge_opposite_infinities() -> None:
    a = Aggregate.of_batch(np.array([math.inf]), np.array([1.0]))
    b = Aggregate.of_batch(np.array([-math.inf]), np.array([1.0]))
    m = a.merge(b)
    assert math.isnan(m.sum) and math.isnan(m.weighted_sum or 0.0) and m.weight_sum == 2.0
