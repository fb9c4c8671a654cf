"""The gRPC face of the engine: decode, delegate, encode. No math here."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import torch

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import limits, losses, validate, wire
from lossd_server.analysis import Analysis
from lossd_server.batching import Batcher, BatchingSettings
from lossd_server.checks import LossFailed
from lossd_server.engine import Batch, Engine, Evaluation
from lossd_server.limits import Admission, CallState, LimitMetrics, Refused
from lossd_server.metrics import CallRecord, Metrics
from lossd_server.reduce import Aggregate
from lossd_server.shm import SharedMemoryRegistry
from lossd_server.validate import FLOAT_DTYPES, INDEX_DTYPES, RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")

_FLOAT_PROTOS = [wire._PROTO_BY_TORCH[d] for d in FLOAT_DTYPES]
_INDEX_PROTOS = [wire._PROTO_BY_TORCH[d] for d in INDEX_DTYPES]


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, LossFailed):  # logged with its traceback where it happened
        context.abort(exc.code, str(exc))
    if isinstance(exc, RequestError):
        log.info("rejected: %s", exc)
        context.abort(exc.code, str(exc))
    if isinstance(exc, Refused):
        log.info("refused: %s", exc.message, extra={"code": exc.code.name,
                                                     "reason": exc.reason})
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        context.abort(exc.code, exc.message)
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def unary_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Map RequestError to its status and anything else to a generic INTERNAL."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except Exception as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises
    return wrapper


def stream_errors(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """unary_errors for response-streaming methods."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            _abort(context, exc)
    return wrapper


def _shared_memory(req: pb.EvaluateRequest, registry: SharedMemoryRegistry | None
                   ) -> wire.SharedMemoryView | None:
    if not req.shared_memory_session:
        return None
    if registry is None:
        raise RequestError("shared_memory_session", "shared memory is off on this server")
    session = req.shared_memory_session
    return lambda ref, field: registry.view(session, ref.region, ref.offset, ref.byte_size,
                                            field)


