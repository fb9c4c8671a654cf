"""How a request check names what it found: shapes, dtypes and sample numbers in its
messages (the errors themselves are in :mod:`lossd_server.errors`).

The loss catalogue (built-ins and plugins) and :mod:`lossd_server.validate` both build on
this module, so a loss's own checks live next to the loss without an import cycle. No gRPC
here.
"""

from __future__ import annotations

import contextvars

import torch

Tensor = torch.Tensor


def shape_str(shape: tuple[int, ...] | torch.Size) -> str:
    """``(2, 3)``; ``()`` for a scalar."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def dtype_str(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


sample_offset: contextvars.ContextVar[int] = contextvars.ContextVar("sample_offset", default=0)
"""Added to sample numbers in messages: a chunk of a split batch reports batch positions."""


def first(mask: Tensor) -> int:
    """Index of the first sample (dim 0) where ``mask`` holds anywhere."""
    rows = mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() > 1 else mask
    return int(rows.nonzero()[0, 0])


def sample(i: int) -> int:
    """Sample ``i`` of this message, numbered within its whole batch."""
    return i + sample_offset.get()


def first_value(values: Tensor, mask: Tensor) -> tuple[int, float | int]:
    """(sample, value) of the first element of ``values`` where ``mask`` holds; the sample
    is numbered within the whole batch."""
    i = first(mask)
    row = values[i][mask[i]] if values.dim() > 1 else values[i:i + 1]
    value = row.reshape(-1)[0].item()
    return sample(i), value
