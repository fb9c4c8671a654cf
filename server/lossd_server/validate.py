"""Every check a request passes before any kernel runs.

Each failure raises :class:`~lossd_server.errors.RequestError` naming the field and the
problem; ``errors.status_of`` turns it into INVALID_ARGUMENT (or the status it carries).
Nothing here touches a device: class indices, labels and lengths are range-checked on the
host, because an out-of-range index on a GPU raises a device-side assert that poisons the
CUDA context for every later request. The generic checks come from the loss's declaration
(its targets, options and extra inputs); a loss's own ``check`` runs last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lossd_server import analysis
from lossd_server.catalogue import unknown_loss, unknown_option
from lossd_server.describe import dtype_str, first_value, sample_offset, shape_str
from lossd_server.describe import first as _first
from lossd_server.describe import sample as _sample
from lossd_server.errors import RequestError
from lossd_server.logs import field as _field
from lossd_server.losses import LOSSES, Loss, Option, OptionType, Targets, all_options
from lossd_server.reduce import REDUCTIONS

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "batch", "dtype_str",
           "finite_predictions", "gradient", "loss", "no_nonfinite", "options",
           "sample_offset", "shape_str"]

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_FLOAT_OPTION = float(torch.finfo(torch.float32).max)
"""The largest magnitude of a float option, whatever the request's dtype: options meet
float32 tensors in torch's kernels (which refuse a scalar they cannot convert) and Python
arithmetic in plugins (``eps ** 2`` overflows past 1e154); no loss means anything by a
value beyond float32's range."""


def loss(name: str) -> Loss:
    """The catalogue entry for ``name``."""
    if not name:
        raise RequestError("loss", f"missing; one of {', '.join(sorted(LOSSES))}")
    spec = LOSSES.get(name)
    if spec is None:
        raise RequestError("loss", unknown_loss(name))
    return spec


def _typed(opt: Option, value: Any) -> Any:
    field = f"options.{opt.name}"
    t = opt.type
    if t is OptionType.FLOAT and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
        if not math.isfinite(value):
            raise RequestError(field, f"must be finite, got {value}")
        if abs(value) > MAX_FLOAT_OPTION:
            raise RequestError(field, f"{value} is beyond float32's range (magnitude at most "
                                      f"{MAX_FLOAT_OPTION:.7g})")
    elif t is OptionType.INT and isinstance(value, int) and not isinstance(value, bool):
        if not -2**63 <= value < 2**63:  # (KServe's uint64_param reaches 2**64 - 1)
            raise RequestError(field, f"{value} is beyond int64's range")
    elif ((t is OptionType.BOOL and isinstance(value, bool))
          or (t is OptionType.STR and isinstance(value, str))):
        pass
    elif t is OptionType.TENSOR and isinstance(value, Tensor):
        if not value.dtype.is_floating_point:
            raise RequestError(field, f"dtype {dtype_str(value.dtype)} not accepted; "
                                      "send a float tensor")
        if not bool(torch.isfinite(value).all()):
            raise RequestError(field, "contains non-finite values")
    else:
        raise RequestError(field, f"expected {t.value}, got {_kind(value)}")
    if opt.choices and value not in opt.choices:
        raise RequestError(field, f"must be one of {', '.join(opt.choices)}; got {value!r}")
    if opt.check is not None and (problem := opt.check(value)) is not None:
        raise RequestError(field, problem)
    return value


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return "tensor"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value),
                                                                     type(value).__name__)


# id(spec) -> (spec, its options by name, their defaults): built once per loss.
_KNOWN: dict[int, tuple[Loss, dict[str, Option], dict[str, Any]]] = {}


