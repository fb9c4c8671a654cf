"""Arrays and tensors <-> ``lossd.v1.Tensor`` messages.

The dtype table lives here and nowhere else; the server imports it. A tensor travels as
raw little-endian, row-major bytes plus its dtype and shape. Encoding makes at most one
copy of the payload (``tobytes`` of a contiguous array); decoding a response is a view.

torch is optional: a ``torch.Tensor`` is recognised without importing torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lossd.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class WireDType:
    """One row of the dtype table: the proto enum value, its name and numpy layout."""

    proto: pb.DType
    name: str
    numpy: np.dtype[Any]
    is_float: bool

    @property
    def itemsize(self) -> int:
        return int(self.numpy.itemsize)


# bfloat16 has no numpy dtype: it travels as its 16 raw bits (viewed as little-endian uint16).
WIRE_DTYPES: dict[pb.DType, WireDType] = {
    d.proto: d
    for d in (
        WireDType(pb.FLOAT32, "float32", np.dtype("<f4"), True),
        WireDType(pb.FLOAT16, "float16", np.dtype("<f2"), True),
        WireDType(pb.BFLOAT16, "bfloat16", np.dtype("<u2"), True),
        WireDType(pb.FLOAT64, "float64", np.dtype("<f8"), True),
        WireDType(pb.INT64, "int64", np.dtype("<i8"), False),
        WireDType(pb.INT32, "int32", np.dtype("<i4"), False),
    )
}
_BY_NUMPY_KIND: dict[str, pb.DType] = {"f4": pb.FLOAT32, "f2": pb.FLOAT16, "f8": pb.FLOAT64,
                                  "i8": pb.INT64, "i4": pb.INT32}
_TORCH_NAMES: dict[str, pb.DType] = {"torch.float32": pb.FLOAT32, "torch.float16": pb.FLOAT16,
                                "torch.bfloat16": pb.BFLOAT16, "torch.float64": pb.FLOAT64,
                                "torch.int64": pb.INT64, "torch.int32": pb.INT32}


def dtype_name(proto_dtype: pb.DType) -> str:
    """The wire dtype's name ("float32", ...), or ``DType(<n>)`` for an unknown value."""
    d = WIRE_DTYPES.get(proto_dtype)
    return d.name if d else f"DType({proto_dtype})"


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    return torch is not None and isinstance(value, torch.Tensor)


_PROTO_BY_TORCH_DTYPE: dict[Any, pb.DType] = {}  # torch.dtype -> wire dtype, filled on use


def _torch_to_numpy(t: Any) -> tuple[np.ndarray, pb.DType]:
    """A CPU, contiguous numpy view of a torch tensor (a copy only if it lives elsewhere)."""
    proto = _PROTO_BY_TORCH_DTYPE.get(t.dtype)
    if proto is None:
        name = str(t.dtype)
        if name not in _TORCH_NAMES:
            raise TypeError(f"unsupported torch dtype {name}; send one of "
                            f"{sorted(_TORCH_NAMES)}")
        proto = _PROTO_BY_TORCH_DTYPE[t.dtype] = _TORCH_NAMES[name]
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if proto == pb.BFLOAT16:
        import torch  # present: we hold a torch tensor

        t = t.view(torch.int16)
    return t.numpy(), proto


def as_array(value: Any, *, field: str) -> tuple[np.ndarray, pb.DType]:
    """Normalise an array-like to a C-contiguous little-endian numpy array and a wire dtype.

    Accepts numpy arrays, torch tensors on any device (bfloat16 too), and nested lists
    (floats become float64, integers int64). No copy is made for a contiguous,
    little-endian array of an accepted dtype.
    """
    if _is_torch_tensor(value):
        return _torch_to_numpy(value)
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        raise TypeError(f"{field}: bool arrays are not accepted; convert to float or int")
    key = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    if key not in _BY_NUMPY_KIND:
        accepted = "float32, float16, bfloat16 (torch), float64, int64, int32"
        raise TypeError(f"{field}: dtype {arr.dtype} is not accepted; use one of {accepted}")
    want = WIRE_DTYPES[_BY_NUMPY_KIND[key]].numpy
    # No-op unless strided or big-endian; reshape keeps 0-d arrays 0-d (ascontiguousarray
    # makes them (1,), which would hide a bad shape from the server).
    arr = np.ascontiguousarray(arr, dtype=want).reshape(arr.shape)
    return arr, _BY_NUMPY_KIND[key]


