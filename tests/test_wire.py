"""Unit tests of the wire codecs: lossd._wire (client) and lossd_server.wire (server)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lossd._wire import (
    WIRE_DTYPES,
    array_to_tensor,
    as_array,
    dtype_name,
    option_value,
    tensor_to_numpy,
    to_tensor,
)
from lossd.v1 import loss_service_pb2 as pb
from lossd_server import wire
from lossd_server.errors import MalformedMessage, RequestError

TORCH_BY_NAME = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64,
                 "int64": torch.int64, "int32": torch.int32}


def _address(buf: bytes) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


def test_dtype_table_covers_the_proto_enum() -> None:
    enum_values = {v.number for v in pb.DType.DESCRIPTOR.values} - {pb.DTYPE_UNSPECIFIED}
    assert set(WIRE_DTYPES) == enum_values
    for proto, d in WIRE_DTYPES.items():
        assert pb.DType.Name(proto).lower() == d.name
        assert d.itemsize == torch.empty(0, dtype=TORCH_BY_NAME[d.name]).element_size()
        assert d.is_float == TORCH_BY_NAME[d.name].is_floating_point
        assert d.numpy.str.startswith("<")  # little-endian on the wire
    assert set(wire.TORCH_DTYPES) == enum_values
    assert dtype_name(pb.INT32) == "int32" and dtype_name(99) == "DType(99)"


# ---------------------------------------------------------------------------------------
# Client: as_array / tensor_to_numpy / option_value


def test_as_array_no_copy_for_contiguous_little_endian() -> None:
    for dtype in ("<f4", "<f2", "<f8", "<i8", "<i4"):
        a = np.arange(12).reshape(3, 4).astype(dtype)
        arr, proto = as_array(a, field="x")
        assert arr is a or np.shares_memory(arr, a)
        assert WIRE_DTYPES[proto].numpy == np.dtype(dtype)


def test_as_array_converts_layout() -> None:
    big = np.arange(6, dtype=">f8").reshape(2, 3)
    arr, proto = as_array(big, field="x")
    assert proto == pb.FLOAT64 and arr.dtype.str == "<f8" and np.array_equal(arr, big)
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    arr, _ = as_array(strided, field="x")
    assert arr.flags.c_contiguous and np.array_equal(arr, strided)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    arr, proto = as_array(fortran, field="x")
    assert proto == pb.INT32 and arr.flags.c_contiguous and np.array_equal(arr, fortran)


def test_as_array_keeps_zero_dim_shape() -> None:
    arr, _ = as_array(np.float32(2.5), field="x")
    assert arr.shape == () and float(arr) == 2.5
    assert array_to_tensor(arr, pb.FLOAT32).shape == []
    arr, _ = as_array(torch.tensor(3), field="x")
    assert arr.shape == ()


def test_as_array_lists() -> None:
    arr, proto = as_array([[1.0, 2], [3, 4]], field="x")
    assert proto == pb.FLOAT64 and arr.shape == (2, 2)
    arr, proto = as_array([1, 2, 3], field="x")
    assert proto == pb.INT64 and arr.tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match=r"^x: bool arrays"):
        as_array([True, False], field="x")
    with pytest.raises(TypeError, match=r"^y: dtype complex128 is not accepted"):
        as_array(np.zeros(2, complex), field="y")


def test_as_array_torch() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    arr, proto = as_array(t, field="x")
    assert proto == pb.FLOAT32 and arr.ctypes.data == t.data_ptr()  # a view, no copy
    bf = torch.tensor([1.5, -2.0, 3.0e38], dtype=torch.bfloat16)
    arr, proto = as_array(bf, field="x")
    assert proto == pb.BFLOAT16 and arr.itemsize == 2
    back = tensor_to_numpy(array_to_tensor(arr, proto))
    assert back.dtype == np.float32 and np.array_equal(back, bf.float().numpy())
    nc = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    arr, proto = as_array(nc, field="x")
    assert proto == pb.INT32 and arr.flags.c_contiguous and arr.tolist() == nc.tolist()
    with pytest.raises(TypeError, match=r"unsupported torch dtype torch.bool"):
        as_array(torch.zeros(2, dtype=torch.bool), field="x")


@pytest.mark.parametrize("name", sorted(TORCH_BY_NAME))
def test_round_trip_through_both_codecs(name: str) -> None:
    """Client encode -> server decode -> server encode -> client decode, for every dtype."""
    dtype = TORCH_BY_NAME[name]
    src = (torch.randn(3, 2, 4) * 100).to(dtype)
    msg = to_tensor(src, field="x")
    assert msg.dtype == getattr(pb, name.upper()) and list(msg.shape) == [3, 2, 4]
    assert len(msg.data) == src.numel() * src.element_size()
    decoded = wire.decode_tensor(msg, "x")
    assert decoded.dtype == dtype and torch.equal(decoded, src)
    assert np.array_equal(tensor_to_numpy(msg), src.float().numpy() if dtype == torch.bfloat16
                          else src.numpy())
    if dtype != torch.bfloat16:  # the server encodes float32 per-sample values
        assert wire.encode_tensor(decoded) == msg


def test_tensor_to_numpy_is_a_read_only_view() -> None:
    msg = to_tensor(np.arange(4, dtype=np.float32), field="x")
    arr = tensor_to_numpy(msg)
    assert not arr.flags.writeable and not arr.flags.owndata
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"unknown wire dtype 42"):
        tensor_to_numpy(pb.Tensor(dtype=42, shape=[1], data=b"\0" * 4))


def test_option_value() -> None:
    assert option_value("a", True).WhichOneof("kind") == "bool_value"
    assert option_value("a", np.bool_(False)).bool_value is False
    assert option_value("a", 3).int_value == 3
    assert option_value("a", np.int32(-7)).int_value == -7
    assert option_value("a", 0.5).float_value == 0.5
    assert option_value("a", np.float32(0.25)).float_value == 0.25
    assert option_value("a", "omit").string_value == "omit"
    for seq in ([1.0, 2.0], (1.0, 2.0), np.array([1.0, 2.0]), torch.tensor([1.0, 2.0])):
        v = option_value("w", seq)
        assert v.WhichOneof("kind") == "tensor_value"
        assert tensor_to_numpy(v.tensor_value).tolist() == [1.0, 2.0]
    with pytest.raises(TypeError, match=r"^options.w: unsupported value of type dict"):
        option_value("w", {})
    with pytest.raises(TypeError, match=r"^options.w: bool arrays"):
        option_value("w", [True])


# ---------------------------------------------------------------------------------------
# Server: decode_tensor / decode_option / encode_aggregate


def _fake(**fields: Any) -> Any:
    """A Tensor message stand-in that hands out exactly the bytes object given."""
    return SimpleNamespace(HasField=lambda name: False, **fields)


def test_decode_tensor_views_the_bytes() -> None:
    """No copy: the tensor's storage is the bytes object the message handed out."""
    data = np.arange(6, dtype="<f4").tobytes()
    msg: Any = _fake(dtype=pb.FLOAT32, shape=[2, 3], data=data)
    t = wire.decode_tensor(msg, "x")
    assert t.data_ptr() == _address(data)
    assert t.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    for proto, name in ((pb.INT64, "int64"), (pb.FLOAT16, "float16"), (pb.BFLOAT16, "bfloat16")):
        n = 4 * WIRE_DTYPES[proto].itemsize
        raw = bytes(range(n))
        t = wire.decode_tensor(_fake(dtype=proto, shape=[4], data=raw), "x")
        assert t.dtype == TORCH_BY_NAME[name] and t.data_ptr() == _address(raw)


