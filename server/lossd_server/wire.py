"""``lossd.v1`` messages <-> host torch tensors, without copying the payload.

Decoding checks what the message itself claims (a known dtype, non-negative dims, bytes
matching shape x itemsize) and then views the bytes as a tensor; what the loss needs of
the tensor is ``validate``'s job. A message that does not parse, or a field that says what
cannot be, raises the errors of :mod:`lossd_server.errors` (no validation imported here).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import torch

from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import WIRE_DTYPES, dtype_name
from lossd_server import analysis
from lossd_server.errors import MalformedMessage, Refused, RequestError
from lossd_server.logs import MAX_NAME, plain
from lossd_server.logs import field as name_field

TORCH_DTYPES: dict[pb.DType, torch.dtype] = {k: getattr(torch, d.name)
                                             for k, d in WIRE_DTYPES.items()}
_PROTO_BY_TORCH = {v: k for k, v in TORCH_DTYPES.items()}

# Request bytes are immutable; tensors viewing them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


MAX_DIMS = 64
"""The most dimensions a tensor may have: numpy's limit (``numpy.lib.array_utils``'s
``MAXDIMS`` since numpy 2), through which decoding views the bytes; no loss takes more."""

SharedMemoryView = Callable[[pb.SharedMemoryRef, str], memoryview]
Claim = Callable[[str, tuple[int, ...]], None]
"""Called with each tensor's field and shape before its bytes are looked at (the server's
element limit, ``limits.ElementBudget.claim``)."""


# proto dtype -> (torch dtype, numpy dtype to view the bytes as, or None for bfloat16).
_DECODE: dict[int, tuple[torch.dtype, np.dtype[Any] | None, int]] = {
    k: (TORCH_DTYPES[k], None if k == pb.BFLOAT16 else d.numpy, d.itemsize)
    for k, d in WIRE_DTYPES.items()}


def decode_tensor(t: pb.Tensor, field: str, shared_memory: SharedMemoryView | None = None,
                  claim: Claim | None = None, *, private: bool = False,
                  pin_memory: bool = False) -> torch.Tensor:
    """A host tensor viewing the message's bytes, or its shared-memory bytes (no copy).

    ``shared_memory`` resolves a SharedMemoryRef of the request's session; ``claim`` sees
    the shape first. ``private``: bytes in shared memory are copied out (into pinned
    memory with ``pin_memory``), so the caller cannot change them after validation.
    ``field`` may hold a caller's name (``inputs.<name>``): it is shown as ``logs.field``
    shows names.
    """
    if len(field) > MAX_NAME or not field.isprintable():
        prefix, dot, name = field.partition(".")
        field = name_field(prefix, name) if dot else plain(field)
    decoded = _DECODE.get(t.dtype)
    if decoded is None:
        raise RequestError(f"{field}.dtype", f"{dtype_name(t.dtype)} not accepted; use one of "
                                             f"{', '.join(d.name for d in WIRE_DTYPES.values())}")
    dtype, view_as, itemsize = decoded
    shape = tuple(t.shape)
    if len(shape) > MAX_DIMS:
        raise RequestError(f"{field}.shape", f"{len(shape)} dimensions; at most {MAX_DIMS}")
    if shape and min(shape) < 0:
        raise RequestError(f"{field}.shape", f"negative dimension in {list(shape)}")
    if claim is not None:
        claim(field, shape)
    expected = math.prod(shape) * itemsize
    data: bytes | memoryview = t.data
    shared = t.HasField("shared_memory")
    if shared:
        if data:
            raise RequestError(field, "both data and shared_memory are set")
        if shared_memory is None:
            raise RequestError(f"{field}.shared_memory", "needs shared_memory_session")
        data = shared_memory(t.shared_memory, f"{field}.shared_memory")
    if len(data) != expected:
        raise RequestError(f"{field}.data", f"{len(data)} bytes; shape {list(shape)} of "
                                            f"{dtype_name(t.dtype)} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if shared and private:  # (a copy, so the caller cannot change it after validation)
        copy = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        copy.copy_(torch.frombuffer(data, dtype=dtype).reshape(shape))
        return copy
    if view_as is not None:  # numpy's view is cheaper than torch.frombuffer's
        return torch.from_numpy(np.frombuffer(data, dtype=view_as).reshape(shape))
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def decode_option(name: str, v: pb.OptionValue, claim: Claim | None = None) -> Any:
    """An option's value: a Python scalar or a host tensor (the caller's ``name`` appears in
    messages as ``logs.field`` shows it)."""
    kind = v.WhichOneof("kind")
    if kind is None:
        raise RequestError(name_field("options", name), "no value set")
    if kind == "tensor_value":
        return decode_tensor(v.tensor_value, name_field("options", name), claim=claim)
    return getattr(v, kind)


_REDUCTIONS = {pb.MEAN: "mean", pb.SUM: "sum", pb.WEIGHTED_MEAN: "weighted_mean",
               pb.WEIGHTED_SUM: "weighted_sum"}


def decode_reduction(value: pb.Reduction) -> str | None:
    """Reduction enum -> its name (``reduce.REDUCTIONS``); UNSPECIFIED -> None."""
    if not value:  # REDUCTION_UNSPECIFIED
        return None
    if value not in _REDUCTIONS:
        raise RequestError("gradient", f"unknown reduction {value}")
    return _REDUCTIONS[value]


def decode_options(options: Any, claim: Claim | None = None) -> dict[str, Any]:
    if not options:
        return {}
    return {name: decode_option(name, v, claim) for name, v in options.items()}


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    """A host tensor as a Tensor message (its bytes copied once into the message)."""
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return pb.Tensor(dtype=_PROTO_BY_TORCH[t.dtype], shape=t.shape, data=raw.numpy().tobytes())


def options_key(options: Any) -> str:
    """The canonical text of a request's ``options`` map (``MergeState.options``): one
    ``name=value`` line per option, sorted by name; a float by its exact ``repr``, a tensor
    as ``name=<dtype>[shape]:sha256`` of its bytes. Equal options, equal text."""
    lines = []
    for name in sorted(options):
        value = options[name]
        kind = value.WhichOneof("kind")
        if kind == "tensor_value":
            t = value.tensor_value
            digest = hashlib.sha256(t.data).hexdigest()
            lines.append(f"{name}=<{dtype_name(t.dtype)}>{list(t.shape)}:{digest}")
        else:
            lines.append(f"{name}={getattr(value, kind)!r}" if kind else f"{name}=None")
    return "\n".join(lines)


def decode_analyses(req: Any) -> analysis.Request:
    """The analyses an EvaluateRequest asks for."""
    if not (req.per_class or req.accuracy or req.top_k or req.diagnostics or req.hardest
            or req.quantiles):
        return analysis.NONE
    return analysis.Request(per_class=req.per_class, accuracy=req.accuracy,
                            top_k=tuple(req.top_k), diagnostics=req.diagnostics,
                            hardest=req.hardest, quantiles=tuple(req.quantiles))


def encode_diagnostics(d: analysis.Diagnostics, out: pb.Diagnostics) -> None:
    out.predicted.CopyFrom(wire_array(d.predicted.astype("<i4", copy=False), pb.INT32))
    out.confidence.CopyFrom(wire_array(d.confidence.astype("<f4", copy=False), pb.FLOAT32))
    out.correct = d.correct.astype(bool, copy=False).tobytes()


def wire_array(a: Any, dtype: pb.DType) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=a.shape, data=a.tobytes())


# --- Zero-copy request parsing -------------------------------------------------------
# protobuf hands a bytes field out as a fresh copy; for a 65 MB batch that copy, and the
# parse that makes it, cost more than the loss. Evaluate requests arrive as raw bytes; the
# tensor fields are sliced out as memoryviews here and protobuf parses only the rest.
#
# What protobuf (upb) accepts, this accepts with the same meaning, and what it rejects,
# this rejects (tests/test_wire_fuzz.py checks it differentially): varints of at most 10
# bytes (bits beyond 64 dropped), tags of at most 5 bytes below 2**32 with a field number
# of at least 1, wire types 0, 1, 2, 3/4 (groups, properly nested and closed) and 5, at
# most 100 levels of messages and groups; a known field with another wire type than its
# own is an unknown field, and unknown fields are skipped.

_TENSOR_FIELDS = {2: "predictions", 3: "targets", 4: "weights", 18: "sample_ids"}
_MAX_DEPTH = 100  # upb's default limit of nested messages and groups
_MASK64 = (1 << 64) - 1
_START_GROUP, _END_GROUP = 3, 4
_INPUTS_FIELD = 11  # map<string, Tensor> inputs: each entry a message {1: key, 2: value}
_OPTIONS_FIELD = 5  # map<string, OptionValue> options (left to protobuf, but counted)
_MAPS = {_INPUTS_FIELD: "inputs", _OPTIONS_FIELD: "options"}
INPUT_PREFIX = "inputs."

MAX_MAP_ENTRIES = 64
"""Default of ``--max-map-entries``: entries a request's ``inputs`` or ``options`` map may
hold. No loss takes more than a handful of either, and each entry costs the parser
(protobuf's or this one) far more than its two bytes on the wire: 8 MiB of empty entries
cost seconds of CPU and hundreds of MiB before the first would be refused by name."""


WALK_BASE, WALK_PER_ENTRY = 1024, 32
"""With ``--max-map-entries`` N, the zero-copy parser walks at most WALK_BASE + WALK_PER_ENTRY
x N fields and packed shape values (at every depth) of a request: a request of lossd's holds
a few dozen, plus a few per map entry, and each costs the Python walk microseconds, so 8 MiB
of two-byte fields (unknown ones, a group of them, a shape of 8M dimensions) would cost
seconds of CPU."""


class _Budget:
    """How many more fields and packed values the parser may walk."""

    __slots__ = ("left", "limit", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.limit = self.left = WALK_BASE + WALK_PER_ENTRY * max_entries

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"request: more than {self.limit} fields and shape values "
                          f"({WALK_BASE} and {WALK_PER_ENTRY} per entry of "
                          f"--max-map-entries {self.max_entries}); a request holds a few "
                          "dozen", reason="too_large")


def too_many_entries(field: str, max_entries: int) -> Refused:
    """The refusal of a request whose ``field`` map holds more than ``max_entries``."""
    return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"{field}: more than {max_entries} entries (--max-map-entries); a request "
                   f"names each of its {field} once", reason="too_large")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedMessage("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7


def _tag(buf: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag)."""
    start = pos
    key, pos = _varint(buf, pos, end)
    if pos - start > 5 or key > 0xFFFFFFFF:
        raise MalformedMessage("overlong or out-of-range tag")
    if key >> 3 == 0:
        raise MalformedMessage("field number 0")
    return key >> 3, key & 7, pos


def _value_end(buf: memoryview, number: int, wire_type: int, pos: int, end: int,
               depth: int, budget: _Budget | None = None) -> tuple[int, int]:
    """(value start, value end) of a field whose tag ends at ``pos``; ``depth``: the
    levels of messages and groups around it; ``budget`` pays for a group's fields."""
    if wire_type == 0:
        return pos, _varint(buf, pos, end)[1]
    if wire_type == 1:
        value_end = pos + 8
    elif wire_type == 2:
        length, pos = _varint(buf, pos, end)
        value_end = pos + length
    elif wire_type == 5:
        value_end = pos + 4
    elif wire_type == _START_GROUP:
        if depth + 1 > _MAX_DEPTH:
            raise MalformedMessage(f"more than {_MAX_DEPTH} nested messages and groups")
        inner = pos
        while True:
            if inner >= end:
                raise MalformedMessage(f"group {number} not closed")
            inner_number, inner_type, inner = _tag(buf, inner, end)
            if budget is not None:
                budget.spend()
            if inner_type == _END_GROUP:
                if inner_number != number:
                    raise MalformedMessage(f"group {number} closed as {inner_number}")
                return pos, inner
            inner = _value_end(buf, inner_number, inner_type, inner, end, depth + 1,
                               budget)[1]
    elif wire_type == _END_GROUP:
        raise MalformedMessage(f"end of group {number} outside a group")
    else:
        raise MalformedMessage(f"unsupported wire type {wire_type}")
    if value_end > end:
        raise MalformedMessage("field runs past the end of the message")
    return pos, value_end


def _fields(buf: memoryview, start: int, end: int, depth: int = 0,
            budget: _Budget | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field of the
    message in ``buf[start:end]``, nested ``depth`` levels deep; each paid from ``budget``."""
    pos = start
    while pos < end:
        field_start = pos
        number, wire_type, pos = _tag(buf, pos, end)
        if budget is not None:
            budget.spend()
        value_start, pos = _value_end(buf, number, wire_type, pos, end, depth, budget)
        yield number, wire_type, field_start, value_start, pos


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class TensorView:
    """A Tensor message whose data is a memoryview into the request (duck-types pb.Tensor)."""

    def __init__(self) -> None:
        self.dtype = 0
        self.shape: list[int] = []
        self.data: memoryview | bytes = b""
        self.shared_memory = pb.SharedMemoryRef()
        self._has_shared_memory = False

    def HasField(self, name: str) -> bool:
        return name == "shared_memory" and self._has_shared_memory

    def merge(self, buf: memoryview, start: int, end: int, depth: int = 1,
              budget: _Budget | None = None) -> None:
        """Merge one occurrence of the message, as protobuf does for repeated occurrences
        (``depth``: its nesting level, 1 for a field of the request; ``budget`` pays for
        its fields and shape values)."""
        for number, wire_type, _, value_start, value_end in _fields(buf, start, end, depth,
                                                                    budget):
            if number == 1 and wire_type == 0:
                self.dtype = _varint(buf, value_start, value_end)[0] & 0xFFFFFFFF
                if self.dtype >= 1 << 31:
                    self.dtype -= 1 << 32
            elif number == 2 and wire_type == 2:  # packed
                pos = value_start
                while pos < value_end:
                    if budget is not None:
                        budget.spend()
                    value, pos = _varint(buf, pos, value_end)
                    self.shape.append(_int64(value))
            elif number == 2 and wire_type == 0:
                self.shape.append(_int64(_varint(buf, value_start, value_end)[0]))
            elif number == 3 and wire_type == 2:
                self.data = buf[value_start:value_end]
            elif number == 4 and wire_type == 2:
                for _ in _fields(buf, value_start, value_end, depth + 1, budget):
                    pass  # nesting checked at its true depth; protobuf parses the values
                try:
                    self.shared_memory.MergeFromString(bytes(buf[value_start:value_end]))
                except Exception as exc:  # protobuf's DecodeError (e.g. a string not UTF-8)
                    raise MalformedMessage(f"shared_memory: {exc}") from None
                self._has_shared_memory = True
            # Anything else, a known field with another wire type included, is unknown.


def _input_entry(buf: memoryview, start: int, end: int, budget: _Budget | None = None
                 ) -> tuple[str, TensorView] | None:
    """One entry of the ``inputs`` map (a message {1: key, 2: Tensor value}), or None for an
    entry protobuf leaves out of the map: one holding any other field, or a field of the
    wrong wire type (protobuf keeps such an entry as an unknown field). As in protobuf, the
    last key and the merge of every value occurrence count."""
    key = ""
    value = TensorView()
    clean = True
    for number, wire_type, _, value_start, value_end in _fields(buf, start, end, 1, budget):
        if number == 1 and wire_type == 2:
            try:
                key = str(buf[value_start:value_end], "utf-8")
            except UnicodeDecodeError:
                raise MalformedMessage("inputs: a key is not valid UTF-8") from None
        elif number == 2 and wire_type == 2:
            value.merge(buf, value_start, value_end, 2, budget)
        else:
            clean = False
    return (key, value) if clean else None


def parse_evaluate_request(raw: bytes, max_map_entries: int = 0
                           ) -> tuple[pb.EvaluateRequest, dict[str, TensorView]]:
    """The request's small fields (parsed by protobuf; tensor fields left empty) and its
    tensors as zero-copy views: predictions, targets, weights, sample_ids, and each of the
    ``inputs`` map as ``inputs.<name>``.

    ``max_map_entries`` (0: no limit): the ``inputs`` or ``options`` entry past it is
    :class:`Refused` as it is met, before the rest of the message is walked, and so is the
    field or shape value past the walk's budget (``WALK_BASE``).
    """
    budget = _Budget(max_map_entries) if max_map_entries else None
    buf = memoryview(raw)
    tensors: dict[str, TensorView] = {}
    # The other fields' byte ranges, adjacent ones joined: their count stays that of the
    # tensor fields between them, however many small fields the message holds.
    rest: list[list[int]] = []
    entries = dict.fromkeys(_MAPS, 0)
    for number, wire_type, field_start, value_start, value_end in _fields(buf, 0, len(buf), 0,
                                                                          budget):
        if number in _MAPS and wire_type == 2:
            entries[number] += 1
            if max_map_entries and entries[number] > max_map_entries:
                raise too_many_entries(_MAPS[number], max_map_entries)
        if number in _TENSOR_FIELDS and wire_type == 2:
            tensors.setdefault(_TENSOR_FIELDS[number], TensorView()).merge(
                buf, value_start, value_end, 1, budget)
        elif number == _INPUTS_FIELD and wire_type == 2:
            entry = _input_entry(buf, value_start, value_end, budget)
            if entry is not None:
                tensors[INPUT_PREFIX + entry[0]] = entry[1]  # a later entry replaces
        elif rest and rest[-1][1] == field_start:
            rest[-1][1] = value_end
        else:  # (a tensor field of another wire type is an unknown field to protobuf too)
            rest.append([field_start, value_end])
    try:
        request = pb.EvaluateRequest.FromString(b"".join(buf[a:b] for a, b in rest))
    except Exception as exc:  # protobuf's DecodeError
        raise MalformedMessage(str(exc) or type(exc).__name__) from None
    return request, tensors


SMALL_MESSAGE_BYTES = 32 * 1024
"""Requests up to this size are parsed by protobuf itself: copying a few kB of tensor bytes
costs less than walking the fields in Python."""


def parse_request(raw: bytes, max_map_entries: int = MAX_MAP_ENTRIES
                  ) -> pb.EvaluateRequest | ParsedRequest:
    """The deserializer of Evaluate and EvaluateStream: protobuf's message for a small
    request, a zero-copy :class:`ParsedRequest` for a larger one (both read alike).

    Either way a request with more than ``max_map_entries`` (0: no limit) ``inputs`` or
    ``options`` entries is :class:`Refused` (RESOURCE_EXHAUSTED naming the map and the
    limit); a large one as soon as the parser meets the entry past the limit.
    """
    if len(raw) > SMALL_MESSAGE_BYTES:
        return ParsedRequest(raw, max_map_entries)
    try:
        request = pb.EvaluateRequest.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError
        raise MalformedMessage(str(exc) or type(exc).__name__) from None
    if max_map_entries:  # (SMALL_MESSAGE_BYTES bounds what protobuf built here)
        for name in _MAPS.values():
            if len(getattr(request, name)) > max_map_entries:
                raise too_many_entries(name, max_map_entries)
    return request


class ParsedRequest:
    """An EvaluateRequest parsed from its raw bytes without copying its tensors.

    Reads like the message: tensor fields and the ``inputs`` map's values are
    :class:`TensorView`s, every other field comes from the protobuf-parsed remainder, and
    ``ByteSize()`` is the received size.
    """

    _TENSORS = frozenset(_TENSOR_FIELDS.values())

    def __init__(self, raw: bytes, max_map_entries: int = 0) -> None:
        self.message, self.tensors = parse_evaluate_request(raw, max_map_entries)
        self.size = len(raw)
        self.inputs = {name.removeprefix(INPUT_PREFIX): view
                       for name, view in self.tensors.items() if name.startswith(INPUT_PREFIX)}

    def __getattr__(self, name: str) -> Any:
        if name in ParsedRequest._TENSORS:
            return self.tensors.get(name) or TensorView()
        return getattr(self.message, name)

    def HasField(self, name: str) -> bool:
        if name in ParsedRequest._TENSORS:
            return name in self.tensors
        return bool(self.message.HasField(name))

    def ByteSize(self) -> int:
        return self.size
