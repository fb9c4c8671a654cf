"""``LossClient``: numpy arrays or torch tensors in, ``LossResult`` out.

Request building lives in :class:`_Requests` so every front (this sync client, and any
other) shares it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lossd._errors import InvalidArgument, from_rpc_error
from lossd._result import LossInfo, LossResult
from lossd._wire import array_to_tensor, as_array, option_value
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Room for the message's own fields (shapes, options, framing) besides the tensor bytes.
_ENVELOPE_BYTES = 64 * 1024

if TYPE_CHECKING:
    from lossd._shm import SharedMemory

Batch = tuple[Any, Any] | tuple[Any, Any, Any]


class _Requests:
    """Builds EvaluateRequest messages; splits batches along N to fit a message limit."""

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes <= _ENVELOPE_BYTES:
            raise ValueError(f"max_message_bytes must exceed {_ENVELOPE_BYTES}")
        self.max_message_bytes = max_message_bytes

    def options(self, options: dict[str, Any]) -> dict[str, pb.OptionValue]:
        return {k: option_value(k, v) for k, v in options.items() if v is not None}

    def build(self, loss: str, predictions: Any, targets: Any, weights: Any, tag: str | None,
              options: dict[str, pb.OptionValue], gradient: str | None = None
              ) -> list[pb.EvaluateRequest]:
        """One request, or several along N when the payload exceeds the message limit."""
        reduction = _reduction(gradient)
        arrays = [as_array(predictions, field="predictions"), as_array(targets, field="targets")]
        if weights is not None:
            arrays.append(as_array(weights, field="weights"))
        total = sum(a.nbytes for a, _ in arrays)
        n = arrays[0][0].shape[0] if arrays[0][0].ndim else 0
        if total + _ENVELOPE_BYTES <= self.max_message_bytes or n <= 1:
            return [self._request(loss, arrays, tag, options, reduction)]
        if any(a.ndim == 0 or a.shape[0] != n for a, _ in arrays):
            # Let the server name the mismatch; it cannot be split consistently.
            return [self._request(loss, arrays, tag, options, reduction)]
        if reduction:
            raise ValueError(f"a gradient request must fit one message ({total} bytes > "
                             f"max_message_bytes {self.max_message_bytes}); raise "
                             "max_message_bytes (and the server's --max-message-mb)")
        if weights is not None:
            self._check_weights_sum(*arrays[2])
        row_bytes = max(1, math.ceil(total / n))
        rows = max(1, (self.max_message_bytes - _ENVELOPE_BYTES) // row_bytes)
        return [self._request(loss, [(a[i:i + rows], d) for a, d in arrays], tag, options)
                for i in range(0, n, rows)]

    @staticmethod
    def _check_weights_sum(w: np.ndarray, proto_dtype: int) -> None:
        # A split batch streams in chunks, where a chunk may sum to zero legitimately; the
        # whole batch may not (Evaluate's rule), so check it here.
        if proto_dtype == pb.BFLOAT16:  # its raw bits travel as int16; read them as floats
            w = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        if w.dtype.kind == "f" and np.all(np.isfinite(w)) and np.all(w >= 0) and not w.any():
            raise InvalidArgument("weights: sum to zero; weighted_mean would be undefined")

    def _request(self, loss: str, arrays: list[tuple[np.ndarray, int]], tag: str | None,
                 options: dict[str, pb.OptionValue], reduction: int = 0) -> pb.EvaluateRequest:
        req = pb.EvaluateRequest(loss=loss, options=options, tag=tag or "", gradient=reduction)
        req.predictions.CopyFrom(array_to_tensor(*arrays[0]))
        req.targets.CopyFrom(array_to_tensor(*arrays[1]))
        if len(arrays) > 2:
            req.weights.CopyFrom(array_to_tensor(*arrays[2]))
        return req


_REDUCTIONS = {"mean": pb.MEAN, "sum": pb.SUM, "weighted_mean": pb.WEIGHTED_MEAN,
               "weighted_sum": pb.WEIGHTED_SUM}


def _reduction(gradient: str | None) -> int:
    if gradient is None:
        return int(pb.REDUCTION_UNSPECIFIED)
    if gradient not in _REDUCTIONS:
        raise ValueError(f"gradient={gradient!r}: one of {', '.join(_REDUCTIONS)}")
    return int(_REDUCTIONS[gradient])


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", -1),
    ]


class LossClient:
    """A blocking client for a lossd server.

    Example::

        with LossClient("127.0.0.1:50051") as client:
            r = client.evaluate(logits, targets, loss="cross_entropy", label_smoothing=0.1)
            r.per_sample, r.mean

    ``target`` is any gRPC target ("host:port", "dns:///name:port", ...).
    ``max_message_bytes`` must not exceed the server's ``--max-message-mb``; larger batches
    are split along N and reassembled. ``timeout`` (seconds) is the default per call.
    """

    def __init__(self, target: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._requests = _Requests(max_message_bytes)
        self._channel = channel or grpc.insecure_channel(
            target, options=_channel_options(max_message_bytes))
        self._stub = pb_grpc.LossServiceStub(self._channel)

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Calls after this fail."""
        self._channel.close()

    def evaluate(self, predictions: Any, targets: Any, *, loss: str = "cross_entropy",
                 weights: Any = None, tag: str | None = None, timeout: float | None = None,
                 gradient: str | None = None, **options: Any) -> LossResult:
        """Per-sample losses and aggregates of one batch.

        ``options`` are the loss's options by their torch.nn.functional names
        (``label_smoothing=0.1``, ``ignore_index=0``, ``class_weights=[...]``) plus
        ``nan_policy``. A batch larger than ``max_message_bytes`` is split along N over
        one stream and comes back as one result, exactly as if it had gone in one message.

        ``gradient`` ("mean", "sum", "weighted_mean", "weighted_sum") also returns
        d(reduction)/d(predictions) as ``result.gradient``, shaped as the predictions
        (bfloat16 comes back as float32 numpy).
        """
        reqs = self._requests.build(loss, predictions, targets, weights, tag,
                                    self._requests.options(options), gradient)
        t = self._timeout(timeout)
        try:
            if len(reqs) == 1:
                return LossResult.from_proto(self._stub.Evaluate(reqs[0], timeout=t))
            parts = [LossResult.from_proto(r)
                     for r in self._stub.EvaluateStream(iter(reqs), timeout=t)]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        last = parts[-1].running
        assert last is not None  # EvaluateStream always sets running
        return LossResult(per_sample=np.concatenate([p.per_sample for p in parts]),
                          aggregates=last)

    def evaluate_stream(self, batches: Iterable[Batch], *, loss: str = "cross_entropy",
                        tag: str | None = None, timeout: float | None = None,
                        **options: Any) -> Iterator[LossResult]:
        """Evaluate many batches over one stream; yields one result per batch.

        Each batch is ``(predictions, targets)`` or ``(predictions, targets, weights)``.
        ``result.running`` holds the aggregates over every batch so far, so the last
        result's ``running`` covers the whole set. Batches are sent as they are consumed.
        """
        opts = self._requests.options(options)

        def requests() -> Iterator[pb.EvaluateRequest]:
            for batch in batches:
                preds, targs, *rest = batch
                yield from self._requests.build(loss, preds, targs, rest[0] if rest else None,
                                                tag, opts)

        try:
            for resp in self._stub.EvaluateStream(requests(), timeout=self._timeout(timeout)):
                yield LossResult.from_proto(resp)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def shared_memory(self, size: int, *, name: str = "lossd") -> SharedMemory:
        """A shared-memory region of ``size`` bytes registered with the server, for callers
        on the same host or in the same pod: ``with client.shared_memory(1 << 28) as shm:
        shm.evaluate(...)``. See :class:`lossd.SharedMemory`.
        """
        from lossd._shm import SharedMemory

        return SharedMemory(self, size, name=name)

    def losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """The server's loss catalogue: names, options, accepted shapes and dtypes."""
        try:
            resp = self._stub.ListLosses(pb.ListLossesRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return [LossInfo.from_proto(s) for s in resp.losses]

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout
