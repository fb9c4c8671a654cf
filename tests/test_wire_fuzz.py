"""The hand-written request parser, proven against protobuf: a differential fuzz test.

``wire.ParsedRequest`` parses Evaluate requests itself (tensors as zero-copy views); the
KServe front decodes ``ModelInferRequest`` messages into tensors. Both are checked
against protobuf's own parser (upb), on

* valid messages generated from the message descriptors (every field, of every type,
  present or not: fields added to the protos later are covered without touching this
  file), then
* mutated on the wire: truncated, fields duplicated, reordered, dropped, given another
  wire type, unknown fields inserted (groups included, nested), shapes switched between
  packed and unpacked encodings, lengths made huge, varints and tags made overlong (up to
  and past their limits), bytes flipped, stray end-group tags; mutations reach into
  nested messages (tensors, map entries, shared-memory references).

For every case: both parsers accept it with identical meaning (every field equal, the
tensors' bytes included), or both reject it and lossd's rejection is the INVALID_ARGUMENT
``request: malformed protobuf: ...``; nothing is read beyond the message (the parse of
the bytes inside a larger buffer is the same). A sample of the cases also goes through
a real server: a message protobuf rejects is answered INVALID_ARGUMENT, never INTERNAL.

``LOSSD_WIRE_FUZZ_EXAMPLES`` (default 2500 per test) sets the number of cases; the long
run (docs/development.md, "Fuzzing"):

    LOSSD_WIRE_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_wire_fuzz.py \\
        -p no:cacheprovider --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lossd._wire import _varint
from lossd.kserve.v2 import grpc_service_pb2 as kpb
from lossd.v1 import loss_service_pb2 as pb
from lossd_server import kserve, wire
from lossd_server.app import LossdServer
from lossd_server.errors import MalformedMessage, Refused, RequestError

EXAMPLES = int(os.environ.get("LOSSD_WIRE_FUZZ_EXAMPLES", "2500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------
# Valid messages from the descriptors. Each case comes from a random.Random seeded by
# hypothesis (one draw a case, so thousands of cases take seconds; a failure prints its
# seed and the message's bytes, and hypothesis replays it).

_INTS: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_VARINT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
                 FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_INT64,
                 FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_UINT64,
                 FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM}
_FLOATS = [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.nan, 1e300, 5e-324]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice("ab_.-é中😀\x00") for _ in range(rng.randint(0, 6)))


def scalar(rng: random.Random, f: FieldDescriptor) -> Any:
    """A valid value of scalar field ``f``."""
    if f.type in _INTS:
        lo, hi = _INTS[f.type]
        return rng.choice([rng.randint(max(lo, -3), min(hi, 300)), rng.randint(lo, hi),
                           lo, hi])
    if f.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        value = rng.choice([*_FLOATS, rng.uniform(-10, 10)])
        if f.type == FieldDescriptor.TYPE_FLOAT and math.isfinite(value) and abs(value) > 3e38:
            value = math.copysign(math.inf, value)
        return float(np.float32(value)) if f.type == FieldDescriptor.TYPE_FLOAT else value
    if f.type == FieldDescriptor.TYPE_STRING:
        return _text(rng)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 4, 8, 16, rng.randint(0, 48)]))
    if f.type == FieldDescriptor.TYPE_ENUM:  # open enums: unknown values are kept
        return rng.choice([rng.choice([v.number for v in f.enum_type.values]),
                           rng.randint(-2**31, 2**31 - 1)])
    raise AssertionError(f"no values for {f.full_name} (type {f.type})")


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def message(rng: random.Random, desc: Descriptor, depth: int = 0) -> Message:
    """A valid message of type ``desc``: any subset of its fields, set to any values."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if rng.random() < 0.35:
            continue
        if _is_map(f):
            key_f = f.message_type.fields_by_name["key"]
            value_f = f.message_type.fields_by_name["value"]
            target = getattr(msg, f.name)
            for _ in range(rng.randint(0, 3)):
                key = scalar(rng, key_f)
                if value_f.message_type is not None:
                    target[key].CopyFrom(message(rng, value_f.message_type, depth + 1))
                else:
                    target[key] = scalar(rng, value_f)
        elif f.message_type is not None:
            if depth >= 4:
                continue
            if f.is_repeated:
                for _ in range(rng.randint(0, 3)):
                    getattr(msg, f.name).add().CopyFrom(
                        message(rng, f.message_type, depth + 1))
            else:
                target = getattr(msg, f.name)
                target.SetInParent()
                target.MergeFrom(message(rng, f.message_type, depth + 1))
        elif f.is_repeated:
            getattr(msg, f.name).extend(scalar(rng, f) for _ in range(rng.randint(0, 4)))
        else:
            setattr(msg, f.name, scalar(rng, f))
    return msg


