"""``LossClient``: numpy arrays or torch tensors in, ``LossResult`` out.

A thin facade: request building is :mod:`lossd._requests` and channel set-up
:mod:`lossd._channel`, shared with ``AsyncLossClient`` (its mirror image); this module only
makes the calls and translates their errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from lossd._channel import (
    DEFAULT_TIMEOUT,
    KEEPALIVE_SECONDS,
    RETRY_ATTEMPTS,
    ChannelSetup,
    MetadataInterceptor,
    PemSource,
    dial,
)
from lossd._errors import LossdError, from_rpc_error
from lossd._ready import FALL_BACK, HEALTH_CHECK, HEALTH_REQUEST, RAISE, ReadyWait
from lossd._requests import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SPLIT_BYTES,
    BatchJoiner,
    BatchLike,
    Requests,
    StreamGuard,
    analysis_fields,
    joined,
    sample_ids_of,
    stream_end,
)
from lossd._result import Aggregates, LossInfo, LossResult, class_names_of
from lossd._shm import ClientLink, SharedMemory
from lossd._transport import NativeChannel, choose
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc


class LossClient:
    """A blocking client for a lossd server.

    Example::

        with LossClient("127.0.0.1:50051") as client:
            r = client.evaluate(logits, targets, loss="cross_entropy", label_smoothing=0.1)
            r.per_sample, r.mean

    ``target`` is the server's address: "host" or "host:port" (the port defaults to 50051,
    lossd's), "http://host:port" or "grpc://host:port" (plaintext), "https://host[:port]" or
    "grpcs://host[:port]" (TLS, as ``tls=True``; port 443 by default), or any gRPC target:
    "dns:///lossd-headless.<ns>.svc.cluster.local:50051" (every resolved address is used,
    round robin), "ipv4:10.0.0.1:50051,10.0.0.2:50051", ... Other schemes are a ValueError.
    ``transport`` (``LOSSD_TRANSPORT``, default "grpcio"): "native" sends ``evaluate``'s
    single-message calls through gRPC C++ on a plaintext channel, at half grpcio's CPU a
    call and a lower latency (the module is built on first use where a C++ compiler and
    gRPC C++ are installed); "auto" does where it builds; "grpcio" never. The rest
    (streams, ``losses``, TLS, a caller's ``channel``) goes through grpcio.
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
                 load_balancing: str = "round_robin", transport: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry_attempts = retry_attempts if channel is None else 1
        self._requests = Requests(max_message_bytes, split_bytes)
        address, tls = dial(target, tls) if channel is None else (target, tls)
        setup = ChannelSetup.of(
            max_message_bytes=max_message_bytes, token=token,
            root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, server_name=server_name,
            retry_attempts=retry_attempts, keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing, env=env)
        self.transport = choose(transport, custom_channel=channel is not None,
                                tls=setup.credentials is not None, env=env)
        if channel is None:
            channel = (grpc.secure_channel(address, setup.credentials, options=setup.options)
                       if setup.credentials is not None
                       else grpc.insecure_channel(address, options=setup.options))
        self._raw_channel = channel
        self._channel = (grpc.intercept_channel(channel, MetadataInterceptor(setup.metadata))
                         if setup.metadata else channel)
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        # Evaluate and EvaluateStream take requests already serialised by Requests.
        self._native: NativeChannel | None = None
        if self.transport == "native":
            self._native = NativeChannel(address, setup.options, setup.metadata)
            self._evaluate = self._native.unary_unary(
                "/lossd.v1.LossService/Evaluate", pb.EvaluateResponse.FromString)
        else:
            self._evaluate = self._channel.unary_unary(
                "/lossd.v1.LossService/Evaluate", request_serializer=None,
                response_deserializer=pb.EvaluateResponse.FromString)
        self._evaluate_stream = self._channel.stream_stream(
            "/lossd.v1.LossService/EvaluateStream", request_serializer=None,
            response_deserializer=pb.EvaluateResponse.FromString)
        self._health = self._channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                                 response_deserializer=None)

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Calls after this fail."""
        self._raw_channel.close()
        if self._native is not None:
            self._native.close()

    def _error(self, exc: grpc.RpcError) -> LossdError:
        return from_rpc_error(exc, retry_attempts=self.retry_attempts)

    def evaluate(self, predictions: Any, targets: Any = None, *, loss: str = "cross_entropy",
                 weights: Any = None, inputs: Mapping[str, Any] | None = None,
                 tag: str | None = None, timeout: float | None = None,
                 gradient: str | None = None, per_class: bool = False,
                 accuracy: bool = False, top_k: int | Iterable[int] | None = None,
                 diagnostics: bool = False, hardest: int = 0,
                 quantiles: bool | Iterable[float] | None = None,
                 class_names: Sequence[str] | None = None, sample_ids: Any = None,
                 mergeable: bool = False,
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
        for 0.5, 0.9, 0.99, or the levels) work for every loss. ``class_names`` (class index
        -> name) name the classes of ``per_class`` and ``hardest`` (``to_pandas()``,
        ``to_dict()``, ``target_name``); the server never sees them. ``sample_ids``: (N,)
        int64, the caller's id of each sample (e.g. its dataset index): the hardest samples
        carry them (``h.sample_id``), and so does the result (``result.sample_ids``,
        ``to_pandas()`` indexed by them); any other dtype or shape is InvalidArgument naming
        ``sample_ids``.
        """
        names = class_names_of(class_names)
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles, mergeable=mergeable)
        reqs = self._requests.build(loss, predictions, targets, weights, tag,
                                    self._requests.options(options), gradient,
                                    analyses=analyses, inputs=inputs, sample_ids=sample_ids)
        ids = sample_ids_of(sample_ids)
        try:
            if len(reqs) == 1:
                reply = self._evaluate(reqs[0], timeout=self._timeout(timeout))
                return LossResult.from_proto(reply).with_class_names(names).with_sample_ids(ids)
            deadline = (self._timeout(timeout) if self._requests.one_message(reqs)
                        else self._stream_timeout(timeout))
            replies = list(self._evaluate_stream(iter(reqs), timeout=deadline))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return joined(replies, running=False).with_class_names(names).with_sample_ids(ids)

    def evaluate_stream(self, batches: Iterable[BatchLike], *, loss: str = "cross_entropy",
                        tag: str | None = None, timeout: float | None = None,
                        per_class: bool = False, accuracy: bool = False,
                        top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                        hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                        class_names: Sequence[str] | None = None, hardest_batches: int = 0,
                        mergeable: bool = True, running: bool = True,
                        **options: Any) -> Iterator[LossResult]:
        """Evaluate many batches over one stream; yields one result per batch.

        Each batch is a :class:`lossd.Batch` (``Batch(predictions, targets, weights=None,
        inputs=None, sample_ids=None, batch_id=None)``), or ``(predictions, targets)``,
        ``(predictions, targets, weights)`` or ``(predictions, targets, weights, inputs)``
        (targets and weights may be None); any other item is a TypeError. Sample ids go on
        every batch or on none; hardest indices are stream positions either way. An
        exception raised by ``batches`` itself (the caller's generator) reaches the caller
        unchanged, the stream cancelled.
        ``result.running`` holds the aggregates over every batch so far, so the last
        result's ``running`` covers the whole set. Batches are sent as they are consumed.
        The analyses (as in :meth:`evaluate`) come per batch (``result.per_class``, ...)
        and over the stream so far (``result.running.per_class``,
        ``result.running.hardest``: indices count from the stream's first sample, ...).
        ``class_names`` as in :meth:`evaluate`. ``hardest_batches`` (K): the stream's K
        completed batches of the largest mean loss, exact, in
        ``result.running.hardest_batches`` (batch id, ordinal, count, mean, and with
        ``hardest`` how many of each batch's samples are among the stream's hardest).

        ``mergeable`` (default True): the last result's ``running.state`` is the stream's
        exact state once the stream has ended (for :func:`lossd.merge`, ``save``).
        ``running=False``: each result carries its batch's per-sample losses and
        aggregates only (``running`` None, no analyses), and the stream's figures come
        once, at its end, as the last result's ``running``: the server encodes, and the
        client decodes, the analyses once instead of per batch (needs ``mergeable``).
        """
        names = class_names_of(class_names)
        joiner = BatchJoiner()
        last: LossResult | None = None
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles, hardest_batches=hardest_batches,
                                   mergeable=mergeable, analyses_at_end=not running)
        guard = StreamGuard(joiner.requests(self._requests, batches, loss, tag,
                                            self._requests.options(options), analyses))
        call = self._evaluate_stream(guard, timeout=self._stream_timeout(timeout))
        guard.attach(call.cancel)
        try:
            for reply in call:
                if guard.error is not None:
                    break
                if (result := joiner.received(reply)) is not None:
                    last = result.with_class_names(names)
                    yield last
        except grpc.RpcError as exc:
            if guard.error is None:
                raise self._error(exc) from exc
        guard.raise_error()
        joiner.settle(last, names)

    def evaluate_all(self, batches: Iterable[BatchLike], *, loss: str = "cross_entropy",
                     tag: str | None = None, timeout: float | None = None,
                     per_class: bool = False, accuracy: bool = False,
                     top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                     hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                     class_names: Sequence[str] | None = None, hardest_batches: int = 0,
                     mergeable: bool = True, **options: Any) -> Aggregates:
        """The aggregates and analyses over every batch of a stream, without iterating it:
        :meth:`evaluate_stream`'s last ``result.running`` (the per-batch results are not
        kept; with ``mergeable``, the default, the figures come once, at the stream's
        end, with their state). The same arguments; no batches at all is a ValueError
        (nothing to report).

        Example::

            with torch.no_grad():
                r = client.evaluate_all(((model(x), y) for x, y in loader), per_class=True,
                                        hardest=10, class_names=dataset.classes)
            r.mean, r.accuracy, r.per_class.to_pandas(), r.hardest.to_pandas()
        """
        last: LossResult | None = None
        for result in self.evaluate_stream(
                batches, loss=loss, tag=tag, timeout=timeout, per_class=per_class,
                accuracy=accuracy, top_k=top_k, diagnostics=diagnostics, hardest=hardest,
                quantiles=quantiles, class_names=class_names,
                hardest_batches=hardest_batches, mergeable=mergeable,
                running=not mergeable, **options):
            last = result
        return stream_end(last)

    def wait_for_ready(self, timeout: float | None = None) -> None:
        """Wait until the server is ready: the channel connects and the server's health
        answers SERVING (``lossd serve`` does once its warm-up passed), or, where it has no
        health service, it answers ListLosses. For a job started beside its server.

        ``timeout``: seconds (None: the client's ``timeout``; both None: no limit). Raises
        :class:`lossd.DeadlineExceeded` (saying what the server last answered) when it
        passes, and the typed error of any other failure (e.g. Unauthenticated).
        """
        wait = ReadyWait(self.target, self._timeout(timeout))
        while True:
            try:
                reply = self._health(HEALTH_REQUEST, timeout=wait.left(),
                                     wait_for_ready=True)
                if wait.answered(reply):
                    return
            except grpc.RpcError as exc:
                step = wait.failed(exc)
                if step == FALL_BACK:
                    self.losses(timeout=wait.left())
                    return
                if step == RAISE:
                    raise self._error(exc) from exc
            time.sleep(wait.pause())

    def shared_memory(self, size: int, *, name: str = "lossd",
                      socket_dir: str | os.PathLike[str] | None = None) -> SharedMemory:
        """A shared-memory region of ``size`` bytes registered with the server, for callers
        on the same host or in the same pod (Linux): ``with client.shared_memory(1 << 28)
        as shm: shm.evaluate(...)``. See :class:`lossd.SharedMemory`.
        """
        link = ClientLink(session=self._stub.SharedMemorySession, channel=self._raw_channel,
                          deadline=self._timeout, requests=self._requests)
        return SharedMemory(link, size, name=name, socket_dir=socket_dir)

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
