"""``LossClient``: numpy arrays or torch tensors in, ``LossResult`` out.

Request building lives in :class:`_Requests` so every front (this sync client, and any
other) shares it. Channel configuration (TLS, token, retries, keepalive, load balancing)
lives in :func:`_channel_options`, :func:`service_config` and :func:`channel_credentials`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lossd._errors import InvalidArgument, LossdError, from_rpc_error
from lossd._result import LossInfo, LossResult
from lossd._wire import as_array, encode_with_tensors, option_value
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SPLIT_BYTES = 16 * 1024 * 1024
"""Batches with more tensor bytes than this go as several messages over one stream (the
result is the same): the server then holds one part's buffers at a time, not the whole
batch's (an extra-large batch's server peak: idle + 4.6 payloads in one 65 MB message,
1.8 in 16 MiB parts), and the parts pipeline."""
# Room for the message's own fields (shapes, options, framing) besides the tensor bytes.
_ENVELOPE_BYTES = 64 * 1024

if TYPE_CHECKING:
    from lossd._shm import SharedMemory

Batch = tuple[Any, Any] | tuple[Any, Any, Any] | tuple[Any, Any, Any, Mapping[str, Any]]
"""A batch of a stream: (predictions, targets), with weights, and with extra inputs (targets
and weights may be None)."""

_PREDICTIONS, _TARGETS, _WEIGHTS, _INPUTS = 2, 3, 4, 11  # EvaluateRequest field numbers
_Tensors = list[tuple[int, np.ndarray, pb.DType]]
_Entries = list[tuple[int, str, np.ndarray, pb.DType]]


class _Requests:
    """Builds serialised EvaluateRequest messages, copying each payload once; splits
    batches along N to fit a message limit (all chunks but the last carry ``more``).

    ``split_bytes``: split batches larger than this too (None: only past the limit);
    gradient requests are never split, so they are limited by ``max_message_bytes`` only.
    """

    def __init__(self, max_message_bytes: int, split_bytes: int | None = None) -> None:
        if max_message_bytes <= _ENVELOPE_BYTES:
            raise ValueError(f"max_message_bytes must exceed {_ENVELOPE_BYTES}")
        if split_bytes is not None and split_bytes <= _ENVELOPE_BYTES:
            raise ValueError(f"split_bytes must exceed {_ENVELOPE_BYTES}")
        self.max_message_bytes = max_message_bytes
        self.split_bytes = split_bytes

    def options(self, options: dict[str, Any]) -> dict[str, pb.OptionValue]:
        return {k: option_value(k, v) for k, v in options.items() if v is not None}

    def build(self, loss: str, predictions: Any, targets: Any, weights: Any, tag: str | None,
              options: dict[str, pb.OptionValue], gradient: str | None = None,
              analyses: Mapping[str, Any] | None = None,
              inputs: Mapping[str, Any] | None = None) -> list[bytes]:
        """One serialised request, or several along N when the payload exceeds the limit.

        ``targets`` None: the loss takes none. ``analyses``: EvaluateRequest analysis fields
        (see :func:`analysis_fields`), on every message. ``inputs``: the loss's extra tensors
        by name (None values are left out), split along N with the rest.
        """
        reduction = _reduction(gradient)
        analyses = analyses or {}
        tensors: _Tensors = [(_PREDICTIONS, *as_array(predictions, field="predictions"))]
        if targets is not None:
            tensors.append((_TARGETS, *as_array(targets, field="targets")))
        if weights is not None:
            tensors.append((_WEIGHTS, *as_array(weights, field="weights")))
        entries: _Entries = [(_INPUTS, name, *as_array(value, field=f"inputs.{name}"))
                             for name, value in (inputs or {}).items() if value is not None]
        arrays = [a for _, a, _ in tensors] + [a for _, _, a, _ in entries]
        total = sum(a.nbytes for a in arrays)
        n = arrays[0].shape[0] if arrays[0].ndim else 0
        limit = self.max_message_bytes
        if self.split_bytes is not None and not reduction:
            limit = min(limit, self.split_bytes)
        if total + _ENVELOPE_BYTES <= limit or n <= 1:
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
        rows = max(1, (limit - _ENVELOPE_BYTES) // row_bytes)
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
                    hardest: int = 0, quantiles: bool | Iterable[float] | None = None
                    ) -> dict[str, Any]:
    """The EvaluateRequest analysis fields for the clients' keyword arguments.

    ``top_k``: a k or several; ``quantiles``: True for (0.5, 0.9, 0.99), or the levels.

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
    if quantiles is True:
        out["quantiles"] = list(DEFAULT_QUANTILES)
    elif quantiles:
        out["quantiles"] = [float(q) for q in quantiles]
    return out


