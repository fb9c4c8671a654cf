"""Results of an evaluation, as plain Python and numpy values.

Every result type has ``to_dict()`` (plain Python values, JSON-ready: NaN stays a float
NaN) and, where it is a table, ``to_pandas()`` (needs pandas, which lossd does not
require). Class names (``class_names=`` of the clients) are a label on top of the class
indices the server sends: ``with_class_names`` adds them, nothing else changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from lossd._wire import tensor_to_numpy
from lossd.v1 import loss_service_pb2 as pb

if TYPE_CHECKING:
    import pandas

    from lossd.state import State

SAVED_MAGIC = b"lossd-result\n"
"""The first line of a saved result (:meth:`Aggregates.to_bytes`)."""
SAVED_FORMAT = 1
"""The saved-result format this lossd writes and reads (``SavedResult.format``)."""


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install pandas") from None
    return pandas


ClassNames = tuple[str, ...]
"""Class index -> name: ``names[c]`` names class c."""


def class_names_of(names: Any) -> ClassNames | None:
    """``class_names=`` as a tuple of str (None stays None): a sequence of strings (a list,
    a tuple, a numpy array), not one string."""
    if names is None:
        return None
    if isinstance(names, str | bytes) or not isinstance(names, Sequence | np.ndarray):
        raise TypeError(f"class_names: a sequence of names (class index -> name), not a "
                        f"{type(names).__name__}")
    out = tuple(str(n) for n in names)
    if len(set(out)) != len(out):
        twice = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(f"class_names: {', '.join(map(repr, twice))} given twice")
    return out


def class_label(c: int, names: ClassNames | None) -> str | int:
    """Class ``c`` by its name, or its index where no names are given; a class beyond the
    names (a mismatch worth seeing, not hiding) is its index as a string."""
    if names is None:
        return c
    return names[c] if 0 <= c < len(names) else str(c)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (and containers of them) as plain Python values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ClassAggregates:
    """The aggregates of one target class (dense inputs: over its positions).

    ``weighted_*`` and ``weight_sum`` are None without weights; ``correct``/``accuracy``
    without ``accuracy``; ``top_k_correct``/``top_k_accuracy`` (k -> value) without
    ``top_k``.
    """

    count: int
    sum: float
    mean: float
    weighted_sum: float | None = None
    weighted_mean: float | None = None
    weight_sum: float | None = None
    correct: int | None = None
    accuracy: float | None = None
    top_k_correct: Mapping[int, int] | None = None
    top_k_accuracy: Mapping[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.__dataclass_fields__}


_CLASS_COLUMNS = ("count", "sum", "mean", "weighted_sum", "weighted_mean", "weight_sum",
                  "correct", "accuracy")


@dataclass(frozen=True)
class PerClass(Mapping[int, ClassAggregates]):
    """Target class -> :class:`ClassAggregates`, for every class present (ascending).

    The same values as parallel numpy arrays: ``classes``, ``count``, ``sum``, ``mean``
    (and ``weighted_sum``, ``weighted_mean``, ``weight_sum``, ``correct``, ``accuracy``
    when asked for; ``top_k_correct``/``top_k_accuracy`` shaped (len(top_k), classes)).

    ``class_names`` (index -> name, or None): ``labels``, ``to_dict()`` and ``to_pandas()``
    then name the classes, and a class may be looked up by name (``per_class["cat"]``).
    """

    classes: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    mean: np.ndarray
    weighted_sum: np.ndarray | None = None
    weighted_mean: np.ndarray | None = None
    weight_sum: np.ndarray | None = None
    correct: np.ndarray | None = None
    accuracy: np.ndarray | None = None
    top_k: tuple[int, ...] = ()
    top_k_correct: np.ndarray | None = None
    top_k_accuracy: np.ndarray | None = None
    class_names: ClassNames | None = None
    _position: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._position.update({c: i for i, c in enumerate(self.classes.tolist())})

    def with_class_names(self, names: Any) -> PerClass:
        """The same table, its classes named by ``names`` (index -> name)."""
        return dataclasses.replace(self, class_names=class_names_of(names), _position={})

    @property
    def labels(self) -> list[str | int]:
        """The classes present, by name where ``class_names`` are given, else by index."""
        return [class_label(c, self.class_names) for c in self.classes.tolist()]

    @classmethod
    def from_proto(cls, p: pb.PerClass, top_k: Sequence[int]) -> PerClass:
        n = len(p.classes)

        def ints(values: Any) -> np.ndarray:
            return np.array(values, dtype=np.int64)

        def floats(values: Any) -> np.ndarray | None:
            return np.array(values, dtype=np.float64) if len(values) else None

        def table(values: Any, dtype: Any) -> np.ndarray | None:
            if not len(values):
                return None
            return np.array(values, dtype=dtype).reshape(len(top_k), n)

        weighted = bool(len(p.weighted_sum))
        return cls(classes=ints(p.classes), count=ints(p.count),
                   sum=np.array(p.sum, dtype=np.float64), mean=np.array(p.mean, dtype=np.float64),
                   weighted_sum=floats(p.weighted_sum) if weighted else None,
                   weighted_mean=floats(p.weighted_mean) if weighted else None,
                   weight_sum=floats(p.weight_sum) if weighted else None,
                   correct=ints(p.correct) if len(p.correct) else None,
                   accuracy=floats(p.accuracy), top_k=tuple(top_k),
                   top_k_correct=table(p.top_k_correct, np.int64),
                   top_k_accuracy=table(p.top_k_accuracy, np.float64))

    def __getitem__(self, target_class: int | str) -> ClassAggregates:
        if isinstance(target_class, str):
            if self.class_names is None or target_class not in self.class_names:
                raise KeyError(target_class)
            target_class = self.class_names.index(target_class)
        i = self._position[int(target_class)]

        def at(a: np.ndarray | None) -> Any:
            return None if a is None else a[i].item()

        def by_k(a: np.ndarray | None) -> dict[int, Any] | None:
            return None if a is None else {k: a[j, i].item() for j, k in enumerate(self.top_k)}

        return ClassAggregates(
            count=int(self.count[i]), sum=float(self.sum[i]), mean=float(self.mean[i]),
            weighted_sum=at(self.weighted_sum), weighted_mean=at(self.weighted_mean),
            weight_sum=at(self.weight_sum), correct=at(self.correct),
            accuracy=at(self.accuracy), top_k_correct=by_k(self.top_k_correct),
            top_k_accuracy=by_k(self.top_k_accuracy))

    def __iter__(self) -> Iterator[int]:
        return iter(self.classes.tolist())

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array (the columns present), e.g. for a table or a plot."""
        out = {name: getattr(self, name) for name in _CLASS_COLUMNS
               if getattr(self, name) is not None}
        for j, k in enumerate(self.top_k):
            if self.top_k_correct is not None and self.top_k_accuracy is not None:
                out[f"top_{k}_correct"] = self.top_k_correct[j]
                out[f"top_{k}_accuracy"] = self.top_k_accuracy[j]
        return out

    def to_dict(self) -> dict[str | int, dict[str, Any]]:
        """Class (its name where given, else its index) -> its aggregates as a plain dict."""
        return {label: self[c].to_dict() for label, c in zip(self.labels, self, strict=True)}

    def to_pandas(self) -> pandas.DataFrame:
        """One row per class present, indexed by ``class`` (its name where given, with the
        index in a ``class_index`` column, else its index)."""
        pd = _pandas()
        columns = self.columns()
        if self.class_names is not None:
            columns = {"class_index": self.classes, **columns}
        return pd.DataFrame(columns, index=pd.Index(self.labels, name="class"))


