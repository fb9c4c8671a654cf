"""The gRPC face of the engine: decode, delegate, encode. No math here."""

from __future__ import annotations

import functools
import logging
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
    if not req.shared_memory_session or registry is None:
        return None
    session = req.shared_memory_session
    return lambda ref, field: registry.view(session, ref.region, ref.offset, ref.byte_size,
                                            field)


def decode_request(req: pb.EvaluateRequest,
                   shared_memory: SharedMemoryRegistry | None = None, *,
                   max_elements: int = 0) -> Batch:
    """The request's tensors (views, no copies) and options. Refused (RESOURCE_EXHAUSTED)
    when its shapes claim more than ``max_elements`` elements (0: no limit), before any
    tensor's bytes are looked at."""
    if not req.HasField("predictions"):
        raise RequestError("predictions", "missing")
    view = _shared_memory(req, shared_memory)
    if req.HasField("per_sample_output") and view is None:
        raise RequestError("per_sample_output", "needs shared_memory_session")
    claim = limits.ElementBudget(max_elements).claim
    return Batch(
        loss=req.loss,
        predictions=wire.decode_tensor(req.predictions, "predictions", view, claim),
        targets=(wire.decode_tensor(req.targets, "targets", view, claim)
                 if req.HasField("targets") else None),
        weights=(wire.decode_tensor(req.weights, "weights", view, claim)
                 if req.HasField("weights") else None),
        options=wire.decode_options(req.options, claim),
        gradient=wire.decode_reduction(req.gradient),
        analyses=wire.decode_analyses(req),
        inputs={name: wire.decode_tensor(t, f"inputs.{name}", view, claim)
                for name, t in req.inputs.items()},
    )