def test_decode_tensor_real_message() -> None:
    msg = pb.Tensor(dtype=pb.INT32, shape=[2, 2], data=np.array([1, -2, 3, 4], "<i4").tobytes())
    assert wire.decode_tensor(msg, "targets").tolist() == [[1, -2], [3, 4]]


def test_decode_tensor_shapes() -> None:
    scalar = wire.decode_tensor(pb.Tensor(dtype=pb.FLOAT64, data=np.float64(2.5).tobytes()), "x")
    assert scalar.shape == () and float(scalar) == 2.5
    empty = wire.decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 3]), "x")
    assert empty.shape == (0, 3) and empty.dtype == torch.float32


@pytest.mark.parametrize(("msg", "field", "problem"), [
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 23), "x.data",
     "23 bytes; shape [2, 3] of float32 needs 24"),
    (pb.Tensor(dtype=pb.FLOAT64, shape=[2], data=b"\0" * 24), "x.data",
     "24 bytes; shape [2] of float64 needs 16"),
    (pb.Tensor(dtype=pb.INT32, shape=[0], data=b"\0" * 4), "x.data", "4 bytes"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[3, -1], data=b"\0" * 12), "x.shape",
     "negative dimension in [3, -1]"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "x.dtype",
     "DType(0) not accepted"),
    (pb.Tensor(dtype=17, shape=[1], data=b"\0" * 4), "x.dtype", "DType(17) not accepted"),
])
def test_decode_tensor_errors(msg: pb.Tensor, field: str, problem: str) -> None:
    with pytest.raises(RequestError) as info:
        wire.decode_tensor(msg, "x")
    assert info.value.field == field
    assert str(info.value) == f"{field}: {info.value.problem}"
    assert problem in info.value.problem