@dataclass(frozen=True)
class Calibration:
    """Confidences in 15 equal-width bins: bin b holds (edges[b], edges[b+1]].

    ``count``, ``correct`` and ``confidence_sum`` per bin; ``ece`` the expected calibration
    error, sum_b (count_b / n) |accuracy_b - confidence_b|.
    """

    edges: np.ndarray
    count: np.ndarray
    correct: np.ndarray
    confidence_sum: np.ndarray
    ece: float

    @classmethod
    def from_proto(cls, c: pb.Calibration) -> Calibration:
        return cls(edges=np.array(c.edges, np.float64), count=np.array(c.count, np.int64),
                   correct=np.array(c.correct, np.int64),
                   confidence_sum=np.array(c.confidence_sum, np.float64), ece=c.ece)

    @property
    def accuracy(self) -> np.ndarray:
        """Per bin: correct / count (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.correct / np.maximum(self.count, 1), np.nan)

    @property
    def confidence(self) -> np.ndarray:
        """Per bin: the mean confidence (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.confidence_sum / np.maximum(self.count, 1),
                            np.nan)

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "count": self.count.tolist(),
                "correct": self.correct.tolist(), "confidence_sum": self.confidence_sum.tolist(),
                "accuracy": self.accuracy.tolist(), "confidence": self.confidence.tolist(),
                "ece": self.ece}

    def to_pandas(self) -> pandas.DataFrame:
        """One row per bin: lower and upper edge, count, correct, accuracy, confidence."""
        pd = _pandas()
        return pd.DataFrame({"lower": self.edges[:-1], "upper": self.edges[1:],
                             "count": self.count, "correct": self.correct,
                             "accuracy": self.accuracy, "confidence": self.confidence},
                            index=pd.RangeIndex(len(self.count), name="bin"))


