"""The lossd.v1 front: decode a LossService message, hand it to the evaluation service,
encode the answer. No math here, and no evaluation pipeline: admission, batching, compute
and a stream's running state are :mod:`lossd_server.service`'s, for every front alike.

One call reads top to bottom: :meth:`LossServicer.Evaluate` -> :meth:`LossServicer._evaluate`
(decode here, :meth:`EvaluationService.evaluate`, encode here); errors end the call through
:func:`errors.abort`, the one mapping from an error to its status.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import torch

from lossd.state import State, encode_aggregate, encode_analysis, encode_hardest_batches
from lossd.state import to_proto as state_to_proto
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import limits, losses, wire
from lossd_server.engine import Batch, Evaluation
from lossd_server.errors import (
    Refused,
    RequestError,
    log_error,
    status_of,
    stream_errors,
    unary_errors,
)
from lossd_server.limits import CallState
from lossd_server.metrics import CallRecord
from lossd_server.service import EvaluationService, StreamState
from lossd_server.shm import SharedMemoryRegistry
from lossd_server.validate import FLOAT_DTYPES, INDEX_DTYPES

T = TypeVar("T")

_FLOAT_PROTOS = [wire._PROTO_BY_TORCH[d] for d in FLOAT_DTYPES]
_INDEX_PROTOS = [wire._PROTO_BY_TORCH[d] for d in INDEX_DTYPES]


def _shared_memory(req: pb.EvaluateRequest, registry: SharedMemoryRegistry | None
                   ) -> wire.SharedMemoryView | None:
    """How the request's tensors in shared memory are viewed (None: it names no session)."""
    if not req.shared_memory_session:
        return None
    if registry is None:
        raise RequestError("shared_memory_session", "shared memory is off on this server")
    session = req.shared_memory_session
    return lambda ref, field: registry.view(session, ref.region, ref.offset, ref.byte_size,
                                            field)


def decode_request(req: pb.EvaluateRequest, view: wire.SharedMemoryView | None = None, *,
                   max_elements: int = 0, pin_memory: bool = False) -> Batch:
    """The request's tensors (views, no copies) and options. Refused (RESOURCE_EXHAUSTED)
    when its shapes claim more than ``max_elements`` elements (0: no limit), before any
    tensor's bytes are looked at. ``view`` reads the tensors the request places in its
    shared-memory session (see :meth:`LossServicer.decode`).

    Tensors in shared memory can be rewritten by the caller at any moment, so every one
    whose values validation relies on (targets, weights, extra inputs such as lengths) is
    copied out of the region
    here, before validation; predictions are viewed in place (zero copy), except for a loss
    with its own check, which may refuse prediction values (binary_cross_entropy's outside
    [0, 1], which its kernel refuses too: the values checked must be the values computed),
    and with ``pin_memory`` (CUDA), where they are copied once into pinned memory for the
    device copy, as the engine would.
    """
    if not req.HasField("predictions"):
        raise RequestError("predictions", "missing")
    if req.HasField("per_sample_output") and view is None:
        raise RequestError("per_sample_output", "needs shared_memory_session")
    claim = limits.ElementBudget(max_elements).claim
    spec = losses.LOSSES.get(req.loss)
    checked = spec is not None and spec.check is not None
    return Batch(
        loss=req.loss,
        predictions=wire.decode_tensor(req.predictions, "predictions", view, claim,
                                       private=pin_memory or checked, pin_memory=pin_memory),
        targets=(wire.decode_tensor(req.targets, "targets", view, claim, private=True)
                 if req.HasField("targets") else None),
        weights=(wire.decode_tensor(req.weights, "weights", view, claim, private=True)
                 if req.HasField("weights") else None),
        options=wire.decode_options(req.options, claim),
        gradient=wire.decode_reduction(req.gradient),
        analyses=wire.decode_analyses(req),
        inputs={name: wire.decode_tensor(t, f"inputs.{name}", view, claim, private=True)
                for name, t in req.inputs.items()} if req.inputs else {},
        sample_ids=(wire.decode_tensor(req.sample_ids, "sample_ids", view, claim, private=True)
                    if req.HasField("sample_ids") else None),
    )