def decode_request(req: pb.EvaluateRequest,
                   shared_memory: SharedMemoryRegistry | None = None, *,
                   max_elements: int = 0, pin_memory: bool = False) -> Batch:
    """The request's tensors (views, no copies) and options. Refused (RESOURCE_EXHAUSTED)
    when its shapes claim more than ``max_elements`` elements (0: no limit), before any
    tensor's bytes are looked at.

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
    view = _shared_memory(req, shared_memory)
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
                for name, t in req.inputs.items()},
    )


def output_view(req: pb.EvaluateRequest, shared_memory: SharedMemoryRegistry | None,
                samples: int) -> memoryview | None:
    """Where ``req.per_sample_output`` asks the per-sample losses to go, checked to hold
    ``samples`` float32 values; resolved with the inputs, so a session that ends while the
    request computes still gets its answer written (the mapping outlives its views)."""
    view = _shared_memory(req, shared_memory)
    if view is None or not req.HasField("per_sample_output"):
        return None
    out = view(req.per_sample_output, "per_sample_output")
    if len(out) != 4 * samples:
        raise RequestError("per_sample_output", f"{len(out)} bytes; {samples} float32 need "
                                                f"{4 * samples}")
    return out


def encode_response(ev: Evaluation, out: memoryview | None = None) -> pb.EvaluateResponse:
    """The response; the per-sample losses go to ``out`` (see :func:`output_view`) if given."""
    if out is not None:
        torch.frombuffer(out, dtype=torch.float32).copy_(ev.per_sample)
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(dtype=pb.FLOAT32,
                                                        shape=[ev.per_sample.shape[0]]))
    else:
        losses = ev.losses
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(
            dtype=pb.FLOAT32, shape=losses.shape, data=losses.tobytes()))
    wire.encode_aggregate(ev.aggregate, resp.aggregates)
    if ev.gradient is not None:
        resp.gradient.CopyFrom(wire.encode_tensor(ev.gradient))
    if ev.analysis is not None:
        wire.encode_analysis(ev.analysis, resp.analysis)
        if ev.analysis.diagnostics is not None:
            wire.encode_diagnostics(ev.analysis.diagnostics, resp.diagnostics)
    return resp


class LossServicer(pb_grpc.LossServiceServicer):  # type: ignore[misc,unused-ignore]
    """Implements lossd.v1.LossService over an :class:`Engine`.

    ``slots`` evaluations run on the device at once and ``max_waiting`` more may wait for
    one (the ``queue`` stage); beyond that a call gets RESOURCE_EXHAUSTED with a
    ``retry-after-ms`` trailer (see :class:`limits.Admission`). Streams are admitted when
    they start (at most ``max_streams``); their batches wait for a slot and are never
    refused for contention. A request claiming more than
    ``max_elements`` elements (0: no limit) is refused before decoding. A call whose caller
    cancelled or whose deadline passed is dropped before compute and never answered late;
    an evaluation that runs out of memory ends RESOURCE_EXHAUSTED and frees the cache.
    """

    def __init__(self, engine: Engine, *, max_message_bytes: int,
                 metrics: Metrics | None = None, slots: int = 2, max_waiting: int = 16,
                 max_streams: int = 0, max_elements: int = 0,
                 batching: BatchingSettings | None = None,
                 in_flight: Callable[[], int] = lambda: 0,
                 shared_memory: SharedMemoryRegistry | None = None,
                 descriptor_socket: str = "") -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics or Metrics(process=False)
        # None: shared memory is off (SharedMemorySession answers FAILED_PRECONDITION).
        self.shared_memory = shared_memory
        self.descriptor_socket = descriptor_socket
        self.limits = LimitMetrics.of(self.metrics.registry)
        self.admission = Admission(slots, max_waiting, max_streams=max_streams,
                                   metrics=self.limits)
        self.max_elements = max_elements
        self.batcher = None if batching is None else Batcher(
            engine, max_samples=batching.max_samples, max_delay=batching.max_delay,
            in_flight=in_flight)

    def _evaluate(self, call: CallRecord, request: pb.EvaluateRequest, *,
                  stream: bool, state: CallState | None = None, admitted: bool = False
                  ) -> tuple[Evaluation, pb.EvaluateResponse]:
        """decode -> queue -> compute -> encode for one message, recorded on ``call``.

        ``stream``: a batch of an EvaluateStream (its weights may sum to zero);
        ``admitted``: a batch of an admitted stream (it waits for a slot, never refused).
        """
        state = state or CallState()
        call.loss = request.loss
        call.received(request.ByteSize())
        try:
            with call.stage("decode"):
                batch = decode_request(request, self.shared_memory,
                                       max_elements=self.max_elements,
                                       pin_memory=self.engine.device.type == "cuda")
                out = output_view(request, self.shared_memory,
                                  batch.predictions.shape[0] if batch.predictions.dim() else 0)
        except Refused as exc:
            self.limits.count(call.method, exc)
            raise
        ev = self.compute(call, batch, state, stream=stream, admitted=admitted)
        with call.stage("encode"):
            resp = encode_response(ev, out)
        call.evaluated(request.loss, request.tag, ev.losses, ev.aggregate.mean,
                       ev.aggregate.weighted_mean, ev.device_seconds)
        return ev, resp

    def compute(self, call: CallRecord, batch: Batch, state: CallState, *,
                stream: bool = False, admitted: bool = False) -> Evaluation:
        """queue -> compute for a decoded batch: admission, deadlines, out-of-memory.

        Every front (this service, the Open Inference Protocol) evaluates through here.
        ``admitted``: the batch belongs to an admitted stream and waits for its slot.
        """
        try:
            oom = False
            try:
                if self.batcher is not None:
                    with call.stage("compute"):  # a leader's queue stage nests in it
                        ev = self.batcher.evaluate(
                            batch, allow_zero_weight_sum=stream,
                            run=lambda device_call: self._in_slot(call, state, device_call,
                                                                  admitted=admitted))
                else:
                    ev = self._in_slot(call, state, lambda: [self.engine.evaluate(
                        batch, allow_zero_weight_sum=stream)], compute_stage=True,
                        admitted=admitted)[0]
            except Exception as exc:
                if not limits.is_out_of_memory(exc):
                    raise
                oom = True  # handled below, once the exception (and its frames) are gone
            if oom:
                samples = batch.predictions.shape[0] if batch.predictions.dim() else 0
                del batch
                limits.release_memory(self.engine.device)
                raise limits.out_of_memory(self.engine.device, samples,
                                           self.admission.retry_after_seconds())
            state.check("after compute")
        except Refused as exc:
            self.limits.count(call.method, exc)
            raise
        return ev

    def _in_slot(self, call: CallRecord, state: CallState,
                 device_call: Callable[[], list[Evaluation]], *,
                 compute_stage: bool = False, admitted: bool = False) -> list[Evaluation]:
        """Run ``device_call`` holding a compute slot (the wait is the ``queue`` stage)."""
        with call.stage("queue"):
            state.check("before compute")
            started = self.admission.acquire(state, admitted=admitted)
        try:
            if not compute_stage:
                return device_call()
            with call.stage("compute"):
                return device_call()
        finally:
            self.admission.release(started)

    @unary_errors
    def Evaluate(self, request: pb.EvaluateRequest,
                 context: grpc.ServicerContext) -> pb.EvaluateResponse:
        with self.metrics.call("Evaluate") as call:
            _, resp = self._evaluate(call, request, stream=False, state=CallState.of(context))
            call.sent(resp.ByteSize())
            return resp

    @stream_errors
    def EvaluateStream(self, request_iterator: Iterator[pb.EvaluateRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.EvaluateResponse]:
        with self.metrics.call("EvaluateStream") as call, \
                self._admitted_stream(call.method):
            state = CallState.of(context)
            running: Aggregate | None = None
            batch: Aggregate | None = None  # the batch so far, while messages carry `more`
            # The same for the analyses asked for (sample positions are theirs to count).
            running_analysis: Analysis | None = None
            batch_analysis: Analysis | None = None
            offset = index = 0
            first: pb.EvaluateRequest | None = None
            for request in self._received(request_iterator, context, call.method):
                where = f"(batch {index} of the stream)"
                if first is None:
                    first = request
                elif request.loss != first.loss:
                    raise RequestError("loss", f"{request.loss!r} differs from the stream's "
                                               f"first batch ({first.loss!r}) {where}")
                elif request.HasField("weights") != first.HasField("weights"):
                    raise RequestError("weights", "must be given on every batch of a stream "
                                                  f"or on none {where}")
                elif (name := wire.analyses_differ(request, first)) is not None:
                    raise RequestError(name, "differs from the stream's first batch; every "
                                             f"batch asks for the same analyses {where}")
                token = validate.sample_offset.set(offset)
                try:
                    ev, resp = self._evaluate(call, request, stream=True, state=state,
                                              admitted=True)
                except RequestError as exc:
                    raise RequestError(exc.field, f"{exc.problem} {where}", exc.code) from None
                finally:
                    validate.sample_offset.reset(token)
                running = ev.aggregate if running is None else running.merge(ev.aggregate)
                batch = ev.aggregate if batch is None else batch.merge(ev.aggregate)
                resp.ClearField("aggregates")
                wire.encode_aggregate(batch, resp.aggregates)
                wire.encode_aggregate(running, resp.running)
                if ev.analysis is not None:
                    running_analysis = (ev.analysis if running_analysis is None
                                        else running_analysis.merge(ev.analysis))
                    batch_analysis = (ev.analysis if batch_analysis is None
                                      else batch_analysis.merge(ev.analysis))
                    resp.ClearField("analysis")
                    wire.encode_analysis(batch_analysis, resp.analysis)
                    wire.encode_analysis(running_analysis, resp.running_analysis)
                if request.more:
                    offset += ev.per_sample.shape[0]
                else:
                    batch, batch_analysis, offset, index = None, None, 0, index + 1
                call.sent(resp.ByteSize())
                try:
                    yield resp
                except GeneratorExit:  # gRPC closed the handler: the caller went away
                    self.limits.count(call.method, _gone(context))
                    raise

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
                self.limits.count(method, exc)
                raise exc from None
            yield request

    @contextlib.contextmanager
    def _admitted_stream(self, method: str) -> Iterator[None]:
        """The door of a stream: admitted for as long as it is open, or Refused now."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.admission.stream())
            except Refused as exc:
                self.limits.count(method, exc)
                raise
            yield

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
        with self._admitted_stream("SharedMemorySession"):
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
                        error, code = str(exc), exc.code.value[0]
                    yield pb.SharedMemoryResponse(regions=sorted(session.regions), error=error,
                                                  code=code)
            finally:
                registry.close_session(session.id)

    def _evaluate_in_session(self, session: str, request: pb.SharedMemoryRequest,
                             context: grpc.ServicerContext) -> pb.SharedMemoryResponse:
        """One ``evaluate`` action: the answer, or the error with its code, as a response."""
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
            with self.metrics.call("SharedMemorySession") as call:
                if req.shared_memory_session and req.shared_memory_session != session:
                    raise RequestError("shared_memory_session", "not this stream's session "
                                                                "(leave it empty)")
                req.shared_memory_session = session
                _, resp = self._evaluate(call, req, stream=False, state=state, admitted=True)
                call.sent(resp.ByteSize())
                return pb.SharedMemoryResponse(evaluation=resp)
        except RequestError as exc:
            log.info("rejected: %s", exc)
            return pb.SharedMemoryResponse(error=str(exc), code=exc.code.value[0])
        except Refused as exc:
            log.info("refused: %s", exc.message, extra={"code": exc.code.name,
                                                         "reason": exc.reason})
            retry = dict(exc.trailers).get(limits.RETRY_AFTER)
            return pb.SharedMemoryResponse(error=exc.message, code=exc.code.value[0],
                                           retry_after_ms=int(retry) if retry else 0)
        except Exception:
            log.exception("internal error")
            return pb.SharedMemoryResponse(error="internal error; see the server log",
                                           code=grpc.StatusCode.INTERNAL.value[0])

    @unary_errors
    def ListLosses(self, request: pb.ListLossesRequest,
                   context: grpc.ServicerContext) -> pb.ListLossesResponse:
        with self.metrics.call("ListLosses") as call:
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


def add_to_server(servicer: LossServicer, server: grpc.Server, *,
                  max_map_entries: int = wire.MAX_MAP_ENTRIES) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does,
    except that Evaluate and EvaluateStream parse their requests with
    :func:`wire.parse_request`, which views the tensors of a large request in the received
    bytes instead of copying them out, and refuses (counted) a request with more than
    ``max_map_entries`` inputs or options before it parses the rest."""
    def parse(method: str) -> Callable[[bytes], Any]:
        def deserialize(raw: bytes) -> Any:
            try:
                return wire.parse_request(raw, max_map_entries)
            except Refused as exc:
                servicer.limits.count(method, exc)
                raise
        return deserialize

    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            servicer.Evaluate, request_deserializer=parse("Evaluate"),
            response_serializer=pb.EvaluateResponse.SerializeToString),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream, request_deserializer=parse("EvaluateStream"),
            response_serializer=pb.EvaluateResponse.SerializeToString),
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            servicer.ListLosses, request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString),
        "SharedMemorySession": grpc.stream_stream_rpc_method_handler(
            servicer.SharedMemorySession,
            request_deserializer=pb.SharedMemoryRequest.FromString,
            response_serializer=pb.SharedMemoryResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("lossd.v1.LossService", handlers),))


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
