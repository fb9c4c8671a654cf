"""The exact, mergeable state behind a result, and its merge: one implementation for the
server's streams and for :func:`lossd.merge` (shards, DDP ranks, saved results). numpy only.

A :class:`State` holds what a result's aggregates and analyses derive from, kept exact:
sums as non-overlapping float64 parts (:class:`Aggregate`) or exact per-group sums
(:class:`GroupedSums`), counts, the K hardest samples and batches, the loss sketch. The
state of a stream is the merge of its batches' states, and the merge of the states of
disjoint parts of a data set equals, bit for bit, the state of one stream over all of them
in that order, however they were split. On the wire it is ``lossd.v1.MergeState``
(:func:`to_proto`, :func:`from_proto`); a result's figures are derived from it by
:func:`encode_aggregate` and :func:`encode_analysis`, on the server and in a merge alike.

Definitions (docs/analyses.md):

* calibration: 15 equal-width confidence bins (b/15, (b+1)/15] (0 falls in the first); ECE =
  sum over bins of |hits - sum of confidences| / counted, i.e. sum_b (n_b / n) |acc_b - conf_b|.
* hardest: the K counted samples with the largest loss; NaN ranks above every number, and
  equal losses rank by index (smaller first). Exact; memory K. With the caller's sample
  ids, each carries its id; the index stays its position (in the batch, or the stream).
* hardest batches (streams): the K completed batches with the largest mean loss (the
  aggregates' exact sum / count), ranked as the hardest samples are, by ordinal on ties;
  batches where no sample counts are not ranked. Exact; memory K.
* quantiles: from a log-linear sketch (:class:`LossSketch`) with relative error at most
  ``RELATIVE_ACCURACY`` (2**-8) and at most ``SKETCH_BUCKETS`` buckets; min and max exact.

Sums are computed exactly and rounded once (Shewchuk's algorithm via ``math.fsum``), so
they do not depend on summation order, device or how the data was split.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from lossd._result import PerClass
from lossd.v1 import loss_service_pb2 as pb

if TYPE_CHECKING:
    from lossd._result import Aggregates, LossResult

VERSION = 1
"""The state's format (``MergeState.version``); states of another do not merge."""

MAX_HARDEST = 10_000
MAX_HARDEST_BATCHES = 10_000
MAX_TOP_K = 16
MAX_QUANTILES = 32
DEFAULT_QUANTILES = (0.5, 0.9, 0.99)
CALIBRATION_BINS = 15
BIN_EDGES = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)

# The sketch: 2**_SKETCH_BITS buckets per binade; a bucket [L, U) has U - L <= L * 2**-7, so
# its midpoint is within 2**-8 of every value in it, relatively.
_SKETCH_BITS = 7
_SKETCH_SHIFT = np.uint64(52 - _SKETCH_BITS)
RELATIVE_ACCURACY = 2.0 ** -(_SKETCH_BITS + 1)
SKETCH_BUCKETS = 8192
_TINY = 2.0 ** -1022  # smaller magnitudes (float64 subnormals) count as zero


# --- exact sums ------------------------------------------------------------------------

def exact_parts(values: list[float]) -> list[float]:
    """Non-overlapping floats whose exact sum is the exact sum of ``values``.

    Each round takes the correctly rounded residual; it shrinks by 2**-53 a round, so a
    handful of rounds suffice. Non-finite input gives a one-element non-finite result.
    """
    try:
        parts: list[float] = []
        while True:
            r = math.fsum(values + [-p for p in parts]) if parts else math.fsum(values)
            if r == 0.0:
                return parts
            if not math.isfinite(r):
                return [r]
            parts.append(r)
    except (OverflowError, ValueError):  # ValueError: fsum of both +inf and -inf
        with np.errstate(over="ignore", invalid="ignore"):
            return [float(np.sum(np.asarray(values, dtype=np.float64)))]


def _value(parts: list[float]) -> float:
    if len(parts) == 1:  # the common case: the exact sum is one float
        return parts[0]
    return math.fsum(parts) if all(math.isfinite(p) for p in parts) else float(sum(parts))


@dataclass
class Aggregate:
    """Exact running sums over the samples that count; mergeable across batches."""

    weighted: bool
    count: int = 0
    ignored: int = 0
    omitted: int = 0
    sum_parts: list[float] = field(default_factory=list)
    weighted_parts: list[float] = field(default_factory=list)
    weight_parts: list[float] = field(default_factory=list)

    @classmethod
    def of_batch(cls, losses: np.ndarray, weights: np.ndarray | None, *,
                 ignored: np.ndarray | None = None, omitted: np.ndarray | None = None
                 ) -> Aggregate:
        """Aggregates of one batch.

        ``losses`` (N,) per-sample values (any float dtype; summed as float64); ``weights``
        (N,) or None; ``ignored``/``omitted`` bool masks of samples left out.
        """
        n_ignored = n_omitted = 0
        if ignored is None and omitted is None:
            keep: np.ndarray | slice = slice(None)
        else:
            mask = np.ones(losses.shape[0], dtype=bool)
            if ignored is not None:
                mask &= ~ignored
                n_ignored = int(ignored.sum())
            if omitted is not None:
                n_omitted = int((omitted & mask).sum())
                mask &= ~omitted
            keep = mask
        kept = losses[keep]
        # tolist() gives each value exactly as a Python float (float64), whatever its dtype.
        agg = cls(weighted=weights is not None, count=int(kept.shape[0]), ignored=n_ignored,
                  omitted=n_omitted, sum_parts=exact_parts(kept.tolist()))
        if weights is not None:
            kept = kept.astype(np.float64, copy=False)
            w = weights[keep].astype(np.float64)
            # float32 x float32 products are exact in float64; a weight of 0 on an infinite
            # loss is NaN, as IEEE says, without a warning per request.
            with np.errstate(invalid="ignore"):
                agg.weighted_parts = exact_parts((w * kept).tolist())
            agg.weight_parts = exact_parts(w.tolist())
        return agg

    def merge(self, other: Aggregate) -> Aggregate:
        """The aggregate over both batches (exact: order and split do not matter)."""
        return Aggregate(
            weighted=self.weighted and other.weighted,
            count=self.count + other.count,
            ignored=self.ignored + other.ignored,
            omitted=self.omitted + other.omitted,
            sum_parts=exact_parts(self.sum_parts + other.sum_parts),
            weighted_parts=exact_parts(self.weighted_parts + other.weighted_parts),
            weight_parts=exact_parts(self.weight_parts + other.weight_parts),
        )

    @property
    def sum(self) -> float:
        return _value(self.sum_parts)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def weighted_sum(self) -> float | None:
        return _value(self.weighted_parts) if self.weighted else None

    @property
    def weight_sum(self) -> float | None:
        return _value(self.weight_parts) if self.weighted else None

    @property
    def weighted_mean(self) -> float | None:
        if not self.weighted:
            return None
        total = _value(self.weight_parts)
        return _value(self.weighted_parts) / total if total != 0 else math.nan