def encode_response(ev: Evaluation, req: pb.EvaluateRequest | None = None,
                    shared_memory: SharedMemoryRegistry | None = None) -> pb.EvaluateResponse:
    """The response; per-sample losses go to ``req.per_sample_output`` when it names one."""
    view = None if req is None else _shared_memory(req, shared_memory)
    if view is not None and req is not None and req.HasField("per_sample_output"):
        out = view(req.per_sample_output, "per_sample_output")
        n = ev.per_sample.shape[0]
        if len(out) != 4 * n:
            raise RequestError("per_sample_output", f"{len(out)} bytes; {n} float32 need {4 * n}")
        torch.frombuffer(out, dtype=torch.float32).copy_(ev.per_sample)
        resp = pb.EvaluateResponse(per_sample=pb.Tensor(dtype=pb.FLOAT32, shape=[n]))
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
    ``retry-after-ms`` trailer (see :class:`limits.Admission`). A request claiming more than
    ``max_elements`` elements (0: no limit) is refused before decoding. A call whose caller
    cancelled or whose deadline passed is dropped before compute and never answered late;
    an evaluation that runs out of memory ends RESOURCE_EXHAUSTED and frees the cache.
    """

    def __init__(self, engine: Engine, *, max_message_bytes: int,
                 metrics: Metrics | None = None, slots: int = 2, max_waiting: int = 16,
                 max_elements: int = 0, batching: BatchingSettings | None = None,
                 in_flight: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics or Metrics(process=False)
        self.shared_memory = SharedMemoryRegistry()
        self.limits = LimitMetrics.of(self.metrics.registry)
        self.admission = Admission(slots, max_waiting, metrics=self.limits)
        self.max_elements = max_elements
        self.batcher = None if batching is None else Batcher(
            engine, max_samples=batching.max_samples, max_delay=batching.max_delay,
            in_flight=in_flight)

    def _evaluate(self, call: CallRecord, request: pb.EvaluateRequest, *,
                  stream: bool, state: CallState | None = None
                  ) -> tuple[Evaluation, pb.EvaluateResponse]:
        """decode -> queue -> compute -> encode for one message, recorded on ``call``."""
        state = state or CallState()
        call.loss = request.loss
        call.received(request.ByteSize())
        try:
            with call.stage("decode"):
                batch = decode_request(request, self.shared_memory,
                                       max_elements=self.max_elements)
        except Refused as exc:
            self.limits.count(call.method, exc)
            raise
        ev = self.compute(call, batch, state, stream=stream)
        with call.stage("encode"):
            resp = encode_response(ev, request, self.shared_memory)
        call.evaluated(request.loss, request.tag, ev.losses, ev.aggregate.mean,
                       ev.aggregate.weighted_mean, ev.device_seconds)
        return ev, resp

    def compute(self, call: CallRecord, batch: Batch, state: CallState, *,
                stream: bool = False) -> Evaluation:
        """queue -> compute for a decoded batch: admission, deadlines, out-of-memory.

        Every front (this service, the Open Inference Protocol) evaluates through here.
        """
        try:
            oom = False
            try:
                if self.batcher is not None:
                    with call.stage("compute"):  # a leader's queue stage nests in it
                        ev = self.batcher.evaluate(
                            batch, allow_zero_weight_sum=stream,
                            run=lambda device_call: self._in_slot(call, state, device_call))
                else:
                    ev = self._in_slot(call, state, lambda: [self.engine.evaluate(
                        batch, allow_zero_weight_sum=stream)], compute_stage=True)[0]
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
                 compute_stage: bool = False) -> list[Evaluation]:
        """Run ``device_call`` holding a compute slot (the wait is the ``queue`` stage)."""
        with call.stage("queue"):
            state.check("before compute")
            started = self.admission.acquire(state)
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
        with self.metrics.call("EvaluateStream") as call:
            state = CallState.of(context)
            running: Aggregate | None = None
            batch: Aggregate | None = None  # the batch so far, while messages carry `more`
            # The same for the analyses asked for (sample positions are theirs to count).
            running_analysis: Analysis | None = None
            batch_analysis: Analysis | None = None
            offset = index = 0
            first: pb.EvaluateRequest | None = None
            for request in request_iterator:
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
                    ev, resp = self._evaluate(call, request, stream=True, state=state)
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
                yield resp

    def SharedMemorySession(self, request_iterator: Iterator[pb.SharedMemoryRequest],
                            context: grpc.ServicerContext) -> Iterator[pb.SharedMemoryResponse]:
        """A session of shared-memory regions; they are released when the stream ends."""
        session = self.shared_memory.open_session()
        context.add_callback(lambda: self.shared_memory.close_session(session.id))
        try:
            yield pb.SharedMemoryResponse(session=session.id)
            for request in request_iterator:
                error = ""
                try:
                    if request.HasField("register"):
                        r = request.register
                        self.shared_memory.register(session, r.name, r.key, r.byte_size)
                    elif request.HasField("unregister"):
                        self.shared_memory.unregister(session, request.unregister)
                    else:
                        raise RequestError("action", "missing: register or unregister")
                except RequestError as exc:
                    error = str(exc)
                yield pb.SharedMemoryResponse(regions=sorted(session.regions), error=error)
        finally:
            self.shared_memory.close_session(session.id)

    @unary_errors
    def ListLosses(self, request: pb.ListLossesRequest,
                   context: grpc.ServicerContext) -> pb.ListLossesResponse:
        with self.metrics.call("ListLosses") as call:
            resp = catalogue_response(self.max_message_bytes)
            call.sent(resp.ByteSize())
            return resp


def add_to_server(servicer: LossServicer, server: grpc.Server) -> None:
    """Register ``servicer`` as the generated ``add_LossServiceServicer_to_server`` does,
    except that Evaluate and EvaluateStream parse their requests with
    :func:`wire.parse_request`, which views the tensors of a large request in the received
    bytes instead of copying them out."""
    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            servicer.Evaluate, request_deserializer=wire.parse_request,
            response_serializer=pb.EvaluateResponse.SerializeToString),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream, request_deserializer=wire.parse_request,
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