# ---------------------------------------------------------------------------------------
# The wire format, to mutate messages below the protobuf API


@dataclass
class Field:
    """One field on the wire. ``value``: an int (varint), bytes (fixed32/64 and
    length-delimited), or a list of fields (a group). ``key_pad`` / ``pad``: extra bytes
    making the tag / the varint or length overlong; ``length``: a length other than the
    value's; ``children``: a length-delimited value taken apart as a message."""

    number: int
    wire_type: int
    value: Any
    key_pad: int = 0
    pad: int = 0
    length: int | None = None
    children: list[Field] | None = None


def varint(value: int, pad: int = 0) -> bytes:
    """``value`` as a varint, made ``pad`` bytes longer than it need be."""
    out = bytearray(_varint(value))
    if pad:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def encode(fields: list[Field]) -> bytes:
    out = bytearray()
    for f in fields:
        out += varint((f.number << 3) | f.wire_type, f.key_pad)
        if f.wire_type == 0:
            out += varint(f.value, f.pad)
        elif f.wire_type == 2:
            payload = encode(f.children) if f.children is not None else f.value
            out += varint(len(payload) if f.length is None else f.length, f.pad) + payload
        elif f.wire_type == 3:
            out += encode(f.value) + varint((f.number << 3) | 4)
        else:
            out += f.value
    return bytes(out)


