"""The built-in catalogue: every loss of torch.nn.functional, plus torchvision's focal loss.

Each loss is one :func:`~lossd_server.catalogue.register` call, the same function plugins
use. Its ``fn`` returns torch's elementwise loss (``reduction='none'``) for a batch, shape
(N, ...) or (N,); :mod:`lossd_server.reduce` turns that into one value per sample. Names,
option names and extra inputs are torch.nn.functional's (``weight`` is ``class_weights``
here, so it is not confused with per-sample ``weights``). Where torch has a precondition
that a device kernel would assert on or silently misread (probabilities outside [0, 1],
labels out of range, lengths beyond the tensor), the loss's ``check`` refuses the request
first, on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lossd_server import catalogue
from lossd_server.catalogue import (
    BUILTIN_SOURCE,
    IGNORE_INDEX,
    LOSSES,
    NAN_POLICY,
    Input,
    Loss,
    Option,
    OptionType,
    Targets,
    all_options,
    registering_for,
    render_default,
)
from lossd_server.describe import first_value, shape_str
from lossd_server.errors import RequestError

__all__ = ["BUILTINS", "CATALOGUE", "IGNORE_INDEX", "LOSSES", "NAN_POLICY", "Input", "Loss",
           "Option", "OptionType", "Targets", "all_options", "render_default",
           "sigmoid_focal_loss"]

register = functools.partial(catalogue.register, thread_safe=True)
"""The built-ins are pure torch functions: safe to call from many threads at once."""

Tensor = torch.Tensor


def _in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"


def _at_least(lo: float, *, strict: bool = False) -> Callable[[Any], str | None]:
    if strict:
        return lambda v: None if v > lo else f"must be > {lo}, got {v}"
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def _one_of(*values: int) -> Callable[[Any], str | None]:
    return lambda v: None if v in values else (f"must be one of "
                                               f"{', '.join(map(str, values))}, got {v}")


def _focal_alpha(v: float) -> str | None:
    return None if (0 <= v <= 1 or v == -1) else f"must be in [0, 1] or -1 (off), got {v}"


def _per_class(dim: int) -> Callable[[Tensor, Tensor], str | None]:
    """A tensor option with one value per class, the classes being predictions dim ``dim``."""
    def fits(value: Tensor, predictions: Tensor) -> str | None:
        n = predictions.shape[dim]
        if tuple(value.shape) == (n,):
            return None
        where = "the last dim of predictions" if dim == -1 else f"predictions dim {dim}"
        return (f"shape {shape_str(value.shape)}; expected ({n},), one weight per class "
                f"({where})")
    return fits


def _pos_weight_fits(value: Tensor, predictions: Tensor) -> str | None:
    n = predictions.shape[-1]
    if tuple(value.shape) in ((n,), (1,)):
        return None
    return (f"shape {shape_str(value.shape)}; expected ({n},), one per class (the last dim "
            "of predictions)")


def _class_weights(dim: int, what: str = "a (C,) rescaling weight per class") -> Option:
    return Option(None, f"torch's `weight`: {what}", fits=_per_class(dim))


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


def _bce(x: Tensor, t: Tensor, *, class_weights: Tensor | None) -> Tensor:
    """torch's binary_cross_entropy; a NaN prediction (which torch refuses, and a CUDA
    kernel would assert on) gets a NaN loss instead, as every loss gives (nan_policy)."""
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return F.binary_cross_entropy(x, t, weight=class_weights, reduction="none")
    out = F.binary_cross_entropy(x.masked_fill(nan, 0.5), t, weight=class_weights,
                                 reduction="none")
    return torch.where(nan, x, out)


def _probabilities(field: str, t: Tensor, *, nan_allowed: bool) -> None:
    bad = (t < 0) | (t > 1)  # False for NaN
    if not nan_allowed:
        bad |= torch.isnan(t)
    if bool(bad.any()):
        i, value = first_value(t, bad)
        raise RequestError(field, f"value {value} at sample {i} is not a probability in "
                                  "[0, 1] (binary_cross_entropy takes probabilities; "
                                  "binary_cross_entropy_with_logits takes logits)")


def _bce_check(predictions: Tensor, targets: Tensor | None, inputs: Mapping[str, Tensor],
               options: Mapping[str, Any]) -> None:
    _probabilities("predictions", predictions, nan_allowed=True)
    assert targets is not None
    _probabilities("targets", targets, nan_allowed=False)


def _gaussian_nll_check(predictions: Tensor, targets: Tensor | None,
                        inputs: Mapping[str, Tensor], options: Mapping[str, Any]) -> None:
    """torch's rules for var's shape (with N first), and no negative variance."""
    var = inputs["var"]
    p, v = tuple(predictions.shape), tuple(var.shape)
    one_broadcast_dim = len(v) == len(p) and sum(b for a, b in zip(p, v, strict=True)
                                                  if a != b) == 1
    if not (v == p or (len(p) >= 2 and v == p[:-1]) or one_broadcast_dim):
        raise RequestError("inputs.var", f"shape {shape_str(v)} does not fit predictions "
                                         f"{shape_str(p)}; expected {shape_str(p)}, "
                                         f"{shape_str(p[:-1]) if len(p) >= 2 else ''}"
                                         f"{' or ' if len(p) >= 2 else ''}the predictions' "
                                         "shape with one dim of size 1")
    negative = var < 0
    if bool(negative.any()):
        i, value = first_value(var, negative)
        raise RequestError("inputs.var", f"negative value {value} at sample {i}; a variance "
                                         "is >= 0")


def _ctc(x: Tensor, t: Tensor, *, input_lengths: Tensor, target_lengths: Tensor, blank: int,
         zero_infinity: bool) -> Tensor:
    # The wire has the batch first (N, T, C); torch takes (T, N, C).
    return F.ctc_loss(x.transpose(0, 1), t, input_lengths, target_lengths, blank=blank,
                      reduction="none", zero_infinity=zero_infinity)


def _ctc_check(predictions: Tensor, targets: Tensor | None, inputs: Mapping[str, Tensor],
               options: Mapping[str, Any]) -> None:
    """Lengths within the tensors and labels within the classes: a CUDA kernel would read
    out of bounds (or assert) otherwise."""
    assert targets is not None
    _, steps, classes = predictions.shape
    blank = options["blank"]
    if not 0 <= blank < classes:
        raise RequestError("options.blank", f"{blank} out of range [0, {classes}) (the "
                                            "classes, predictions dim 2)")
    labels = targets.shape[1]
    for name, most, what in (("input_lengths", steps, "T, predictions dim 1"),
                             ("target_lengths", labels, "S, targets dim 1")):
        lengths = inputs[name]
        bad = (lengths < 0) | (lengths > most)
        if bool(bad.any()):
            i, value = first_value(lengths, bad)
            raise RequestError(f"inputs.{name}", f"{value} at sample {i} outside [0, {most}] "
                                                 f"({what})")
    within = torch.arange(labels) < inputs["target_lengths"].reshape(-1, 1)
    bad = within & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        i, value = first_value(targets, bad)
        raise RequestError("targets", f"label {value} out of range [0, {classes}) at sample "
                                      f"{i}")
    bad = within & (targets == blank)
    if bool(bad.any()):
        i, _ = first_value(targets, bad)
        raise RequestError("targets", f"the blank label {blank} at sample {i}; a target "
                                      "sequence holds labels other than blank")


def _ctc_working_elements(predictions: Tensor, targets: Tensor | None,
                          inputs: Mapping[str, Tensor], options: Mapping[str, Any]) -> int:
    """torch's alpha table (and, for a gradient, beta): N x T x (2S + 1) floats, where S is
    the targets' length; quadratic in what the request sends (a 144 kB request made it
    544 MiB)."""
    assert targets is not None
    n, steps, _ = predictions.shape
    return int(n * steps * (2 * targets.shape[1] + 1))


_DISTANCES: Mapping[str, Callable[[Tensor, Tensor], Tensor] | None] = {
    "pairwise_distance": None,  # torch's default: torch.pairwise_distance
    "cosine_distance": lambda a, b: 1.0 - F.cosine_similarity(a, b),
}


def _triplet_with_distance(x: Tensor, *, positive: Tensor, negative: Tensor,
                           distance_function: str, margin: float, swap: bool) -> Tensor:
    return F.triplet_margin_with_distance_loss(
        x, positive, negative, distance_function=_DISTANCES[distance_function],
        margin=margin, swap=swap, reduction="none")


_CLASS_SHAPES = ("(N, C)", "(N, C, d1, ...)")
_INPUT2 = Input("float", "predictions", "the second input, shaped as input1 (predictions)")
_MARGIN_POSITIVE = _at_least(0.0, strict=True)


def _register_builtins() -> tuple[Loss, ...]:
    cross_entropy_options = {
        "class_weights": _class_weights(1),
        "ignore_index": IGNORE_INDEX,
        "label_smoothing": Option(0.0, "mix the target with the uniform distribution by "
                                       "this amount", check=_in_range(0.0, 1.0)),
    }
    losses = [
        register("cross_entropy", _cross_entropy, targets=Targets.CLASS_INDEX_OR_PROBS,
                 description="Cross entropy of logits against class indices or class "
                             "probabilities.",
                 options=cross_entropy_options, min_prediction_dims=2,
                 prediction_shapes=_CLASS_SHAPES,
                 target_shapes=("(N)", "(N, d1, ...)", "same as predictions (probabilities)")),
        register("nll_loss", _nll_loss, targets=Targets.CLASS_INDEX,
                 description="Negative log-likelihood of log-probabilities against class "
                             "indices.",
                 options={"class_weights": _class_weights(1), "ignore_index": IGNORE_INDEX},
                 min_prediction_dims=2, prediction_shapes=_CLASS_SHAPES,
                 target_shapes=("(N)", "(N, d1, ...)")),
        register("binary_cross_entropy_with_logits", _bce_with_logits, targets="values",
                 description="Binary cross entropy of logits, e.g. multi-label (N, C) against "
                             "0/1 targets.",
                 options={"class_weights": _class_weights(
                              -1, "a rescaling weight broadcast over the last dim"),
                          "pos_weight": Option(None, "weight of positive examples, one per "
                                                     "class (last dim)",
                                               fits=_pos_weight_fits)}),
        register("binary_cross_entropy", _bce, targets="values", check=_bce_check,
                 description="Binary cross entropy of probabilities in [0, 1] against targets "
                             "in [0, 1].",
                 options={"class_weights": _class_weights(
                     -1, "a rescaling weight broadcast over the last dim")}),
        register("mse_loss", lambda x, t: F.mse_loss(x, t, reduction="none"), targets="values",
                 description="Squared error.", options={}),
        register("l1_loss", lambda x, t: F.l1_loss(x, t, reduction="none"), targets="values",
                 description="Absolute error.", options={}),
        register("smooth_l1_loss",
                 lambda x, t, *, beta: F.smooth_l1_loss(x, t, beta=beta, reduction="none"),
                 targets="values", description="Smooth L1: squared below beta, absolute above.",
                 options={"beta": Option(1.0, "threshold between the two regimes",
                                         check=_at_least(0.0))}),
        register("huber_loss",
                 lambda x, t, *, delta: F.huber_loss(x, t, delta=delta, reduction="none"),
                 targets="values", description="Huber loss: squared below delta, linear above.",
                 options={"delta": Option(1.0, "threshold between the two regimes",
                                          check=_at_least(0.0, strict=True))}),
        register("kl_div",
                 lambda x, t, *, log_target: F.kl_div(x, t, log_target=log_target,
                                                      reduction="none"),
                 targets="values",
                 description="KL divergence of the target distribution from log-probability "
                             "predictions; the class dimension (dim 1) is summed, so each "
                             "sample gets its divergence.",
                 options={"log_target": Option(False, "targets are log-probabilities")},
                 sum_class_dim=True, min_prediction_dims=2, prediction_shapes=_CLASS_SHAPES),
        register("sigmoid_focal_loss", sigmoid_focal_loss, targets="values",
                 description="Focal loss of logits against 0/1 targets (torchvision's).",
                 options={"alpha": Option(0.25, "weight of the positive class in [0, 1]; -1 "
                                                "turns it off", check=_focal_alpha),
                          "gamma": Option(2.0, "focusing exponent", check=_at_least(0.0))}),
        register("poisson_nll_loss",
                 lambda x, t, *, log_input, full, eps: F.poisson_nll_loss(
                     x, t, log_input=log_input, full=full, eps=eps, reduction="none"),
                 targets="values", description="Poisson negative log-likelihood.",
                 options={"log_input": Option(True, "predictions are log-rates"),
                          "full": Option(False, "add the Stirling term"),
                          "eps": Option(1e-8, "added to the rate before log when log_input "
                                              "is false", check=_at_least(0.0, strict=True))}),
        register("gaussian_nll_loss",
                 lambda x, t, *, var, full, eps: F.gaussian_nll_loss(
                     x, t, var, full=full, eps=eps, reduction="none"),
                 targets="values", check=_gaussian_nll_check,
                 description="Gaussian negative log-likelihood of predicted means, with the "
                             "predicted variances as input `var`.",
                 inputs={"var": Input("float", "any", "variances: shaped as predictions, or "
                                                      "with the last dim left out or of size "
                                                      "1 (homoscedastic), >= 0",
                                      shapes=("same as predictions", "(N, d1, ..., 1)",
                                              "(N, d1, ...) for predictions (N, d1, ..., D)"))},
                 options={"full": Option(False, "add the constant 0.5 log(2 pi)"),
                          "eps": Option(1e-6, "variances are clamped to at least this",
                                        check=_at_least(0.0))}),
        register("ctc_loss", _ctc, targets=Targets.LABEL_SEQUENCES, check=_ctc_check,
                 working_elements=_ctc_working_elements,
                 description="Connectionist temporal classification of log-probabilities "
                             "(N, T, C), batch first, against label sequences; per sample "
                             "torch's reduction='none' value.",
                 inputs={"input_lengths": Input("int", "sample", "frames of each sample, in "
                                                                 "[0, T]"),
                         "target_lengths": Input("int", "sample", "labels of each sample's "
                                                                  "target, in [0, S]")},
                 options={"blank": Option(0, "the blank label, in [0, C)"),
                          "zero_infinity": Option(False, "an infinite loss (an impossible "
                                                         "alignment) and its gradient are 0")},
                 min_prediction_dims=3, max_prediction_dims=3,
                 prediction_shapes=("(N, T, C) log-probabilities, batch first",),
                 target_shapes=("(N, S) labels in [0, C), not blank; padding beyond "
                                "target_lengths is not read",)),
        register("margin_ranking_loss",
                 lambda x, t, *, input2, margin: F.margin_ranking_loss(
                     x, input2, t, margin=margin, reduction="none"),
                 targets="values", inputs={"input2": _INPUT2},
                 description="Margin ranking of input1 (predictions) against input2: targets "
                             "1 rank input1 higher, -1 lower.",
                 options={"margin": Option(0.0, "the margin")}),
        register("hinge_embedding_loss",
                 lambda x, t, *, margin: F.hinge_embedding_loss(x, t, margin=margin,
                                                                reduction="none"),
                 targets="values",
                 description="Hinge embedding loss of distances against 1 (similar) or -1 "
                             "(dissimilar) targets.",
                 options={"margin": Option(1.0, "the margin for dissimilar pairs")}),
        register("cosine_embedding_loss",
                 lambda x, t, *, input2, margin: F.cosine_embedding_loss(
                     x, input2, t, margin=margin, reduction="none"),
                 targets=Targets.SAMPLE_VALUES, inputs={"input2": _INPUT2},
                 description="Cosine embedding loss of input1 (predictions, (N, D)) and "
                             "input2 against 1 (similar) or -1 (dissimilar) per sample.",
                 options={"margin": Option(0.0, "the margin for dissimilar pairs (in [-1, 1] "
                                                "makes sense)")},
                 min_prediction_dims=2, max_prediction_dims=2, prediction_shapes=("(N, D)",),
                 target_shapes=("(N) of 1 or -1",)),
        register("triplet_margin_loss",
                 lambda x, *, positive, negative, margin, p, eps, swap: F.triplet_margin_loss(
                     x, positive, negative, margin=margin, p=p, eps=eps, swap=swap,
                     reduction="none"),
                 targets="none",
                 inputs={"positive": Input("float", "predictions", "positive examples, "
                                                                   "shaped as the anchors"),
                         "negative": Input("float", "predictions", "negative examples, "
                                                                   "shaped as the anchors")},
                 description="Triplet margin loss of anchors (predictions) against positive and "
                             "negative examples, by p-norm distance.",
                 options={"margin": Option(1.0, "the margin", check=_MARGIN_POSITIVE),
                          "p": Option(2.0, "the norm degree of the pairwise distance"),
                          "eps": Option(1e-6, "added to the difference before the norm"),
                          "swap": Option(False, "use the distance swap (Balntas et al.)")},
                 min_prediction_dims=2, prediction_shapes=("(N, D)", "(N, d1, ..., D)")),
        register("triplet_margin_with_distance_loss", _triplet_with_distance, targets="none",
                 inputs={"positive": Input("float", "predictions", "positive examples, "
                                                                   "shaped as the anchors"),
                         "negative": Input("float", "predictions", "negative examples, "
                                                                   "shaped as the anchors")},
                 description="Triplet margin loss with a named distance function (a callable "
                             "cannot travel: pairwise_distance, torch's default, or "
                             "cosine_distance = 1 - cosine_similarity).",
                 options={"distance_function": Option("pairwise_distance", "the distance",
                                                      choices=tuple(_DISTANCES)),
                          "margin": Option(1.0, "the margin", check=_MARGIN_POSITIVE),
                          "swap": Option(False, "use the distance swap (Balntas et al.)")},
                 min_prediction_dims=2, prediction_shapes=("(N, D)", "(N, d1, ..., D)")),
        register("multilabel_margin_loss",
                 lambda x, t: F.multilabel_margin_loss(x, t, reduction="none"),
                 targets=Targets.CLASS_SETS,
                 description="Multi-class multi-label hinge loss; each target row lists the "
                             "sample's classes, ending at the first -1.",
                 options={}, min_prediction_dims=2, max_prediction_dims=2,
                 prediction_shapes=("(N, C)",),
                 target_shapes=("(N, C) class indices in [0, C), then -1 and anything",)),
        register("multilabel_soft_margin_loss",
                 lambda x, t, *, class_weights: F.multilabel_soft_margin_loss(
                     x, t, weight=class_weights, reduction="none"),
                 targets="values",
                 description="Multi-label one-versus-all loss of logits against 0/1 targets; "
                             "the classes (last dim) are averaged.",
                 options={"class_weights": _class_weights(-1, "a (C,) weight per class (last "
                                                              "dim)")},
                 min_prediction_dims=2, prediction_shapes=("(N, C)", "(N, d1, ..., C)")),
        register("multi_margin_loss",
                 lambda x, t, *, p, margin, class_weights: F.multi_margin_loss(
                     x, t, p=p, margin=margin, weight=class_weights, reduction="none"),
                 targets="classes",
                 description="Multi-class hinge loss of scores (N, C) against class indices.",
                 options={"p": Option(1, "1 or 2: the hinge's exponent", check=_one_of(1, 2)),
                          "margin": Option(1.0, "the margin"),
                          "class_weights": _class_weights(1)},
                 min_prediction_dims=2, max_prediction_dims=2, prediction_shapes=("(N, C)",),
                 target_shapes=("(N)",)),
        register("soft_margin_loss", lambda x, t: F.soft_margin_loss(x, t, reduction="none"),
                 targets="values",
                 description="Two-class logistic loss of scores against 1 or -1 targets.",
                 options={}),
    ]
    return tuple(losses)


with registering_for(BUILTIN_SOURCE):
    BUILTINS: tuple[Loss, ...] = _register_builtins()

CATALOGUE = BUILTINS
"""The built-in losses (``LOSSES`` also holds the plugins')."""