# --- Exact sums by group (per-class aggregates, calibration bins) ----------------------
#
# Each finite float64 value is split into two pieces of at most 29 significant bits (its top
# 24 bits by truncation, and the exact remainder). A piece with exponent e is a multiple of
# 2**(e - 29). Pieces are summed per (group, bucket), a bucket spanning _OCTAVES binades:
# n pieces of one bucket sum to a multiple of 2**(E - 29) below n * 2**(E + _OCTAVES), which
# float64 holds exactly while n <= 2**(24 - _OCTAVES). Bucket counts are kept at or below
# _MAX_PIECES (half that), so two states merge exactly; a bucket that would pass it is split
# into pieces again. The total of a group is math.fsum of its few bucket sums: correctly
# rounded, so equal to Aggregate's sum of the same values, whatever the order or split.

_OCTAVES = 4
_MAX_PIECES = 1 << (24 - _OCTAVES - 1)
_BUCKET_BITS = 10  # (exponent + 1100) >> 2 is below 2**10 for every float64 exponent
_HI_MASK = np.uint64(0xFFFF_FFFF_E000_0000)  # sign, exponent and the top 23 fraction bits


def _pieces(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, pieces) of finite float64 ``values``: each value as two exact pieces."""
    hi = (values.view(np.uint64) & _HI_MASK).view(np.float64)
    lo = values - hi  # exact: the truncated low bits
    pieces = np.concatenate([hi, lo])
    g = np.concatenate([groups, groups])
    nonzero = pieces != 0
    pieces, g = pieces[nonzero], g[nonzero]
    exponent = np.frexp(pieces)[1].astype(np.int64)
    keys = (g << _BUCKET_BITS) | ((exponent + 1100) >> 2)
    return keys, pieces


def _reduce(keys: np.ndarray, sums: np.ndarray, counts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries with equal keys summed (exact while each key's count stays in bound)."""
    if keys.shape[0] == 0:
        return keys, sums, counts
    unique, inverse = np.unique(keys, return_inverse=True)
    return (unique, np.bincount(inverse, weights=sums, minlength=unique.shape[0]),
            np.bincount(inverse, weights=counts, minlength=unique.shape[0]).astype(np.int64))


@dataclass(frozen=True)
class GroupedSums:
    """Exact sums of float64 values by integer group (>= 0); mergeable, split-independent.

    ``total`` of a group is the exact sum of its values rounded once, as ``Aggregate``
    rounds its sums; non-finite values make a group's total inf or NaN as they would there.
    Memory: a few entries per group and binade range, never more than the values added.

    >>> s = GroupedSums.of(np.array([0, 1, 0]), np.array([1e16, 3.0, 1.0]))
    >>> s.merge(GroupedSums.of(np.array([0]), np.array([-1e16]))).totals()
    {0: 1.0, 1: 3.0}
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # group -> (has NaN, has +inf, has -inf)
    nonfinite: dict[int, tuple[bool, bool, bool]] = field(default_factory=dict)

    @classmethod
    def of(cls, groups: np.ndarray, values: np.ndarray) -> GroupedSums:
        """The sums of ``values`` (any float dtype, summed as float64) by ``groups``."""
        groups = np.asarray(groups, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        nonfinite: dict[int, tuple[bool, bool, bool]] = {}
        if not finite.all():
            for g, v in zip(groups[~finite].tolist(), values[~finite].tolist(), strict=True):
                nan, pos, neg = nonfinite.get(g, (False, False, False))
                nonfinite[g] = (nan or math.isnan(v), pos or v == math.inf, neg or v == -math.inf)
            groups, values = groups[finite], values[finite]
        keys, pieces = _pieces(groups, values)
        out = cls(nonfinite=nonfinite)
        # A chunk holds at most _MAX_PIECES pieces, so no key of it passes the bound.
        for start in range(0, keys.shape[0], _MAX_PIECES):
            stop = start + _MAX_PIECES
            chunk = cls(*_reduce(keys[start:stop], pieces[start:stop],
                                 np.ones(min(stop, keys.shape[0]) - start, np.int64)))
            out = out.merge(chunk)
        return out

    def merge(self, other: GroupedSums) -> GroupedSums:
        """The sums over both (exact: order and split do not matter)."""
        nonfinite = dict(self.nonfinite)
        for g, flags in other.nonfinite.items():
            mine = nonfinite.get(g, (False, False, False))
            nonfinite[g] = (mine[0] or flags[0], mine[1] or flags[1], mine[2] or flags[2])
        if other.keys.shape[0] == 0 or self.keys.shape[0] == 0:
            base = other if self.keys.shape[0] == 0 else self
            return GroupedSums(base.keys, base.sums, base.counts, nonfinite)
        keys, sums, counts = _reduce(np.concatenate([self.keys, other.keys]),
                                     np.concatenate([self.sums, other.sums]),
                                     np.concatenate([self.counts, other.counts]))
        while (full := counts > _MAX_PIECES).any():
            # Each full bucket's exact sum becomes two pieces again, with a count of one.
            new_keys, new_pieces = _pieces(keys[full] >> _BUCKET_BITS, sums[full])
            keys, sums, counts = _reduce(
                np.concatenate([keys[~full], new_keys]), np.concatenate([sums[~full], new_pieces]),
                np.concatenate([counts[~full], np.ones(new_keys.shape[0], np.int64)]))
        return GroupedSums(keys, sums, counts, nonfinite)

    def totals(self) -> dict[int, float]:
        """Group -> its exact sum rounded once (groups that received only zeros: absent,
        their total is 0.0)."""
        out: dict[int, float] = {}
        if self.keys.shape[0]:
            groups = self.keys >> _BUCKET_BITS
            starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]).tolist()
            ends = [*starts[1:], groups.shape[0]]
            values = self.sums.tolist()
            for g, a, b in zip(groups[starts].tolist(), starts, ends, strict=True):
                part = values[a:b]
                try:
                    out[g] = math.fsum(part)
                except OverflowError:
                    out[g] = float(np.sum(np.asarray(part)))
        for g, (nan, pos, neg) in self.nonfinite.items():
            out[g] = math.nan if nan or (pos and neg) else (math.inf if pos else -math.inf)
        return out


# --- analyses -------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """The analyses a request asks for (all off by default)."""

    per_class: bool = False
    accuracy: bool = False
    top_k: tuple[int, ...] = ()
    diagnostics: bool = False
    hardest: int = 0
    quantiles: tuple[float, ...] = ()

    @property
    def classes(self) -> bool:
        """Whether any analysis needs class-index targets."""
        return self.per_class or self.accuracy or bool(self.top_k) or self.diagnostics

    @property
    def predictions(self) -> bool:
        """Whether the device must rank the classes (predicted class, hits)."""
        return self.accuracy or bool(self.top_k) or self.diagnostics

    @property
    def any(self) -> bool:
        return self.classes or self.hardest != 0 or bool(self.quantiles)


NONE = Request()


def _spread(a: np.ndarray, own: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Columns of ``a`` (one per class of the sorted ``own``) placed at those classes among
    the sorted ``classes`` (a superset), zeros elsewhere."""
    out = np.zeros(a.shape[:-1] + classes.shape, np.int64)
    out[..., np.searchsorted(classes, own)] = a
    return out