def options(spec: Loss, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Typed options with defaults filled in; unknown names and bad values rejected."""
    cached = _KNOWN.get(id(spec))
    if cached is None or cached[0] is not spec:
        known = {o.name: o for o in all_options(spec)}
        cached = _KNOWN[id(spec)] = (spec, known, {n: o.default for n, o in known.items()})
    _, known, defaults = cached
    if not raw:
        return dict(defaults)
    for name in raw:
        if name not in known:
            raise RequestError(_field("options", name), unknown_option(spec, name, known))
    return {name: (_typed(o, raw[name]) if name in raw else o.default)
            for name, o in known.items()}


def _float_tensor(field: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise RequestError(field, f"dtype {dtype_str(t.dtype)} not accepted; "
                                  "use float32, float16, bfloat16 or float64")


def batch(spec: Loss, predictions: Tensor, targets: Tensor | None, weights: Tensor | None,
          opts: Mapping[str, Any], inputs: Mapping[str, Tensor] | None = None, *,
          allow_zero_weight_sum: bool = False) -> ClassTargets | None:
    """Check shapes, dtypes and values; for class-index targets (one per position, with
    ``ignore_index``), return their range."""
    _float_tensor("predictions", predictions)
    dims = predictions.dim()
    if dims < spec.min_prediction_dims or (spec.max_prediction_dims is not None
                                           and dims > spec.max_prediction_dims):
        raise RequestError("predictions",
                           f"shape {shape_str(predictions.shape)} has {dims} dims; "
                           f"{spec.name} takes {' or '.join(spec.prediction_shapes)}")
    if predictions.shape[0] == 0:
        raise RequestError("predictions", "empty batch (N = 0)")
    if predictions.numel() == 0:
        raise RequestError("predictions", f"shape {shape_str(predictions.shape)} has no elements")

    found = _targets(spec, predictions, targets, opts)
    if inputs or spec.inputs:  # (most losses take none, and most requests send none)
        _inputs(spec, predictions, inputs or {})
    _tensor_options(spec, predictions, opts)
    if weights is not None:
        _weights(predictions.shape[0], weights, allow_zero_sum=allow_zero_weight_sum)
    if spec.check is not None:
        spec.check(predictions, targets, inputs or {}, opts)
    return found


def _targets(spec: Loss, predictions: Tensor, targets: Tensor | None,
             opts: Mapping[str, Any]) -> ClassTargets | None:
    kind = spec.targets
    if kind is Targets.NONE:
        if targets is not None:
            raise RequestError("targets", f"{spec.name} takes no targets; leave them out")
        return None
    if targets is None:
        raise RequestError("targets", f"missing; {spec.name} takes "
                                      f"{' or '.join(spec.target_shapes)}")
    integer = targets.dtype in INDEX_DTYPES
    if integer and not kind.integer:
        raise RequestError("targets", f"dtype {dtype_str(targets.dtype)} not accepted by "
                                      f"{spec.name}; send float values")
    if not integer and not kind.floating:
        what = "class indices of shape (N, ...)" if spec.class_targets else "labels"
        raise RequestError("targets", f"dtype {dtype_str(targets.dtype)} not accepted by "
                                      f"{spec.name}; send int64 or int32 {what}")
    if integer:
        if kind is Targets.CLASS_SETS:
            _class_sets(predictions, targets)
            return None
        if kind is Targets.LABEL_SEQUENCES:
            _label_sequences(predictions, targets)
            return None
        return _class_targets(spec, predictions, targets, opts)
    _float_tensor("targets", targets)
    want = (predictions.shape[0],) if kind is Targets.SAMPLE_VALUES else tuple(
        predictions.shape)
    if tuple(targets.shape) != want:
        if kind is Targets.CLASS_INDEX_OR_PROBS:
            raise RequestError("targets", _indices_or_probabilities(spec, predictions, targets))
        per_sample = (f"; one value per sample, {shape_str(want)}"
                      if kind is Targets.SAMPLE_VALUES else "")
        raise RequestError("targets", f"shape {shape_str(targets.shape)} does not match "
                                      f"predictions {shape_str(predictions.shape)}{per_sample}")
    if kind is Targets.CLASS_INDEX_OR_PROBS and opts.get("ignore_index", -100) != -100:
        raise RequestError("options.ignore_index", "not supported with probability targets")
    return None


def _indices_or_probabilities(spec: Loss, predictions: Tensor, targets: Tensor) -> str:
    """The problem with float targets of a loss taking class indices or probabilities whose
    shape is not the predictions': shaped as class indices, the dtype is the mistake."""
    indices = (predictions.shape[0], *predictions.shape[2:])
    takes = (f"{spec.name} takes class indices (int64/int32) of shape (N, ...), here "
             f"{shape_str(indices)}, or class probabilities shaped like the predictions, "
             f"here {shape_str(predictions.shape)}")
    if tuple(targets.shape) == indices:
        return (f"dtype {dtype_str(targets.dtype)} with the shape of class indices, "
                f"{shape_str(targets.shape)}: {takes}; send the class indices as int64 "
                "(targets.long())")
    return (f"shape {shape_str(targets.shape)} does not match predictions "
            f"{shape_str(predictions.shape)}; {takes}")


def _class_targets(spec: Loss, predictions: Tensor, targets: Tensor,
                   opts: Mapping[str, Any]) -> ClassTargets:
    if predictions.dim() < 2:  # (a plugin may declare one dim; class indices need two)
        raise RequestError("predictions", f"shape {shape_str(predictions.shape)} has no class "
                                          f"dimension; {spec.name} with class-index targets "
                                          "takes (N, C) or (N, C, d1, ...)")
    want = (predictions.shape[0], *predictions.shape[2:])
    if tuple(targets.shape) != want:
        raise RequestError("targets", f"shape {shape_str(targets.shape)} does not match "
                                      f"predictions {shape_str(predictions.shape)}; class "
                                      f"indices must be {shape_str(want)}")
    n_classes = predictions.shape[1]
    ignore_index = opts.get("ignore_index", -100)
    found = ClassTargets(*index_range(targets))
    if found.lo >= 0 and found.hi < n_classes:
        return found
    t = targets.numpy()
    bad = ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1)
        i = int(rows.any(axis=1).argmax())
        value = int(t.reshape(t.shape[0], -1)[i][rows[i]][0])
        raise RequestError("targets", f"class index {value} out of range [0, {n_classes}) "
                                      f"at sample {_sample(i)} (ignore_index is {ignore_index})")
    return found


