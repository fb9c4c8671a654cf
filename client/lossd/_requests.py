"""Request building: the I/O-free core both clients share (httpx's ``BaseClient`` idea).

Everything here turns Python values into serialised ``EvaluateRequest`` messages, or
replies into ``LossResult`` objects; nothing opens a channel or makes a call, so
``LossClient`` and ``AsyncLossClient`` differ only in how they call. Names without a
leading underscore are used by the other modules of the package; ``lossd.requests``
publishes the ones for callers that drive gRPC themselves (bench/).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from lossd._errors import InvalidArgument
from lossd._result import Aggregates, LossResult
from lossd._wire import as_array, encode_with_tensors, option_value
from lossd.state import State
from lossd.state import from_proto as state_from_proto
from lossd.v1 import loss_service_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The clients' message limit: the server's default ``--max-message-mb`` (64)."""
DEFAULT_SPLIT_BYTES = 16 * 1024 * 1024
"""Batches with more tensor bytes than this go as several messages over one stream (the
result is the same): the server then holds one part's buffers at a time, not the whole
batch's (an extra-large batch's server peak: idle + 4.6 payloads in one 65 MB message,
1.8 in 16 MiB parts), and the parts pipeline."""
ENVELOPE_BYTES = 64 * 1024
"""Room kept in a message for its own fields (shapes, options, framing) besides the tensor
bytes: a batch is split once its tensors need more than the limit less this."""


class Batch(NamedTuple):
    """A batch of a stream, named: ``lossd.Batch(predictions, targets, weights=None,
    inputs=None, sample_ids=None, batch_id=None)``; plain ``(predictions, targets)``,
    ``(predictions, targets, weights)`` and ``(predictions, targets, weights, inputs)``
    tuples are read as the same fields.

    ``sample_ids``: (N,) int64, the caller's id of each sample (a dataset index), carried
    into the hardest samples (``h.sample_id``). ``batch_id``: the caller's id of the batch,
    carried into ``hardest_batches`` (default: its ordinal in the stream, from 0).
    """

    predictions: Any
    targets: Any
    weights: Any = None
    inputs: Mapping[str, Any] | None = None
    sample_ids: Any = None
    batch_id: int | None = None


BatchLike = (Batch | tuple[Any, Any] | tuple[Any, Any, Any]
             | tuple[Any, Any, Any, Mapping[str, Any]])
"""A stream item: a :class:`Batch`, or the plain tuples it names."""

_PREDICTIONS, _TARGETS, _WEIGHTS, _INPUTS = 2, 3, 4, 11  # EvaluateRequest field numbers
_SAMPLE_IDS = 18
_Tensors = list[tuple[int, np.ndarray, pb.DType]]
_Entries = list[tuple[int, str, np.ndarray, pb.DType]]