def _joined(replies: list[pb.EvaluateResponse], *, running: bool) -> LossResult:
    """One batch's result from the replies to its messages (several when it was split):
    the last reply's aggregates and analyses cover the whole batch; per-sample arrays are
    joined."""
    last = LossResult.from_proto(replies[-1])
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


class _BatchJoiner:
    """Turns batches into stream messages and the replies back into one result per batch
    (a batch split along N goes as several messages and is answered by as many)."""

    def __init__(self) -> None:
        self._chunks: collections.deque[int] = collections.deque()
        self._replies: list[pb.EvaluateResponse] = []

    def requests(self, builder: _Requests, batches: Iterable[Batch], loss: str,
                 tag: str | None, options: dict[str, pb.OptionValue],
                 analyses: Mapping[str, Any] | None = None) -> Iterator[bytes]:
        for batch in batches:
            preds, targs, *rest = batch
            weights = rest[0] if rest else None
            inputs = rest[1] if len(rest) > 1 else None
            built = builder.build(loss, preds, targs, weights, tag, options,
                                  analyses=analyses, inputs=inputs)
            self._chunks.append(len(built))
            yield from built

    def received(self, reply: pb.EvaluateResponse) -> LossResult | None:
        """The batch's result once its last reply is in, else None."""
        self._replies.append(reply)
        if len(self._replies) < self._chunks[0]:
            return None
        self._chunks.popleft()
        replies, self._replies = self._replies, []
        return _joined(replies, running=True)


_REDUCTIONS = {"mean": pb.MEAN, "sum": pb.SUM, "weighted_mean": pb.WEIGHTED_MEAN,
               "weighted_sum": pb.WEIGHTED_SUM}


def _reduction(gradient: str | None) -> pb.Reduction:
    if gradient is None:
        return pb.REDUCTION_UNSPECIFIED
    if gradient not in _REDUCTIONS:
        raise ValueError(f"gradient={gradient!r}: one of {', '.join(_REDUCTIONS)}")
    return _REDUCTIONS[gradient]


DEFAULT_TIMEOUT = 60.0
"""Default deadline of unary calls (seconds); streams have none unless asked."""
KEEPALIVE_SECONDS = 30.0
"""Keepalive ping interval; servers accept pings from every 10 s (--min-client-ping-seconds)."""
RETRY_ATTEMPTS = 5
SERVICE = "lossd.v1.LossService"
# Idempotent methods: evaluating is a pure function of the request, so a call refused with
# UNAVAILABLE (server unreachable, draining, connection lost before an answer) is safely
# sent again. gRPC retries a stream only until its first response arrived (and while the
# sent messages fit its 256 KiB retry buffer); after that an UNAVAILABLE stream fails.
# SharedMemorySession is a stateful session and is not retried.
RETRIED_METHODS = ("Evaluate", "EvaluateStream", "ListLosses")

ENV_TOKEN = "LOSSD_TOKEN"
ENV_TLS_CA = "LOSSD_TLS_CA"
# Not LOSSD_TLS_CERT/LOSSD_TLS_KEY: those are the server's own --tls-cert/--tls-key.
ENV_TLS_CERT = "LOSSD_TLS_CLIENT_CERT"
ENV_TLS_KEY = "LOSSD_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "LOSSD_TLS_SERVER_NAME"