def output_view(req: pb.EvaluateRequest, view: wire.SharedMemoryView, samples: int
                ) -> memoryview:
    """Where ``req.per_sample_output`` asks the per-sample losses to go, checked to hold
    ``samples`` float32 values; resolved with the inputs, so a session that ends while the
    request computes still gets its answer written (the mapping outlives its views)."""
    out = view(req.per_sample_output, "per_sample_output")
    if len(out) != 4 * samples:
        raise RequestError("per_sample_output", f"{len(out)} bytes; {samples} float32 need "
                                                f"{4 * samples}")
    return out


def encode_response(ev: Evaluation, out: memoryview | None = None, *,
                    analyses: bool = True) -> pb.EvaluateResponse:
    """The response; the per-sample losses go to ``out`` (see :func:`output_view`) if given.
    ``analyses`` False: the batch's analyses are left out (diagnostics stay)."""
    if out is not None:
        torch.frombuffer(out, dtype=torch.float32).copy_(ev.per_sample)
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(dtype=pb.FLOAT32,
                                                        shape=[ev.losses.shape[0]]))
    else:
        losses = ev.losses
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(
            dtype=pb.FLOAT32, shape=losses.shape, data=losses.tobytes()))
    encode_aggregate(ev.aggregate, resp.aggregates)
    if ev.gradient is not None:
        resp.gradient.CopyFrom(wire.encode_tensor(ev.gradient))
    if ev.analysis is not None:
        if analyses:
            encode_analysis(ev.analysis, resp.analysis)
        if ev.analysis.diagnostics is not None:
            wire.encode_diagnostics(ev.analysis.diagnostics, resp.diagnostics)
    return resp


def batch_state(request: pb.EvaluateRequest, batch: Batch, ev: Evaluation) -> State:
    """The exact state of one evaluated batch (``EvaluateResponse.state``)."""
    analysis = ev.analysis
    if analysis is not None and analysis.diagnostics is not None:
        analysis = dataclasses.replace(analysis, diagnostics=None)  # per message, not state
    return State(loss=request.loss, options=wire.options_key(request.options),
                 request=batch.analyses, aggregate=ev.aggregate,
                 samples=int(ev.losses.shape[0]), batches=1, analysis=analysis)


def stream_state(stream: StreamState) -> State | None:
    """The exact state of a stream so far (None before its first message)."""
    asked = stream.asked
    if asked is None or stream.running is None:
        return None
    loss, analyses, k = asked
    return State(loss=loss, options=stream.options, request=analyses, aggregate=stream.running,
                 samples=stream.samples + stream.offset, batches=stream.index,
                 analysis=stream.running_analysis, hardest_batches_k=k,
                 hardest_batches=stream.hardest_batches)