class Requests:
    """Builds serialised EvaluateRequest messages, copying each payload once; splits
    batches along N to fit a message limit (all chunks but the last carry ``more``).

    ``split_bytes``: split batches larger than this too (None: only past the limit);
    gradient requests are never split, so they are limited by ``max_message_bytes`` only.
    """

    def __init__(self, max_message_bytes: int, split_bytes: int | None = None) -> None:
        if max_message_bytes <= ENVELOPE_BYTES:
            raise ValueError(f"max_message_bytes must exceed {ENVELOPE_BYTES}")
        if split_bytes is not None and split_bytes <= ENVELOPE_BYTES:
            raise ValueError(f"split_bytes must exceed {ENVELOPE_BYTES}")
        self.max_message_bytes = max_message_bytes
        self.split_bytes = split_bytes

    def options(self, options: dict[str, Any]) -> dict[str, pb.OptionValue]:
        """The loss options as EvaluateRequest ``options`` (None values left out)."""
        return {k: option_value(k, v) for k, v in options.items() if v is not None}

    def build(self, loss: str, predictions: Any, targets: Any, weights: Any, tag: str | None,
              options: dict[str, pb.OptionValue], gradient: str | None = None,
              analyses: Mapping[str, Any] | None = None,
              inputs: Mapping[str, Any] | None = None, sample_ids: Any = None,
              batch_id: int | None = None) -> list[bytes]:
        """One serialised request, or several along N when the payload exceeds the limit.

        ``targets`` None: the loss takes none. ``analyses``: EvaluateRequest analysis fields
        (see :func:`analysis_fields`), on every message. ``inputs``: the loss's extra tensors
        by name (None values are left out), and ``sample_ids``, split along N with the rest.
        ``batch_id``: a stream batch's id, on every message (the server reads the last's).
        """
        reduction = gradient_reduction(gradient)
        analyses = analyses or {}
        if batch_id is not None:
            if not isinstance(batch_id, int) or isinstance(batch_id, bool):
                raise TypeError(f"batch_id={batch_id!r}: an int")
            analyses = {**analyses, "batch_id": batch_id}  # a small field like them
        tensors: _Tensors = [(_PREDICTIONS, *as_array(predictions, field="predictions"))]
        if targets is not None:
            tensors.append((_TARGETS, *as_array(targets, field="targets")))
        if weights is not None:
            tensors.append((_WEIGHTS, *as_array(weights, field="weights")))
        if sample_ids is not None:
            tensors.append((_SAMPLE_IDS, *as_array(sample_ids, field="sample_ids")))
        entries: _Entries = [(_INPUTS, name, *as_array(value, field=f"inputs.{name}"))
                             for name, value in (inputs or {}).items() if value is not None]
        arrays = [a for _, a, _ in tensors] + [a for _, _, a, _ in entries]
        total = sum(a.nbytes for a in arrays)
        n = arrays[0].shape[0] if arrays[0].ndim else 0
        limit = self.max_message_bytes
        if self.split_bytes is not None and not reduction:
            limit = min(limit, self.split_bytes)
        if total + ENVELOPE_BYTES <= limit or n <= 1:
            return [self._request(loss, tensors, entries, tag, options, reduction, analyses)]
        if any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            # Let the server name the mismatch; it cannot be split consistently.
            return [self._request(loss, tensors, entries, tag, options, reduction, analyses)]
        if reduction:
            raise ValueError(f"a gradient request must fit one message ({total} bytes > "
                             f"max_message_bytes {self.max_message_bytes}); raise "
                             "max_message_bytes (and the server's --max-message-mb)")
        for number, arr, dtype in tensors:
            if number == _WEIGHTS:
                self._check_weights_sum(arr, dtype)
        row_bytes = max(1, math.ceil(total / n))
        rows = max(1, (limit - ENVELOPE_BYTES) // row_bytes)
        return [self._request(loss, [(f, a[i:i + rows], d) for f, a, d in tensors],
                              [(f, k, a[i:i + rows], d) for f, k, a, d in entries], tag,
                              options, analyses=analyses, more=i + rows < n)
                for i in range(0, n, rows)]

    def one_message(self, requests: list[bytes]) -> bool:
        """Whether the batch of ``requests`` would fit one message (split for ``split_bytes``
        alone): it keeps the deadline of a unary call."""
        return sum(map(len, requests)) <= self.max_message_bytes

    @staticmethod
    def _check_weights_sum(w: np.ndarray, proto_dtype: pb.DType) -> None:
        # A split batch streams in chunks, where a chunk may sum to zero legitimately; the
        # whole batch may not (Evaluate's rule), so check it here.
        if proto_dtype == pb.BFLOAT16:  # its raw bits travel as int16; read them as floats
            w = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        if w.dtype.kind == "f" and np.all(np.isfinite(w)) and np.all(w >= 0) and not w.any():
            raise InvalidArgument("weights: sum to zero; weighted_mean would be undefined")

    def _request(self, loss: str, tensors: _Tensors, entries: _Entries, tag: str | None,
                 options: dict[str, pb.OptionValue],
                 reduction: pb.Reduction = pb.REDUCTION_UNSPECIFIED,
                 analyses: Mapping[str, Any] | None = None, *, more: bool = False) -> bytes:
        small = pb.EvaluateRequest(loss=loss, options=options, tag=tag or "",
                                   gradient=reduction, more=more, **(analyses or {}))
        return encode_with_tensors(small, tensors, entries)


DEFAULT_QUANTILES = (0.5, 0.9, 0.99)


def analysis_fields(*, per_class: bool = False, accuracy: bool = False,
                    top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                    hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                    hardest_batches: int = 0, mergeable: bool = False,
                    analyses_at_end: bool = False) -> dict[str, Any]:
    """The EvaluateRequest analysis fields for the clients' keyword arguments.

    ``top_k``: a k or several; ``quantiles``: True for (0.5, 0.9, 0.99), or the levels;
    ``hardest_batches`` (streams only): K batches of the largest mean loss; ``mergeable``:
    the result carries its exact state (``Aggregates.state``, for :func:`lossd.merge`);
    ``analyses_at_end`` (streams, with ``mergeable``): the analyses and running aggregates
    come once, at the stream's end.

    >>> analysis_fields(top_k=5, quantiles=True)
    {'top_k': [5], 'quantiles': [0.5, 0.9, 0.99]}
    """
    out: dict[str, Any] = {}
    if per_class:
        out["per_class"] = True
    if accuracy:
        out["accuracy"] = True
    if top_k is not None:
        ks = [top_k] if isinstance(top_k, int) else list(top_k)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise TypeError(f"top_k={top_k!r}: an int or ints")
        if ks:
            out["top_k"] = ks
    if diagnostics:
        out["diagnostics"] = True
    if hardest:
        if not isinstance(hardest, int) or isinstance(hardest, bool):
            raise TypeError(f"hardest={hardest!r}: an int (K)")
        out["hardest"] = hardest
    if hardest_batches:
        if not isinstance(hardest_batches, int) or isinstance(hardest_batches, bool):
            raise TypeError(f"hardest_batches={hardest_batches!r}: an int (K)")
        out["hardest_batches"] = hardest_batches
    if quantiles is True:
        out["quantiles"] = list(DEFAULT_QUANTILES)
    elif quantiles:
        out["quantiles"] = [float(q) for q in quantiles]
    if mergeable:
        out["mergeable"] = True
    if analyses_at_end:
        if not mergeable:
            raise ValueError("running=False needs mergeable=True: the stream's figures come "
                             "with its state, at its end")
        out["analyses_at_end"] = True
    return out


def is_state_only(reply: pb.EvaluateResponse) -> bool:
    """Whether ``reply`` is a mergeable stream's last message: its state alone, after the
    answers to its batches."""
    return reply.HasField("state") and not reply.HasField("per_sample")


def stream_end(last: LossResult | None) -> Aggregates:
    """What ``evaluate_all`` returns: the last result's ``running`` aggregates, the whole
    stream's; a ValueError when there was no batch."""
    if last is None or last.running is None:
        raise ValueError("evaluate_all: the batches were empty; nothing was evaluated")
    return last.running


def joined(replies: list[pb.EvaluateResponse], *, running: bool) -> LossResult:
    """One batch's result from the replies to its messages (several when it was split):
    the last reply's aggregates and analyses cover the whole batch; per-sample arrays are
    joined. A split batch asked ``mergeable`` ends with its state alone: it becomes the
    result's ``aggregates.state``."""
    state = None
    if len(replies) > 1 and is_state_only(replies[-1]):
        state, replies = state_from_proto(replies[-1].state), replies[:-1]
    last = LossResult.from_proto(replies[-1])
    if state is not None:
        last = dataclasses.replace(
            last, aggregates=dataclasses.replace(last.aggregates, state=state))
    if len(replies) == 1:
        return last if running else dataclasses.replace(last, running=None)
    parts = [LossResult.from_proto(r) for r in replies[:-1]] + [last]

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[-1] is None else np.concatenate(arrays)

    return dataclasses.replace(
        last, per_sample=np.concatenate([p.per_sample for p in parts]),
        running=last.running if running else None,
        predicted=cat("predicted"), confidence=cat("confidence"), correct=cat("correct"))


BATCH_FORMS = ("a (predictions, targets), (predictions, targets, weights) or (predictions, "
               "targets, weights, inputs) tuple (targets and weights may be None, inputs is "
               "a dict), or a lossd.Batch")
"""What a stream item must be, as the TypeError for one that is not says it."""


def batch_parts(batch: Any, index: int = 0) -> Batch:
    """A stream's batch number ``index`` as a :class:`Batch`.

    A :class:`Batch`, or a tuple or list of 2 to 4 items; anything else (a bare array, whose
    rows would otherwise unpack as predictions and targets) is a TypeError saying what a
    batch is.

    >>> tuple(batch_parts(("x", "t")))
    ('x', 't', None, None, None, None)
    """
    if isinstance(batch, Batch):
        parts = batch
    elif not isinstance(batch, tuple | list) or not 2 <= len(batch) <= 4:
        what = type(batch).__name__
        if isinstance(batch, tuple | list):
            what = f"{what} of {len(batch)} items"
        elif (shape := getattr(batch, "shape", None)) is not None:
            what = f"{what} of shape {tuple(shape)}"
        raise TypeError(f"evaluate_stream: batch {index} is a {what}; each batch is "
                        f"{BATCH_FORMS}: yield (predictions, targets), not predictions alone")
    else:
        parts = Batch(*batch)
    if parts.inputs is not None and not isinstance(parts.inputs, Mapping):
        raise TypeError(f"evaluate_stream: batch {index}'s inputs are a "
                        f"{type(parts.inputs).__name__}; each batch is {BATCH_FORMS}")
    return parts


def sample_ids_of(sample_ids: Any) -> np.ndarray | None:
    """The caller's sample ids as numpy (as they were sent), to keep in the result."""
    return None if sample_ids is None else as_array(sample_ids, field="sample_ids")[0]


class StreamGuard:
    """An ``evaluate_stream`` call's request stream, guarded for the caller's sake.

    An exception raised while the stream is produced (by the caller's own batch generator,
    or for an item that is not a batch) would otherwise reach gRPC, which ends the call as
    ``UNKNOWN: Exception iterating requests!`` and shows the real error only in its log.
    Here it is kept in :attr:`error`, the call is cancelled (the server stops at once) and
    the stream ends; the client then raises the error itself, unchanged
    (:meth:`raise_error`). gRPC may draw on the stream from its own thread, hence the lock.
    """

    def __init__(self, requests: Iterator[bytes]) -> None:
        self._requests = requests
        self._lock = threading.Lock()
        self._cancel: Callable[[], object] | None = None
        self.error: Exception | None = None

    def __iter__(self) -> StreamGuard:
        return self

    def __next__(self) -> bytes:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as exc:
            with self._lock:
                self.error = exc
                cancel = self._cancel
            if cancel is not None:
                cancel()
            raise StopIteration from None

    def attach(self, cancel: Callable[[], object]) -> None:
        """The call's ``cancel``, called on an error (at once for one already kept: gRPC
        starts drawing on the stream as soon as the call exists)."""
        with self._lock:
            self._cancel = cancel
            failed = self.error is not None
        if failed:
            cancel()

    def raise_error(self) -> None:
        """Raise the kept exception, if any; call it outside an ``except`` block, so that
        the exception keeps its own chain."""
        if self.error is not None:
            raise self.error


class BatchJoiner:
    """Turns batches into stream messages and the replies back into one result per batch
    (a batch split along N goes as several messages and is answered by as many)."""

    def __init__(self) -> None:
        # Per batch sent and not yet answered: its message count and its sample ids.
        self._chunks: collections.deque[tuple[int, Any]] = collections.deque()
        self._replies: list[pb.EvaluateResponse] = []
        self.state: State | None = None
        """The stream's exact state, from its last message (a mergeable stream)."""

    def requests(self, builder: Requests, batches: Iterable[BatchLike], loss: str,
                 tag: str | None, options: dict[str, pb.OptionValue],
                 analyses: Mapping[str, Any] | None = None) -> Iterator[bytes]:
        """The stream's messages, batch by batch as ``batches`` is consumed (each batch
        built by ``builder``, split along N where it must be)."""
        for index, batch in enumerate(batches):
            b = batch_parts(batch, index)
            built = builder.build(loss, b.predictions, b.targets, b.weights, tag, options,
                                  analyses=analyses, inputs=b.inputs, sample_ids=b.sample_ids,
                                  batch_id=b.batch_id)
            self._chunks.append((len(built), b.sample_ids))
            yield from built

    def settle(self, last: LossResult | None, class_names: Any = None) -> None:
        """Give the stream's last result its exact state (``last.running.state``), and,
        where the answers carried no running aggregates (``analyses_at_end``), the stream's
        figures derived from it (``last.running``, named by ``class_names``): the state
        comes in the stream's final message, after that result was handed out."""
        if self.state is None or last is None:
            return
        # The result is frozen, but its caller reads it only once the stream has ended.
        if last.running is None:
            object.__setattr__(last, "running",
                               self.state.aggregates().with_class_names(class_names))
        else:
            object.__setattr__(last.running, "state", self.state)

    def received(self, reply: pb.EvaluateResponse) -> LossResult | None:
        """The batch's result once its last reply is in, else None."""
        if not self._chunks and is_state_only(reply):
            self.state = state_from_proto(reply.state)
            return None
        self._replies.append(reply)
        count, sample_ids = self._chunks[0]
        if len(self._replies) < count:
            return None
        self._chunks.popleft()
        replies, self._replies = self._replies, []
        return joined(replies, running=True).with_sample_ids(sample_ids_of(sample_ids))


_REDUCTIONS = {"mean": pb.MEAN, "sum": pb.SUM, "weighted_mean": pb.WEIGHTED_MEAN,
               "weighted_sum": pb.WEIGHTED_SUM}


def gradient_reduction(gradient: str | None) -> pb.Reduction:
    """The request's ``gradient`` field for the clients' ``gradient=`` argument."""
    if gradient is None:
        return pb.REDUCTION_UNSPECIFIED
    if gradient not in _REDUCTIONS:
        raise ValueError(f"gradient={gradient!r}: one of {', '.join(_REDUCTIONS)}")
    return _REDUCTIONS[gradient]