@dataclass(frozen=True)
class HardSample:
    """One of the hardest samples: its position, loss and, for (N,) class-index targets,
    its target class (and with ``diagnostics`` its predicted class and confidence).
    ``sample_id``: the caller's id of the sample, where ``sample_ids`` were sent (the
    ``index`` stays its position). ``target_name``/``predicted_name``: those classes by
    name, where class names are given.
    """

    index: int
    loss: float
    target: int | None = None
    predicted: int | None = None
    confidence: float | None = None
    target_name: str | None = None
    predicted_name: str | None = None
    sample_id: int | None = None

    def named(self, names: ClassNames | None) -> HardSample:
        """This sample with its classes named by ``names`` (None: unnamed)."""
        def name(c: int | None) -> str | None:
            return None if c is None or names is None else str(class_label(c, names))

        return dataclasses.replace(self, target_name=name(self.target),
                                   predicted_name=name(self.predicted))

    def to_dict(self) -> dict[str, Any]:
        """The fields; the ``*_name`` ones only where class names are given, ``sample_id``
        only where sample ids were sent."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__
                if not ((k.endswith("_name") or k == "sample_id") and getattr(self, k) is None)}


@dataclass(frozen=True)
class Hardest(Sequence[HardSample]):
    """The K samples with the largest loss, largest first (NaN above every number, equal
    losses by index). Indices are positions in the batch (``r.hardest``) or in the stream
    from its first sample (``r.running.hardest``), whether or not sample ids were sent;
    with ``sample_ids`` each sample carries its id too (``h.sample_id``, ``sample_ids``).
    With ``class_names`` each sample's target and predicted class are named too
    (``target_name``, ``predicted_name``)."""

    samples: tuple[HardSample, ...] = ()
    class_names: ClassNames | None = None

    def with_class_names(self, names: Any) -> Hardest:
        """The same samples, their classes named by ``names`` (index -> name)."""
        checked = class_names_of(names)
        return Hardest(tuple(h.named(checked) for h in self.samples), checked)

    @classmethod
    def from_proto(cls, items: Sequence[pb.HardSample]) -> Hardest:
        return cls(tuple(HardSample(
            index=h.index, loss=h.loss,
            target=h.target if h.HasField("target") else None,
            predicted=h.predicted if h.HasField("predicted") else None,
            confidence=h.confidence if h.HasField("confidence") else None,
            sample_id=h.sample_id if h.HasField("sample_id") else None) for h in items))

    @overload
    def __getitem__(self, i: int) -> HardSample: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[HardSample]: ...

    def __getitem__(self, i: int | slice) -> HardSample | Sequence[HardSample]:
        return self.samples[i]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def indices(self) -> np.ndarray:
        """The samples' indices, hardest first."""
        return np.array([h.index for h in self.samples], dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        """Their losses, largest first."""
        return np.array([h.loss for h in self.samples], dtype=np.float64)

    @property
    def sample_ids(self) -> np.ndarray | None:
        """The samples' ids (as sent), hardest first; None where no ids were sent."""
        if any(h.sample_id is None for h in self.samples):
            return None
        return np.array([h.sample_id for h in self.samples], dtype=np.int64)

    def to_dict(self) -> list[dict[str, Any]]:
        return [h.to_dict() for h in self.samples]

    def to_pandas(self) -> pandas.DataFrame:
        """One row per sample, hardest first: index, (sample_id where sample ids were
        sent), loss, target, predicted, confidence (and target_name, predicted_name where
        class names are given)."""
        pd = _pandas()
        columns = ["index", "loss", "target", "predicted", "confidence"]
        if self.samples and self.samples[0].sample_id is not None:
            columns.insert(1, "sample_id")
        if self.class_names is not None:
            columns += ["target_name", "predicted_name"]
        return pd.DataFrame([h.to_dict() for h in self.samples], columns=columns)


@dataclass(frozen=True)
class HardBatch:
    """One of a stream's hardest batches: the caller's ``batch_id`` (``lossd.Batch``'s, else
    its ordinal), its ``ordinal`` in the stream (from 0), the samples that count and their
    mean loss (exact sum / count, as ``Aggregates``), and with ``hardest`` how many of its
    samples are among the stream's hardest (``in_hardest``; None without)."""

    batch_id: int
    ordinal: int
    count: int
    mean: float
    in_hardest: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HardestBatches(Sequence[HardBatch]):
    """The K completed batches of a stream with the largest mean loss, largest first (NaN
    above every number, equal means by ordinal): ``evaluate_stream(...,
    hardest_batches=K)``'s ``r.running.hardest_batches``, or ``evaluate_all``'s."""

    batches: tuple[HardBatch, ...] = ()

    @classmethod
    def from_proto(cls, items: Sequence[pb.HardBatch]) -> HardestBatches:
        return cls(tuple(HardBatch(
            batch_id=b.batch_id, ordinal=b.ordinal, count=b.count, mean=b.mean,
            in_hardest=b.in_hardest if b.HasField("in_hardest") else None) for b in items))

    @overload
    def __getitem__(self, i: int) -> HardBatch: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[HardBatch]: ...

    def __getitem__(self, i: int | slice) -> HardBatch | Sequence[HardBatch]:
        return self.batches[i]

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batch_ids(self) -> np.ndarray:
        """The batches' ids, hardest first."""
        return np.array([b.batch_id for b in self.batches], dtype=np.int64)

    def to_dict(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.batches]

    def to_pandas(self) -> pandas.DataFrame:
        """One row per batch, hardest first: batch_id, ordinal, count, mean, in_hardest."""
        pd = _pandas()
        return pd.DataFrame([b.to_dict() for b in self.batches],
                            columns=["batch_id", "ordinal", "count", "mean", "in_hardest"])


@dataclass(frozen=True)
class Quantiles(Mapping[float, float]):
    """Level -> loss quantile (e.g. ``q[0.99]``), from the server's sketch: each within
    ``relative_accuracy`` (2**-8) of the exact value of rank floor(q * (count - 1)).

    ``levels`` and their ``estimates``; ``min`` and ``max`` are exact; ``count`` losses
    are in it (NaN ones counted apart in ``nan_count``); ``collapsed``: the sketch hit its
    bucket bound and its lowest levels are not within the bound.
    """

    levels: tuple[float, ...]
    estimates: tuple[float, ...]
    count: int
    min: float
    max: float
    nan_count: int = 0
    relative_accuracy: float = 2.0 ** -8
    collapsed: bool = False

    @classmethod
    def from_proto(cls, q: pb.Quantiles) -> Quantiles:
        return cls(levels=tuple(q.levels), estimates=tuple(q.values), count=q.count, min=q.min,
                   max=q.max, nan_count=q.nan_count, relative_accuracy=q.relative_accuracy,
                   collapsed=q.collapsed)

    def __getitem__(self, level: float) -> float:
        for lv, v in zip(self.levels, self.estimates, strict=True):
            if lv == level:
                return v
        raise KeyError(level)

    def __iter__(self) -> Iterator[float]:
        return iter(self.levels)

    def __len__(self) -> int:
        return len(self.levels)

    def to_dict(self) -> dict[str, Any]:
        return {"quantiles": dict(zip(self.levels, self.estimates, strict=True)),
                "count": self.count, "min": self.min, "max": self.max,
                "nan_count": self.nan_count, "relative_accuracy": self.relative_accuracy,
                "collapsed": self.collapsed}

    def to_pandas(self) -> pandas.Series:
        """The levels, then ``max``, as a Series named ``loss``."""
        pd = _pandas()
        return pd.Series([*self.estimates, self.max], index=[*map(str, self.levels), "max"],
                         name="loss")


@dataclass(frozen=True)
class Aggregates:
    """Aggregates over the samples that count (docs/losses.md, the per-sample rule), and the
    analyses asked for (None where not).

    ``weighted_sum``, ``weighted_mean`` and ``weight_sum`` are None without weights.
    Analyses (class-index targets for the class ones): ``per_class``; ``accuracy`` (top-1,
    ``correct`` of ``accuracy_count`` samples, dense: positions); ``top_k_accuracy`` and
    ``top_k_correct`` (k -> value); ``calibration`` and ``ece`` (with ``diagnostics``);
    ``hardest``; ``quantiles``; ``hardest_batches`` (a stream's running aggregates only).
    """

    sum: float
    mean: float
    count: int
    weighted_sum: float | None = None
    weighted_mean: float | None = None
    weight_sum: float | None = None
    ignored: int = 0
    omitted: int = 0
    per_class: PerClass | None = None
    accuracy: float | None = None
    correct: int | None = None
    accuracy_count: int | None = None
    top_k_accuracy: Mapping[int, float] | None = None
    top_k_correct: Mapping[int, int] | None = None
    calibration: Calibration | None = None
    hardest: Hardest | None = None
    quantiles: Quantiles | None = None
    hardest_batches: HardestBatches | None = None
    state: State | None = field(default=None, repr=False, compare=False)
    """The exact state these figures derive from (asked with ``mergeable``): what
    :func:`lossd.merge`, :meth:`save` and :func:`lossd.distributed.gather` use."""

    @classmethod
    def from_proto(cls, a: pb.Aggregates, analysis: pb.Analysis | None = None) -> Aggregates:
        extra: dict[str, Any] = {}
        if analysis is not None:
            acc = analysis.accuracy if analysis.HasField("accuracy") else None
            top_k = tuple(acc.top_k) if acc is not None else ()
            if acc is not None:
                extra.update(accuracy=acc.accuracy, correct=acc.correct,
                             accuracy_count=acc.count)
                if top_k:
                    extra.update(top_k_accuracy=dict(zip(top_k, acc.top_k_accuracy, strict=True)),
                                 top_k_correct=dict(zip(top_k, acc.top_k_correct, strict=True)))
            if analysis.HasField("per_class"):
                extra["per_class"] = PerClass.from_proto(analysis.per_class, top_k)
            if analysis.HasField("calibration"):
                extra["calibration"] = Calibration.from_proto(analysis.calibration)
            if analysis.HasField("hardest"):
                extra["hardest"] = Hardest.from_proto(analysis.hardest.samples)
            if analysis.HasField("quantiles"):
                extra["quantiles"] = Quantiles.from_proto(analysis.quantiles)
            if analysis.HasField("hardest_batches"):
                extra["hardest_batches"] = HardestBatches.from_proto(
                    analysis.hardest_batches.batches)
        return cls(
            sum=a.sum,
            mean=a.mean,
            count=a.count,
            weighted_sum=a.weighted_sum if a.HasField("weighted_sum") else None,
            weighted_mean=a.weighted_mean if a.HasField("weighted_mean") else None,
            weight_sum=a.weight_sum if a.HasField("weight_sum") else None,
            ignored=a.ignored,
            omitted=a.omitted,
            **extra,
        )

    def with_class_names(self, names: Any) -> Aggregates:
        """The same aggregates, the classes of ``per_class`` and ``hardest`` named by
        ``names`` (index -> name; None: as they are)."""
        if names is None:
            return self
        return dataclasses.replace(
            self,
            per_class=None if self.per_class is None else self.per_class.with_class_names(names),
            hardest=None if self.hardest is None else self.hardest.with_class_names(names))

    @property
    def ece(self) -> float | None:
        """Expected calibration error (with ``diagnostics``), else None."""
        return None if self.calibration is None else self.calibration.ece

    def to_bytes(self) -> bytes:
        """These aggregates in lossd's saved-result format (docs/training.md, "Saved
        results"): the line ``lossd-result``, then a versioned ``lossd.v1.SavedResult``
        message; not pickle. Needs :attr:`state` (evaluate with ``mergeable=True``)."""
        from lossd import __version__
        from lossd.state import to_proto

        state = _needs_state(self)
        saved = pb.SavedResult(format=SAVED_FORMAT, lossd_version=__version__)
        to_proto(state, saved.state)
        names = class_names_in(self)
        if names is not None:
            saved.class_names.extend(names)
        return SAVED_MAGIC + saved.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> Aggregates:
        """Aggregates from :meth:`to_bytes`' format, rebuilt from their state (so exactly
        as the server derived them). Raises :class:`lossd.MergeError` for anything else
        (another format, a newer version, a damaged file)."""
        from google.protobuf.message import DecodeError

        from lossd.state import MergeError, from_proto

        if not data.startswith(SAVED_MAGIC):
            raise MergeError("not a saved lossd result (it does not start with "
                             "'lossd-result')")
        saved = pb.SavedResult()
        try:
            saved.ParseFromString(data[len(SAVED_MAGIC):])
        except DecodeError as exc:
            raise MergeError(f"a damaged saved lossd result: {exc}") from None
        if saved.format != SAVED_FORMAT:
            raise MergeError(f"saved result format {saved.format} (lossd "
                             f"{saved.lossd_version or '?'}) is not {SAVED_FORMAT}, the one "
                             "this lossd reads")
        out = from_proto(saved.state).aggregates()
        return out.with_class_names(tuple(saved.class_names)) if saved.class_names else out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write these aggregates to ``path`` (:meth:`to_bytes`; read back with
        :func:`lossd.load_result`, merge with :func:`lossd.merge`)."""
        Path(path).write_bytes(self.to_bytes())

    @property
    def max(self) -> float | None:
        """The largest loss (with ``quantiles``), else None."""
        return None if self.quantiles is None else self.quantiles.max

    def to_dict(self) -> dict[str, Any]:
        """Every field present (None for those not asked for) as plain Python values."""
        out = {k: _plain(getattr(self, k)) for k in self.__dataclass_fields__ if k != "state"}
        out["ece"] = self.ece
        return out

    def to_pandas(self) -> pandas.Series:
        """The scalar aggregates and analyses (accuracy, top-k, ECE, quantiles, max) as a
        Series; tables are ``per_class.to_pandas()``, ``hardest.to_pandas()``, ..."""
        pd = _pandas()
        row: dict[str, Any] = {k: getattr(self, k) for k in (
            "count", "sum", "mean", "weighted_sum", "weighted_mean", "weight_sum", "ignored",
            "omitted", "accuracy", "correct", "accuracy_count")}
        for k, v in (self.top_k_accuracy or {}).items():
            row[f"top_{k}_accuracy"] = v
        row["ece"] = self.ece
        if self.quantiles is not None:
            for level, v in self.quantiles.items():
                row[f"quantile_{level:g}"] = v
            row["max"] = self.quantiles.max
        return pd.Series({k: v for k, v in row.items() if v is not None}, dtype=object)


def _needs_state(a: Aggregates) -> State:
    if a.state is None:
        from lossd.state import NO_STATE_HINT, MergeError

        raise MergeError(f"this result carries no mergeable state: {NO_STATE_HINT}")
    return a.state


def class_names_in(a: Aggregates) -> ClassNames | None:
    """The class names ``a``'s analyses carry (None: none)."""
    for part in (a.per_class, a.hardest):
        if part is not None and part.class_names is not None:
            return part.class_names
    return None


@dataclass(frozen=True)
class LossResult:
    """Per-sample losses of one batch and its aggregates.

    ``per_sample`` is a float32 array of shape (N,). ``running`` holds the aggregates over
    the whole stream so far (``evaluate_stream`` only; None from ``evaluate``).
    ``gradient``: d(reduction)/d(predictions) when asked for with ``gradient=``, else None.
    With ``diagnostics=True``: ``predicted`` (int32), ``confidence`` (float32) and
    ``correct`` (bool), each shaped as the targets. ``sample_ids``: the caller's ids of the
    batch's samples, where sent (they index ``to_pandas()``). The analyses of the batch are
    ``r.per_class``, ``r.accuracy``, ... (shortcuts to ``r.aggregates``); of the stream so
    far ``r.running.per_class``, ...
    """

    per_sample: np.ndarray
    aggregates: Aggregates
    running: Aggregates | None = None
    gradient: np.ndarray | None = None
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    correct: np.ndarray | None = None
    sample_ids: np.ndarray | None = None

    @property
    def sum(self) -> float:
        return self.aggregates.sum

    @property
    def mean(self) -> float:
        return self.aggregates.mean

    @property
    def count(self) -> int:
        return self.aggregates.count

    @property
    def weighted_sum(self) -> float | None:
        return self.aggregates.weighted_sum

    @property
    def weighted_mean(self) -> float | None:
        return self.aggregates.weighted_mean

    @property
    def weight_sum(self) -> float | None:
        return self.aggregates.weight_sum

    @property
    def ignored(self) -> int:
        return self.aggregates.ignored

    @property
    def omitted(self) -> int:
        return self.aggregates.omitted

    @property
    def per_class(self) -> PerClass | None:
        return self.aggregates.per_class

    @property
    def accuracy(self) -> float | None:
        return self.aggregates.accuracy

    @property
    def top_k_accuracy(self) -> Mapping[int, float] | None:
        return self.aggregates.top_k_accuracy

    @property
    def calibration(self) -> Calibration | None:
        return self.aggregates.calibration

    @property
    def ece(self) -> float | None:
        return self.aggregates.ece

    @property
    def hardest(self) -> Hardest | None:
        return self.aggregates.hardest

    @property
    def quantiles(self) -> Quantiles | None:
        return self.aggregates.quantiles

    @classmethod
    def from_proto(cls, r: pb.EvaluateResponse, *, per_sample: np.ndarray | None = None
                   ) -> LossResult:
        """The result of a reply; ``per_sample``: the losses when they came another way
        (shared memory), not in ``r``."""
        analysis = r.analysis if r.HasField("analysis") else None
        running = (Aggregates.from_proto(r.running, r.running_analysis if
                                         r.HasField("running_analysis") else None)
                   if r.HasField("running") else None)
        if per_sample is None:  # writable, owned by the caller
            per_sample = tensor_to_numpy(r.per_sample).copy()
        gradient = tensor_to_numpy(r.gradient).copy() if r.HasField("gradient") else None
        predicted = confidence = correct = None
        if r.HasField("diagnostics"):
            d = r.diagnostics
            predicted = tensor_to_numpy(d.predicted).copy()
            confidence = tensor_to_numpy(d.confidence).copy()
            correct = np.frombuffer(d.correct, dtype=np.bool_).reshape(predicted.shape).copy()
        aggregates = Aggregates.from_proto(r.aggregates, analysis)
        if r.HasField("state"):
            from lossd.state import from_proto

            aggregates = dataclasses.replace(aggregates, state=from_proto(r.state))
        return cls(per_sample=per_sample, aggregates=aggregates,
                   running=running, gradient=gradient, predicted=predicted,
                   confidence=confidence, correct=correct)

    @property
    def whole(self) -> Aggregates:
        """What this result covers as a whole: a stream's ``running`` aggregates (the stream
        so far), else the batch's ``aggregates``. What :func:`lossd.merge` and :meth:`save`
        take."""
        return self.running if self.running is not None else self.aggregates

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`whole` to ``path`` (see :meth:`Aggregates.save`)."""
        self.whole.save(path)

    def with_sample_ids(self, sample_ids: np.ndarray | None) -> LossResult:
        """The same result carrying the caller's ``sample_ids`` (None: as it is)."""
        if sample_ids is None:
            return self
        return dataclasses.replace(self, sample_ids=sample_ids)

    def with_class_names(self, names: Any) -> LossResult:
        """The same result, the classes of its analyses (batch and running) named by
        ``names`` (index -> name; None: as it is)."""
        if names is None:
            return self
        return dataclasses.replace(
            self, aggregates=self.aggregates.with_class_names(names),
            running=None if self.running is None else self.running.with_class_names(names))

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain Python values (arrays as lists)."""
        return {"per_sample": self.per_sample.tolist(), "aggregates": self.aggregates.to_dict(),
                "running": None if self.running is None else self.running.to_dict(),
                "gradient": None if self.gradient is None else self.gradient.tolist(),
                "predicted": _plain(self.predicted), "confidence": _plain(self.confidence),
                "correct": _plain(self.correct), "sample_ids": _plain(self.sample_ids)}

    def to_pandas(self) -> pandas.DataFrame:
        """One row per sample: ``loss`` and, with (N,) diagnostics, ``predicted``,
        ``confidence`` and ``correct``; indexed by ``sample`` (the position), or by
        ``sample_id`` where sample ids were sent."""
        pd = _pandas()
        columns: dict[str, Any] = {"loss": self.per_sample}
        for name in ("predicted", "confidence", "correct"):
            value = getattr(self, name)
            if value is not None and value.ndim == 1:
                columns[name] = value
        index = (pd.RangeIndex(self.per_sample.shape[0], name="sample")
                 if self.sample_ids is None else pd.Index(self.sample_ids, name="sample_id"))
        return pd.DataFrame(columns, index=index)

    def __repr__(self) -> str:
        a = self.aggregates
        w = "" if a.weighted_mean is None else f", weighted_mean={a.weighted_mean:.6g}"
        mean = "nan" if math.isnan(a.mean) else f"{a.mean:.6g}"
        acc = "" if a.accuracy is None else f", accuracy={a.accuracy:.4g}"
        return (f"LossResult(n={self.per_sample.shape[0]}, mean={mean}{w}{acc}, "
                f"count={a.count})")


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: str
    description: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputInfo:
    """One extra tensor a loss takes (``evaluate(..., inputs={name: ...})``), N first."""

    name: str
    description: str
    shapes: tuple[str, ...]
    dtypes: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class LossInfo:
    """One catalogue entry, as ``LossClient.losses()`` returns it.

    ``targets``: what the targets are ("values", "classes", "none", ...; see the loss
    table in docs/losses.md); ``source``: "lossd" for a built-in, else the plugin that
    registered it.
    """

    name: str
    description: str
    options: tuple[OptionInfo, ...]
    prediction_shapes: tuple[str, ...]
    target_shapes: tuple[str, ...]
    prediction_dtypes: tuple[str, ...]
    target_dtypes: tuple[str, ...]
    inputs: tuple[InputInfo, ...] = ()
    targets: str = ""
    source: str = ""

    @classmethod
    def from_proto(cls, s: pb.LossSpec) -> LossInfo:
        from lossd._wire import dtype_name

        return cls(
            name=s.name,
            description=s.description,
            options=tuple(OptionInfo(o.name, o.type, o.default, o.description, tuple(o.choices))
                          for o in s.options),
            prediction_shapes=tuple(s.prediction_shapes),
            target_shapes=tuple(s.target_shapes),
            prediction_dtypes=tuple(dtype_name(d) for d in s.prediction_dtypes),
            target_dtypes=tuple(dtype_name(d) for d in s.target_dtypes),
            inputs=tuple(InputInfo(i.name, i.description, tuple(i.shapes),
                                   tuple(dtype_name(d) for d in i.dtypes), i.optional)
                         for i in s.inputs),
            targets=s.targets,
            source=s.source,
        )
