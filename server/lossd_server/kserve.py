"""The Open Inference Protocol (KServe v2) front: ``inference.GRPCInferenceService``.

Served beside ``lossd.v1.LossService`` so Triton and KServe clients (``tritonclient.grpc``
and others) can call lossd unchanged. Each loss of the catalogue is a model of the same
name, version ``"1"``, platform ``"lossd"``.

ModelInfer, per model (loss):

* inputs ``PREDICTIONS`` and ``TARGETS`` (none for a loss without targets), optional
  ``WEIGHTS`` (N,), optional ``SAMPLE_IDS`` (INT64 (N,), the caller's ids of the samples,
  checked as the native ``sample_ids``), the loss's extra inputs named in capitals
  (``VAR``, ``INPUT2``, ``INPUT_LENGTHS``...), and one optional input per tensor-valued
  loss option, named after it in capitals (``CLASS_WEIGHTS``, ``POS_WEIGHT``). Datatypes
  ``FP32``, ``FP16``, ``BF16``, ``FP64``, ``INT64``, ``INT32``, as the native API accepts
  them. Data comes as
  ``raw_input_contents`` (one entry per input, in input order) or as typed ``contents``
  (``fp32_contents``, ``fp64_contents``, ``int64_contents``, ``int_contents``; FP16 and
  BF16 only raw).
* request ``parameters`` are the loss's scalar options by their native names
  (``label_smoothing``, ``ignore_index``, ``nan_policy``, ...): bool, int64, double or
  string values, checked exactly as the native API checks options. Any other parameter,
  Triton's scheduling ones (``priority``, ``timeout``) included, is rejected.
* outputs ``PER_SAMPLE`` (FP32 [N]); ``SUM``, ``MEAN`` (FP64 [1]); ``COUNT``, ``IGNORED``,
  ``OMITTED`` (INT64 [1]); with ``WEIGHTS`` also ``WEIGHTED_SUM``, ``WEIGHTED_MEAN``,
  ``WEIGHT_SUM`` (FP64 [1]). The values are the native API's, bit for bit. A request that
  lists ``outputs`` gets those, in its order; otherwise every output the request produces.
  Outputs travel as ``raw_output_contents``.
* analyses, for losses with class-index targets (the native API's, see ``ANALYSIS_OUTPUTS``):
  per class ``CLASSES``, ``CLASS_COUNT``, ``CLASS_SUM``, ``CLASS_MEAN`` (and weighted
  ``CLASS_WEIGHTED_SUM``, ``CLASS_WEIGHTED_MEAN``, ``CLASS_WEIGHT_SUM``; with accuracy
  ``CLASS_CORRECT``, ``CLASS_ACCURACY``), all [K] over the K classes present; ``ACCURACY``
  (FP64 [1]), ``CORRECT`` and ``ACCURACY_COUNT`` (INT64 [1]); ``TOP_K``, ``TOP_K_CORRECT``,
  ``TOP_K_ACCURACY`` ([len(top_k)]); ``PREDICTED`` (INT64), ``CONFIDENCE`` (FP32), both shaped
  as the targets, and ``ECE`` (FP64 [1]). Asked for with the request parameters
  ``per_class``, ``accuracy``, ``diagnostics`` (bool) and ``top_k`` (int64, or a string of
  comma-separated ks), or by listing an output: listing ``CLASS_MEAN`` turns ``per_class``
  on, ``ACCURACY`` ``accuracy``, ``PREDICTED`` ``diagnostics``.

Like the lossd.v1 front beside it (neither imports the other), this module decodes, hands
the batch to the evaluation service (:mod:`lossd_server.service`: admission, deadlines,
out-of-memory, metrics under method ``ModelInfer``) and encodes. No math here.

Errors are the native API's: a bad request is INVALID_ARGUMENT with a message that starts
with the field at fault, named as here (``PREDICTIONS``, ``TARGETS``, ``WEIGHTS``,
``CLASS_WEIGHTS``, ``VAR``, ``parameters.<name>``, ``raw_input_contents[<i>]``,
``outputs.<name>``);
an unknown model or version is NOT_FOUND.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from lossd import PerClass
from lossd.kserve.v2 import grpc_service_pb2 as pb
from lossd.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from lossd_server import __version__, analysis, limits
from lossd_server.catalogue import option_hint, suggest_loss
from lossd_server.engine import Batch, Evaluation
from lossd_server.errors import Refused, RequestError, unary_errors
from lossd_server.limits import CallState
from lossd_server.logs import field as name_field
from lossd_server.logs import plain, shown
from lossd_server.losses import LOSSES, Loss, OptionType, Targets, all_options
from lossd_server.service import EvaluationService
from lossd_server.wire import MAX_DIMS

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "lossd"
PLATFORM = "lossd"
MODEL_VERSION = "1"
# Triton's extension names: request/response `parameters` are the one lossd implements.
EXTENSIONS = ("parameters",)

PREDICTIONS, TARGETS, WEIGHTS = "PREDICTIONS", "TARGETS", "WEIGHTS"
SAMPLE_IDS = "SAMPLE_IDS"


@dataclass(frozen=True)
class DataType:
    """One accepted tensor datatype: its torch dtype and the typed contents field, if any."""

    torch: torch.dtype
    numpy: np.dtype[Any]
    contents_field: str | None


DATATYPES: Mapping[str, DataType] = {
    "FP32": DataType(torch.float32, np.dtype("<f4"), "fp32_contents"),
    "FP16": DataType(torch.float16, np.dtype("<f2"), None),
    "BF16": DataType(torch.bfloat16, np.dtype("<u2"), None),
    "FP64": DataType(torch.float64, np.dtype("<f8"), "fp64_contents"),
    "INT64": DataType(torch.int64, np.dtype("<i8"), "int64_contents"),
    "INT32": DataType(torch.int32, np.dtype("<i4"), "int_contents"),
}

# Request bytes are immutable; tensors viewing them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class Output:
    """One output tensor: its datatype, whether it needs WEIGHTS, the analysis it needs
    (``per_class``, ``accuracy``, ``top_k``, ``diagnostics``; None: none), its shape in the
    model metadata, and how to read it."""

    name: str
    datatype: str
    weighted: bool
    value: Callable[[Evaluation], np.ndarray]
    needs: str | None = None
    shape: tuple[int, ...] = (1,)


def _scalar(dtype: str, read: Callable[[Evaluation], Any]) -> Callable[[Evaluation], np.ndarray]:
    return lambda ev: np.array([read(ev)], dtype=dtype)


def _analysis(ev: Evaluation) -> analysis.Analysis:
    assert ev.analysis is not None
    return ev.analysis


def _table(ev: Evaluation) -> PerClass:
    stats = _analysis(ev).per_class
    assert stats is not None
    return stats.table()


def _column(name: str, dtype: str) -> Callable[[Evaluation], np.ndarray]:
    def read(ev: Evaluation) -> np.ndarray:
        value = getattr(_table(ev), name)
        return np.asarray(value, dtype=dtype)
    return read


def _accuracy(ev: Evaluation) -> analysis.Accuracy:
    acc = _analysis(ev).accuracy
    assert acc is not None
    return acc


def _diagnostics(ev: Evaluation) -> analysis.Diagnostics:
    d = _analysis(ev).diagnostics
    assert d is not None
    return d


def _ece(ev: Evaluation) -> float:
    cal = _analysis(ev).calibration
    assert cal is not None
    return cal.ece


OUTPUTS: tuple[Output, ...] = (
    Output("PER_SAMPLE", "FP32", False,
           lambda ev: ev.losses.astype("<f4", copy=False)),
    Output("SUM", "FP64", False, _scalar("<f8", lambda ev: ev.aggregate.sum)),
    Output("MEAN", "FP64", False, _scalar("<f8", lambda ev: ev.aggregate.mean)),
    Output("COUNT", "INT64", False, _scalar("<i8", lambda ev: ev.aggregate.count)),
    Output("IGNORED", "INT64", False, _scalar("<i8", lambda ev: ev.aggregate.ignored)),
    Output("OMITTED", "INT64", False, _scalar("<i8", lambda ev: ev.aggregate.omitted)),
    Output("WEIGHTED_SUM", "FP64", True, _scalar("<f8", lambda ev: ev.aggregate.weighted_sum)),
    Output("WEIGHTED_MEAN", "FP64", True,
           _scalar("<f8", lambda ev: ev.aggregate.weighted_mean)),
    Output("WEIGHT_SUM", "FP64", True, _scalar("<f8", lambda ev: ev.aggregate.weight_sum)),
)
ANALYSIS_OUTPUTS: tuple[Output, ...] = (
    Output("CLASSES", "INT64", False, _column("classes", "<i8"), "per_class", (-1,)),
    Output("CLASS_COUNT", "INT64", False, _column("count", "<i8"), "per_class", (-1,)),
    Output("CLASS_SUM", "FP64", False, _column("sum", "<f8"), "per_class", (-1,)),
    Output("CLASS_MEAN", "FP64", False, _column("mean", "<f8"), "per_class", (-1,)),
    Output("CLASS_WEIGHTED_SUM", "FP64", True, _column("weighted_sum", "<f8"), "per_class",
           (-1,)),
    Output("CLASS_WEIGHTED_MEAN", "FP64", True, _column("weighted_mean", "<f8"), "per_class",
           (-1,)),
    Output("CLASS_WEIGHT_SUM", "FP64", True, _column("weight_sum", "<f8"), "per_class", (-1,)),
    Output("CLASS_CORRECT", "INT64", False, _column("correct", "<i8"), "per_class+accuracy",
           (-1,)),
    Output("CLASS_ACCURACY", "FP64", False, _column("accuracy", "<f8"), "per_class+accuracy",
           (-1,)),
    Output("ACCURACY", "FP64", False, _scalar("<f8", lambda ev: _accuracy(ev).accuracy),
           "accuracy"),
    Output("CORRECT", "INT64", False, _scalar("<i8", lambda ev: _accuracy(ev).hits),
           "accuracy"),
    Output("ACCURACY_COUNT", "INT64", False, _scalar("<i8", lambda ev: _accuracy(ev).count),
           "accuracy"),
    Output("TOP_K", "INT64", False, lambda ev: np.array(_accuracy(ev).top_k, "<i8"), "top_k",
           (-1,)),
    Output("TOP_K_CORRECT", "INT64", False,
           lambda ev: np.array(_accuracy(ev).top_k_hits, "<i8"), "top_k", (-1,)),
    Output("TOP_K_ACCURACY", "FP64", False,
           lambda ev: np.array(_accuracy(ev).top_k_accuracy, "<f8"), "top_k", (-1,)),
    Output("PREDICTED", "INT64", False,
           lambda ev: _diagnostics(ev).predicted.astype("<i8", copy=False), "diagnostics",
           (-1,)),
    Output("CONFIDENCE", "FP32", False,
           lambda ev: _diagnostics(ev).confidence.astype("<f4", copy=False), "diagnostics",
           (-1,)),
    Output("ECE", "FP64", False, _scalar("<f8", _ece), "diagnostics"),
)
OUTPUT_BY_NAME: Mapping[str, Output] = {o.name: o for o in (*OUTPUTS, *ANALYSIS_OUTPUTS)}
# Request parameters that ask for analyses (besides the loss's options).
ANALYSIS_PARAMETERS = ("per_class", "accuracy", "top_k", "diagnostics")


def tensor_inputs(spec: Loss) -> dict[str, str]:
    """Input name -> option name for the loss's tensor-valued options (``CLASS_WEIGHTS``...)."""
    return {o.name.upper(): o.name for o in all_options(spec) if o.type is OptionType.TENSOR}