def decode(raw: bytes) -> list[Field]:
    """Fields of a well-formed message (as protobuf serialises it)."""
    fields, pos = [], 0
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(raw, pos)
        elif wire_type == 2:
            n, pos = _read_varint(raw, pos)
            value, pos = raw[pos:pos + n], pos + n
        else:
            size = {1: 8, 5: 4}[wire_type]
            value, pos = raw[pos:pos + size], pos + size
        fields.append(Field(number, wire_type, value))
    return fields


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = raw[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def unknown_field(rng: random.Random, depth: int = 0) -> Field:
    number = rng.choice([rng.randint(1, 40), 1000, 2**29 - 1])
    kind = rng.choice([0, 1, 2, 5] + ([3] if depth < 3 else []))
    if kind == 0:
        return Field(number, 0, rng.randint(0, 2**64 - 1))
    if kind in (1, 5):
        return Field(number, kind, rng.randbytes(8 if kind == 1 else 4))
    if kind == 2:
        return Field(number, 2, rng.randbytes(rng.randint(0, 12)))
    return Field(number, 3, [unknown_field(rng, depth + 1) for _ in range(rng.randint(0, 3))])


MUTATIONS = ("duplicate", "shuffle", "drop", "unknown", "wrong_wire_type", "packing",
             "overlong", "too_long", "huge_length", "nested", "stray_end_group", "group_depth")


def mutate(rng: random.Random, fields: list[Field], desc: Descriptor, done: list[str],
           depth: int = 0) -> list[Field]:
    """``fields`` with zero to three wire-level mutations, some reaching into nested
    messages of ``desc``; their names are appended to ``done``."""
    fields = [replace(f) for f in fields]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        how = rng.choice(MUTATIONS)
        at = rng.randint(0, len(fields))
        pick = rng.randint(0, max(0, len(fields) - 1))
        target = fields[pick] if fields else None
        done.append(how + (" (nested)" if depth else ""))
        if how == "duplicate" and target:
            fields.insert(at, replace(target))
        elif how == "shuffle":
            rng.shuffle(fields)
        elif how == "drop" and target:
            del fields[pick]
        elif how == "unknown":
            fields.insert(at, unknown_field(rng))
        elif how == "wrong_wire_type" and target:
            kind = rng.choice([k for k in (0, 1, 2, 5) if k != target.wire_type])
            value = {0: rng.randint(0, 2**64 - 1), 1: bytes(8), 5: bytes(4),
                     2: rng.randbytes(rng.randint(0, 8))}[kind]
            fields[pick] = Field(target.number, kind, value)
        elif how == "packing":
            fields = repack(fields, desc)
        elif how == "overlong" and target:
            if rng.random() < 0.5:
                target.key_pad = rng.choice([1, 2, 3, 4, 5, 6])
            elif target.wire_type in (0, 2):
                target.pad = rng.choice([1, 2, 5, 8, 9, 10])
        elif how == "too_long" and target and target.wire_type == 2:
            size = len(encode(target.children) if target.children is not None
                       else target.value)
            target.length = size + rng.randint(1, 3)
        elif how == "huge_length" and target and target.wire_type == 2:
            target.length = rng.choice([2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1])
        elif how == "nested" and target and target.wire_type == 2 and depth < 3:
            sub = desc.fields_by_number.get(target.number)
            if sub is not None and sub.message_type is not None and target.children is None:
                try:
                    children = decode(target.value)
                except (IndexError, KeyError):
                    continue
                target.children = mutate(rng, children, sub.message_type, done, depth + 1)
        elif how == "stray_end_group":
            fields.insert(at, Field(rng.randint(1, 40), 4, b""))
        elif how == "group_depth":
            group: list[Field] = []
            for _ in range(rng.choice([97, 98, 99, 100, 101])):
                group = [Field(21, 3, group)]
            fields.insert(at, group[0])
    return fields


def repack(fields: list[Field], desc: Descriptor) -> list[Field]:
    """Packed repeated varint fields unpacked, and unpacked ones packed."""
    out: list[Field] = []
    for f in fields:
        d = desc.fields_by_number.get(f.number)
        packable = d is not None and d.is_repeated and d.type in _VARINT_TYPES
        if packable and f.wire_type == 2 and f.children is None:
            values, pos = [], 0
            try:
                while pos < len(f.value):
                    v, pos = _read_varint(f.value, pos)
                    values.append(v)
            except IndexError:  # (bytes an earlier mutation put there)
                out.append(f)
                continue
            out += [Field(f.number, 0, v) for v in values]
        elif packable and f.wire_type == 0:
            out.append(Field(f.number, 2, varint(f.value)))
        else:
            out.append(f)
    return out


def wire_case(rng: random.Random, desc: Descriptor, done: list[str],
              valid: Callable[[random.Random, Message], None] | None = None) -> bytes:
    """A valid message of ``desc`` (``valid`` may adjust it), mutated, sometimes truncated
    or with a byte flipped."""
    msg = message(rng, desc)
    if valid is not None:
        valid(rng, msg)
    raw = encode(mutate(rng, decode(msg.SerializeToString()), desc, done))
    tail = rng.randint(0, 9)
    if tail == 9 and raw:
        done.append("truncated")
        raw = raw[:rng.randint(0, len(raw) - 1)]
    elif tail == 8 and raw:
        done.append("byte flipped")
        i = rng.randint(0, len(raw) - 1)
        raw = raw[:i] + bytes([raw[i] ^ rng.randint(1, 255)]) + raw[i + 1:]
    return raw


# ---------------------------------------------------------------------------------------
# Meaning: what a parsed request says, read through the interface the servicer uses


def _tensor(view: Any) -> pb.Tensor:
    t = pb.Tensor(dtype=view.dtype, shape=list(view.shape), data=bytes(view.data))
    if view.HasField("shared_memory"):
        t.shared_memory.CopyFrom(view.shared_memory)
    return t


def meaning(parsed: Any, desc: Descriptor = pb.EvaluateRequest.DESCRIPTOR) -> bytes:
    """The request as ``parsed`` presents it, re-serialised deterministically (unknown
    fields dropped): two parses mean the same exactly when these bytes are equal."""
    out = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if f.message_type is not None and not f.is_repeated:
            if not parsed.HasField(f.name):
                continue
            value = getattr(parsed, f.name)
            target = getattr(out, f.name)
            target.SetInParent()
            target.CopyFrom(value if isinstance(value, Message) else _tensor(value))
        elif _is_map(f):
            value_f = f.message_type.fields_by_name["value"]
            for k, v in getattr(parsed, f.name).items():
                if value_f.message_type is not None:
                    getattr(out, f.name)[k].CopyFrom(
                        v if isinstance(v, Message) else _tensor(v))
                else:
                    getattr(out, f.name)[k] = v
        elif f.is_repeated:
            items = getattr(parsed, f.name)
            if f.message_type is not None:
                for v in items:
                    getattr(out, f.name).add().CopyFrom(
                        v if isinstance(v, Message) else _tensor(v))
            else:
                getattr(out, f.name).extend(items)
        else:
            setattr(out, f.name, getattr(parsed, f.name))
    out.DiscardUnknownFields()
    return out.SerializeToString(deterministic=True)


def protobuf_parse(cls: type[Message], raw: bytes) -> Message | None:
    try:
        msg = cls.FromString(raw)
    except Exception:  # DecodeError
        return None
    return msg


def lossd_parse(raw: bytes | memoryview, *, entry: bool = False) -> Any:
    """``wire.ParsedRequest(raw)`` (or, with ``entry``, the server's deserializer
    ``wire.parse_request``), None when it rejects the message as protobuf would."""
    try:
        if entry:
            return wire.parse_request(raw)  # type: ignore[arg-type]
        return wire.ParsedRequest(raw)  # type: ignore[arg-type]
    except MalformedMessage as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(exc).startswith("request: malformed protobuf: ")
        return None


# An unknown length-delimited field (number 30) that makes a request large enough for
# the server's deserializer to hand it to the hand parser.
LARGE_UNKNOWN = b"\xf2\x01" + _varint(wire.SMALL_MESSAGE_BYTES) + bytes(wire.SMALL_MESSAGE_BYTES)


@dataclass
class Findings:
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    samples: list[bytes] = field(default_factory=list)


EVALUATE = Findings()


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_parsed_request_means_what_protobuf_parses(seed: int) -> None:
    rng = random.Random(seed)
    done: list[str] = []
    raw = wire_case(rng, pb.EvaluateRequest.DESCRIPTOR, done)
    for name in done:
        event(f"mutation {name}")
    want = protobuf_parse(pb.EvaluateRequest, raw)
    got = lossd_parse(raw)
    EVALUATE.cases += 1
    event("protobuf accepts" if want is not None else "protobuf rejects")
    if want is None:
        assert got is None, f"lossd accepted what protobuf rejects: {raw.hex()}"
        EVALUATE.rejected += 1
    else:
        assert got is not None, f"lossd rejected what protobuf accepts: {raw.hex()}"
        assert meaning(got) == meaning(want), raw.hex()
        EVALUATE.accepted += 1
        assert got.ByteSize() == len(raw)
    # The server's deserializer (wire.parse_request) leaves small requests to protobuf:
    # the same case behind a large unknown field reaches the hand parser through it.
    big = LARGE_UNKNOWN + raw
    want_big, got_big = protobuf_parse(pb.EvaluateRequest, big), lossd_parse(big, entry=True)
    assert (want_big is None) == (got_big is None) == (want is None), raw.hex()
    if want_big is not None and got_big is not None:
        assert isinstance(got_big, wire.ParsedRequest)
        assert meaning(got_big) == meaning(want_big), raw.hex()
    # Nothing beyond the message is read: the same bytes inside a larger buffer, with
    # more (valid) fields after them, parse the same.
    padded = memoryview(raw + b"\x0a\x03abc\x12\x02\x08\x01")[:len(raw)]
    again = lossd_parse(padded)
    assert (again is None) == (got is None)
    if again is not None and got is not None:
        assert meaning(again) == meaning(got)
    if len(EVALUATE.samples) < 300 and (want is None or EVALUATE.cases % 9 == 0):
        EVALUATE.samples.append(raw)


def _nest(levels: int) -> bytes:
    return bytes.fromhex("ab01") * levels + bytes.fromhex("ac01") * levels


def _ld(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


_hex = bytes.fromhex

# Edge cases the generator may not draw often, pinned: (bytes, protobuf accepts).
PINNED = [
    (_hex("8a8080800000"), True),     # tag in 5 bytes (overlong, allowed)
    (_hex("8a808080800000"), False),  # tag in 6 bytes
    (_hex("8a8080807000"), False),    # tag above 2**32
    (_hex("f8ffffff0f01"), True),     # field number 2**29 - 1
    (_hex("808080801001"), False),    # field number 2**29
    (_hex("ab010801ac01"), True),     # an unknown group
    (_hex("ab010801b401"), False),    # a group closed with another number
    (_hex("ac01"), False),            # an end-group tag outside a group
    (_hex("ab010801"), False),        # a group never closed
    (_hex("0e01"), False),            # wire type 6
    (_hex("1005"), True),             # predictions as a varint: an unknown field
    (_ld(2, _hex("10" + "ff" * 9 + "7f")), True),   # shape: 10-byte varint, bits past 64
    (_ld(2, _hex("10" + "ff" * 10 + "01")), False),  # shape: 11-byte varint
    (_ld(2, _hex("ab01ac01")), True),  # a group inside a tensor
    (_ld(2, _hex("15ff")), False),     # a tensor's fixed32 field cut short
    (_ld(2, _hex("1801")), True),      # a tensor's data as a varint: unknown
    (_ld(2, _hex("108080808020")), True),  # dtype 2**33 (truncated to 32 bits: 0)
    # upb allows 100 levels of messages and groups, counted from the request.
    (_nest(100), True), (_nest(101), False),
    (_ld(2, _nest(99)), True), (_ld(2, _nest(100)), False),
    (_ld(2, _ld(4, _nest(98))), True), (_ld(2, _ld(4, _nest(99))), False),
    (_ld(2, _ld(4, _ld(1, b"\xff"))), False),  # a shared-memory region name not UTF-8
]


@pytest.mark.parametrize(("raw", "accepted"), PINNED, ids=[r.hex()[:24] for r, _ in PINNED])
def test_pinned_edge_cases(raw: bytes, accepted: bool) -> None:
    want = protobuf_parse(pb.EvaluateRequest, raw)
    assert (want is not None) == accepted
    got = lossd_parse(raw)
    assert (got is not None) == accepted
    if got is not None and want is not None:
        assert meaning(got) == meaning(want)


# ---------------------------------------------------------------------------------------
# The same cases through a server: protobuf rejects -> INVALID_ARGUMENT, never INTERNAL


def test_the_server_answers_every_case_without_an_internal_error(server: LossdServer) -> None:
    assert EVALUATE.samples, "run with the differential test (it collects the cases)"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        method = ch.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=None,
                                response_deserializer=pb.EvaluateResponse.FromString)
        codes: dict[str, int] = {}
        cases = [*EVALUATE.samples, *(LARGE_UNKNOWN + raw for raw in EVALUATE.samples)]
        for raw in cases:  # small ones parsed by protobuf, large ones by the hand parser
            parsed = protobuf_parse(pb.EvaluateRequest, raw)
            try:
                method(raw, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if parsed is None:
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (raw.hex(), exc.details())
                    assert (exc.details() or "").startswith("request: not a valid message")
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.RESOURCE_EXHAUSTED), (raw.hex(), code)
            codes[code.name] = codes.get(code.name, 0) + 1
    assert codes.get("INVALID_ARGUMENT", 0) > 0
    print(f"\nwire fuzz: {EVALUATE.cases} cases, protobuf accepted {EVALUATE.accepted}, "
          f"rejected {EVALUATE.rejected}; {len(cases)} sent to a server: {codes}")


# ---------------------------------------------------------------------------------------
# The KServe decoder


_KS_NUMPY = {name: dt.numpy for name, dt in kserve.DATATYPES.items()}
_KS_TORCH = {name: dt.torch for name, dt in kserve.DATATYPES.items()}


def _bytes(t: torch.Tensor) -> bytes:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def reference_inputs(req: kpb.ModelInferRequest) -> dict[str, torch.Tensor] | str:
    """The Open Inference Protocol's reading of a request's inputs (written from the
    protocol, not from kserve.py): name -> tensor, or the reason it is not valid."""
    raws = list(req.raw_input_contents)
    if raws and len(raws) != len(req.inputs):
        return "raw_input_contents"
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(req.inputs):
        if t.datatype not in _KS_NUMPY or any(d < 0 for d in t.shape) or t.parameters:
            return t.name
        if t.name in out:
            return t.name
        count = math.prod(t.shape)
        dt = _KS_NUMPY[t.datatype]
        if raws:
            if t.HasField("contents") or len(raws[i]) != count * dt.itemsize:
                return t.name
            arr = np.frombuffer(raws[i], dtype=dt).copy()
        else:
            typed = {"FP32": t.contents.fp32_contents, "FP64": t.contents.fp64_contents,
                     "INT64": t.contents.int64_contents, "INT32": t.contents.int_contents}
            if t.datatype not in typed or len(typed[t.datatype]) != count:
                return t.name
            arr = np.asarray(list(typed[t.datatype]), dtype=dt)
        if count == 0:  # (numpy refuses shapes whose other dimensions are huge)
            out[t.name] = torch.empty(tuple(t.shape), dtype=_KS_TORCH[t.datatype])
            continue
        tensor = torch.from_numpy(arr.reshape(tuple(t.shape)))
        out[t.name] = tensor.view(torch.bfloat16) if t.datatype == "BF16" else tensor
    return out


def plausible(rng: random.Random, msg: Message) -> None:
    """Now and then, a ModelInferRequest naming a real model, its inputs, datatypes and
    consistent raw contents (else nearly everything would be refused early)."""
    assert isinstance(msg, kpb.ModelInferRequest)
    if rng.random() < 0.2:
        return
    loss = rng.choice(sorted(kserve.LOSSES))
    msg.model_name = loss
    msg.model_version = rng.choice(["", "1", msg.model_version])
    names = kserve.input_names(kserve.LOSSES[loss])
    for t in msg.inputs:
        if rng.random() < 0.75:
            t.name = rng.choice(names)
        if rng.random() < 0.75:
            t.datatype = rng.choice(sorted(_KS_NUMPY))
        if rng.random() < 0.6:
            t.parameters.clear()
    if rng.random() < 0.5:
        msg.parameters.clear()
    if rng.random() < 0.5:
        del msg.raw_input_contents[:]
        for t in msg.inputs:
            del t.shape[:]
            t.shape.extend(rng.randint(0, 3) for _ in range(rng.randint(0, 3)))
            t.ClearField("contents")
            size = math.prod(t.shape) * _KS_NUMPY.get(t.datatype, np.dtype("u1")).itemsize
            msg.raw_input_contents.append(rng.randbytes(size))


KSERVE = Findings()


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_kserve_decoding_means_what_the_protocol_says(seed: int) -> None:
    rng = random.Random(seed)
    done: list[str] = []
    raw = wire_case(rng, kpb.ModelInferRequest.DESCRIPTOR, done, plausible)
    for name in done:
        event(f"mutation {name}")
    req = protobuf_parse(kpb.ModelInferRequest, raw)
    KSERVE.cases += 1
    if req is None:  # gRPC's deserializer (in lossd's gate) answers INVALID_ARGUMENT
        event("protobuf rejects")
        KSERVE.rejected += 1
        return
    assert isinstance(req, kpb.ModelInferRequest)
    KSERVE.accepted += 1
    try:
        batch = kserve.decode_request(req, max_elements=1 << 25)
    except RequestError as exc:
        event(f"refused {exc.code.name}")
        assert exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        return
    except Refused as exc:  # more elements than --max-elements
        assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.reason == "too_large"
        return
    event("decoded")
    expected = reference_inputs(req)
    assert isinstance(expected, dict), f"kserve decoded what the protocol refuses: {expected}"
    spec = kserve.LOSSES[batch.loss]
    tensors = {kserve.PREDICTIONS: batch.predictions}
    if batch.targets is not None:
        tensors[kserve.TARGETS] = batch.targets
    if batch.weights is not None:
        tensors[kserve.WEIGHTS] = batch.weights
    if batch.sample_ids is not None:
        tensors[kserve.SAMPLE_IDS] = batch.sample_ids
    for input_name, option in kserve.tensor_inputs(spec).items():
        if option in batch.options:
            tensors[input_name] = batch.options[option]
    for input_name, extra in kserve.extra_inputs(spec).items():
        if extra in batch.inputs:
            tensors[input_name] = batch.inputs[extra]
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        want = expected[name]
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert _bytes(tensor) == _bytes(want), name
    scalar = {k: getattr(v, v.WhichOneof("parameter_choice"))
              for k, v in req.parameters.items()}
    assert {k: v for k, v in batch.options.items() if not isinstance(v, torch.Tensor)} \
        == scalar


def test_kserve_fuzz_ran() -> None:
    assert KSERVE.cases > 0 or EXAMPLES == 0
    print(f"\nkserve fuzz: {KSERVE.cases} cases, protobuf accepted {KSERVE.accepted}, "
          f"rejected {KSERVE.rejected}")

