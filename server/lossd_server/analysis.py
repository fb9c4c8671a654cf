"""What per-sample losses are for: per-class breakdown, accuracy, calibration, the hardest
samples and loss quantiles, over one batch or a whole stream. No gRPC here.

Every analysis is a state that merges: the analysis of a stream is the merge of its
batches' analyses, and equals (bit for bit) the analysis of the concatenated batches, however
the stream was split. The device part (:func:`class_outputs`: predicted class, confidence,
top-k hits) runs next to the loss; the rest is host arithmetic on the per-sample results.

Which samples count: those the aggregates count (not all-ignored, not omitted by
``nan_policy='omit'``). Class analyses need class-index targets. For dense inputs
(predictions (N, C, d1, ...), targets (N, d1, ...)) they count **positions**: every valid
position (target not ``ignore_index``) of a counted sample, with the element-wise loss at
that position and its sample's weight.

Definitions:

* predicted class: the first index of the largest logit (``torch.argmax``; NaN counts as
  the largest). confidence: ``softmax`` over the class dimension at the predicted class.
* top-k hit: fewer than k classes rank ahead of the target class, where class j ranks ahead
  of t when its logit is larger, or equal with j < t, or NaN (a stable descending sort).
  Top-1 hit = predicted class is the target. A NaN target logit is never a hit.
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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import numpy as np
import torch

from lossd import PerClass
from lossd_server.reduce import GroupedSums

Tensor = torch.Tensor

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


# --- the device part -----------------------------------------------------------------------

@dataclass(frozen=True)
class ClassOutputs:
    """Per position (shaped as the targets): predicted class, its confidence (or None),
    top-1 hit and the hits for each k of ``Request.top_k`` (in that order)."""

    predicted: Tensor
    confidence: Tensor | None
    hit: Tensor
    top_k_hits: tuple[Tensor, ...]


def class_outputs(predictions: Tensor, targets: Tensor, valid: Tensor | None,
                  request: Request) -> ClassOutputs:
    """Predicted classes, confidences and top-k hits of (N, C, d1, ...) ``predictions``
    against (N, d1, ...) int64 ``targets``; ``valid`` masks ignored positions (no hit there).
    """
    predicted = _argmax(predictions)
    safe = targets if valid is None else torch.where(valid, targets, 0)
    target_logit = predictions.gather(1, safe.unsqueeze(1))
    hit = (predicted == safe) & ~torch.isnan(target_logit.squeeze(1))
    if valid is not None:
        hit &= valid
    confidence = None
    if request.diagnostics:
        confidence = _confidence(predictions, predicted)
    hits = []
    if request.top_k:
        hits = _top_k_hits(predictions, safe, target_logit, request.top_k)
        if valid is not None:
            hits = [h & valid for h in hits]
    return ClassOutputs(predicted, confidence, hit, tuple(hits))


def _confidence(x: Tensor, predicted: Tensor) -> Tensor:
    """softmax over the class dimension at the predicted class.

    On CUDA a dense (N, C, d1, ...) softmax over dim 1 is a strided reduction; with the
    classes moved last it streams (as ``losses._classes_last`` does for the losses).
    """
    if x.is_cuda and x.dim() > 2:
        rows = torch.softmax(x.movedim(1, -1), dim=-1)
        return rows.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
    return torch.softmax(x, dim=1).gather(1, predicted.unsqueeze(1)).squeeze(1)


def _argmax(x: Tensor) -> Tensor:
    """``torch.argmax(x, dim=1)``: the first index of the largest value, NaN the largest.

    On CPU numpy's argmax gives the same indices in a quarter of the time (it is
    vectorised; torch's is not, 3 vs 12 ms for 8192 x 1000 float32 on the 2-core VM).
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argmax(x.numpy(), axis=1))
    return torch.argmax(x, dim=1)


_BLOCK_ELEMENTS = 1 << 20
"""The ranking works on at most about this many logits at a time (columns for the k
largest, rows for exact ties): its temporaries stay a few MiB whatever C is declared.
torch's CPU topk alone takes 16 bytes per logit it sees, 8x a row of float16."""