def array_to_tensor(arr: np.ndarray, proto_dtype: pb.DType) -> pb.Tensor:
    """Wrap a contiguous array as a Tensor message: one copy of the payload (tobytes)."""
    return pb.Tensor(dtype=proto_dtype, shape=arr.shape, data=arr.tobytes())


def to_tensor(value: Any, *, field: str) -> pb.Tensor:
    """Array-like -> Tensor message (see :func:`as_array` for what is accepted)."""
    arr, proto = as_array(value, field=field)
    return array_to_tensor(arr, proto)


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    """Tensor message -> numpy array (a read-only view of the message's bytes).

    bfloat16 comes back as float32 since numpy has no bfloat16.
    """
    d = WIRE_DTYPES.get(t.dtype)
    if d is None:
        raise ValueError(f"unknown wire dtype {t.dtype}")
    arr = np.frombuffer(t.data, dtype=d.numpy).reshape(tuple(t.shape))
    if t.dtype == pb.BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def option_value(name: str, value: Any) -> pb.OptionValue:
    """A Python option value -> OptionValue. Arrays and sequences become tensors."""
    if isinstance(value, bool | np.bool_):
        return pb.OptionValue(bool_value=bool(value))
    if isinstance(value, int | np.integer):
        return pb.OptionValue(int_value=int(value))
    if isinstance(value, float | np.floating):
        return pb.OptionValue(float_value=float(value))
    if isinstance(value, str):
        return pb.OptionValue(string_value=value)
    if isinstance(value, np.ndarray | Sequence) or _is_torch_tensor(value):
        return pb.OptionValue(tensor_value=to_tensor(value, field=f"options.{name}"))
    raise TypeError(f"options.{name}: unsupported value of type {type(value).__name__}")


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if 0 < value < 1 << 14:  # (a small tensor's byte count or a message's length)
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_HEADERS: dict[tuple[int, tuple[int, ...]], bytes] = {}
MAX_CACHED_HEADERS = 64
"""(dtype, shape) headers kept: a training loop sends a few shapes over and over."""


def _tensor_header(dtype: pb.DType, shape: tuple[int, ...]) -> bytes:
    """``Tensor(dtype=dtype, shape=shape).SerializeToString()``, written directly (and
    kept for the next request of that dtype and shape)."""
    key = (dtype, shape)
    header = _HEADERS.get(key)
    if header is not None:
        return header
    header = b"\x08" + _varint(dtype) if dtype else b""  # field 1, varint
    if shape:  # field 2, packed varints
        packed = b"".join([_varint(d) for d in shape])
        header += b"\x12" + _varint(len(packed)) + packed
    if len(_HEADERS) >= MAX_CACHED_HEADERS:
        _HEADERS.clear()
    _HEADERS[key] = header
    return header


def _tensor_message(arr: np.ndarray, dtype: pb.DType) -> tuple[list[Any], int]:
    """A Tensor message as pieces to join (the array's bytes as a view, not a copy) and its
    length."""
    header = _tensor_header(dtype, arr.shape)
    nbytes = arr.nbytes
    data_key = _varint(nbytes)
    length = len(header) + 1 + len(data_key) + nbytes
    return [header, b"\x1a", data_key, arr.data.cast("B") if nbytes else b""], length


def encode_with_tensors(message: Any, tensors: list[tuple[int, np.ndarray, pb.DType]],
                        entries: Sequence[tuple[int, str, np.ndarray, pb.DType]] = ()
                        ) -> bytes:
    """``message`` serialised, followed by Tensor fields built from the arrays in place.

    ``tensors``: (field number, contiguous array, wire dtype). ``entries``: (field number of
    a ``map<string, Tensor>``, key, contiguous array, wire dtype), one map entry each.
    Protobuf merges a message's fields wherever they stand, so this parses exactly as if
    the tensors had been set on the message; the difference is that each array's bytes
    are copied once, by the final join, instead of by tobytes, the message setter and the
    serialiser.
    """
    parts: list[Any] = [message.SerializeToString()]
    for number, arr, dtype in tensors:
        pieces, length = _tensor_message(arr, dtype)
        parts += [_varint((number << 3) | 2), _varint(length), *pieces]
    for number, key, arr, dtype in entries:
        raw_key = key.encode()
        key_field = b"\x0a" + _varint(len(raw_key)) + raw_key  # entry field 1: the key
        pieces, length = _tensor_message(arr, dtype)
        value_key = b"\x12" + _varint(length)  # entry field 2: the value
        entry_length = len(key_field) + len(value_key) + length
        parts += [_varint((number << 3) | 2), _varint(entry_length), key_field, value_key,
                  *pieces]
    return b"".join(parts)
