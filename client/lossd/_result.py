"""Results of an evaluation, as plain Python and numpy values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lossd._wire import tensor_to_numpy
from lossd.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class Aggregates:
    """Aggregates over the samples that count (see the README's per-sample rule).

    ``weighted_sum``, ``weighted_mean`` and ``weight_sum`` are None without weights.
    """

    sum: float
    mean: float
    count: int
    weighted_sum: float | None = None
    weighted_mean: float | None = None
    weight_sum: float | None = None
    ignored: int = 0
    omitted: int = 0

    @classmethod
    def from_proto(cls, a: pb.Aggregates) -> Aggregates:
        return cls(
            sum=a.sum,
            mean=a.mean,
            count=a.count,
            weighted_sum=a.weighted_sum if a.HasField("weighted_sum") else None,
            weighted_mean=a.weighted_mean if a.HasField("weighted_mean") else None,
            weight_sum=a.weight_sum if a.HasField("weight_sum") else None,
            ignored=a.ignored,
            omitted=a.omitted,
        )


@dataclass(frozen=True)
class LossResult:
    """Per-sample losses of one batch and its aggregates.

    ``per_sample`` is a float32 array of shape (N,). ``running`` holds the aggregates over
    the whole stream so far (``evaluate_stream`` only; None from ``evaluate``).
    ``gradient``: d(reduction)/d(predictions) when asked for with ``gradient=``, else None.
    """

    per_sample: np.ndarray
    aggregates: Aggregates
    running: Aggregates | None = None
    gradient: np.ndarray | None = None

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

    @classmethod
    def from_proto(cls, r: pb.EvaluateResponse) -> LossResult:
        running = Aggregates.from_proto(r.running) if r.HasField("running") else None
        per_sample = tensor_to_numpy(r.per_sample).copy()  # writable, owned by the caller
        gradient = tensor_to_numpy(r.gradient).copy() if r.HasField("gradient") else None
        return cls(per_sample=per_sample, aggregates=Aggregates.from_proto(r.aggregates),
                   running=running, gradient=gradient)

    def __repr__(self) -> str:
        a = self.aggregates
        w = "" if a.weighted_mean is None else f", weighted_mean={a.weighted_mean:.6g}"
        mean = "nan" if math.isnan(a.mean) else f"{a.mean:.6g}"
        return f"LossResult(n={self.per_sample.shape[0]}, mean={mean}{w}, count={a.count})"


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: str
    description: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class LossInfo:
    """One catalogue entry, as ``LossClient.losses()`` returns it."""

    name: str
    description: str
    options: tuple[OptionInfo, ...]
    prediction_shapes: tuple[str, ...]
    target_shapes: tuple[str, ...]
    prediction_dtypes: tuple[str, ...]
    target_dtypes: tuple[str, ...]

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
        )