@dataclass(frozen=True)
class ClassStats:
    """Per class present (``classes``: the sorted class indices with a counted position):
    counts, exact loss sums and, with the class ranking, hits, each aligned to ``classes``.

    Sparse on purpose: memory O(classes present), whatever class count C the predictions
    declare (one sample with C = 8M keeps one class, not 8M counters per top-k).
    """

    classes: np.ndarray
    count: np.ndarray
    sums: GroupedSums
    weighted: GroupedSums | None
    weights: GroupedSums | None
    hits: np.ndarray | None  # top-1 hits
    top_k_hits: np.ndarray | None  # (len(top_k), classes present)

    def merge(self, other: ClassStats) -> ClassStats:
        classes = np.union1d(self.classes, other.classes)

        def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            total: np.ndarray = (_spread(a, self.classes, classes)
                                 + _spread(b, other.classes, classes))
            return total
        return ClassStats(
            classes=classes, count=add(self.count, other.count),
            sums=self.sums.merge(other.sums),
            weighted=_merge_opt(self.weighted, other.weighted),
            weights=_merge_opt(self.weights, other.weights),
            hits=None if self.hits is None or other.hits is None else add(self.hits, other.hits),
            top_k_hits=(None if self.top_k_hits is None or other.top_k_hits is None
                        else add(self.top_k_hits, other.top_k_hits)))

    def table(self, top_k: tuple[int, ...] = ()) -> PerClass:
        """The classes present (count > 0) with their aggregates (the client's type)."""
        classes, count = self.classes, self.count
        sums = _gather(self.sums, classes)
        out = PerClass(classes=classes, count=count, sum=sums, mean=sums / count, top_k=top_k)
        if self.weighted is not None and self.weights is not None:
            ws, wt = _gather(self.weighted, classes), _gather(self.weights, classes)
            with np.errstate(divide="ignore", invalid="ignore"):
                out = replace(out, weighted_sum=ws, weight_sum=wt,
                              weighted_mean=np.where(wt != 0, ws / np.where(wt != 0, wt, 1),
                                                     math.nan))
        if self.hits is not None:
            out = replace(out, correct=self.hits, accuracy=self.hits / count)
        if self.top_k_hits is not None:
            out = replace(out, top_k_correct=self.top_k_hits,
                          top_k_accuracy=self.top_k_hits / count)
        return out


def _merge_opt(a: GroupedSums | None, b: GroupedSums | None) -> GroupedSums | None:
    return None if a is None or b is None else a.merge(b)


def _gather(s: GroupedSums, classes: np.ndarray) -> np.ndarray:
    totals = s.totals()
    return np.array([totals.get(c, 0.0) for c in classes.tolist()], dtype=np.float64)


@dataclass(frozen=True)
class Accuracy:
    """Hits over counted samples (dense: positions): top-1 and each k of ``top_k``."""

    count: int
    hits: int
    top_k: tuple[int, ...]
    top_k_hits: tuple[int, ...]

    def merge(self, other: Accuracy) -> Accuracy:
        return Accuracy(self.count + other.count, self.hits + other.hits, self.top_k,
                        tuple(a + b for a, b in zip(self.top_k_hits, other.top_k_hits,
                                                    strict=True)))

    @property
    def accuracy(self) -> float:
        return self.hits / self.count if self.count else math.nan

    @property
    def top_k_accuracy(self) -> tuple[float, ...]:
        return tuple(h / self.count if self.count else math.nan for h in self.top_k_hits)