def extra_inputs(spec: Loss) -> dict[str, str]:
    """Input name -> the loss's extra input (``VAR`` -> ``var``, ``INPUT_LENGTHS``...)."""
    return {i.name.upper(): i.name for i in spec.inputs}


def input_names(spec: Loss) -> list[str]:
    targets = [TARGETS] if spec.takes_targets else []
    return [PREDICTIONS, *targets, WEIGHTS, SAMPLE_IDS, *extra_inputs(spec),
            *tensor_inputs(spec)]


def _field(spec: Loss, field: str) -> str:
    """A native field name (``predictions``, ``options.label_smoothing``, ``inputs.var``) as
    named here."""
    head, _, rest = field.partition(".")
    native = {"predictions": PREDICTIONS, "targets": TARGETS, "weights": WEIGHTS,
              "sample_ids": SAMPLE_IDS}
    if head in native:
        return native[head] + (f".{rest}" if rest else "")
    if head == "options" and rest:
        tensors = {v: k for k, v in tensor_inputs(spec).items()}
        return tensors.get(rest, f"parameters.{rest}")
    if head in ANALYSIS_PARAMETERS:
        return f"parameters.{field}"
    if head == "inputs" and rest:
        name, _, sub = rest.partition(".")
        return name.upper() + (f".{sub}" if sub else "")
    return field