def service_config(*, load_balancing: str = "round_robin",
                   retry_attempts: int = RETRY_ATTEMPTS, initial_backoff: float = 0.1,
                   max_backoff: float = 2.0, backoff_multiplier: float = 2.0) -> str:
    """The gRPC service config (JSON): load balancing across every resolved address and
    retries with exponential backoff on UNAVAILABLE for the idempotent methods.

    >>> cfg = json.loads(service_config())
    >>> cfg["loadBalancingConfig"], cfg["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    ([{'round_robin': {}}], 5)
    """
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retry_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": retry_attempts,
                "initialBackoff": f"{initial_backoff:g}s",
                "maxBackoff": f"{max_backoff:g}s",
                "backoffMultiplier": backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def _channel_options(max_message_bytes: int, *, keepalive_seconds: float = KEEPALIVE_SECONDS,
                     load_balancing: str = "round_robin",
                     retry_attempts: int = RETRY_ATTEMPTS,
                     server_name: str | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", -1),
        ("grpc.service_config", service_config(load_balancing=load_balancing,
                                               retry_attempts=retry_attempts)),
        ("grpc.enable_retries", 1 if retry_attempts > 1 else 0),
        # The service config above wins over one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if keepalive_seconds > 0:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


PemSource = str | os.PathLike[str] | bytes | None


def _pem(value: PemSource, env: Mapping[str, str], var: str, what: str) -> bytes | None:
    """PEM bytes from bytes, a file path, or (when ``value`` is None) the file named by
    ``env[var]``."""
    if value is None:
        path = env.get(var) or None
        if path is None:
            return None
        value, what = path, f"{what} (from {var})"
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {os.fspath(value)}: {exc.strerror}") from None


def channel_credentials(*, root_certificates: PemSource = None,
                        certificate_chain: PemSource = None, private_key: PemSource = None,
                        tls: bool | None = None, env: Mapping[str, str] | None = None
                        ) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    Each PEM option is bytes or a file path; one left out comes from the file named by
    ``LOSSD_TLS_CA``, ``LOSSD_TLS_CLIENT_CERT`` or ``LOSSD_TLS_CLIENT_KEY``. TLS is on when
    ``tls`` is True or (``tls`` None) when any PEM is given; without a root CA the system's
    roots apply. A client certificate (mutual TLS) needs both chain and key.
    """
    env = os.environ if env is None else env
    ca = _pem(root_certificates, env, ENV_TLS_CA, "root_certificates")
    chain = _pem(certificate_chain, env, ENV_TLS_CERT, "certificate_chain")
    key = _pem(private_key, env, ENV_TLS_KEY, "private_key")
    if (chain is None) != (key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    if tls is False:
        if ca or chain:
            raise ValueError("tls=False with TLS certificates given")
        return None
    if tls is None and ca is None and chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=chain)


@dataclasses.dataclass(frozen=True)
class ChannelSetup:
    """What both clients build their channel from: options, credentials, call metadata."""

    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, *, max_message_bytes: int, token: str | None, root_certificates: PemSource,
           certificate_chain: PemSource, private_key: PemSource, tls: bool | None,
           server_name: str | None, retry_attempts: int, keepalive_seconds: float,
           load_balancing: str, env: Mapping[str, str] | None) -> ChannelSetup:
        env = os.environ if env is None else env
        if load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing={load_balancing!r}: round_robin or pick_first")
        options = _channel_options(
            max_message_bytes, keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing, retry_attempts=retry_attempts,
            server_name=server_name or env.get(ENV_TLS_SERVER_NAME) or None)
        credentials = channel_credentials(
            root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, env=env)
        token = token if token is not None else env.get(ENV_TOKEN) or None
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ValueError("token: empty or contains a line break")
        metadata = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        return cls(options, credentials, metadata)


_INTERCEPTORS: tuple[type, ...] = (
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor)


class _Metadata(*_INTERCEPTORS):  # type: ignore[misc]
    """Adds fixed metadata (the bearer token) to every call on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class LossClient:
    """A blocking client for a lossd server.

    Example::

        with LossClient("127.0.0.1:50051") as client:
            r = client.evaluate(logits, targets, loss="cross_entropy", label_smoothing=0.1)
            r.per_sample, r.mean

    ``target`` is any gRPC target: "host:port",
    "dns:///lossd-headless.<ns>.svc.cluster.local:50051" (every resolved address is used,
    round robin), "ipv4:10.0.0.1:50051,10.0.0.2:50051", ...
    ``max_message_bytes`` must not exceed the server's ``--max-message-mb``; larger batches
    are split along N and reassembled, and so are batches over ``split_bytes`` (16 MiB; None
    turns it off): the server then holds one part at a time (a 65 MB batch's server peak
    drops from 4.6 payloads to 1.8) and the parts pipeline.

    Deadlines: ``timeout`` (seconds, default 60) bounds each unary call (``evaluate`` of a
    batch that fits one message, even when sent in parts, ``losses``); ``stream_timeout``
    (default none) bounds streams (``evaluate_stream``, and ``evaluate`` of a batch larger
    than a message). A
    per-call ``timeout=`` overrides both; None means no deadline.

    Security (docs/security.md), each also read from the environment when left out:

    * ``token`` (``LOSSD_TOKEN``): sent as ``authorization: Bearer <token>`` on every call.
    * ``root_certificates`` (``LOSSD_TLS_CA``): PEM bytes or a file path; turns TLS on.
    * ``certificate_chain`` / ``private_key`` (``LOSSD_TLS_CLIENT_CERT`` /
      ``LOSSD_TLS_CLIENT_KEY``): the client certificate for mutual TLS.
    * ``tls``: True for TLS with the system's roots; None (default) for TLS exactly when a
      certificate is given. ``server_name`` (``LOSSD_TLS_SERVER_NAME``) checks the server
      certificate against this name instead of the target's host.

    Resilience (docs/resilience.md): ``retry_attempts`` (5; 1 turns retries off) tries
    for UNAVAILABLE with exponential backoff 0.1 s .. 2 s on Evaluate, EvaluateStream
    (before its first answer) and ListLosses; ``keepalive_seconds`` (30; 0 off) pings the
    server so a dead connection is noticed; ``load_balancing`` ("round_robin" or
    "pick_first") spreads calls over every address of the target. When retries run out the
    call raises :class:`lossd.Unavailable`; every error is a typed :class:`lossd.LossdError`.
    """

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 stream_timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 split_bytes: int | None = DEFAULT_SPLIT_BYTES,
                 channel: grpc.Channel | None = None, token: str | None = None,
                 root_certificates: PemSource = None, certificate_chain: PemSource = None,
                 private_key: PemSource = None, tls: bool | None = None,
                 server_name: str | None = None, retry_attempts: int = RETRY_ATTEMPTS,
                 keepalive_seconds: float = KEEPALIVE_SECONDS,
                 load_balancing: str = "round_robin",
                 env: Mapping[str, str] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry_attempts = retry_attempts if channel is None else 1
        self._requests = _Requests(max_message_bytes, split_bytes)
        setup = ChannelSetup.of(
            max_message_bytes=max_message_bytes, token=token,
            root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, server_name=server_name,
            retry_attempts=retry_attempts, keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing, env=env)
        if channel is None:
            channel = (grpc.secure_channel(target, setup.credentials, options=setup.options)
                       if setup.credentials is not None
                       else grpc.insecure_channel(target, options=setup.options))
        self._raw_channel = channel
        self._channel = (grpc.intercept_channel(channel, _Metadata(setup.metadata))
                         if setup.metadata else channel)
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        # Evaluate and EvaluateStream take requests already serialised by _Requests.
        self._evaluate = self._channel.unary_unary(
            "/lossd.v1.LossService/Evaluate", request_serializer=None,
            response_deserializer=pb.EvaluateResponse.FromString)
        self._evaluate_stream = self._channel.stream_stream(
            "/lossd.v1.LossService/EvaluateStream", request_serializer=None,
            response_deserializer=pb.EvaluateResponse.FromString)

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Calls after this fail."""
        self._raw_channel.close()

    def _error(self, exc: grpc.RpcError) -> LossdError:
        return from_rpc_error(exc, retry_attempts=self.retry_attempts)

    def evaluate(self, predictions: Any, targets: Any = None, *, loss: str = "cross_entropy",
                 weights: Any = None, inputs: Mapping[str, Any] | None = None,
                 tag: str | None = None, timeout: float | None = None,
                 gradient: str | None = None, per_class: bool = False,
                 accuracy: bool = False, top_k: int | Iterable[int] | None = None,
                 diagnostics: bool = False, hardest: int = 0,
                 quantiles: bool | Iterable[float] | None = None,
                 **options: Any) -> LossResult:
        """Per-sample losses and aggregates of one batch, and the analyses asked for.

        ``options`` are the loss's options by their torch.nn.functional names
        (``label_smoothing=0.1``, ``ignore_index=0``, ``class_weights=[...]``) plus
        ``nan_policy``. ``inputs`` are the loss's extra tensors by torch's argument names,
        each with N first (``inputs={"var": var}`` for gaussian_nll_loss); ``targets`` is
        left out for a loss that takes none (triplet_margin_loss). A batch larger than
        ``max_message_bytes`` is split along N over one stream and comes back as one
        result, exactly as if it had gone in one message.

        ``gradient`` ("mean", "sum", "weighted_mean", "weighted_sum") also returns
        d(reduction)/d(predictions) as ``result.gradient``, shaped as the predictions
        (bfloat16 comes back as float32 numpy).

        Analyses (docs/analyses.md), in ``result.per_class``, ``result.accuracy``, ...:
        ``per_class`` (aggregates per target class), ``accuracy`` (top-1), ``top_k`` (a k
        or several: ``result.top_k_accuracy``), ``diagnostics`` (per-sample predicted
        class, confidence, correct, and the calibration with ``result.ece``) need
        class-index targets; ``hardest`` (K: the K largest losses) and ``quantiles`` (True
        for 0.5, 0.9, 0.99, or the levels) work for every loss.
        """
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles)
        reqs = self._requests.build(loss, predictions, targets, weights, tag,
                                    self._requests.options(options), gradient,
                                    analyses=analyses, inputs=inputs)
        try:
            if len(reqs) == 1:
                return LossResult.from_proto(self._evaluate(
                    reqs[0], timeout=self._timeout(timeout)))
            deadline = (self._timeout(timeout) if self._requests.one_message(reqs)
                        else self._stream_timeout(timeout))
            replies = list(self._evaluate_stream(iter(reqs), timeout=deadline))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return _joined(replies, running=False)

    def evaluate_stream(self, batches: Iterable[Batch], *, loss: str = "cross_entropy",
                        tag: str | None = None, timeout: float | None = None,
                        per_class: bool = False, accuracy: bool = False,
                        top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                        hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                        **options: Any) -> Iterator[LossResult]:
        """Evaluate many batches over one stream; yields one result per batch.

        Each batch is ``(predictions, targets)``, ``(predictions, targets, weights)`` or
        ``(predictions, targets, weights, inputs)`` (targets and weights may be None).
        ``result.running`` holds the aggregates over every batch so far, so the last
        result's ``running`` covers the whole set. Batches are sent as they are consumed.
        The analyses (as in :meth:`evaluate`) come per batch (``result.per_class``, ...)
        and over the stream so far (``result.running.per_class``,
        ``result.running.hardest``: indices count from the stream's first sample, ...).
        """
        joiner = _BatchJoiner()
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles)
        requests = joiner.requests(self._requests, batches, loss, tag,
                                   self._requests.options(options), analyses)
        try:
            for reply in self._evaluate_stream(requests, timeout=self._stream_timeout(timeout)):
                if (result := joiner.received(reply)) is not None:
                    yield result
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def shared_memory(self, size: int, *, name: str = "lossd",
                      socket_dir: str | os.PathLike[str] | None = None) -> SharedMemory:
        """A shared-memory region of ``size`` bytes registered with the server, for callers
        on the same host or in the same pod (Linux): ``with client.shared_memory(1 << 28)
        as shm: shm.evaluate(...)``. See :class:`lossd.SharedMemory`.
        """
        from lossd._shm import SharedMemory

        return SharedMemory(self, size, name=name, socket_dir=socket_dir)

    def losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """The server's loss catalogue: names, options, accepted shapes and dtypes."""
        try:
            resp = self._stub.ListLosses(pb.ListLossesRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return [LossInfo.from_proto(s) for s in resp.losses]

    def _timeout(self, timeout: float | None) -> float | None:
        """The deadline of a unary call: the call's ``timeout``, else the client's."""
        return timeout if timeout is not None else self.timeout

    def _stream_timeout(self, timeout: float | None) -> float | None:
        """The deadline of a stream: the call's ``timeout``, else ``stream_timeout``."""
        return timeout if timeout is not None else self.stream_timeout
