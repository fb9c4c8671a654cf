"""Per-sample reduction and batch aggregates.

Per-sample rule: the loss of sample i is torch's elementwise loss (``reduction='none'``)
averaged over sample i's valid positions (all positions but those whose target equals
``ignore_index``); for ``kl_div`` the class dimension is summed first; a loss whose
``reduction='none'`` output is already one value per sample (N,) keeps it. A sample with no
valid position gets 0.0 (torch's value at ignored positions) and is left out of the
aggregates, counted in ``ignored``.

Aggregates are sums of float64 values computed *exactly* and rounded once (Shewchuk's
algorithm via ``math.fsum``). The result does not depend on summation order, device or how
a batch was split, so a stream's running aggregates equal those of the concatenated batch,
bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Tensor = torch.Tensor


def per_sample(values: Tensor, valid: Tensor | None, *, sum_class_dim: bool = False
               ) -> tuple[Tensor, Tensor | None]:
    """Reduce an elementwise loss (N, ...) to one value per sample (N,).

    ``valid`` is a bool mask shaped as ``values`` (after the class-dimension sum), or None
    when every position counts. Returns the per-sample values and, with a mask, a bool (N,)
    tensor that is True for samples with no valid position (their value is 0.0).

    >>> v = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    >>> per_sample(v, torch.tensor([[True, True], [True, False]]))[0]
    tensor([2., 2.])
    """
    if sum_class_dim and values.dim() >= 2:
        values = values.sum(dim=1)
    n = values.shape[0]
    if values.dim() == 1:
        if valid is None:
            return values, None
        if valid.dim() == 1:
            return values, ~valid
        # One value per sample for dense targets (a loss that reduces its positions itself):
        # a sample with no valid position still has no loss.
        all_ignored = ~valid.reshape(n, -1).any(dim=1)
        return values.masked_fill(all_ignored, 0.0), all_ignored
    flat = values.reshape(n, -1)
    if valid is None:
        return flat.mean(dim=1), None
    counts = valid.reshape(n, -1).sum(dim=1)
    all_ignored = counts == 0
    # Ignored positions already hold 0 in torch's elementwise output.
    out = flat.sum(dim=1) / counts.clamp(min=1).to(flat.dtype)
    return out, all_ignored


REDUCTIONS = ("mean", "sum", "weighted_mean", "weighted_sum")


def reduction(kind: str, losses: Tensor, keep: Tensor, weights: Tensor | None) -> Tensor:
    """A differentiable reduction of per-sample ``losses`` over the samples in ``keep``.

    The value the gradient is taken of: ``mean`` = sum/count, ``sum``, ``weighted_sum`` =
    sum of w*l, ``weighted_mean`` = weighted_sum / sum of w (over kept samples).
    """
    kept = torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
    if kind in ("mean", "sum"):
        total = kept.sum()
        return total / keep.sum().clamp(min=1) if kind == "mean" else total
    if weights is None:
        raise ValueError(f"{kind} needs weights")
    weighted = (weights * kept).sum()
    if kind == "weighted_sum":
        return weighted
    return weighted / torch.where(keep, weights, 0).sum()


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