def _model(name: str, version: str) -> Loss:
    if name not in LOSSES:
        guess = suggest_loss(name)
        hint = f"did you mean {guess!r}? " if guess is not None else ""
        raise RequestError("model_name", f"unknown model {shown(name)}; {hint}the models are the "
                                         f"losses: {', '.join(sorted(LOSSES))}",
                           grpc.StatusCode.NOT_FOUND)
    if version not in ("", MODEL_VERSION):
        raise RequestError("model_version", f"{name} has no version {shown(version)}; its only "
                                            f"version is {MODEL_VERSION!r}",
                           grpc.StatusCode.NOT_FOUND)
    return LOSSES[name]


def _datatype(name: str, datatype: str) -> DataType:
    if datatype not in DATATYPES:
        raise RequestError(f"{name}.datatype", f"{shown(datatype)} not accepted; use one of "
                                               f"{', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                 index: int) -> torch.Tensor:
    """A host tensor from one input: a view of ``raw`` bytes, or a copy of typed contents."""
    name = tensor.name
    dt = _datatype(name, tensor.datatype)
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise RequestError(f"{name}.shape", f"{len(shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise RequestError(f"{name}.shape", f"negative dimension in {list(shape)}")
    count = math.prod(shape)
    if tensor.parameters:
        raise RequestError(f"{name}.parameters", f"{', '.join(sorted(tensor.parameters))} not "
                                                 "supported (shared memory is not either)")
    if raw is not None:
        if tensor.HasField("contents"):
            raise RequestError(f"{name}.contents", "set together with raw_input_contents; "
                                                   "send one or the other")
        expected = count * dt.numpy.itemsize
        if len(raw) != expected:
            raise RequestError(f"raw_input_contents[{index}]",
                               f"{len(raw)} bytes; {name} of shape {list(shape)} and datatype "
                               f"{tensor.datatype} needs {expected}")
        if expected == 0:
            return torch.empty(shape, dtype=dt.torch)
        return torch.frombuffer(raw, dtype=dt.torch).reshape(shape)
    if dt.contents_field is None:
        raise RequestError(f"{name}.contents", f"{tensor.datatype} has no typed contents; "
                                               "send it as raw_input_contents")
    values = getattr(tensor.contents, dt.contents_field)
    if len(values) != count:
        raise RequestError(f"{name}.contents.{dt.contents_field}",
                           f"{len(values)} values; shape {list(shape)} needs {count}")
    if count == 0:  # (numpy refuses shapes whose other dimensions are huge)
        return torch.empty(shape, dtype=dt.torch)
    return torch.from_numpy(np.asarray(values, dtype=dt.numpy).reshape(shape))


def decode_parameter(name: str, p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    if kind is None:
        raise RequestError(name_field("parameters", name), "no value set")
    return getattr(p, kind)


def decode_request(request: pb.ModelInferRequest, *, max_elements: int = 0) -> Batch:
    """The engine's batch for a ModelInfer request (model, inputs and parameters).

    The shapes the inputs claim are checked first, as the native API checks them
    (``--max-elements``, and dimensions whose product overflows), before any decoding.
    """
    spec = _model(request.model_name, request.model_version)
    budget = limits.ElementBudget(max_elements)
    for i, t in enumerate(request.inputs):
        budget.claim(plain(t.name) if t.name else f"inputs[{i}]", t.shape)
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise RequestError("raw_input_contents", f"{len(raws)} entries for "
                                                 f"{len(request.inputs)} inputs; send one per "
                                                 "input, in input order")
    accepted = input_names(spec)
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(request.inputs):
        if t.name not in accepted:
            raise RequestError(plain(t.name) if t.name else f"inputs[{i}]",
                               f"unknown input for model {spec.name}; its inputs are "
                               f"{', '.join(accepted)}")
        if t.name in tensors:
            raise RequestError(t.name, "given twice")
        tensors[t.name] = decode_input(t, raws[i] if raws else None, i)
    for name in (PREDICTIONS, TARGETS) if spec.takes_targets else (PREDICTIONS,):
        if name not in tensors:
            raise RequestError(name, f"missing input; model {spec.name} takes "
                                     f"{', '.join(accepted)}")

    tensor_options = tensor_inputs(spec)
    scalar_options = [o.name for o in all_options(spec) if o.type is not OptionType.TENSOR]
    options: dict[str, Any] = {}
    asked: dict[str, Any] = {}
    for name, p in request.parameters.items():
        if name in tensor_options.values():
            raise RequestError(name_field("parameters", name), f"a tensor; send it as input "
                                                     f"{name.upper()}")
        if name in ANALYSIS_PARAMETERS:
            asked[name] = _analysis_parameter(name, decode_parameter(name, p))
            continue
        if name not in scalar_options:
            hint = option_hint(spec, name, [o.name for o in all_options(spec)])
            raise RequestError(name_field("parameters", name), f"unknown parameter for model "
                                                     f"{spec.name}; {hint + '; ' if hint else ''}"
                                                     "accepted: "
                                                     f"{', '.join(scalar_options)} and "
                                                     f"{', '.join(ANALYSIS_PARAMETERS)}")
        options[name] = decode_parameter(name, p)
    for input_name, option in tensor_options.items():
        if input_name in tensors:
            options[option] = tensors[input_name]
    for r in request.outputs:  # an analysis output asks for its analysis
        out = OUTPUT_BY_NAME.get(r.name)
        if out is not None and out.needs is not None:
            for need in out.needs.split("+"):
                if need == "top_k" and "top_k" not in asked:
                    raise RequestError(f"outputs.{r.name}", "needs parameter top_k (the ks)")
                asked.setdefault(need, True)
    analyses = analysis.Request(per_class=bool(asked.get("per_class")),
                                accuracy=bool(asked.get("accuracy")),
                                top_k=asked.get("top_k", ()),
                                diagnostics=bool(asked.get("diagnostics")))
    return Batch(loss=spec.name, predictions=tensors[PREDICTIONS], targets=tensors.get(TARGETS),
                 weights=tensors.get(WEIGHTS), options=options, analyses=analyses,
                 inputs={name: tensors[key] for key, name in extra_inputs(spec).items()
                         if key in tensors},
                 sample_ids=tensors.get(SAMPLE_IDS))


_INT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
"""An int in a string parameter: ASCII digits, an optional sign, spaces around."""


def _analysis_parameter(name: str, value: Any) -> Any:
    field = f"parameters.{name}"
    if name != "top_k":
        if not isinstance(value, bool):
            raise RequestError(field, f"expected bool, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(field, "expected int64 or a string of comma-separated ints")
    if isinstance(value, int):
        return (value,)
    ks = value.split(",")
    if not all(_INT.fullmatch(k) for k in ks):  # int() would read "٣" as 3 and "1_0" as 10
        raise RequestError(field, f"{shown(value)} is not a comma-separated list of ints")
    return tuple(int(k) for k in ks)


def _produced(o: Output, weighted: bool, analyses: analysis.Request) -> bool:
    if o.weighted and not weighted:
        return False
    if o.needs is None:
        return True
    return all({"per_class": analyses.per_class, "accuracy": analyses.predictions,
                "top_k": bool(analyses.top_k), "diagnostics": analyses.diagnostics}[n]
               for n in o.needs.split("+"))


def requested_outputs(request: pb.ModelInferRequest, *, weighted: bool,
                      analyses: analysis.Request = analysis.NONE) -> list[Output]:
    """The outputs to return: those the request lists, in its order, or all it produces."""
    if not request.outputs:
        return [o for o in (*OUTPUTS, *ANALYSIS_OUTPUTS) if _produced(o, weighted, analyses)]
    chosen: list[Output] = []
    for r in request.outputs:
        field = f"outputs.{plain(r.name)}"
        if r.name not in OUTPUT_BY_NAME:
            raise RequestError(field, f"unknown output; the outputs are "
                                      f"{', '.join(OUTPUT_BY_NAME)}")
        out = OUTPUT_BY_NAME[r.name]
        if out in chosen:
            raise RequestError(field, "requested twice")
        if out.weighted and not weighted:
            raise RequestError(field, f"produced only when the request has input {WEIGHTS}")
        if not _produced(out, True, analyses):
            needs = " and ".join(f"parameters.{n}" for n in (out.needs or "").split("+"))
            raise RequestError(field, f"needs {needs}, turned off by the request")
        if r.parameters:
            raise RequestError(f"{field}.parameters", f"{', '.join(sorted(r.parameters))} not "
                                                      "supported")
        chosen.append(out)
    return chosen


def decode(request: pb.ModelInferRequest, *, max_elements: int = 0
           ) -> tuple[Batch, list[Output]]:
    """The batch of a ModelInfer request and the outputs it asks for."""
    batch = decode_request(request, max_elements=max_elements)
    return batch, requested_outputs(request, weighted=batch.weights is not None,
                                    analyses=batch.analyses)


def encode_response(request: pb.ModelInferRequest, outputs: Sequence[Output],
                    ev: Evaluation) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION,
                                 id=request.id)
    for out in outputs:
        value = out.value(ev)
        resp.outputs.add(name=out.name, datatype=out.datatype, shape=value.shape)
        resp.raw_output_contents.append(value.tobytes())
    return resp


def _metadata(name: str, datatype: str, shape: Sequence[int]
              ) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def model_metadata(spec: Loss) -> pb.ModelMetadataResponse:
    """Inputs and outputs of one model with their canonical datatype and smallest shape.

    The protocol has one datatype and one rank per tensor: PREDICTIONS is listed as FP32
    (FP16, BF16, FP64 are accepted too), class-index TARGETS as INT64 (INT32 too; for
    cross_entropy also float probabilities shaped as PREDICTIONS), float TARGETS as
    PREDICTIONS, extra inputs as FP32 or INT64; trailing dimensions d1, ... beyond the listed
    shape are accepted.
    """
    pred_shape = [-1] * spec.min_prediction_dims
    kind = spec.targets
    if kind is Targets.SAME_SHAPE or kind is Targets.CLASS_SETS:
        targets = [_metadata(TARGETS, "INT64" if kind.integer else "FP32", pred_shape)]
    elif kind is Targets.LABEL_SEQUENCES:
        targets = [_metadata(TARGETS, "INT64", [-1, -1])]
    elif kind is Targets.NONE:
        targets = []
    else:
        targets = [_metadata(TARGETS, "INT64" if kind.integer else "FP32", [-1])]
    extra = [_metadata(key, "INT64" if spec.input_by_name[name].dtype == "int" else "FP32",
                       pred_shape if spec.input_by_name[name].shape == "predictions" else [-1])
             for key, name in extra_inputs(spec).items()]
    inputs = [_metadata(PREDICTIONS, "FP32", pred_shape), *targets,
              _metadata(WEIGHTS, "FP32", [-1]), _metadata(SAMPLE_IDS, "INT64", [-1]), *extra,
              *(_metadata(name, "FP32", [-1]) for name in tensor_inputs(spec))]
    listed = (*OUTPUTS, *ANALYSIS_OUTPUTS) if spec.targets is not Targets.SAME_SHAPE \
        else OUTPUTS
    outputs = [_metadata(o.name, o.datatype, [-1] if o.name == "PER_SAMPLE" else o.shape)
               for o in listed]
    return pb.ModelMetadataResponse(name=spec.name, versions=[MODEL_VERSION],
                                    platform=PLATFORM, inputs=inputs, outputs=outputs)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc,unused-ignore]
    """Implements ``inference.GRPCInferenceService`` over an :class:`EvaluationService`.

    ``ready`` says whether the server is ready (default: always, once serving); ModelReady
    is ServerReady for every model in the catalogue. The request size limit is the gRPC
    server's, for every service (RESOURCE_EXHAUSTED beyond it).
    """

    def __init__(self, service: EvaluationService, *,
                 ready: Callable[[], bool] | None = None) -> None:
        self.service = service
        self._ready = ready or (lambda: True)

    def ServerLive(self, request: pb.ServerLiveRequest,
                   context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest,
                    context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request: pb.ModelReadyRequest,
                   context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        # As Triton: an unknown model or version is not ready (no error).
        known = request.name in LOSSES and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=known and self._ready())

    def ServerMetadata(self, request: pb.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=EXTENSIONS)

    @unary_errors
    def ModelMetadata(self, request: pb.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        return model_metadata(_model(request.name, request.version))

    @unary_errors
    def ModelInfer(self, request: pb.ModelInferRequest,
                   context: grpc.ServicerContext) -> pb.ModelInferResponse:
        service = self.service
        with service.call("ModelInfer") as call:
            call.loss = request.model_name
            call.received(request.ByteSize())
            try:
                with call.stage("decode"):
                    batch, outputs = decode(request, max_elements=service.max_elements)
            except Refused as exc:  # too large
                service.refused(call.method, exc)
                raise
            try:
                ev = service.evaluate(call, batch, CallState.of(context))
            except RequestError as exc:
                raise RequestError(_field(LOSSES[batch.loss], exc.field), exc.problem,
                                   exc.code) from None
            with call.stage("encode"):
                response = encode_response(request, outputs, ev)
            call.sent(response.ByteSize())
            call.evaluated(batch.loss, "", ev.losses, ev.aggregate.mean,
                           ev.aggregate.weighted_mean, ev.device_seconds)
            return response


def add_to_server(server: grpc.Server, service: EvaluationService, *,
                  ready: Callable[[], bool] | None = None) -> str:
    """Serve ``inference.GRPCInferenceService`` on ``server``; returns the service name."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call,unused-ignore]
        KServeServicer(service, ready=ready), server)
    return SERVICE_NAME
