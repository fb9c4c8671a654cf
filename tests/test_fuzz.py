"""Property-based fuzzing of Evaluate with raw protobuf requests (hypothesis).

Requests are built field by field through the generated messages, then sent as bytes:
random losses, dtypes (valid and not), shapes (empty, negative, huge claimed ones), byte
lengths (exact, truncated, padded), values with NaN and Inf, options of every kind under
known and unknown names, reductions, and now and then a message truncated or replaced by
random bytes. Every answer must be

* OK, with per-sample values equal to torch's (``tests.loss_reference``) and aggregates
  that add up, or
* INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a message that starts with the field at
  fault (``predictions.shape: ...``),

never INTERNAL or anything else; afterwards the server still answers a valid request
correctly. ``LOSSD_FUZZ_EXAMPLES`` (default 2000) sets the number of examples and
``LOSSD_FUZZ_DEVICE`` (default cpu) the server's device: on ``cuda`` the fuzzing also
checks that no input reaches a kernel that would assert on the device.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lossd import LossClient
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.app import LossdServer
from lossd_server.losses import CATALOGUE, LOSSES, Targets, all_options
from tests import loss_reference as ref
from tests.conftest import start_server

EXAMPLES = int(os.environ.get("LOSSD_FUZZ_EXAMPLES", "2000"))
DEVICE = os.environ.get("LOSSD_FUZZ_DEVICE", "cpu")
MAX_ELEMENTS = 4096
EVALUATE = "/lossd.v1.LossService/Evaluate"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
# A message names its field first: "predictions.shape: ...", "options.beta: ...".
# An option is named as sent, whatever its characters: "options.<name>...".
FIELD_FIRST = re.compile(r"^((loss|predictions|targets|weights|gradient|request|"
                         r"per_sample_output|shared_memory_session)[\w.\[\]]*|"
                         r"(options|inputs)\..*?): ", re.DOTALL)

NUMPY = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.BFLOAT16: np.dtype("<u2"),
         pb.FLOAT64: np.dtype("<f8"), pb.INT64: np.dtype("<i8"), pb.INT32: np.dtype("<i4")}
FLOATS = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64)
INDEXES = (pb.INT64, pb.INT32)
OPTION_NAMES = sorted({o.name for spec in CATALOGUE for o in all_options(spec)})
# The built-ins, whose references tests/loss_reference.py has (plugins the server loads
# join LOSSES later).
BUILTIN_NAMES = sorted(spec.name for spec in CATALOGUE)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LossdServer]:
    srv = start_server(max_elements=MAX_ELEMENTS, max_waiting=64, device=DEVICE)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server: LossdServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        yield channel


# ---------------------------------------------------------------------------------------
# Strategies

values = st.one_of(
    st.floats(-4, 4, width=32),
    st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30]),
    st.floats(allow_nan=True, allow_infinity=True, width=32))


@st.composite
def tensor_data(draw: st.DrawFn, dtype: int, shape: list[int], *,
                classes: int | None = None) -> bytes:
    """Bytes for ``shape`` of ``dtype``; index dtypes hold classes (some out of range)."""
    count = math.prod(shape) if shape and all(0 <= d <= 64 for d in shape) else 0
    if dtype in INDEXES:
        hi = max(1, classes or 4)
        items = draw(st.lists(st.one_of(st.integers(0, hi - 1), st.integers(-101, hi + 2),
                                        st.just(-100)), min_size=count, max_size=count))
        return np.asarray(items, dtype=NUMPY[dtype]).tobytes()
    items = draw(st.lists(values, min_size=count, max_size=count))
    arr = np.asarray(items, dtype=np.float32)
    if dtype == pb.BFLOAT16:
        return (arr.view(np.uint32) >> 16).astype("<u2").tobytes()
    with np.errstate(over="ignore"):
        return arr.astype(NUMPY.get(dtype, np.dtype("<f4"))).tobytes()


def mangle(draw: st.DrawFn, data: bytes) -> bytes:
    """Mostly the bytes as they are; sometimes truncated, padded or emptied."""
    how = draw(st.sampled_from(["keep"] * 8 + ["truncate", "pad", "empty"]))
    if how == "truncate" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "pad":
        return data + draw(st.binary(min_size=1, max_size=9))
    if how == "empty":
        return b""
    return data


dims = st.one_of(st.integers(1, 4), st.integers(0, 6), st.sampled_from([-1, 2**31, 2**62]))


@st.composite
def tensor(draw: st.DrawFn, dtype: int, shape: list[int], *, classes: int | None = None,
           chaos: bool) -> pb.Tensor:
    if chaos and draw(st.integers(0, 9)) == 0:
        dtype = draw(st.sampled_from([0, 7, 99, *NUMPY]))
    if chaos and draw(st.integers(0, 9)) == 0:
        shape = draw(st.lists(dims, max_size=5))
    data = draw(tensor_data(dtype if dtype in NUMPY else pb.FLOAT32, shape, classes=classes))
    if chaos:
        data = mangle(draw, data)
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@st.composite
def option_value(draw: st.DrawFn, classes: int) -> pb.OptionValue:
    kind = draw(st.sampled_from(["float", "int", "bool", "string", "tensor", "none"]))
    if kind == "float":
        return pb.OptionValue(float_value=draw(st.one_of(st.floats(0, 1), values)))
    if kind == "int":
        return pb.OptionValue(int_value=draw(st.one_of(st.integers(-101, 5),
                                                       st.integers(-2**63, 2**63 - 1))))
    if kind == "bool":
        return pb.OptionValue(bool_value=draw(st.booleans()))
    if kind == "string":
        return pb.OptionValue(string_value=draw(st.one_of(
            st.sampled_from(["propagate", "omit", "raise"]), st.text(max_size=8))))
    if kind == "tensor":
        n = draw(st.sampled_from([classes, 1, 2]))
        dtype = draw(st.sampled_from([pb.FLOAT64, pb.FLOAT32, pb.INT64]))
        return pb.OptionValue(tensor_value=draw(tensor(dtype, [n], chaos=True)))
    return pb.OptionValue()


@st.composite
def typed_option(draw: st.DrawFn, o: Any, shape: list[int]) -> pb.OptionValue:
    """A value of the option's own type (which its range check may still refuse)."""
    kind = o.type.value
    if o.choices:
        return pb.OptionValue(string_value=draw(st.sampled_from(list(o.choices))))
    if kind == "float":
        return pb.OptionValue(float_value=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0])))
    if kind == "int":
        return pb.OptionValue(int_value=draw(st.sampled_from([-100, 0, 1, 2])))
    if kind == "bool":
        return pb.OptionValue(bool_value=draw(st.booleans()))
    n = shape[1] if o.name == "class_weights" and len(shape) > 1 else shape[-1]
    w = draw(st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n))
    return pb.OptionValue(tensor_value=pb.Tensor(
        dtype=pb.FLOAT64, shape=[n], data=np.asarray(w, "<f8").tobytes()))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """An EvaluateRequest, serialized; mostly plausible, sometimes broken on purpose."""
    chaos = draw(st.booleans())  # half the requests are well-formed
    name = draw(st.sampled_from([*BUILTIN_NAMES, *(["", "nope"] if chaos else [])]))
    spec = LOSSES.get(name, CATALOGUE[0])
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    extra = draw(st.lists(st.integers(1, 3), max_size=1))
    if spec.targets is Targets.SAME_SHAPE and spec.name != "kl_div":
        shape = draw(st.sampled_from([[n], [n, c], [n, c, *extra]]))
    else:
        shape = [n, c, *extra]
    pdtype = draw(st.sampled_from(FLOATS))
    integer = spec.targets in (Targets.CLASS_INDEX, Targets.CLASS_SETS,
                               Targets.LABEL_SEQUENCES) or (
        spec.targets is Targets.CLASS_INDEX_OR_PROBS and draw(st.booleans()))
    req = pb.EvaluateRequest(loss=name)
    req.predictions.CopyFrom(draw(tensor(pdtype, shape, chaos=chaos)))
    if integer:
        tshape = {Targets.CLASS_SETS: shape,
                  Targets.LABEL_SEQUENCES: [shape[0], draw(st.integers(1, 3))]}.get(
            spec.targets, [shape[0], *shape[2:]])
        classes = shape[-1] if spec.targets is not Targets.CLASS_INDEX else shape[1]
        req.targets.CopyFrom(draw(tensor(draw(st.sampled_from(INDEXES)), tshape,
                                         classes=classes, chaos=chaos)))
    else:
        tshape = [n] if spec.targets is Targets.SAMPLE_VALUES else shape
        targets = draw(tensor(draw(st.sampled_from(FLOATS)), tshape, chaos=chaos))
        if spec.name in ("binary_cross_entropy_with_logits", "sigmoid_focal_loss",
                         "binary_cross_entropy") and not chaos:  # probabilities in [0, 1]
            t = np.clip(np.nan_to_num(decode(targets).float().numpy()), 0, 1)
            targets = pb.Tensor(dtype=pb.FLOAT32, shape=tshape, data=t.tobytes())
        req.targets.CopyFrom(targets)
    for declared in spec.inputs:  # the loss's extra tensors (now and then left out)
        if draw(st.integers(0, 9)) == 0:
            continue
        if declared.dtype == "int":  # lengths: (N,) counts of what the tensors hold
            hi = shape[1] if declared.name == "input_lengths" and len(shape) > 1 else 2
            values_ = draw(st.lists(st.integers(-1, hi + 1), min_size=n, max_size=n))
            req.inputs[declared.name].CopyFrom(pb.Tensor(
                dtype=pb.INT64, shape=[n], data=np.asarray(values_, "<i8").tobytes()))
        else:
            req.inputs[declared.name].CopyFrom(draw(tensor(draw(st.sampled_from(FLOATS)),
                                                           shape, chaos=chaos)))
    if spec.targets is Targets.NONE and draw(st.integers(0, 9)) != 0:
        req.ClearField("targets")
    if draw(st.integers(0, 3)) == 0:
        w = draw(tensor(draw(st.sampled_from(FLOATS)), [n], chaos=chaos))
        if not chaos:  # non-negative, not all zero
            arr = np.abs(np.nan_to_num(decode(w).double().numpy(), posinf=1.0, neginf=1.0))
            arr[0] = max(arr[0], 0.5)
            w = pb.Tensor(dtype=pb.FLOAT64, shape=[n], data=arr.astype("<f8").tobytes())
        req.weights.CopyFrom(w)
    if chaos:  # any name, any kind of value
        names = draw(st.lists(st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=6)),
                              max_size=3, unique=True))
        for opt in names:
            req.options[opt].CopyFrom(draw(option_value(shape[1] if len(shape) > 1 else 1)))
    else:  # the loss's own options with values of their type
        for o in draw(st.lists(st.sampled_from(all_options(spec)), max_size=3,
                               unique_by=lambda o: o.name)):
            req.options[o.name].CopyFrom(draw(typed_option(o, shape)))
    if draw(st.integers(0, 4)) == 0:
        req.gradient = draw(st.sampled_from([0, 1, 2, 3, 4, 5, -3]))  # type: ignore[assignment]
    req.tag = draw(st.text(max_size=4))
    raw = req.SerializeToString()
    tail = draw(st.integers(0, 29))  # (hypothesis favours 0: keep the message then)
    if tail == 29:
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]  # truncated message
    if tail == 28:
        return draw(st.binary(max_size=64))  # garbage
    if tail == 27:  # a field of the wrong wire type: loss (1) as a varint
        return raw + struct.pack("<BB", (1 << 3) | 0, 7)
    return raw


