"""The loss catalogue: one ``Loss`` entry per supported loss. Adding a loss is one entry.

Each entry's ``fn`` returns torch's elementwise loss (``reduction='none'``) for a batch,
shape (N, ...); :mod:`lossd_server.reduce` turns that into one value per sample. Names and
option names are torch.nn.functional's (``weight`` is ``class_weights`` here, so it is not
confused with per-sample ``weights``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class Targets(enum.Enum):
    """What a loss takes as targets."""

    CLASS_INDEX = "class indices (N, d1, ...) for predictions (N, C, d1, ...)"
    CLASS_INDEX_OR_PROBS = "class indices (N, d1, ...) or probabilities shaped as predictions"
    SAME_SHAPE = "values shaped as predictions"


class OptionType(enum.Enum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STR = "str"
    TENSOR = "tensor"


@dataclass(frozen=True)
class Option:
    """A loss option: its torch name, type, default and the values it accepts.

    ``check`` returns a problem description for a bad value, or None.
    """

    name: str
    type: OptionType
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Loss:
    """One catalogue entry.

    ``fn(predictions, targets, **options)`` gets predictions in the compute dtype, targets
    as int64 class indices or in the compute dtype, tensor options on the device.
    ``sum_class_dim``: the per-sample value sums dim 1 before averaging (kl_div).
    ``samplewise``: a sample's loss depends on its own rows only (every built-in), so the
    engine may evaluate a large batch in chunks of samples; False for a loss that couples
    the samples of a batch (a contrastive loss over it).
    """

    name: str
    description: str
    fn: Callable[..., Tensor]
    targets: Targets
    options: tuple[Option, ...] = ()
    sum_class_dim: bool = False
    samplewise: bool = True
    min_prediction_dims: int = 1
    prediction_shapes: tuple[str, ...] = ("(N)", "(N, d1, ...)")
    target_shapes: tuple[str, ...] = ("same as predictions",)
    option_by_name: Mapping[str, Option] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "option_by_name", {o.name: o for o in self.options})


def _in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"


def _at_least(lo: float, *, strict: bool = False) -> Callable[[Any], str | None]:
    if strict:
        return lambda v: None if v > lo else f"must be > {lo}, got {v}"
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def _focal_alpha(v: float) -> str | None:
    return None if (0 <= v <= 1 or v == -1) else f"must be in [0, 1] or -1 (off), got {v}"


# The option shared by every loss; the engine applies it, not the loss functions.
NAN_POLICY = Option(
    "nan_policy", OptionType.STR, "propagate",
    "non-finite predictions: propagate (into the loss), raise (INVALID_ARGUMENT), "
    "omit (left out of the aggregates and counted in 'omitted')",
    choices=("propagate", "raise", "omit"))

CLASS_WEIGHTS = Option("class_weights", OptionType.TENSOR, None,
                       "torch's `weight`: a (C,) rescaling weight per class")
IGNORE_INDEX = Option("ignore_index", OptionType.INT, -100,
                      "target value that is ignored: it adds no loss and no valid position")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss with reduction='none' (same arithmetic)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def _classes_last(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """On CUDA, run a class-dim loss on dense (N, C, d1, ...) inputs as (N*d, C) rows.

    CUDA's softmax over dim 1 of (N, C, T) is a strided reduction (7 GB/s on an H100 for
    N=8, C=8000, T=512); with the classes last it streams. Values agree with the (N, C, T)
    call to float rounding. On CPU the transpose costs more than it saves, so it is skipped.
    """
    def wrapped(x: Tensor, t: Tensor, **options: Any) -> Tensor:
        if not x.is_cuda or x.dim() <= 2:
            return fn(x, t, **options)
        c = x.shape[1]
        rows = x.movedim(1, -1).reshape(-1, c)
        target = t.movedim(1, -1).reshape(-1, c) if t.shape == x.shape else t.reshape(-1)
        return fn(rows, target, **options).reshape(x.shape[0], *x.shape[2:])
    return wrapped


@_classes_last
def _cross_entropy(x: Tensor, t: Tensor, *, class_weights: Tensor | None, ignore_index: int,
                   label_smoothing: float) -> Tensor:
    return F.cross_entropy(x, t, weight=class_weights, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")


@_classes_last
def _nll_loss(x: Tensor, t: Tensor, *, class_weights: Tensor | None,
              ignore_index: int) -> Tensor:
    return F.nll_loss(x, t, weight=class_weights, ignore_index=ignore_index, reduction="none")


def _bce_with_logits(x: Tensor, t: Tensor, *, class_weights: Tensor | None,
                     pos_weight: Tensor | None) -> Tensor:
    return F.binary_cross_entropy_with_logits(x, t, weight=class_weights,
                                              pos_weight=pos_weight, reduction="none")


_CLASS_SHAPES = ("(N, C)", "(N, C, d1, ...)")

CATALOGUE: tuple[Loss, ...] = (
    Loss("cross_entropy",
         "Cross entropy of logits against class indices or class probabilities.",
         _cross_entropy, Targets.CLASS_INDEX_OR_PROBS,
         options=(CLASS_WEIGHTS, IGNORE_INDEX,
                  Option("label_smoothing", OptionType.FLOAT, 0.0,
                         "mix the target with the uniform distribution by this amount",
                         check=_in_range(0.0, 1.0))),
         min_prediction_dims=2, prediction_shapes=_CLASS_SHAPES,
         target_shapes=("(N)", "(N, d1, ...)", "same as predictions (probabilities)")),
    Loss("nll_loss", "Negative log-likelihood of log-probabilities against class indices.",
         _nll_loss, Targets.CLASS_INDEX, options=(CLASS_WEIGHTS, IGNORE_INDEX),
         min_prediction_dims=2, prediction_shapes=_CLASS_SHAPES,
         target_shapes=("(N)", "(N, d1, ...)")),
    Loss("binary_cross_entropy_with_logits",
         "Binary cross entropy of logits, e.g. multi-label (N, C) against 0/1 targets.",
         _bce_with_logits, Targets.SAME_SHAPE,
         options=(Option("class_weights", OptionType.TENSOR, None,
                         "torch's `weight`: a rescaling weight broadcast over the last dim"),
                  Option("pos_weight", OptionType.TENSOR, None,
                         "weight of positive examples, one per class (last dim)"))),
    Loss("mse_loss", "Squared error.",
         lambda x, t: F.mse_loss(x, t, reduction="none"), Targets.SAME_SHAPE),
    Loss("l1_loss", "Absolute error.",
         lambda x, t: F.l1_loss(x, t, reduction="none"), Targets.SAME_SHAPE),
    Loss("smooth_l1_loss", "Smooth L1: squared below beta, absolute above.",
         lambda x, t, *, beta: F.smooth_l1_loss(x, t, beta=beta, reduction="none"),
         Targets.SAME_SHAPE,
         options=(Option("beta", OptionType.FLOAT, 1.0, "threshold between the two regimes",
                         check=_at_least(0.0)),)),
    Loss("huber_loss", "Huber loss: squared below delta, linear above.",
         lambda x, t, *, delta: F.huber_loss(x, t, delta=delta, reduction="none"),
         Targets.SAME_SHAPE,
         options=(Option("delta", OptionType.FLOAT, 1.0, "threshold between the two regimes",
                         check=_at_least(0.0, strict=True)),)),
    Loss("kl_div",
         "KL divergence of the target distribution from log-probability predictions; "
         "the class dimension (dim 1) is summed, so each sample gets its divergence.",
         lambda x, t, *, log_target: F.kl_div(x, t, log_target=log_target, reduction="none"),
         Targets.SAME_SHAPE,
         options=(Option("log_target", OptionType.BOOL, False,
                         "targets are log-probabilities"),),
         sum_class_dim=True, min_prediction_dims=2, prediction_shapes=_CLASS_SHAPES),
    Loss("sigmoid_focal_loss", "Focal loss of logits against 0/1 targets (torchvision's).",
         sigmoid_focal_loss, Targets.SAME_SHAPE,
         options=(Option("alpha", OptionType.FLOAT, 0.25,
                         "weight of the positive class in [0, 1]; -1 turns it off",
                         check=_focal_alpha),
                  Option("gamma", OptionType.FLOAT, 2.0, "focusing exponent",
                         check=_at_least(0.0)))),
    Loss("poisson_nll_loss", "Poisson negative log-likelihood.",
         lambda x, t, *, log_input, full, eps: F.poisson_nll_loss(
             x, t, log_input=log_input, full=full, eps=eps, reduction="none"),
         Targets.SAME_SHAPE,
         options=(Option("log_input", OptionType.BOOL, True, "predictions are log-rates"),
                  Option("full", OptionType.BOOL, False, "add the Stirling term"),
                  Option("eps", OptionType.FLOAT, 1e-8,
                         "added to the rate before log when log_input is false",
                         check=_at_least(0.0, strict=True)))),
)

LOSSES: Mapping[str, Loss] = {loss.name: loss for loss in CATALOGUE}


def all_options(loss: Loss) -> tuple[Option, ...]:
    """The loss's own options plus the engine-level ones every loss accepts."""
    return (*loss.options, NAN_POLICY)


def render_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)