def _top_values(x: Tensor, k: int) -> Tensor:
    """``torch.topk(x, k, dim=1).values`` (NaN first, then descending): of each block of
    columns first, then of those candidates; the same values, since the k largest of a row
    are among the k largest of its blocks."""
    c = x.shape[1]
    width = max(k, _BLOCK_ELEMENTS // max(1, x[:, :1].numel()))
    if c <= width:
        return torch.topk(x, k, dim=1, largest=True, sorted=True).values
    tops = [torch.topk(x[:, i:i + width], min(k, c - i), dim=1, largest=True,
                       sorted=True).values for i in range(0, c, width)]
    return torch.topk(torch.cat(tops, dim=1), k, dim=1, largest=True, sorted=True).values


def _ranked_ahead(x: Tensor, t: Tensor, xt: Tensor, rows: tuple[Tensor, ...]) -> Tensor:
    """For the positions ``rows``: how many classes rank ahead of the target (a larger
    logit, an equal one of a smaller index, or NaN), a block of rows at a time."""
    c = x.shape[1]
    by_class = x.movedim(1, -1)
    step = max(1, _BLOCK_ELEMENTS // max(1, c))
    counts = []
    for start in range(0, rows[0].shape[0], step):
        if step == 1:  # a wide row: viewed, not copied, and no (C,) index tensor
            at = tuple(int(r[start]) for r in rows)
            row, target, logit = by_class[at], int(t[at]), xt[at]
            # (a NaN logit is never larger, and a tied target logit is not NaN)
            n = ((row > logit).count_nonzero() + torch.isnan(row).count_nonzero()
                 + (row[:target] == logit).count_nonzero())
            counts.append(n.reshape(1))
            continue
        block = tuple(r[start:start + step] for r in rows)
        xr = by_class[block]  # (B, C)
        xtr = xt[block].unsqueeze(1)
        j = torch.arange(c, device=x.device)
        counts.append(((xr > xtr) | torch.isnan(xr)
                       | ((xr == xtr) & (j < t[block].unsqueeze(1)))).count_nonzero(dim=1))
    return torch.cat(counts)


def _top_k_hits(x: Tensor, t: Tensor, xt: Tensor, ks: Sequence[int]) -> list[Tensor]:
    """For each k: fewer than k classes rank ahead of the target (see the module doc).

    The k-th largest logit decides every position but those where it equals the target's
    logit; those few are ranked exactly, once for every k.
    """
    top = _top_values(x, max(ks))  # NaN sorts first
    xt_ = xt.squeeze(1)
    kths = [top.select(1, k - 1) for k in ks]
    ties = [xt_ == kth for kth in kths]
    tied = ties[0].clone()
    for tie in ties[1:]:
        tied |= tie
    rows: tuple[Tensor, ...] | None = None
    ahead = None
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        ahead = _ranked_ahead(x, t, xt_, rows)
    out = []
    for k, kth, tie in zip(ks, kths, ties, strict=True):
        hit = xt_ > kth
        if rows is not None and ahead is not None:
            hit[rows] = torch.where(tie[rows], ahead < k, hit[rows])
        out.append(hit)
    return out


# --- host states -----------------------------------------------------------------------------

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
        return _top(self.k, np.concatenate([self.index, other.index]),
                    np.concatenate([self.loss, other.loss]), cat(self.target, other.target),
                    cat(self.predicted, other.predicted),
                    cat(self.confidence, other.confidence),
                    cat(self.sample_id, other.sample_id))


def _top(k: int, index: np.ndarray, loss: np.ndarray, target: np.ndarray | None,
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
    arrays in rank order: the caller's ``batch_id``, the ``ordinal`` in the stream, the
    batch's first sample position in the stream (``start``) and its size (``samples``), the
    samples that count (``count``) and their mean loss. Memory K whatever the stream's
    length: :meth:`add` keeps the top K only."""

    k: int
    batch_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ordinal: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    start: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    samples: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    count: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    mean: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))

    def add(self, batch_id: int, ordinal: int, start: int, samples: int, count: int,
            mean: float) -> HardestBatches:
        """These batches and one more (not ranked when none of its samples count)."""
        if not count:
            return self

        def cat(a: np.ndarray, value: float) -> np.ndarray:
            return np.concatenate([a, np.array([value], a.dtype)])
        arrays = [cat(self.batch_id, batch_id), cat(self.ordinal, ordinal),
                  cat(self.start, start), cat(self.samples, samples), cat(self.count, count),
                  cat(self.mean, mean)]
        order = _top_order(self.k, arrays[1], arrays[5])
        return HardestBatches(self.k, *(a[order] for a in arrays))

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


@dataclass(frozen=True)
class BatchData:
    """Host arrays of one evaluated batch that the analyses read.

    ``losses`` (N,) per-sample values; ``keep`` (N,) samples that count; ``targets`` as sent
    (class indices, or None); ``valid`` positions whose target is not ignored (dense or
    (N,), None: all); ``elementwise`` the loss at each position (dense per-class only);
    ``weights`` (N,) float64 or None; ``outputs``: :class:`ClassOutputs` on the host.
    """

    losses: np.ndarray
    keep: np.ndarray
    targets: np.ndarray | None
    valid: np.ndarray | None
    elementwise: np.ndarray | None
    weights: np.ndarray | None
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    hit: np.ndarray | None = None
    top_k_hits: tuple[np.ndarray, ...] = ()
    sample_ids: np.ndarray | None = None
    """(N,) int64 caller ids of the samples, or None."""


def analyse(request: Request, d: BatchData) -> Analysis:
    """The analyses ``request`` asks for, of one batch (sample indices from 0)."""
    n = d.losses.shape[0]
    out = Analysis(request, n)
    positions = None  # counted positions, shaped as the targets
    if request.classes:
        assert d.targets is not None
        keep = d.keep.reshape((n,) + (1,) * (d.targets.ndim - 1))
        positions = np.broadcast_to(keep, d.targets.shape)
        if d.valid is not None:
            positions = positions & d.valid
    if request.per_class:
        assert d.targets is not None and positions is not None
        out = replace(out, per_class=_class_stats(request, d, positions))
    if request.predictions:
        assert positions is not None and d.hit is not None
        counted = int(positions.sum())
        out = replace(out, accuracy=Accuracy(
            counted, int(d.hit[positions].sum()), request.top_k,
            tuple(int(h[positions].sum()) for h in d.top_k_hits)))
    if request.diagnostics:
        assert positions is not None and d.confidence is not None and d.predicted is not None
        conf = d.confidence[positions]
        bins = calibration_bins(conf)
        hit = d.hit[positions] if d.hit is not None else np.zeros(conf.shape, bool)
        out = replace(out, calibration=Calibration(
            np.bincount(bins, minlength=CALIBRATION_BINS).astype(np.int64),
            np.bincount(bins, weights=hit, minlength=CALIBRATION_BINS).astype(np.int64),
            GroupedSums.of(bins, conf)),
            diagnostics=Diagnostics(d.predicted, d.confidence, d.hit if d.hit is not None
                                    else np.zeros(d.predicted.shape, bool)))
    if request.hardest:
        index = np.flatnonzero(d.keep)
        one_d = d.targets is not None and d.targets.ndim == 1

        def at(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or not one_d else a[index]
        out = replace(out, hardest=_top(
            request.hardest, index, d.losses[index].astype(np.float64),
            at(None if d.targets is None else d.targets.astype(np.int64)),
            at(d.predicted), at(d.confidence),
            None if d.sample_ids is None else d.sample_ids[index]))
    if request.quantiles:
        out = replace(out, quantiles=LossSketch.of(d.losses[d.keep]))
    return out


def _class_stats(request: Request, d: BatchData, positions: np.ndarray) -> ClassStats:
    assert d.targets is not None
    # Counted by the classes present, not by the declared C (see ClassStats).
    classes, inverse = np.unique(d.targets[positions].astype(np.int64), return_inverse=True)
    inverse = inverse.reshape(-1)
    present = classes.shape[0]
    dense = d.targets.ndim > 1
    values = (d.elementwise if dense else d.losses)
    assert values is not None
    values = values[positions].astype(np.float64)
    count = np.bincount(inverse, minlength=present).astype(np.int64)
    by_class = classes[inverse]
    weighted = weights = None
    if d.weights is not None:
        per_sample = d.weights.reshape((d.weights.shape[0],) + (1,) * (d.targets.ndim - 1))
        w = np.broadcast_to(per_sample, d.targets.shape)[positions].astype(np.float64)
        weighted, weights = GroupedSums.of(by_class, w * values), GroupedSums.of(by_class, w)
    hits = top = None
    if d.hit is not None and request.predictions:
        hits = np.bincount(inverse, weights=d.hit[positions],
                           minlength=present).astype(np.int64)
        if d.top_k_hits:
            top = np.stack([np.bincount(inverse, weights=h[positions],
                                        minlength=present).astype(np.int64)
                            for h in d.top_k_hits])
    return ClassStats(classes, count, GroupedSums.of(by_class, values), weighted, weights,
                      hits, top)
