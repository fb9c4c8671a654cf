"""The wire format, public: what the server shares with the client and what callers that
build messages themselves need.

The dtype table (``WIRE_DTYPES``: wire dtype -> name, numpy layout) and ``dtype_name``
are defined once, in the client, and the server reads them from here; the tensor
encoders turn arrays into ``lossd.v1.Tensor`` fields with at most one copy.
"""

from lossd._wire import (
    WIRE_DTYPES,
    WireDType,
    as_array,
    dtype_name,
    encode_with_tensors,
    tensor_to_numpy,
    to_tensor,
)

__all__ = ["WIRE_DTYPES", "WireDType", "as_array", "dtype_name", "encode_with_tensors",
           "tensor_to_numpy", "to_tensor"]
