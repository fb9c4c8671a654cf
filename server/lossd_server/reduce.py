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

import torch

from lossd.state import Aggregate, GroupedSums, exact_parts

__all__ = ["REDUCTIONS", "Aggregate", "GroupedSums", "exact_parts", "per_sample", "reduction"]

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