@dataclass(slots=True)
class ClassTargets:
    """What validation learnt of class-index targets: their smallest and largest index."""

    lo: int
    hi: int

    def may_contain(self, value: int) -> bool:
        """False when no target can equal ``value`` (e.g. ``ignore_index``)."""
        return self.lo <= value <= self.hi


def index_range(targets: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty host tensor of class indices.

    Through numpy on the host: each torch call (aminmax, then two ``int()``) lets go of the
    GIL, and under concurrent calls every release is a hand-off between serving threads."""
    values = targets.numpy()  # validation runs on the decoded host tensors
    return int(values.min()), int(values.max())


def _class_sets(predictions: Tensor, targets: Tensor) -> None:
    """multilabel_margin_loss: class indices shaped as the predictions (N, C), each row a
    list of classes ended by the first -1; every entry must lie in [-1, C)."""
    if targets.shape != predictions.shape:
        raise RequestError("targets", f"shape {shape_str(targets.shape)} does not match "
                                      f"predictions {shape_str(predictions.shape)}; class "
                                      "lists are shaped as the predictions")
    n_classes = predictions.shape[-1]
    bad = (targets < -1) | (targets >= n_classes)
    if bool(bad.any()):
        i, value = first_value(targets, bad)
        raise RequestError("targets", f"class index {value} out of range [-1, {n_classes}) "
                                      f"at sample {i} (-1 ends a sample's list)")


def _label_sequences(predictions: Tensor, targets: Tensor) -> None:
    n = predictions.shape[0]
    if targets.dim() != 2 or targets.shape[0] != n:
        raise RequestError("targets", f"shape {shape_str(targets.shape)}; expected (N, S) "
                                      f"label sequences with N = {n}, padded to the longest "
                                      "(S)")


def _inputs(spec: Loss, predictions: Tensor, inputs: Mapping[str, Tensor]) -> None:
    """Each extra input: known, present unless optional, of its dtype, with N first."""
    for name in inputs:
        if name not in spec.input_by_name:
            accepted = ", ".join(spec.input_by_name) or "none"
            raise RequestError(_field("inputs", name),
                               f"unknown input for {spec.name}; accepted: {accepted}")
    n = predictions.shape[0]
    for declared in spec.inputs:
        field = f"inputs.{declared.name}"
        t = inputs.get(declared.name)
        if t is None:
            if declared.optional:
                continue
            raise RequestError(field, f"missing; {spec.name} takes {declared.name}: "
                                      f"{declared.description or ' or '.join(declared.shapes)}")
        if declared.dtype == "int":
            if t.dtype not in INDEX_DTYPES:
                raise RequestError(field, f"dtype {dtype_str(t.dtype)} not accepted; send "
                                          "int64 or int32")
        else:
            _float_tensor(field, t)
        if declared.shape == "predictions" and t.shape != predictions.shape:
            raise RequestError(field, f"shape {shape_str(t.shape)} does not match predictions "
                                      f"{shape_str(predictions.shape)}")
        if declared.shape == "sample" and tuple(t.shape) != (n,):
            raise RequestError(field, f"shape {shape_str(t.shape)}; expected ({n},), one per "
                                      "sample")
        if t.dim() == 0 or t.shape[0] != n:
            raise RequestError(field, f"shape {shape_str(t.shape)}; the batch dimension "
                                      f"N = {n} comes first, as in the predictions")


def _tensor_options(spec: Loss, predictions: Tensor, opts: Mapping[str, Any]) -> None:
    for o in spec.accepted_options:  # (all_options(spec), without the call)
        value = opts.get(o.name)
        if o.fits is not None and isinstance(value, Tensor):
            problem = o.fits(value, predictions)
            if problem is not None:
                raise RequestError(f"options.{o.name}", problem)


def _weights(n: int, w: Tensor, *, allow_zero_sum: bool) -> None:
    _float_tensor("weights", w)
    if tuple(w.shape) != (n,):
        raise RequestError("weights", f"shape {shape_str(w.shape)}; expected ({n},), one per "
                                      "sample")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        raise RequestError("weights", f"non-finite value at sample {_sample(_first(~finite))}")
    negative = w < 0
    if bool(negative.any()):
        i = _first(negative)
        raise RequestError("weights", f"negative value {float(w[i])} at sample {_sample(i)}")
    if not allow_zero_sum and not bool(w.any()):
        raise RequestError("weights", "sum to zero; weighted_mean would be undefined")


def sample_ids(n: int, ids: Tensor) -> None:
    """Sample ids are int64, one per sample: (N,)."""
    if ids.dtype != torch.int64:
        raise RequestError("sample_ids", f"dtype {dtype_str(ids.dtype)}; send int64")
    if tuple(ids.shape) != (n,):
        raise RequestError("sample_ids", f"shape {shape_str(ids.shape)}; expected ({n},), "
                                         "one per sample")


def gradient(kind: str | None, *, weighted: bool) -> None:
    """A gradient request names a known reduction; weighted ones need weights."""
    if kind is None:
        return
    if kind not in REDUCTIONS:
        raise RequestError("gradient", f"unknown reduction {kind!r}; one of "
                                       f"{', '.join(REDUCTIONS)}")
    if kind.startswith("weighted") and not weighted:
        raise RequestError("gradient", f"{kind} needs weights")


def finite_predictions(predictions: Tensor) -> Tensor:
    """(N,) bool: True where every prediction of the sample is finite."""
    return torch.isfinite(predictions).reshape(predictions.shape[0], -1).all(dim=1)


def no_nonfinite(finite: Tensor) -> None:
    """nan_policy='raise': reject a batch with a non-finite prediction."""
    if not bool(finite.all()):
        raise RequestError("predictions", f"non-finite value at sample "
                                          f"{_sample(_first(~finite))} (nan_policy='raise')")


def analyses(a: analysis.Request, spec: Loss, predictions: Tensor, targets: Tensor | None, *,
             class_index: bool) -> None:
    """The analyses asked for suit the loss and the batch, and stay within their bounds."""
    if a.classes and not class_index:
        name = next(n for n, on in (("per_class", a.per_class), ("accuracy", a.accuracy),
                                    ("top_k", bool(a.top_k)), ("diagnostics", a.diagnostics))
                    if on)
        if spec.targets is Targets.SAME_SHAPE:
            got = "takes values, not class indices"
        elif spec.class_targets and targets is not None:
            got = f"got {dtype_str(targets.dtype)} targets (probabilities)"
        else:  # ctc's label sequences, multilabel_margin's class lists, no targets, ...
            got = f"takes {spec.targets.description}, not class indices per position"
        raise RequestError(name, f"needs class-index targets; {spec.name} {got}")
    if a.top_k:
        n_classes = predictions.shape[1]
        if len(a.top_k) > analysis.MAX_TOP_K:
            raise RequestError("top_k", f"{len(a.top_k)} values; at most {analysis.MAX_TOP_K}")
        if len(set(a.top_k)) != len(a.top_k):
            raise RequestError("top_k", f"repeated value in {list(a.top_k)}")
        for k in a.top_k:
            if not 1 <= k <= n_classes:
                raise RequestError("top_k", f"{k} out of range [1, {n_classes}] (C is "
                                            f"{n_classes})")
    if not 0 <= a.hardest <= analysis.MAX_HARDEST:
        raise RequestError("hardest", f"{a.hardest} out of range [0, {analysis.MAX_HARDEST}]")
    if len(a.quantiles) > analysis.MAX_QUANTILES:
        raise RequestError("quantiles", f"{len(a.quantiles)} levels; at most "
                                        f"{analysis.MAX_QUANTILES}")
    for q in a.quantiles:
        if not 0.0 <= q <= 1.0:  # NaN fails too
            raise RequestError("quantiles", f"level {q} out of range [0, 1]")