class LossServicer(pb_grpc.LossServiceServicer):  # type: ignore[misc,unused-ignore]
    """Implements lossd.v1.LossService over an :class:`EvaluationService`.

    ``shared_memory``: the registry of shared-memory sessions (None: shared memory is off,
    SharedMemorySession answers FAILED_PRECONDITION); ``descriptor_socket``: where clients
    pass their memfds, told to each session.
    """

    def __init__(self, service: EvaluationService, *, max_message_bytes: int,
                 shared_memory: SharedMemoryRegistry | None = None,
                 descriptor_socket: str = "") -> None:
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.shared_memory = shared_memory
        self.descriptor_socket = descriptor_socket

    def decode(self, request: pb.EvaluateRequest) -> tuple[Batch, memoryview | None]:
        """The batch of ``request`` and where its per-sample losses go (None: in the
        response), its shared-memory session looked up once for both."""
        view = _shared_memory(request, self.shared_memory)
        service = self.service
        batch = decode_request(request, view, max_elements=service.max_elements,
                               pin_memory=service.pin_memory)
        if view is None or not request.HasField("per_sample_output"):
            return batch, None
        return batch, output_view(request, view, batch.predictions.shape[0]
                                  if batch.predictions.dim() else 0)

    def _evaluate(self, call: CallRecord, request: pb.EvaluateRequest, state: CallState, *,
                  stream: bool = False, admitted: bool = False
                  ) -> tuple[Evaluation, pb.EvaluateResponse]:
        """decode -> service (queue, compute) -> encode for one message, recorded on ``call``.

        ``stream``: a batch of an EvaluateStream (its weights may sum to zero; its answer
        gets its analyses from the stream, so none are encoded here);
        ``admitted``: a batch of an admitted stream (it waits for a slot, never refused).
        """
        call.loss = request.loss
        call.received(request.ByteSize())
        service = self.service
        if not stream and (request.hardest_batches or request.HasField("batch_id")):
            field = "hardest_batches" if request.hardest_batches else "batch_id"
            raise RequestError(field, "EvaluateStream only: it ranks a stream's batches")
        if not stream and request.analyses_at_end:
            raise RequestError("analyses_at_end", "EvaluateStream only: a single answer "
                                                  "carries its analyses")
        try:
            with call.stage("decode"):
                batch, out = self.decode(request)
        except Refused as exc:  # too large
            service.refused(call.method, exc)
            raise
        ev = service.evaluate(call, batch, state, stream=stream, admitted=admitted)
        with call.stage("encode"):
            resp = encode_response(ev, out, analyses=not stream)
            if request.mergeable and not stream:
                state_to_proto(batch_state(request, batch, ev), resp.state)
        call.evaluated(request.loss, request.tag, ev.losses, ev.aggregate.mean,
                       ev.aggregate.weighted_mean, ev.device_seconds)
        return ev, resp

    @unary_errors
    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> bytes:
        """The serialised EvaluateResponse: serialised here, once, its length is the sent
        bytes' metric (``ByteSize()`` would walk the message a second time)."""
        with self.service.call("Evaluate") as call:
            _, resp = self._evaluate(call, request, CallState.of(context))
            data: bytes = resp.SerializeToString()
            call.sent(len(data))
            return data

    @stream_errors
    def EvaluateStream(self, request_iterator: Iterator[pb.EvaluateRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.EvaluateResponse]:
        service = self.service
        with service.call("EvaluateStream") as call, service.stream(call.method):
            state = CallState.of(context)
            stream = StreamState()
            for request in self._received(request_iterator, context, call.method):
                stream.check(request.loss, request.HasField("weights"),
                             wire.decode_analyses(request),
                             identified=request.HasField("sample_ids"),
                             hardest_batches=request.hardest_batches,
                             mergeable=request.mergeable, at_end=request.analyses_at_end,
                             options=functools.partial(wire.options_key, request.options))
                with stream.evaluating():
                    ev, resp = self._evaluate(call, request, state, stream=True,
                                              admitted=True)
                batch, running, batch_analysis, running_analysis = stream.add(
                    ev, more=request.more,
                    batch_id=request.batch_id if request.HasField("batch_id") else None)
                resp.ClearField("aggregates")
                encode_aggregate(batch, resp.aggregates)
                if not stream.at_end:  # else the stream's final message carries them
                    encode_aggregate(running, resp.running)
                    if batch_analysis is not None and running_analysis is not None:
                        encode_analysis(batch_analysis, resp.analysis)
                        encode_analysis(running_analysis, resp.running_analysis)
                    if stream.hardest_batches is not None:
                        encode_hardest_batches(
                            stream.hardest_batches,
                            None if running_analysis is None else running_analysis.hardest,
                            resp.running_analysis.hardest_batches)
                call.sent(resp.ByteSize())
                try:
                    yield resp
                except GeneratorExit:  # gRPC closed the handler: the caller went away
                    service.refused(call.method, _gone(context))
                    raise
                # Nothing of this message is held while the next is awaited: an idle
                # stream pins no payload (its request views the received bytes).
                del request, ev, resp, batch, running, batch_analysis, running_analysis
            whole = stream_state(stream) if stream.mergeable else None
            if whole is not None:  # one more message: the stream's exact state
                final = pb.EvaluateResponse()
                encode_aggregate(whole.aggregate, final.running)
                state_to_proto(whole, final.state)
                call.sent(final.ByteSize())
                yield final

    def _received(self, requests: Iterator[T], context: grpc.ServicerContext,
                  method: str) -> Iterator[T]:
        """A stream's messages. A caller that goes away mid-stream (cancelled, deadline
        passed, connection lost) ends it CANCELLED or DEADLINE_EXCEEDED, not INTERNAL."""
        while True:
            try:
                request = next(requests)
            except (StopIteration, grpc.RpcError) as end:
                if context.is_active():  # the caller closed its side: the stream is done
                    if isinstance(end, StopIteration):
                        return
                    raise
                exc = _gone(context)
                self.service.refused(method, exc)
                raise exc from None
            yield request
            del request  # not held while the next message is awaited

    @stream_errors
    def SharedMemorySession(self, request_iterator: Iterator[pb.SharedMemoryRequest],
                            context: grpc.ServicerContext) -> Iterator[pb.SharedMemoryResponse]:
        """A session of shared-memory regions; they are released when the stream ends.

        The session is admitted like any stream; its ``evaluate`` actions wait for a
        compute slot and are answered in order on the stream, errors included (the
        session stays open).
        """
        registry = self.shared_memory
        if registry is None:
            raise RequestError("SharedMemorySession", "shared memory is off on this server "
                                                      "(--no-shared-memory)",
                               grpc.StatusCode.FAILED_PRECONDITION)
        with self.service.stream("SharedMemorySession"):
            session = registry.open_session()
            context.add_callback(lambda: registry.close_session(session.id))
            try:
                yield pb.SharedMemoryResponse(session=session.id,
                                              descriptor_socket=self.descriptor_socket)
                for request in self._received(request_iterator, context,
                                              "SharedMemorySession"):
                    if request.HasField("evaluate"):
                        yield self._evaluate_in_session(session.id, request, context)
                        continue
                    error, code = "", 0
                    try:
                        if request.HasField("register"):
                            r = request.register
                            registry.register(session, r.name, r.byte_size,
                                              descriptor=r.descriptor, key=r.key)
                        elif request.HasField("unregister"):
                            registry.unregister(session, request.unregister)
                        else:
                            raise RequestError("action", "missing: register, unregister or "
                                                         "evaluate")
                    except RequestError as exc:
                        status = status_of(exc)
                        error, code = status.message, status.code_number
                    yield pb.SharedMemoryResponse(regions=sorted(session.regions), error=error,
                                                  code=code)
            finally:
                registry.close_session(session.id)

    def _evaluate_in_session(self, session: str, request: pb.SharedMemoryRequest,
                             context: grpc.ServicerContext) -> pb.SharedMemoryResponse:
        """One ``evaluate`` action: the answer, or the error with its status, as a response."""
        req = request.evaluate
        stream_state = CallState.of(context)
        state = stream_state
        if request.timeout_seconds > 0:
            deadline = time.monotonic() + request.timeout_seconds

            def time_remaining() -> float:
                left = stream_state.time_remaining()
                mine = deadline - time.monotonic()
                return mine if left is None else min(left, mine)

            state = CallState(is_active=stream_state.is_active, time_remaining=time_remaining)
        try:
            with self.service.call("SharedMemorySession") as call:
                if req.shared_memory_session and req.shared_memory_session != session:
                    raise RequestError("shared_memory_session", "not this stream's session "
                                                                "(leave it empty)")
                req.shared_memory_session = session
                _, resp = self._evaluate(call, req, state, admitted=True)
                call.sent(resp.ByteSize())
                return pb.SharedMemoryResponse(evaluation=resp)
        except Exception as exc:
            status = status_of(exc)
            log_error(exc, status)
            return pb.SharedMemoryResponse(error=status.message, code=status.code_number,
                                           retry_after_ms=status.retry_after_ms)

    @unary_errors
    def ListLosses(self, request: pb.ListLossesRequest,
                   context: grpc.ServicerContext) -> pb.ListLossesResponse:
        with self.service.call("ListLosses") as call:
            resp = catalogue_response(self.max_message_bytes)
            call.sent(resp.ByteSize())
            return resp


def _gone(context: grpc.ServicerContext) -> Refused:
    """Why a stream whose caller went away ends: its deadline passed, or it cancelled."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed mid-stream; "
                       "dropped", reason="deadline_exceeded")
    return Refused(grpc.StatusCode.CANCELLED, "caller went away mid-stream; dropped",
                   reason="cancelled")


class _Sent:
    """A stream's response as grpcio holds it. grpcio keeps the last response it sent
    until the handler yields the next, which an idle stream never does; it keeps this box,
    which its serializer empties, not the message (a payload of per-sample losses)."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message: Any = message

    def serialize(self) -> bytes:
        message, self.message = self.message, None
        return bytes(message.SerializeToString())


def _released(behavior: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]
              ) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[_Sent]]:
    """``behavior``'s responses each in a :class:`_Sent`, none held here meanwhile."""
    def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[_Sent]:
        for response in behavior(requests, context):
            yield _Sent(response)
            del response
    return run