def test_decode_option() -> None:
    assert wire.decode_option("a", pb.OptionValue(float_value=0.5)) == 0.5
    assert wire.decode_option("a", pb.OptionValue(int_value=-100)) == -100
    assert wire.decode_option("a", pb.OptionValue(bool_value=False)) is False
    assert wire.decode_option("a", pb.OptionValue(string_value="omit")) == "omit"
    t = wire.decode_option("cw", option_value("cw", [1.0, 2.0]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [1.0, 2.0]
    with pytest.raises(RequestError, match=r"^options.a: no value set"):
        wire.decode_option("a", pb.OptionValue())
    bad = pb.OptionValue(tensor_value=pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"\0"))
    with pytest.raises(RequestError, match=r"^options.cw.data: 1 bytes"):
        wire.decode_option("cw", bad)


def test_encode_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    msg = wire.encode_tensor(t)
    assert msg.dtype == pb.FLOAT32 and list(msg.shape) == [4, 3]
    assert np.array_equal(tensor_to_numpy(msg), t.numpy())


@pytest.mark.parametrize("shape", [(), (0,), (1,), (32, 10), (127, 128), (0, 1 << 40),
                                   (3, 200, 2)])
@pytest.mark.parametrize("proto", [pb.FLOAT32, pb.BFLOAT16, pb.INT64])
def test_encode_with_tensors_is_what_protobuf_serialises(shape: tuple[int, ...],
                                                         proto: pb.DType) -> None:
    from lossd._wire import encode_with_tensors

    arr = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    raw = encode_with_tensors(pb.EvaluateRequest(loss="x", tag="t"), [(2, arr, proto)])
    want = pb.EvaluateRequest(loss="x", tag="t", predictions=pb.Tensor(
        dtype=proto, shape=shape, data=arr.tobytes()))
    assert pb.EvaluateRequest.FromString(raw) == want


# ---------------------------------------------------------------------------------------
# The zero-copy request parser and the ``inputs`` map (EvaluateRequest field 11)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(*parts: bytes) -> bytes:
    return _field(11, b"".join(parts))


def _parsed_inputs(raw: bytes) -> dict[str, tuple[int, list[int], bytes]]:
    parsed = wire.ParsedRequest(raw)
    return {k: (v.dtype, list(v.shape), bytes(v.data)) for k, v in parsed.inputs.items()}


def _protobuf_inputs(raw: bytes) -> dict[str, tuple[int, list[int], bytes]]:
    msg = pb.EvaluateRequest.FromString(raw)
    return {k: (v.dtype, list(v.shape), v.data) for k, v in msg.inputs.items()}


def test_client_encoding_of_inputs_parses_as_protobuf_and_as_lossd() -> None:
    """encode_with_tensors writes map entries that protobuf reads as the map, and lossd's
    parser views in place."""
    from lossd._wire import encode_with_tensors

    var = np.arange(12, dtype="<f4").reshape(4, 3)
    lengths = np.array([3, 1, 2, 2], dtype="<i8")
    small = pb.EvaluateRequest(loss="gaussian_nll_loss", tag="t")
    raw = encode_with_tensors(small, [(2, var, pb.FLOAT32)],
                              [(11, "var", var, pb.FLOAT32), (11, "lengths", lengths, pb.INT64),
                               (11, "ünïcode", lengths[:0], pb.INT64)])
    want = pb.EvaluateRequest(loss="gaussian_nll_loss", tag="t",
                              predictions=array_to_tensor(var, pb.FLOAT32))
    for key, arr, dtype in (("var", var, pb.FLOAT32), ("lengths", lengths, pb.INT64),
                            ("ünïcode", lengths[:0], pb.INT64)):
        want.inputs[key].CopyFrom(array_to_tensor(arr, dtype))
    assert pb.EvaluateRequest.FromString(raw) == want
    assert _parsed_inputs(raw) == _protobuf_inputs(raw)
    parsed = wire.ParsedRequest(raw)
    assert parsed.loss == "gaussian_nll_loss" and parsed.ByteSize() == len(raw)
    assert not parsed.message.inputs  # left to the zero-copy views
    t = wire.decode_tensor(parsed.inputs["var"], "inputs.var")
    start = _address(raw)
    assert start <= t.data_ptr() < start + len(raw)  # a view of the request bytes
    assert torch.equal(t, torch.from_numpy(var))


@pytest.mark.parametrize(("raw", "want"), [
    (_entry(_field(1, b"a"), _field(2, pb.Tensor(dtype=pb.FLOAT32).SerializeToString()),
            _field(2, pb.Tensor(shape=[3]).SerializeToString())),
     {"a": (pb.FLOAT32, [3], b"")}),  # value occurrences merge
    (_entry(_field(1, b"a"), _field(1, b"b")), {"b": (0, [], b"")}),  # the last key counts
    (_entry(_field(1, b"k"), _field(2, pb.Tensor(shape=[1]).SerializeToString()))
     + _entry(_field(1, b"k"), _field(2, pb.Tensor(shape=[2]).SerializeToString())),
     {"k": (0, [2], b"")}),  # a later entry replaces an earlier one
    (_entry(_field(2, pb.Tensor(shape=[1]).SerializeToString())), {"": (0, [1], b"")}),
    (_entry(), {"": (0, [], b"")}),
    (_entry(_field(1, b"a"), _field(3, b"unknown")), {}),  # protobuf drops such an entry
    (_entry(_field(1, b"a"), _varint(2 << 3 | 0) + _varint(5)), {}),  # value as a varint
    (_entry(_field(1, b"a")) + _varint(11 << 3 | 0) + _varint(7), {"a": (0, [], b"")}),
    (_entry(_field(2, pb.Tensor(shape=[4]).SerializeToString()), _field(1, b"late-key")),
     {"late-key": (0, [4], b"")}),
], ids=["values-merge", "last-key", "last-entry", "no-key", "empty-entry", "unknown-field",
        "wrong-wire-type", "field-11-as-varint", "key-after-value"])
def test_inputs_map_semantics_are_protobufs(raw: bytes, want: dict[str, Any]) -> None:
    raw = pb.EvaluateRequest(loss="mse_loss").SerializeToString() + raw
    assert _protobuf_inputs(raw) == want
    assert _parsed_inputs(raw) == want


def test_inputs_key_must_be_utf8() -> None:
    raw = _entry(_field(1, b"\xff\xfe"))
    with pytest.raises(Exception, match="Error parsing"):
        pb.EvaluateRequest.FromString(raw)
    with pytest.raises(MalformedMessage, match="inputs: a key is not valid UTF-8"):
        wire.ParsedRequest(raw)


@pytest.mark.parametrize("dim", [0, 1, 127, 128, 255, 300, 16383, 16384, 2**21 + 5, 2**40])
def test_tensor_headers_are_protobufs_own_bytes_when_kept_too(dim: int) -> None:
    from lossd._wire import _tensor_header

    want = pb.Tensor(dtype=pb.INT64, shape=[dim, 3]).SerializeToString()
    assert _tensor_header(pb.INT64, (dim, 3)) == want
    assert _tensor_header(pb.INT64, (dim, 3)) == want  # the kept one