@dataclass(frozen=True)
class Calibration:
    """Per confidence bin: count, top-1 hits and the exact sum of confidences."""

    count: np.ndarray
    hits: np.ndarray
    confidence_sums: GroupedSums

    def merge(self, other: Calibration) -> Calibration:
        return Calibration(self.count + other.count, self.hits + other.hits,
                           self.confidence_sums.merge(other.confidence_sums))

    def confidence_sum(self) -> np.ndarray:
        totals = self.confidence_sums.totals()
        return np.array([totals.get(b, 0.0) for b in range(CALIBRATION_BINS)])

    @property
    def ece(self) -> float:
        """sum_b |hits_b - confidence_sum_b| / n (NaN when nothing counted)."""
        n = int(self.count.sum())
        if n == 0:
            return math.nan
        gaps = np.abs(self.hits - self.confidence_sum())
        return math.fsum(gaps.tolist()) / n


def calibration_bins(confidence: np.ndarray) -> np.ndarray:
    """Bin b holds confidences in (b/15, (b+1)/15]; 0 (and below) falls in bin 0."""
    bins = np.searchsorted(BIN_EDGES, confidence.astype(np.float64), side="left") - 1
    return np.clip(bins, 0, CALIBRATION_BINS - 1)


@dataclass(frozen=True)
class Hardest:
    """The ``k`` counted samples with the largest loss (see the module doc for the order),
    as parallel arrays; ``target``/``predicted``/``confidence`` are None where unknown,
    ``sample_id`` where the caller sent no ids."""

    k: int
    index: np.ndarray
    loss: np.ndarray
    target: np.ndarray | None = None
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    sample_id: np.ndarray | None = None

    def shifted(self, offset: int) -> Hardest:
        return replace(self, index=self.index + offset) if offset else self

    def merge(self, other: Hardest) -> Hardest:
        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])
        return top(self.k, np.concatenate([self.index, other.index]),
                    np.concatenate([self.loss, other.loss]), cat(self.target, other.target),
                    cat(self.predicted, other.predicted),
                    cat(self.confidence, other.confidence),
                    cat(self.sample_id, other.sample_id))


def top(k: int, index: np.ndarray, loss: np.ndarray, target: np.ndarray | None,
         predicted: np.ndarray | None, confidence: np.ndarray | None,
         sample_id: np.ndarray | None = None) -> Hardest:
    """The k largest (NaN first, then descending loss, then ascending index)."""
    order = _top_order(k, index, loss)

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[order]
    return Hardest(k, index[order], loss[order], pick(target), pick(predicted),
                   pick(confidence), pick(sample_id))


