"""What a loss is, and the registry every loss enters through :func:`register`.

A :class:`Loss` is a torch function returning torch's elementwise loss
(``reduction='none'``), with its options (typed by their defaults), its extra input
tensors, what its targets are, and optionally a check of a request's tensors. The built-in
catalogue (:mod:`lossd_server.losses`) and plugins (:mod:`lossd_server.plugins`) register
through the same :func:`register`; :data:`LOSSES` is every loss registered in this process,
in registration order. The registry is per process: each worker process registers the
built-ins on import and loads its plugins itself (``app.create_server``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import enum
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lossd_server.errors import RegistrationError
from lossd_server.logs import MAX_NAME, shown

Tensor = torch.Tensor


class Targets(enum.Enum):
    """What a loss takes as targets; the value is the name used in ``register`` and
    ``LossSpec.targets``."""

    SAME_SHAPE = "values"
    CLASS_INDEX = "classes"
    CLASS_INDEX_OR_PROBS = "classes_or_probabilities"
    CLASS_SETS = "class_sets"
    LABEL_SEQUENCES = "sequences"
    SAMPLE_VALUES = "sample_values"
    NONE = "none"

    @property
    def description(self) -> str:
        return _TARGET_DESCRIPTIONS[self]

    @property
    def integer(self) -> bool:
        """Accepts int64/int32 targets."""
        return self in (Targets.CLASS_INDEX, Targets.CLASS_INDEX_OR_PROBS, Targets.CLASS_SETS,
                        Targets.LABEL_SEQUENCES)

    @property
    def floating(self) -> bool:
        """Accepts float targets."""
        return self in (Targets.SAME_SHAPE, Targets.CLASS_INDEX_OR_PROBS,
                        Targets.SAMPLE_VALUES)


_TARGET_DESCRIPTIONS = {
    Targets.SAME_SHAPE: "values shaped as predictions",
    Targets.CLASS_INDEX: "class indices (N, d1, ...) for predictions (N, C, d1, ...)",
    Targets.CLASS_INDEX_OR_PROBS: "class indices (N, d1, ...) or probabilities shaped as "
                                  "predictions",
    Targets.CLASS_SETS: "class indices shaped as predictions (N, C), each row's list ending "
                        "at the first -1",
    Targets.LABEL_SEQUENCES: "label sequences (N, S), padded; their lengths are an input",
    Targets.SAMPLE_VALUES: "one value per sample (N)",
    Targets.NONE: "none",
}

TargetsName = Literal["values", "classes", "classes_or_probabilities", "class_sets",
                      "sequences", "sample_values", "none"]


class OptionType(enum.Enum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STR = "str"
    TENSOR = "tensor"


def option_type(default: Any) -> OptionType:
    """An option's type is its default's: float, int, bool, str, or None (optional tensor)."""
    if default is None:
        return OptionType.TENSOR
    for kind, option in ((bool, OptionType.BOOL), (int, OptionType.INT),
                         (float, OptionType.FLOAT), (str, OptionType.STR)):
        if type(default) is kind:
            return option
    raise RegistrationError(f"unsupported default {default!r} ({type(default).__name__}); "
                            "use a float, int, bool or str, or None for an optional tensor")


@dataclass(frozen=True)
class Option:
    """A keyword option of a loss: its default (whose type is the option's type), what it
    does, and the values it accepts.

    ``choices``: the accepted values of a str option. ``check(value)`` returns a problem
    description for a bad value, or None. ``fits(value, predictions)``, for a tensor option,
    returns a problem with its shape given the predictions, or None. ``name`` is filled in
    by :func:`register` from the ``options`` mapping.
    """

    default: Any
    description: str = ""
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    fits: Callable[[Tensor, Tensor], str | None] | None = None
    name: str = ""
    type: OptionType = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", option_type(self.default))


@dataclass(frozen=True)
class Input:
    """An extra tensor a loss takes besides predictions and targets, batch dimension first.

    ``dtype``: "float" (sent as any float dtype, computed in the predictions' compute
    dtype) or "int" (int64/int32, given to the loss as int64). ``shape``: "predictions"
    (exactly the predictions' shape), "sample" ((N,)) or "any" ((N, ...); the loss's
    ``check`` may say more). ``name`` is filled in by :func:`register`.
    """

    dtype: Literal["float", "int"] = "float"
    shape: Literal["predictions", "sample", "any"] = "predictions"
    description: str = ""
    optional: bool = False
    name: str = ""
    shapes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in ("float", "int"):
            raise RegistrationError(f"dtype {self.dtype!r}: 'float' or 'int'")
        if self.shape not in ("predictions", "sample", "any"):
            raise RegistrationError(f"shape {self.shape!r}: 'predictions', 'sample' or 'any'")
        if not self.shapes:
            shapes = {"predictions": ("same as predictions",), "sample": ("(N)",),
                      "any": ("(N, ...)",)}[self.shape]
            object.__setattr__(self, "shapes", shapes)


_INPUT_SHORTHANDS = {
    "values": Input("float", "predictions"),
    "float": Input("float", "any"),
    "int": Input("int", "any"),
}

Check = Callable[[Tensor, "Tensor | None", Mapping[str, Tensor], Mapping[str, Any]], None]
"""``check(predictions, targets, inputs, options)``: a loss's own request check on the
host tensors as decoded (wire dtypes), after the generic ones; raises
``errors.RequestError`` naming the field."""

WorkingElements = Callable[[Tensor, "Tensor | None", Mapping[str, Tensor], Mapping[str, Any]],
                           int]
"""``working_elements(predictions, targets, inputs, options)``: how many elements (of the
compute dtype) the loss's function allocates for a validated request beyond its inputs and
output, at most; the server counts them against ``--max-elements`` before the function
runs. Only from shapes and options: it must cost nothing."""


@dataclass(frozen=True)
class Loss:
    """One registered loss; see :func:`register` for the fields.

    ``fn(predictions, targets, **inputs, **options)`` (no ``targets`` when ``targets`` is
    ``Targets.NONE``) gets predictions in the compute dtype, integer targets and inputs as
    int64, float ones in the compute dtype, tensor options on the device.
    """

    name: str
    description: str
    fn: Callable[..., Tensor]
    targets: Targets
    options: tuple[Option, ...] = ()
    inputs: tuple[Input, ...] = ()
    check: Check | None = None
    working_elements: WorkingElements | None = None
    """Its working memory beyond its inputs (see :data:`WorkingElements`); None: about
    their size, which the element budget counts already."""
    sum_class_dim: bool = False
    samplewise: bool = True
    """A sample's loss depends on its own rows only (every built-in), so the engine may
    evaluate a large batch in chunks of samples; False for a loss that couples the samples
    of a batch (a contrastive loss over it)."""
    min_prediction_dims: int = 1
    max_prediction_dims: int | None = None
    prediction_shapes: tuple[str, ...] = ("(N)", "(N, d1, ...)")
    target_shapes: tuple[str, ...] = ("same as predictions",)
    source: str = ""
    thread_safe: bool = False
    """``fn`` may run in several threads at once; else calls take turns (``lock``)."""
    option_by_name: Mapping[str, Option] = field(init=False, repr=False)
    input_by_name: Mapping[str, Input] = field(init=False, repr=False)
    class_targets: bool = field(init=False, repr=False)
    """Targets are (or, for ``classes_or_probabilities``, may be) class indices, one per
    position (N, d1, ...) for the class dimension 1 of the predictions: per-class breakdowns
    and accuracy apply. Whether a request's targets are indices is its dtype's say
    (``engine.Checked.class_targets``)."""
    engine_ignore_index: bool = field(init=False, repr=False)
    """The engine applies ``ignore_index`` itself (the loss takes class indices but has no
    ``ignore_index`` option of its own): ignored positions reach the function as class 0
    and their values are zeroed."""
    takes_targets: bool = field(init=False, repr=False)
    accepted_options: tuple[Option, ...] = field(init=False, repr=False)
    """Its own options, then the engine-level ones (:func:`all_options`)."""
    builtin: bool = field(init=False, repr=False)
    """One of lossd's own losses (``source`` is :data:`BUILTIN_SOURCE`): trusted never to
    write into its arguments, so the engine hands it the request's tensors themselves."""
    lock: threading.Lock | None = field(init=False, repr=False, compare=False)
    """Held around each call of ``fn`` unless ``thread_safe``."""

    def __post_init__(self) -> None:
        # Derived once: requests read these on every call.
        option_by_name = {o.name: o for o in self.options}
        class_targets = self.targets in (Targets.CLASS_INDEX, Targets.CLASS_INDEX_OR_PROBS)
        engine_ignore_index = class_targets and "ignore_index" not in option_by_name
        engine = (IGNORE_INDEX,) if engine_ignore_index else ()
        derived: dict[str, Any] = {
            "option_by_name": option_by_name,
            "input_by_name": {i.name: i for i in self.inputs},
            "class_targets": class_targets,
            "engine_ignore_index": engine_ignore_index,
            "takes_targets": self.targets is not Targets.NONE,
            "accepted_options": (*self.options, *engine, NAN_POLICY),
            "builtin": self.source == BUILTIN_SOURCE,
            "lock": None if self.thread_safe else threading.Lock(),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


# The options every loss takes; the engine applies them, not the loss functions.
NAN_POLICY = Option(
    "propagate", "non-finite predictions: propagate (into the loss), raise "
    "(INVALID_ARGUMENT), omit (left out of the aggregates and counted in 'omitted')",
    choices=("propagate", "raise", "omit"), name="nan_policy")
IGNORE_INDEX = Option(-100, "target value that is ignored: it adds no loss and no valid "
                            "position", name="ignore_index")
RESERVED_NAMES = frozenset({"nan_policy", "reduction", "predictions", "targets", "weights",
                            "input", "target", "size_average", "reduce"})


def all_options(loss: Loss) -> tuple[Option, ...]:
    """The loss's own options plus the engine-level ones it accepts."""
    return loss.accepted_options


def render_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


class Registry(Mapping[str, Loss]):
    """Every loss registered in this process by name, in registration order. Thread-safe."""

    def __init__(self) -> None:
        self._losses: dict[str, Loss] = {}
        self._lock = threading.Lock()

    def add(self, loss: Loss) -> None:
        with self._lock:
            taken = self._losses.get(loss.name)
            if taken is not None:
                raise RegistrationError(_clash(taken, loss))
            self._losses = {**self._losses, loss.name: loss}

    def remove(self, name: str) -> None:
        """Take ``name`` out again (a plugin that failed to load halfway; tests)."""
        with self._lock:
            self._losses = {k: v for k, v in self._losses.items() if k != name}

    def __getitem__(self, name: str) -> Loss:
        return self._losses[name]

    def get(self, name: str, default: Loss | None = None) -> Loss | None:  # type: ignore[override]
        """The loss called ``name``, or ``default`` (one dict lookup: Mapping.get's
        ``self[name]`` and KeyError cost a call's decode two more Python frames)."""
        return self._losses.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._losses

    def __iter__(self) -> Iterator[str]:
        return iter(self._losses)

    def __len__(self) -> int:
        return len(self._losses)


def _clash(taken: Loss, loss: Loss) -> str:
    """Why ``loss`` cannot have its name: who has it, who wants it, and the way out."""
    first = f"loss {loss.name!r} is already registered (by {taken.source or 'an unnamed source'})"
    if taken.source == BUILTIN_SOURCE:
        return f"{first}: a built-in's name; give the new loss another name"
    return (f"{first} and {loss.source or 'an unnamed source'} registers it again: rename "
            "one of the two, or serve one only: `lossd serve --no-entry-points --plugin "
            "MODULE` loads just the modules named, no installed entry point")


LOSSES = Registry()
"""Every loss of this process: the built-ins, then the plugins' in loading order."""

BUILTIN_SOURCE = "lossd"
"""The ``source`` of the built-in losses."""

_source: contextvars.ContextVar[str] = contextvars.ContextVar("loss_source", default="")


@contextlib.contextmanager
def registering_for(source: str) -> Iterator[None]:
    """Losses registered inside are recorded as coming from ``source`` (the built-ins:
    "lossd"; a plugin: its module and distribution)."""
    token = _source.set(source)
    try:
        yield
    finally:
        _source.reset(token)


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def register(name: str, fn: Callable[..., Tensor], *,
             options: Mapping[str, Any],
             targets: TargetsName | Targets,
             description: str = "",
             inputs: Mapping[str, Input | Literal["values", "float", "int"]] | None = None,
             check: Check | None = None,
             working_elements: WorkingElements | None = None,
             sum_class_dim: bool = False,
             samplewise: bool = True,
             min_prediction_dims: int = 1,
             max_prediction_dims: int | None = None,
             prediction_shapes: tuple[str, ...] | None = None,
             target_shapes: tuple[str, ...] | None = None,
             thread_safe: bool = False) -> Loss:
    """Serve ``fn`` as the loss ``name``, with everything a built-in gets.

    ``fn(input, target, *, **inputs, **options)`` (no ``target`` when ``targets="none"``)
    returns torch's ``reduction='none'`` output: shape (N, ...), whose per-sample value is
    the mean over each sample's valid positions, or (N,). It must be differentiable
    with respect to ``input`` for gradients, and must not modify its arguments in place.
    A plugin's ``fn`` gets its own copies of the tensors (a write into them, even through
    ``.data`` or ``.numpy()``, reaches neither the caller's memory nor the analyses).

    ``thread_safe``: the server calls losses from many threads at once (one per device
    slot, ``--slots``). By default a registered ``fn`` is called by one thread at a time (a
    lock per loss), so a function with state (a cache, a counter, a library that is not
    thread-safe) is correct as written; pass ``thread_safe=True`` for a function that may
    run concurrently (a pure torch function is) to let the slots compute it side by side.
    The lock covers the call, not the backward pass of a gradient.

    ``options``: keyword option -> its default, whose type is the option's type (float,
    int, bool, str; None: an optional tensor), or an :class:`Option` with a description,
    choices and checks. Values sent are type-checked against it before ``fn`` runs.

    ``targets``: ``"values"`` (floats shaped as the predictions), ``"classes"`` (integer
    class indices (N, d1, ...) for predictions (N, C, d1, ...), range-checked, with
    ``ignore_index`` honoured), ``"none"``, or one of the other :class:`Targets`.

    ``inputs``: extra tensors by torch's argument names, each an :class:`Input` or
    ``"values"`` (floats shaped as the predictions), ``"float"`` or ``"int"`` (N first).

    ``check(predictions, targets, inputs, options)``: the loss's own request check, after
    the generic ones; raise ``RequestError(field, problem)``. ``working_elements(predictions,
    targets, inputs, options)``: for a loss whose function allocates far more than its
    inputs (ctc_loss: N x T x (2S + 1)), how many elements, from the shapes; the request is
    refused beyond ``--max-elements`` before the function runs. ``sum_class_dim``: sum dim 1
    before averaging (kl_div). ``samplewise=False`` for a loss whose samples depend on each
    other (a contrastive loss over the batch): it is then never evaluated in chunks of
    samples (large batches are, for memory), and a batch split over several messages is
    each message's business. The shapes are what ListLosses shows.

    Raises :class:`RegistrationError` for a declaration that cannot be served or a name
    that is taken. Returns the registered :class:`Loss`.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistrationError(f"loss name {name!r}: letters, digits, '_', '.', '-' "
                                "(at most 64, starting with a letter or '_')")
    if not callable(fn):
        raise RegistrationError(f"loss {name!r}: fn is a {type(fn).__name__}, not callable")
    try:
        kind = targets if isinstance(targets, Targets) else Targets(targets)
    except ValueError:
        raise RegistrationError(f"loss {name!r}: targets={targets!r}; one of "
                                f"{', '.join(t.value for t in Targets)}") from None
    opts = tuple(_option(name, key, value) for key, value in dict(options).items())
    extra = tuple(_input(name, key, value) for key, value in dict(inputs or {}).items())
    _check_names(name, opts, extra)
    _check_signature(name, fn, kind, opts, extra)
    if min_prediction_dims < 1 or (max_prediction_dims is not None
                                   and max_prediction_dims < min_prediction_dims):
        raise RegistrationError(f"loss {name!r}: prediction dims [{min_prediction_dims}, "
                                f"{max_prediction_dims}] is empty")
    if prediction_shapes is None:
        prediction_shapes = (("(N, C)", "(N, C, d1, ...)") if kind is Targets.CLASS_INDEX
                             else ("(N)", "(N, d1, ...)"))
    if target_shapes is None:
        target_shapes = ((kind.description,) if kind is not Targets.SAME_SHAPE
                         else ("same as predictions",))
    loss = Loss(name=name, description=description, fn=fn, targets=kind, options=opts,
                inputs=extra, check=check, working_elements=working_elements,
                sum_class_dim=sum_class_dim,
                samplewise=samplewise,
                min_prediction_dims=min_prediction_dims,
                max_prediction_dims=max_prediction_dims,
                prediction_shapes=tuple(prediction_shapes), target_shapes=tuple(target_shapes),
                source=_source.get() or getattr(fn, "__module__", "") or "",
                thread_safe=thread_safe)
    LOSSES.add(loss)
    return loss


def _option(loss: str, key: str, value: Any) -> Option:
    where = f"loss {loss!r}, option {key!r}"
    if not isinstance(key, str) or not _IDENTIFIER.match(key):
        raise RegistrationError(f"{where}: not a Python identifier (options are keyword "
                                "arguments)")
    try:
        opt = value if isinstance(value, Option) else Option(value)
    except RegistrationError as exc:
        raise RegistrationError(f"{where}: {exc}") from None
    if opt.choices and opt.type is not OptionType.STR:
        raise RegistrationError(f"{where}: choices are for str options")
    if opt.choices and opt.default not in opt.choices:
        raise RegistrationError(f"{where}: default {opt.default!r} is not one of its choices")
    return dataclasses.replace(opt, name=key)


def _input(loss: str, key: str, value: Any) -> Input:
    where = f"loss {loss!r}, input {key!r}"
    if not isinstance(key, str) or not _IDENTIFIER.match(key):
        raise RegistrationError(f"{where}: not a Python identifier (inputs are keyword "
                                "arguments)")
    if isinstance(value, str) and value in _INPUT_SHORTHANDS:
        value = _INPUT_SHORTHANDS[value]
    if not isinstance(value, Input):
        raise RegistrationError(f"{where}: {value!r}; an Input or one of "
                                f"{', '.join(_INPUT_SHORTHANDS)}")
    return dataclasses.replace(value, name=key)


def _check_names(loss: str, opts: tuple[Option, ...], extra: tuple[Input, ...]) -> None:
    seen: dict[str, str] = {}
    for what, key in [*(("option", o.name) for o in opts), *(("input", i.name) for i in extra)]:
        if key.lower() in RESERVED_NAMES:
            raise RegistrationError(f"loss {loss!r}: {what} name {key!r} is reserved "
                                    "(lossd computes reduction='none' and applies nan_policy "
                                    "and the per-sample weights itself)")
        if key.upper() in seen:  # the Open Inference Protocol names inputs in capitals
            raise RegistrationError(f"loss {loss!r}: {what} {key!r} clashes with "
                                    f"{seen[key.upper()]}")
        seen[key.upper()] = f"{what} {key!r}"


def _check_signature(loss: str, fn: Callable[..., Tensor], kind: Targets,
                     opts: tuple[Option, ...], extra: tuple[Input, ...]) -> None:
    """``fn`` can be called the way the engine will call it (when Python can tell)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    positional = (None,) if kind is Targets.NONE else (None, None)
    keywords = {o.name: None for o in opts} | {i.name: None for i in extra}
    try:
        signature.bind(*positional, **keywords)
    except TypeError as exc:
        args = "input" if kind is Targets.NONE else "input, target"
        names = ", ".join(f"{k}=..." for k in keywords)
        raise RegistrationError(
            f"loss {loss!r}: its function {getattr(fn, '__name__', fn)!r}{signature} cannot "
            f"be called as fn({args}{', ' if names else ''}{names}): {exc}") from None


# -- names that point at the fix ----------------------------------------------------------
# A caller arriving from torch writes torch's spellings; these turn them into lossd's.

_TORCH_PREFIXES = ("torch.nn.functional.", "torch.nn.modules.loss.", "torch.nn.", "nn.functional.",
                   "functional.", "torchvision.ops.", "nn.", "F.")
_ABBREVIATIONS = {"bce": "binarycrossentropy", "bcewithlogits": "binarycrossentropywithlogits"}
"""torch's class names that are not its function names run together (BCELoss)."""


def _squashed(name: str) -> str:
    """``CrossEntropyLoss``, ``nn.CrossEntropyLoss()``, ``F.cross_entropy`` and
    ``cross_entropy`` all become ``crossentropy``: the spelling torch's class and function
    names share."""
    name = name.strip().removesuffix("()")
    for prefix in _TORCH_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    flat = name.replace("_", "").replace("-", "").lower()
    if flat.endswith("loss") and flat != "loss":
        flat = flat[:-len("loss")]
    return _ABBREVIATIONS.get(flat, flat)


def suggest_loss(name: str, names: Iterable[str] | None = None) -> str | None:
    """The loss ``name`` most likely meant: torch's class or function spelling of a loss
    (``CrossEntropyLoss``, ``nn.functional.cross_entropy`` -> ``cross_entropy``), else the
    closest name by :mod:`difflib` (a typo), else None. ``names``: the losses to pick from
    (default: every registered loss).

    >>> suggest_loss("nn.CrossEntropyLoss", ["cross_entropy", "mse_loss"])
    'cross_entropy'
    >>> suggest_loss("mse_los", ["cross_entropy", "mse_loss"])
    'mse_loss'
    """
    known = list(LOSSES if names is None else names)
    if len(name) > MAX_NAME:  # no loss name is that long: nothing to compare (or to pay for)
        return None
    by_squashed = {_squashed(n): n for n in known}
    if (exact := by_squashed.get(_squashed(name))) is not None:
        return exact
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(_squashed(name), list(by_squashed), n=1, cutoff=0.75)
    return by_squashed[close[0]] if close else None


def unknown_loss(name: str, names: Iterable[str] | None = None) -> str:
    """The problem text for an unknown loss: a "did you mean", then every loss's name."""
    known = sorted(LOSSES if names is None else names)
    guess = suggest_loss(name, known)
    hint = f"did you mean {guess!r}? " if guess is not None else ""
    return f"unknown loss {shown(name)}; {hint}one of {', '.join(known)}"


REDUCTION_OPTIONS = frozenset({"reduction", "size_average", "reduce"})
"""torch's reduction arguments: lossd takes none, it returns every reduction."""


def option_hint(loss: Loss, name: str, accepted: Iterable[str]) -> str:
    """What to do instead of option ``name``, which ``loss`` does not take: torch's
    ``weight`` and ``reduction`` explained, else a "did you mean" among ``accepted``, else
    "" (the KServe front words its own message around it)."""
    if name in REDUCTION_OPTIONS:
        return (f"lossd takes no {name}: every result carries every reduction (per_sample, "
                "sum, mean, and weighted_sum / weighted_mean with weights=), so there is "
                "nothing to choose")
    if name == "weight":
        where = ("lossd calls torch's weight class_weights" if "class_weights" in accepted
                 else f"{loss.name} takes no class weights")
        return f"{where}; per-sample weights go in weights="
    if len(name) > MAX_NAME:
        return ""
    close = difflib.get_close_matches(name, list(accepted), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def unknown_option(loss: Loss, name: str, accepted: Iterable[str]) -> str:
    """The problem text for an option ``loss`` does not take: :func:`option_hint`, then the
    accepted names."""
    accepted = list(accepted)
    listed = f"accepted: {', '.join(accepted) or 'none'}"
    hint = option_hint(loss, name, accepted)
    if name in REDUCTION_OPTIONS or name == "weight":
        return f"{hint}; {listed}"
    return f"unknown option for {loss.name}{'; ' + hint if hint else ''}; {listed}"