# ---------------------------------------------------------------------------------------
# The reference


def decode(t: pb.Tensor) -> torch.Tensor:
    arr = np.frombuffer(t.data, dtype=NUMPY[t.dtype]).reshape(tuple(t.shape))
    if t.dtype == pb.BFLOAT16:
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


@dataclass
class Reply:
    code: grpc.StatusCode
    details: str
    response: pb.EvaluateResponse | None


def call(channel: grpc.Channel, raw: bytes) -> Reply:
    method = channel.unary_unary(EVALUATE, request_serializer=None,
                                 response_deserializer=pb.EvaluateResponse.FromString)
    try:
        resp = method(raw, timeout=30)
    except grpc.RpcError as exc:
        return Reply(exc.code(), exc.details() or "", None)
    return Reply(grpc.StatusCode.OK, "", resp)


def check_ok(raw: bytes, resp: pb.EvaluateResponse) -> None:
    """The answer to a request the server accepted equals torch's."""
    req = pb.EvaluateRequest.FromString(raw)
    x = decode(req.predictions)
    t = decode(req.targets) if req.HasField("targets") else None
    w = decode(req.weights).double() if req.HasField("weights") else None
    opts: dict[str, Any] = {}
    for name, v in req.options.items():
        kind = v.WhichOneof("kind")
        opts[name] = decode(v.tensor_value) if kind == "tensor_value" else getattr(v, kind)
    nan_policy = opts.get("nan_policy", "propagate")
    inputs = {name: decode(v) for name, v in req.inputs.items()}
    case = ref.Case("fuzz", req.loss, x, t, {k: v for k, v in opts.items()}, w, inputs)
    want = ref.expected(case, DEVICE)
    got = torch.from_numpy(np.frombuffer(resp.per_sample.data, "<f4").copy())
    assert got.shape == (x.shape[0],)
    torch.testing.assert_close(got, want.per_sample.float().cpu(), rtol=2e-6, atol=1e-6,
                               equal_nan=True)
    counted = ~want.ignored.cpu()
    if nan_policy == "omit":
        counted &= torch.isfinite(x.double()).reshape(x.shape[0], -1).all(dim=1)
    agg = resp.aggregates
    assert agg.count == int(counted.sum())
    assert agg.ignored == int(want.ignored.sum())
    values = got.double()[counted]
    if bool(torch.isfinite(values).all()) and values.numel():
        scale = float(values.abs().sum()) + 1e-12
        assert abs(agg.sum - float(values.sum())) <= 1e-5 * scale
    if req.gradient:
        assert list(resp.gradient.shape) == list(req.predictions.shape)


# ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(  # reduce.py: a weight of 0 times an infinite loss
    "ignore:invalid value encountered in multiply:RuntimeWarning")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(raw=requests())
def test_every_answer_is_correct_or_a_named_client_error(fuzz_channel: grpc.Channel,
                                                        raw: bytes) -> None:
    reply = call(fuzz_channel, raw)
    event(reply.code.name)  # pytest --hypothesis-show-statistics shows the mix
    if reply.response is None:
        event("field " + reply.details.split(":", 1)[0].split(".", 1)[0])
    assert reply.code in ALLOWED, (reply.code, reply.details)
    if reply.response is not None:
        check_ok(raw, reply.response)
    else:
        assert FIELD_FIRST.match(reply.details), reply.details


def test_the_server_still_serves_correctly_after_the_fuzzing(
        fuzz_server: LossdServer) -> None:
    x = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([0, 2])
    with LossClient(f"127.0.0.1:{fuzz_server.port}", timeout=10) as client:
        r = client.evaluate(x, t)
    assert torch.equal(torch.from_numpy(r.per_sample),
                       torch.nn.functional.cross_entropy(x, t, reduction="none"))
    assert fuzz_server.metrics.registry.get_sample_value(
        "lossd_requests_total",
        {"method": "Evaluate", "loss": "cross_entropy", "code": "INTERNAL"}) == 0
