"""``lossd.v1`` messages <-> host torch tensors, without copying the payload.

Decoding checks what the message itself claims (a known dtype, non-negative dims, bytes
matching shape x itemsize) and then views the bytes as a tensor; what the loss needs of
the tensor is ``validate``'s job.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lossd._wire import WIRE_DTYPES, dtype_name
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.reduce import Aggregate
from lossd_server.validate import RequestError

TORCH_DTYPES: dict[int, torch.dtype] = {k: getattr(torch, d.name) for k, d in WIRE_DTYPES.items()}
_PROTO_BY_TORCH = {v: k for k, v in TORCH_DTYPES.items()}

# Request bytes are immutable; tensors viewing them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


SharedMemoryView = Callable[[pb.SharedMemoryRef, str], memoryview]


def decode_tensor(t: pb.Tensor, field: str,
                  shared_memory: SharedMemoryView | None = None) -> torch.Tensor:
    """A host tensor viewing the message's bytes, or its shared-memory bytes (no copy).

    ``shared_memory`` resolves a SharedMemoryRef of the request's session.
    """
    if t.dtype not in TORCH_DTYPES:
        raise RequestError(f"{field}.dtype", f"{dtype_name(t.dtype)} not accepted; use one of "
                                             f"{', '.join(d.name for d in WIRE_DTYPES.values())}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise RequestError(f"{field}.shape", f"negative dimension in {list(shape)}")
    itemsize = WIRE_DTYPES[t.dtype].itemsize
    expected = math.prod(shape) * itemsize
    data: bytes | memoryview = t.data
    if t.HasField("shared_memory"):
        if data:
            raise RequestError(field, "both data and shared_memory are set")
        if shared_memory is None:
            raise RequestError(f"{field}.shared_memory", "needs shared_memory_session")
        data = shared_memory(t.shared_memory, f"{field}.shared_memory")
    if len(data) != expected:
        raise RequestError(f"{field}.data", f"{len(data)} bytes; shape {list(shape)} of "
                                            f"{dtype_name(t.dtype)} needs {expected}")
    dtype = TORCH_DTYPES[t.dtype]
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def decode_option(name: str, v: pb.OptionValue) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None:
        raise RequestError(f"options.{name}", "no value set")
    if kind == "tensor_value":
        return decode_tensor(v.tensor_value, f"options.{name}")
    return getattr(v, kind)


_REDUCTIONS = {pb.MEAN: "mean", pb.SUM: "sum", pb.WEIGHTED_MEAN: "weighted_mean",
               pb.WEIGHTED_SUM: "weighted_sum"}


def decode_reduction(value: int) -> str | None:
    """Reduction enum -> its name (``reduce.REDUCTIONS``); UNSPECIFIED -> None."""
    if value == pb.REDUCTION_UNSPECIFIED:
        return None
    if value not in _REDUCTIONS:
        raise RequestError("gradient", f"unknown reduction {value}")
    return _REDUCTIONS[value]


def decode_options(options: Any) -> dict[str, Any]:
    return {name: decode_option(name, v) for name, v in options.items()}


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    """A host tensor as a Tensor message (its bytes copied once into the message)."""
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return pb.Tensor(dtype=_PROTO_BY_TORCH[t.dtype], shape=t.shape, data=raw.numpy().tobytes())


def encode_aggregate(a: Aggregate, out: pb.Aggregates) -> None:
    out.sum = a.sum
    out.mean = a.mean
    out.count = a.count
    out.ignored = a.ignored
    out.omitted = a.omitted
    if a.weighted:
        out.weighted_sum = a.weighted_sum
        out.weighted_mean = a.weighted_mean
        out.weight_sum = a.weight_sum