def add_to_server(servicer: LossServicer, server: grpc.Server, *,
                  max_map_entries: int = wire.MAX_MAP_ENTRIES) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does,
    except that Evaluate and EvaluateStream parse their requests with
    :func:`wire.parse_request`, which views the tensors of a large request in the received
    bytes instead of copying them out, and refuses (counted) a request with more than
    ``max_map_entries`` inputs or options before it parses the rest; and except that
    Evaluate answers its response serialised (see :meth:`LossServicer.Evaluate`)."""
    def parse(method: str) -> Callable[[bytes], Any]:
        def deserialize(raw: bytes) -> Any:
            try:
                return wire.parse_request(raw, max_map_entries)
            except Refused as exc:
                servicer.service.refused(method, exc)
                raise
        return deserialize

    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(  # (it answers serialised)
            servicer.Evaluate, request_deserializer=parse("Evaluate")),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            _released(servicer.EvaluateStream), request_deserializer=parse("EvaluateStream"),
            response_serializer=_Sent.serialize),
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            servicer.ListLosses, request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString),
        "SharedMemorySession": grpc.stream_stream_rpc_method_handler(
            _released(servicer.SharedMemorySession),
            request_deserializer=pb.SharedMemoryRequest.FromString,
            response_serializer=_Sent.serialize),
    }
    # Registered as the generated code registers them: looked up by exact name, and the
    # native front knows which methods stream before their first message arrives.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("lossd.v1.LossService", handlers),))
    server.add_registered_method_handlers("lossd.v1.LossService", handlers)


def catalogue_response(max_message_bytes: int) -> pb.ListLossesResponse:
    """Every loss of this process (built-ins, then plugins) as ListLosses describes it."""
    resp = pb.ListLossesResponse(max_message_bytes=max_message_bytes)
    for spec in losses.LOSSES.values():
        kind = spec.targets
        resp.losses.append(pb.LossSpec(
            name=spec.name, description=spec.description,
            options=[pb.OptionSpec(name=o.name, type=o.type.value,
                                   default=losses.render_default(o.default),
                                   description=o.description, choices=o.choices)
                     for o in losses.all_options(spec)],
            prediction_shapes=spec.prediction_shapes,
            target_shapes=spec.target_shapes if spec.takes_targets else [],
            prediction_dtypes=_FLOAT_PROTOS,
            target_dtypes=(_INDEX_PROTOS if kind.integer else []) + (_FLOAT_PROTOS if
                                                                     kind.floating else []),
            inputs=[pb.InputSpec(name=i.name, description=i.description, shapes=i.shapes,
                                 dtypes=_INDEX_PROTOS if i.dtype == "int" else _FLOAT_PROTOS,
                                 optional=i.optional) for i in spec.inputs],
            targets=kind.value, source=spec.source))
    return resp
