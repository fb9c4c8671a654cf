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

The host states (per class, accuracy, calibration, hardest samples and batches, the loss
sketch) and their merge live in :mod:`lossd.state`, shared with ``lossd.merge``; their
definitions are there. Here: the device part and :func:`analyse`, one batch's states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from lossd.state import (  # the host states: one implementation, shared with lossd.merge
    BIN_EDGES,
    CALIBRATION_BINS,
    DEFAULT_QUANTILES,
    MAX_HARDEST,
    MAX_HARDEST_BATCHES,
    MAX_QUANTILES,
    MAX_TOP_K,
    NONE,
    RELATIVE_ACCURACY,
    SKETCH_BUCKETS,
    Accuracy,
    Analysis,
    Calibration,
    ClassStats,
    Diagnostics,
    GroupedSums,
    Hardest,
    HardestBatches,
    LossSketch,
    Request,
    calibration_bins,
    top,
)

__all__ = [
    "BIN_EDGES",
    "CALIBRATION_BINS",
    "DEFAULT_QUANTILES",
    "MAX_HARDEST",
    "MAX_HARDEST_BATCHES",
    "MAX_QUANTILES",
    "MAX_TOP_K",
    "NONE",
    "RELATIVE_ACCURACY",
    "SKETCH_BUCKETS",
    "Accuracy",
    "Analysis",
    "BatchData",
    "Calibration",
    "ClassOutputs",
    "ClassStats",
    "Diagnostics",
    "Hardest",
    "HardestBatches",
    "LossSketch",
    "Request",
    "analyse",
    "calibration_bins",
    "class_outputs",
]

Tensor = torch.Tensor


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
        out = replace(out, hardest=top(
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