def _top_order(k: int, index: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Positions of the k largest of ``loss``, in rank order: NaN first, then descending
    loss, then ascending ``index``."""
    n = loss.shape[0]
    if n > k:
        score = np.where(np.isnan(loss), np.inf, loss)
        threshold = np.partition(score, n - k)[n - k]
        candidates = np.flatnonzero(score >= threshold)  # ties at the threshold included
    else:
        candidates = np.arange(n)
    c_loss = loss[candidates]
    nan = np.isnan(c_loss)
    return candidates[np.lexsort((index[candidates], -np.where(nan, 0.0, c_loss), ~nan))][:k]


@dataclass(frozen=True)
class HardestBatches:
    """The ``k`` completed batches of a stream with the largest mean loss, as parallel
    arrays in rank order: the caller's ``batch_id`` (``id_given``; else the ordinal), the
    ``ordinal`` in the stream, the batch's first sample position in the stream (``start``)
    and its size (``samples``), the samples that count (``count``) and their mean loss.
    Memory K whatever the stream's length: :meth:`add` and :meth:`merge` keep the top K."""

    k: int
    batch_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ordinal: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    start: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    samples: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    count: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    mean: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    id_given: np.ndarray = field(default_factory=lambda: np.empty(0, np.bool_))

    def _arrays(self) -> list[np.ndarray]:
        return [self.batch_id, self.ordinal, self.start, self.samples, self.count, self.mean,
                self.id_given]

    def _ranked(self, arrays: list[np.ndarray]) -> HardestBatches:
        order = _top_order(self.k, arrays[1], arrays[5])
        return HardestBatches(self.k, *(a[order] for a in arrays))

    def add(self, batch_id: int | None, ordinal: int, start: int, samples: int, count: int,
            mean: float) -> HardestBatches:
        """These batches and one more (not ranked when none of its samples count);
        ``batch_id`` None: the batch is known by its ordinal."""
        if not count:
            return self
        row = [ordinal if batch_id is None else batch_id, ordinal, start, samples, count,
               mean, batch_id is not None]
        return self._ranked([np.concatenate([a, np.array([v], a.dtype)])
                             for a, v in zip(self._arrays(), row, strict=True)])

    def merge(self, later: HardestBatches, *, batches: int, samples: int) -> HardestBatches:
        """These batches followed by ``later``'s, whose ordinals and positions start after
        this part's ``batches`` and ``samples`` (an unnamed batch's id is its ordinal)."""
        shifted = replace(later, ordinal=later.ordinal + batches,
                          start=later.start + samples,
                          batch_id=np.where(later.id_given, later.batch_id,
                                            later.batch_id + batches))
        return self._ranked([np.concatenate([a, b]) for a, b in
                             zip(self._arrays(), shifted._arrays(), strict=True)])

    def in_hardest(self, hardest: Hardest) -> np.ndarray:
        """Per kept batch, how many of ``hardest``'s samples (stream positions) it holds."""
        index = np.sort(hardest.index)
        ends = np.searchsorted(index, self.start + self.samples, side="left")
        starts = np.searchsorted(index, self.start, side="left")
        counts: np.ndarray = (ends - starts).astype(np.int64)
        return counts


@dataclass(frozen=True)
class LossSketch:
    """Counts of loss values in log-linear buckets: 128 per binade, each [L, U) with
    U - L <= L / 128, so a bucket's midpoint is within ``RELATIVE_ACCURACY`` (2**-8) of any
    value in it. Keys are signed (their order is the values' order; 0 holds zeros and
    magnitudes below 2**-1022); NaN is counted apart. At most ``SKETCH_BUCKETS`` buckets: past
    that, the lowest buckets merge into the lowest kept one (``collapsed``), and quantiles
    that fall there lose the bound. The state depends only on the multiset of values.
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nan_count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    collapsed: bool = False

    @classmethod
    def of(cls, values: np.ndarray) -> LossSketch:
        v = np.asarray(values, dtype=np.float64)
        nan = np.isnan(v)
        n_nan = int(nan.sum())
        if n_nan:
            v = v[~nan]
        if v.shape[0] == 0:
            return cls(nan_count=n_nan)
        mag = np.abs(v)
        bucket = (mag.view(np.uint64) >> _SKETCH_SHIFT).astype(np.int64) + 1
        keys = np.where(mag < _TINY, 0, np.where(v < 0, -bucket, bucket))
        unique, counts = np.unique(keys, return_counts=True)
        return cls(unique, counts.astype(np.int64), n_nan, float(v.min()),
                   float(v.max()))._bounded()

    def merge(self, other: LossSketch) -> LossSketch:
        keys = np.concatenate([self.keys, other.keys])
        counts = np.concatenate([self.counts, other.counts])
        unique, inverse = np.unique(keys, return_inverse=True)
        merged = np.bincount(inverse, weights=counts, minlength=unique.shape[0])
        return LossSketch(unique, merged.astype(np.int64), self.nan_count + other.nan_count,
                          min(self.minimum, other.minimum), max(self.maximum, other.maximum),
                          self.collapsed or other.collapsed)._bounded()

    def _bounded(self) -> LossSketch:
        extra = self.keys.shape[0] - SKETCH_BUCKETS
        if extra <= 0:
            return self
        counts = self.counts[extra:].copy()
        counts[0] += int(self.counts[:extra].sum())
        return replace(self, keys=self.keys[extra:], counts=counts, collapsed=True)

    @property
    def count(self) -> int:
        """Values in the sketch (NaN excluded)."""
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """The value of rank floor(q * (count - 1)) (numpy's ``method='lower'``), within
        ``RELATIVE_ACCURACY``; NaN when the sketch is empty. Level 0 and 1 are exact."""
        n = self.count
        if n == 0:
            return math.nan
        rank = math.floor(q * (n - 1))
        if rank <= 0:
            return self.minimum
        if rank >= n - 1:
            return self.maximum
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        return min(max(_bucket_value(int(self.keys[i])), self.minimum), self.maximum)


def _bucket_value(key: int) -> float:
    """The midpoint of a sketch bucket."""
    if key == 0:
        return 0.0
    m = abs(key) - 1
    lo = float(np.array(m << int(_SKETCH_SHIFT), np.uint64).view(np.float64))
    hi = float(np.array((m + 1) << int(_SKETCH_SHIFT), np.uint64).view(np.float64))
    mid = lo if math.isinf(lo) else lo + (hi - lo) / 2 if math.isfinite(hi) else lo
    return mid if key > 0 else -mid


# --- one batch, and merging -----------------------------------------------------------------

@dataclass(frozen=True)
class Diagnostics:
    """Per position (shaped as the targets): predicted class, confidence, top-1 hit."""

    predicted: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray


@dataclass(frozen=True)
class Analysis:
    """The analyses asked for, of one batch or a stream so far; None where not asked.

    ``samples``: samples covered (hardest indices of a merged-in analysis move by it).
    ``diagnostics``: per-position arrays of one message only (not merged).
    """

    request: Request
    samples: int
    per_class: ClassStats | None = None
    accuracy: Accuracy | None = None
    calibration: Calibration | None = None
    hardest: Hardest | None = None
    quantiles: LossSketch | None = None
    diagnostics: Diagnostics | None = None

    def merge(self, later: Analysis) -> Analysis:
        """This analysis followed by ``later`` (whose sample indices start at 0)."""
        hardest = (None if self.hardest is None or later.hardest is None
                   else self.hardest.merge(later.hardest.shifted(self.samples)))
        return Analysis(self.request, self.samples + later.samples,
                        per_class=_both(self.per_class, later.per_class),
                        accuracy=_both(self.accuracy, later.accuracy),
                        calibration=_both(self.calibration, later.calibration),
                        hardest=hardest, quantiles=_both(self.quantiles, later.quantiles))


class _Mergeable(Protocol):
    def merge(self: M, other: M) -> M: ...


M = TypeVar("M", bound=_Mergeable)


def _both(a: M | None, b: M | None) -> M | None:
    return None if a is None or b is None else a.merge(b)


# --- the figures a result shows --------------------------------------------------------

def encode_aggregate(a: Aggregate, out: pb.Aggregates) -> None:
    out.sum = a.sum
    out.mean = a.mean
    out.count = a.count
    out.ignored = a.ignored
    out.omitted = a.omitted
    weighted_sum, weighted_mean, weight_sum = a.weighted_sum, a.weighted_mean, a.weight_sum
    if weighted_sum is not None and weighted_mean is not None and weight_sum is not None:
        out.weighted_sum = weighted_sum
        out.weighted_mean = weighted_mean
        out.weight_sum = weight_sum


def encode_analysis(a: Analysis, out: pb.Analysis) -> None:
    """An analysis into its message: only the parts it holds."""
    if a.per_class is not None:
        t = a.per_class.table(a.request.top_k)
        pc = out.per_class
        pc.SetInParent()
        pc.classes.extend(t.classes.tolist())
        pc.count.extend(t.count.tolist())
        pc.sum.extend(t.sum.tolist())
        pc.mean.extend(t.mean.tolist())
        if t.weighted_sum is not None and t.weighted_mean is not None \
                and t.weight_sum is not None:
            pc.weighted_sum.extend(t.weighted_sum.tolist())
            pc.weighted_mean.extend(t.weighted_mean.tolist())
            pc.weight_sum.extend(t.weight_sum.tolist())
        if t.correct is not None and t.accuracy is not None:
            pc.correct.extend(t.correct.tolist())
            pc.accuracy.extend(t.accuracy.tolist())
        if t.top_k_correct is not None and t.top_k_accuracy is not None:
            pc.top_k_correct.extend(t.top_k_correct.reshape(-1).tolist())
            pc.top_k_accuracy.extend(t.top_k_accuracy.reshape(-1).tolist())
    if a.accuracy is not None:
        acc = a.accuracy
        out.accuracy.CopyFrom(pb.Accuracy(
            count=acc.count, correct=acc.hits, accuracy=acc.accuracy, top_k=acc.top_k,
            top_k_correct=acc.top_k_hits, top_k_accuracy=acc.top_k_accuracy))
    if a.calibration is not None:
        cal = a.calibration
        out.calibration.CopyFrom(pb.Calibration(
            edges=BIN_EDGES.tolist(), count=cal.count.tolist(),
            correct=cal.hits.tolist(), confidence_sum=cal.confidence_sum().tolist(),
            ece=cal.ece))
    if a.hardest is not None:
        h = a.hardest
        columns = [h.index.tolist(), h.loss.tolist()]
        for extra in (h.target, h.predicted, h.confidence, h.sample_id):
            columns.append(extra.tolist() if extra is not None else [None] * len(columns[0]))
        out.hardest.SetInParent()
        for index, loss, target, predicted, confidence, sample_id in zip(*columns,
                                                                         strict=True):
            out.hardest.samples.add(index=index, loss=loss, target=target,
                                    predicted=predicted, confidence=confidence,
                                    sample_id=sample_id)
    if a.quantiles is not None:
        q = a.quantiles
        levels = a.request.quantiles
        out.quantiles.CopyFrom(pb.Quantiles(
            levels=levels, values=[q.quantile(level) for level in levels], count=q.count,
            min=q.minimum if q.count else math.nan, max=q.maximum if q.count else math.nan,
            nan_count=q.nan_count, relative_accuracy=RELATIVE_ACCURACY,
            collapsed=q.collapsed))


def encode_hardest_batches(b: HardestBatches, hardest: Hardest | None,
                           out: pb.HardestBatches) -> None:
    """A stream's hardest batches into their message; with the stream's ``hardest``
    samples, how many of each batch's are among them."""
    out.SetInParent()
    in_hardest = ([None] * len(b.ordinal) if hardest is None
                  else b.in_hardest(hardest).tolist())
    for batch_id, ordinal, count, mean, hits in zip(
            b.batch_id.tolist(), b.ordinal.tolist(), b.count.tolist(), b.mean.tolist(),
            in_hardest, strict=True):
        out.batches.add(batch_id=batch_id, ordinal=ordinal, count=count, mean=mean,
                        in_hardest=hits)


# --- a result's whole state, and merging parts ----------------------------------------------

class MergeError(ValueError):
    """States that cannot merge: of different losses, options, analyses or format versions,
    or a part that carries no state. The message names the mismatch."""


@dataclass(frozen=True)
class State:
    """The exact state of one result: a batch, a stream so far, or merged parts.

    ``loss`` and ``options`` (the server's canonical text of the options sent) say what
    was computed;
    ``request`` and ``hardest_batches_k`` which analyses; ``samples`` the samples covered
    (stream positions) and ``batches`` the batches completed (stream ordinals).
    ``analysis`` is None when no analysis was asked; ``hardest_batches`` when no ranking of
    batches was.
    """

    loss: str
    options: str
    request: Request
    aggregate: Aggregate
    samples: int
    batches: int
    analysis: Analysis | None = None
    hardest_batches_k: int = 0
    hardest_batches: HardestBatches | None = None
    version: int = VERSION

    def check_mergeable(self, other: State, *, where: str = "") -> None:
        """Raise :class:`MergeError` naming what differs between the two parts."""
        suffix = f" {where}" if where else ""
        if self.version != other.version:
            raise MergeError(f"state format version {other.version} differs from "
                             f"{self.version}{suffix}")
        if self.loss != other.loss:
            raise MergeError(f"loss {other.loss!r} differs from {self.loss!r}{suffix}")
        if self.options != other.options:
            raise MergeError(f"options {_shown(other.options)} differ from "
                             f"{_shown(self.options)}{suffix}")
        for f in dataclasses.fields(Request):
            mine, theirs = getattr(self.request, f.name), getattr(other.request, f.name)
            if mine != theirs:
                raise MergeError(f"analyses differ: {f.name} is {theirs!r}, not "
                                 f"{mine!r}{suffix}")
        if self.hardest_batches_k != other.hardest_batches_k:
            raise MergeError(f"analyses differ: hardest_batches is {other.hardest_batches_k},"
                             f" not {self.hardest_batches_k}{suffix}")
        if self.aggregate.weighted != other.aggregate.weighted:
            raise MergeError(f"weights: sent with one part and not another{suffix}")

    def merge(self, later: State, *, where: str = "") -> State:
        """This part followed by ``later``: later's sample positions and batch ordinals
        start after this part's. Equal to one stream over both, bit for bit. A mismatch
        (:meth:`check_mergeable`) names ``where`` it was found."""
        self.check_mergeable(later, where=where)
        analysis = (None if self.analysis is None or later.analysis is None
                    else self.analysis.merge(replace(later.analysis, diagnostics=None)))
        batches = None
        if self.hardest_batches is not None and later.hardest_batches is not None:
            batches = self.hardest_batches.merge(later.hardest_batches,
                                                 batches=self.batches, samples=self.samples)
        return replace(self, aggregate=self.aggregate.merge(later.aggregate),
                       samples=self.samples + later.samples,
                       batches=self.batches + later.batches, analysis=analysis,
                       hardest_batches=batches)

    def aggregates(self) -> Aggregates:
        """The result's figures (the client's :class:`lossd.Aggregates`), derived exactly as
        the server derives them, and carrying this state."""
        from lossd._result import Aggregates

        agg, an = pb.Aggregates(), pb.Analysis()
        encode_aggregate(self.aggregate, agg)
        if self.analysis is not None:
            encode_analysis(self.analysis, an)
        if self.hardest_batches is not None:
            encode_hardest_batches(self.hardest_batches,
                                   None if self.analysis is None else self.analysis.hardest,
                                   an.hardest_batches)
        analysis = an if an.ListFields() else None
        return dataclasses.replace(Aggregates.from_proto(agg, analysis), state=self)


def merge_states(states: Iterable[State], labels: Sequence[str] = ()) -> State:
    """The states of consecutive parts, merged in order (:meth:`State.merge`); a mismatch
    names the part it was found in by its label (default: "part i", from 0)."""
    merged: State | None = None
    first = ""
    for i, state in enumerate(states):
        label = labels[i] if i < len(labels) else f"part {i}"
        if merged is None:
            merged, first = state, label
        else:
            merged = merged.merge(state, where=f"({label}, against {first})")
    if merged is None:
        raise MergeError("nothing to merge: no parts were given")
    return merged


NO_STATE_HINT = "evaluate with mergeable=True (evaluate_stream and evaluate_all do by default)"
"""How a result gets the state a merge needs, for the errors that find none."""


def merge(parts: Iterable[LossResult | Aggregates]) -> Aggregates:
    """One result from the results of disjoint parts of one data set, in order: equal to
    the result of one stream over all their batches in that order (sums and means bit for
    bit; per class, accuracy, top-k, calibration, quantiles; hardest samples by loss, their
    indices stream positions of the whole; hardest batches). A :class:`lossd.LossResult`
    counts with its ``running`` aggregates (a stream's), else its ``aggregates``.

    Each part needs its exact state (evaluate with ``mergeable=True``; streams and
    ``evaluate_all`` keep it by default, saved results have it). Parts of different losses,
    options, analyses or state formats raise :class:`MergeError` naming the difference.

    Example (three shards saved by ``lossd eval --save`` or ``result.save``)::

        whole = lossd.merge(lossd.load_result(p) for p in ["s0.lossd", "s1.lossd", "s2.lossd"])
        whole.mean, whole.per_class.to_pandas()
    """
    from lossd._result import LossResult

    wholes = [p.whole if isinstance(p, LossResult) else p for p in parts]
    return merge_labelled([(f"part {i}", a) for i, a in enumerate(wholes)])


def merge_labelled(parts: Sequence[tuple[str, Aggregates]]) -> Aggregates:
    """:func:`merge` of ``(label, aggregates)`` pairs, each error naming its part by its
    label ("part 2", "rank 1")."""
    from lossd._result import Aggregates, class_names_in

    states = []
    for label, a in parts:
        if not isinstance(a, Aggregates):
            raise TypeError(f"merge: {label} is a {type(a).__name__}, not a LossResult or "
                            "Aggregates")
        if a.state is None:
            raise MergeError(f"{label} carries no mergeable state: {NO_STATE_HINT}")
        states.append(a.state)
    merged = merge_states(states, [label for label, _ in parts]).aggregates()
    names = {n for n in (class_names_in(a) for _, a in parts) if n is not None}
    if len(names) > 1:
        raise MergeError("class_names differ between "
                         f"{', '.join(label for label, _ in parts)}")
    return merged.with_class_names(names.pop()) if names else merged


def load_result(path: str | os.PathLike[str]) -> Aggregates:
    """A result saved by ``result.save(path)`` or ``lossd eval --save`` (the format:
    :meth:`lossd.Aggregates.to_bytes`). Raises :class:`MergeError` for a file that is not
    one, or of another format version."""
    from lossd._result import Aggregates

    try:
        return Aggregates.from_bytes(Path(path).read_bytes())
    except MergeError as exc:
        raise MergeError(f"{path}: {exc}") from None


def _shown(options: str) -> str:
    return "{" + ", ".join(options.splitlines()) + "}" if options else "{} (none)"


# --- on the wire: lossd.v1.MergeState ------------------------------------------------------

_NAN, _POS, _NEG = 1, 2, 4


def _sums_to_proto(s: GroupedSums, out: pb.GroupedSumsState) -> None:
    out.SetInParent()
    out.keys.extend(s.keys.tolist())
    out.sums.extend(s.sums.tolist())
    out.counts.extend(s.counts.tolist())
    for g, (nan, pos, neg) in sorted(s.nonfinite.items()):
        out.nonfinite_groups.append(g)
        out.nonfinite_flags.append(_NAN * nan | _POS * pos | _NEG * neg)


def _sums_from_proto(p: pb.GroupedSumsState) -> GroupedSums:
    nonfinite = {g: (bool(f & _NAN), bool(f & _POS), bool(f & _NEG))
                 for g, f in zip(p.nonfinite_groups, p.nonfinite_flags, strict=True)}
    return GroupedSums(np.array(p.keys, np.int64), np.array(p.sums, np.float64),
                       np.array(p.counts, np.int64), nonfinite)


def to_proto(state: State, out: pb.MergeState | None = None) -> pb.MergeState:
    """The state as its message (``out``, or a new one)."""
    m = pb.MergeState() if out is None else out
    r = state.request
    m.version, m.loss, m.options = state.version, state.loss, state.options
    m.analyses.CopyFrom(pb.AnalysisRequest(
        per_class=r.per_class, accuracy=r.accuracy, top_k=r.top_k, diagnostics=r.diagnostics,
        hardest=r.hardest, quantiles=r.quantiles, hardest_batches=state.hardest_batches_k))
    m.samples, m.batches = state.samples, state.batches
    a = state.aggregate
    m.aggregate.CopyFrom(pb.ExactAggregate(
        weighted=a.weighted, count=a.count, ignored=a.ignored, omitted=a.omitted,
        sum_parts=a.sum_parts, weighted_parts=a.weighted_parts, weight_parts=a.weight_parts))
    an = state.analysis
    if an is not None and an.per_class is not None:
        c = an.per_class
        pc = m.per_class
        pc.classes.extend(c.classes.tolist())
        pc.count.extend(c.count.tolist())
        _sums_to_proto(c.sums, pc.sums)
        if c.weighted is not None and c.weights is not None:
            _sums_to_proto(c.weighted, pc.weighted)
            _sums_to_proto(c.weights, pc.weights)
        if c.hits is not None:
            pc.has_hits = True
            pc.hits.extend(c.hits.tolist())
        if c.top_k_hits is not None:
            pc.top_k_hits.extend(c.top_k_hits.reshape(-1).tolist())
    if an is not None and an.accuracy is not None:
        m.accuracy.CopyFrom(pb.AccuracyState(count=an.accuracy.count, hits=an.accuracy.hits,
                                             top_k_hits=an.accuracy.top_k_hits))
    if an is not None and an.calibration is not None:
        cal = an.calibration
        m.calibration.count.extend(cal.count.tolist())
        m.calibration.hits.extend(cal.hits.tolist())
        _sums_to_proto(cal.confidence_sums, m.calibration.confidence_sums)
    if an is not None and an.hardest is not None:
        h = an.hardest
        hs = m.hardest
        hs.k = h.k
        hs.index.extend(h.index.tolist())
        hs.loss.extend(h.loss.tolist())
        for name in ("target", "predicted", "confidence", "sample_id"):
            column = getattr(h, name)
            if column is not None:
                setattr(hs, f"has_{name}", True)
                getattr(hs, name).extend(column.tolist())
    if an is not None and an.quantiles is not None:
        q = an.quantiles
        m.quantiles.CopyFrom(pb.SketchState(keys=q.keys.tolist(), counts=q.counts.tolist(),
                                            nan_count=q.nan_count, min=q.minimum, max=q.maximum,
                                            collapsed=q.collapsed))
    if state.hardest_batches is not None:
        b = state.hardest_batches
        m.hardest_batches.CopyFrom(pb.HardestBatchesState(
            k=b.k, batch_id=b.batch_id.tolist(), id_given=b.id_given.tolist(),
            ordinal=b.ordinal.tolist(), start=b.start.tolist(), samples=b.samples.tolist(),
            count=b.count.tolist(), mean=b.mean.tolist()))
    return m


def from_proto(m: pb.MergeState) -> State:
    """The state a message holds. Raises :class:`MergeError` for another format version or
    a state that does not hold what its request asked for."""
    if m.version != VERSION:
        raise MergeError(f"state format version {m.version} is not {VERSION}, the one this "
                         "lossd reads")
    ar = m.analyses
    request = Request(per_class=ar.per_class, accuracy=ar.accuracy, top_k=tuple(ar.top_k),
                      diagnostics=ar.diagnostics, hardest=ar.hardest,
                      quantiles=tuple(ar.quantiles))
    ag = m.aggregate
    aggregate = Aggregate(weighted=ag.weighted, count=ag.count, ignored=ag.ignored,
                          omitted=ag.omitted, sum_parts=list(ag.sum_parts),
                          weighted_parts=list(ag.weighted_parts),
                          weight_parts=list(ag.weight_parts))

    def need(present: bool, what: str) -> None:
        if not present:
            raise MergeError(f"state: {what} was asked for but is missing")
    analysis = None
    if request.any:
        analysis = Analysis(request, m.samples)
        if request.per_class:
            need(m.HasField("per_class"), "per_class")
            pc = m.per_class
            classes = np.array(pc.classes, np.int64)
            weighted = weights = None
            if pc.HasField("weighted"):
                weighted, weights = _sums_from_proto(pc.weighted), _sums_from_proto(pc.weights)
            top = (np.array(pc.top_k_hits, np.int64).reshape(len(request.top_k), -1)
                   if request.top_k and pc.has_hits else None)
            analysis = replace(analysis, per_class=ClassStats(
                classes, np.array(pc.count, np.int64), _sums_from_proto(pc.sums), weighted,
                weights, np.array(pc.hits, np.int64) if pc.has_hits else None, top))
        if request.predictions:
            need(m.HasField("accuracy"), "accuracy")
            analysis = replace(analysis, accuracy=Accuracy(
                m.accuracy.count, m.accuracy.hits, request.top_k, tuple(m.accuracy.top_k_hits)))
        if request.diagnostics:
            need(m.HasField("calibration"), "calibration")
            cal = m.calibration
            analysis = replace(analysis, calibration=Calibration(
                np.array(cal.count, np.int64), np.array(cal.hits, np.int64),
                _sums_from_proto(cal.confidence_sums)))
        if request.hardest:
            need(m.HasField("hardest"), "hardest")
            h = m.hardest

            def column(name: str, dtype: type) -> np.ndarray | None:
                return (np.array(getattr(h, name), dtype) if getattr(h, f"has_{name}")
                        else None)
            analysis = replace(analysis, hardest=Hardest(
                h.k, np.array(h.index, np.int64), np.array(h.loss, np.float64),
                column("target", np.int64), column("predicted", np.int64),
                column("confidence", np.float64), column("sample_id", np.int64)))
        if request.quantiles:
            need(m.HasField("quantiles"), "quantiles")
            q = m.quantiles
            analysis = replace(analysis, quantiles=LossSketch(
                np.array(q.keys, np.int64), np.array(q.counts, np.int64), q.nan_count, q.min,
                q.max, q.collapsed))
    batches = None
    if ar.hardest_batches:
        need(m.HasField("hardest_batches"), "hardest_batches")
        b = m.hardest_batches
        batches = HardestBatches(
            b.k, np.array(b.batch_id, np.int64), np.array(b.ordinal, np.int64),
            np.array(b.start, np.int64), np.array(b.samples, np.int64),
            np.array(b.count, np.int64), np.array(b.mean, np.float64),
            np.array(b.id_given, np.bool_))
    return State(loss=m.loss, options=m.options, request=request, aggregate=aggregate,
                 samples=m.samples, batches=m.batches, analysis=analysis,
                 hardest_batches_k=ar.hardest_batches, hardest_batches=batches,
                 version=m.version)
