"""``AsyncLossClient``: the asyncio mirror of ``LossClient`` (grpc.aio).

Request building and result decoding (:mod:`lossd._requests`), channel configuration
(:mod:`lossd._channel`) and error mapping (``from_rpc_error``) are shared with
``LossClient``; only the calls differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from lossd._channel import (
    DEFAULT_TIMEOUT,
    KEEPALIVE_SECONDS,
    RETRY_ATTEMPTS,
    ChannelSetup,
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
from lossd.v1 import loss_service_pb2 as pb


class AsyncLossClient:
    """An asyncio client for a lossd server; the same options as :class:`LossClient`, but
    ``channel`` and ``transport``: every call goes through grpc.aio.

    Example::

        async with AsyncLossClient("127.0.0.1:50051") as client:
            r = await client.evaluate(logits, targets, loss="cross_entropy")
            async for r in client.evaluate_stream(batches):
                print(r.running.mean)
    """

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 stream_timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 split_bytes: int | None = DEFAULT_SPLIT_BYTES,
                 token: str | None = None, root_certificates: PemSource = None,
                 certificate_chain: PemSource = None, private_key: PemSource = None,
                 tls: bool | None = None, server_name: str | None = None,
                 retry_attempts: int = RETRY_ATTEMPTS,
                 keepalive_seconds: float = KEEPALIVE_SECONDS,
                 load_balancing: str = "round_robin",
                 env: Mapping[str, str] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry_attempts = retry_attempts
        self._requests = Requests(max_message_bytes, split_bytes)
        address, tls = dial(target, tls)
        setup = ChannelSetup.of(
            max_message_bytes=max_message_bytes, token=token,
            root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, server_name=server_name,
            retry_attempts=retry_attempts, keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing, env=env)
        self._metadata = setup.metadata
        self._channel = (grpc.aio.secure_channel(address, setup.credentials,
                                                 options=setup.options)
                         if setup.credentials is not None
                         else grpc.aio.insecure_channel(address, options=setup.options))
        self._evaluate = self._channel.unary_unary(
            "/lossd.v1.LossService/Evaluate", request_serializer=None,
            response_deserializer=pb.EvaluateResponse.FromString)
        self._evaluate_stream = self._channel.stream_stream(
            "/lossd.v1.LossService/EvaluateStream", request_serializer=None,
            response_deserializer=pb.EvaluateResponse.FromString)
        self._list_losses = self._channel.unary_unary(
            "/lossd.v1.LossService/ListLosses",
            request_serializer=pb.ListLossesRequest.SerializeToString,
            response_deserializer=pb.ListLossesResponse.FromString)
        self._health = self._channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                                 response_deserializer=None)

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Calls after this fail."""
        await self._channel.close()

    def _error(self, exc: grpc.RpcError) -> LossdError:
        return from_rpc_error(exc, retry_attempts=self.retry_attempts)

    async def evaluate(self, predictions: Any, targets: Any = None, *,
                       loss: str = "cross_entropy", weights: Any = None,
                       inputs: Mapping[str, Any] | None = None, tag: str | None = None,
                       timeout: float | None = None, gradient: str | None = None,
                       per_class: bool = False, accuracy: bool = False,
                       top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                       hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                       class_names: Sequence[str] | None = None, sample_ids: Any = None,
                       mergeable: bool = False,
                       **options: Any) -> LossResult:
        """As :meth:`LossClient.evaluate`."""
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
                reply = await self._evaluate(reqs[0], timeout=_or(timeout, self.timeout),
                                             metadata=self._metadata)
                return LossResult.from_proto(reply).with_class_names(names).with_sample_ids(ids)
            deadline = _or(timeout, self.timeout if self._requests.one_message(reqs)
                           else self.stream_timeout)
            call = self._evaluate_stream(iter(reqs), metadata=self._metadata,
                                         timeout=deadline)
            replies = [reply async for reply in call]
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return joined(replies, running=False).with_class_names(names).with_sample_ids(ids)

    async def evaluate_stream(self, batches: Iterable[BatchLike], *, loss: str = "cross_entropy",
                              tag: str | None = None, timeout: float | None = None,
                              per_class: bool = False, accuracy: bool = False,
                              top_k: int | Iterable[int] | None = None,
                              diagnostics: bool = False, hardest: int = 0,
                              quantiles: bool | Iterable[float] | None = None,
                              class_names: Sequence[str] | None = None,
                              hardest_batches: int = 0,
                              mergeable: bool = True, running: bool = True,
                        **options: Any) -> AsyncIterator[LossResult]:
        """As :meth:`LossClient.evaluate_stream`, as an async iterator."""
        names = class_names_of(class_names)
        joiner = BatchJoiner()
        last: LossResult | None = None
        analyses = analysis_fields(per_class=per_class, accuracy=accuracy, top_k=top_k,
                                   diagnostics=diagnostics, hardest=hardest,
                                   quantiles=quantiles, hardest_batches=hardest_batches,
                                   mergeable=mergeable, analyses_at_end=not running)
        guard = StreamGuard(joiner.requests(self._requests, batches, loss, tag,
                                            self._requests.options(options), analyses))
        call = self._evaluate_stream(guard, metadata=self._metadata,
                                     timeout=_or(timeout, self.stream_timeout))
        guard.attach(call.cancel)
        try:
            async for reply in call:
                if guard.error is not None:
                    break
                if (result := joiner.received(reply)) is not None:
                    last = result.with_class_names(names)
                    yield last
        except grpc.RpcError as exc:
            if guard.error is None:
                raise self._error(exc) from exc
        except asyncio.CancelledError:
            # grpc.aio reports the call cancelled here (the guard's doing) as CancelledError.
            if guard.error is None:
                raise
        guard.raise_error()
        joiner.settle(last, names)

    async def evaluate_all(self, batches: Iterable[BatchLike], *, loss: str = "cross_entropy",
                           tag: str | None = None, timeout: float | None = None,
                           per_class: bool = False, accuracy: bool = False,
                           top_k: int | Iterable[int] | None = None, diagnostics: bool = False,
                           hardest: int = 0, quantiles: bool | Iterable[float] | None = None,
                           class_names: Sequence[str] | None = None,
                           hardest_batches: int = 0, mergeable: bool = True,
                           **options: Any) -> Aggregates:
        """As :meth:`LossClient.evaluate_all`."""
        last: LossResult | None = None
        async for result in self.evaluate_stream(
                batches, loss=loss, tag=tag, timeout=timeout, per_class=per_class,
                accuracy=accuracy, top_k=top_k, diagnostics=diagnostics, hardest=hardest,
                quantiles=quantiles, class_names=class_names,
                hardest_batches=hardest_batches, mergeable=mergeable,
                running=not mergeable, **options):
            last = result
        return stream_end(last)

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        """As :meth:`LossClient.wait_for_ready`."""
        wait = ReadyWait(self.target, _or(timeout, self.timeout))
        while True:
            try:
                reply = await self._health(HEALTH_REQUEST, timeout=wait.left(),
                                           metadata=self._metadata, wait_for_ready=True)
                if wait.answered(reply):
                    return
            except grpc.RpcError as exc:
                step = wait.failed(exc)
                if step == FALL_BACK:
                    await self.losses(timeout=wait.left())
                    return
                if step == RAISE:
                    raise self._error(exc) from exc
            await asyncio.sleep(wait.pause())

    async def losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """As :meth:`LossClient.losses`."""
        try:
            resp = await self._list_losses(pb.ListLossesRequest(), metadata=self._metadata,
                                           timeout=_or(timeout, self.timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return [LossInfo.from_proto(s) for s in resp.losses]


def _or(value: float | None, default: float | None) -> float | None:
    return value if value is not None else default
