"""The benchmark's workloads: shapes, data, the compute floor and the floor's request bytes.

Data is made with numpy only (no torch kernels run before the client processes fork),
deterministically from a seed. Every client sees torch tensors, as a training loop would
hand them over: float32 tensors are ``torch.from_numpy`` views, bfloat16 ones are views of
the bits (numpy has no bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import encode_with_tensors


@dataclass(frozen=True)
class Workload:
    """One benchmark workload (always ``cross_entropy``, the service's main loss)."""

    name: str
    description: str
    n: int
    classes: int
    seq: int = 0  # > 0: predictions (N, C, T), targets (N, T)
    dtype: str = "float32"  # "float32" or "bfloat16"
    weighted: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"
    # Measuring time per case (seconds) and minimum calls, at concurrency 1.
    duration: float = 2.0
    min_calls: int = 5

    @property
    def pred_shape(self) -> tuple[int, ...]:
        return (self.n, self.classes, self.seq) if self.seq else (self.n, self.classes)

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.n, self.seq) if self.seq else (self.n,)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def payload_bytes(self) -> int:
        """Tensor bytes in one request: predictions + int64 targets (+ float32 weights)."""
        pred = int(np.prod(self.pred_shape)) * self.itemsize
        targ = int(np.prod(self.target_shape)) * 8
        return pred + targ + (4 * self.n if self.weighted else 0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "loss": self.loss,
                "n": self.n, "classes": self.classes, "seq": self.seq, "dtype": self.dtype,
                "weighted": self.weighted, "options": self.options,
                "predictions_shape": list(self.pred_shape),
                "targets_shape": list(self.target_shape),
                "payload_bytes": self.payload_bytes, "response_bytes": 4 * self.n}


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("small", "N=32, C=10, fp32", 32, 10, duration=1.5, min_calls=50),
    Workload("medium", "N=1024, C=1000, fp32 (4 MB)", 1024, 1000, duration=1.5, min_calls=20),
    Workload("large", "N=8192, C=1000, fp32 (33 MB)", 8192, 1000),
    Workload("xl", "N=16384, C=1000, fp32 (66 MB)", 16384, 1000),
    Workload("large_bf16", "N=8192, C=1000, bf16 (16 MB)", 8192, 1000, dtype="bfloat16"),
    Workload("seq", "N=8, T=512, C=8000, bf16, ignore_index=0 (66 MB)", 8, 8000, seq=512,
             dtype="bfloat16", options={"ignore_index": 0}),
    Workload("weighted", "N=4096, C=1000, fp32, per-sample weights (16 MB)", 4096, 1000,
             weighted=True, duration=1.5),
)}


@dataclass
class Data:
    """A workload's arrays as numpy (shared by forked client processes)."""

    predictions: np.ndarray  # float32, or uint16 bfloat16 bits
    targets: np.ndarray  # int64
    weights: np.ndarray | None  # float32

    def torch(self) -> tuple[Any, Any, Any]:
        """Torch tensors viewing the arrays (no copy)."""
        import torch

        pred = torch.from_numpy(self.predictions)
        if self.predictions.dtype == np.uint16:
            pred = torch.from_numpy(self.predictions.view(np.int16)).view(torch.bfloat16)
        w = None if self.weights is None else torch.from_numpy(self.weights)
        return pred, torch.from_numpy(self.targets), w


def make_data(w: Workload, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(w.pred_shape, dtype=np.float32)
    if w.dtype == "bfloat16":
        x = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bfloat16 bits
    targets = rng.integers(0, w.classes, size=w.target_shape, dtype=np.int64)
    if w.seq:
        # Padding: ignore_index marks each sequence's tail; lengths vary from T/2 to T.
        ignore = int(w.options.get("ignore_index", -100))
        lengths = rng.integers(w.seq // 2, w.seq + 1, size=w.n)
        targets[targets == ignore] = (ignore + 1) % w.classes
        for i, length in enumerate(lengths):
            targets[i, length:] = ignore
    weights = rng.random(w.n, dtype=np.float32) + 0.5 if w.weighted else None
    return Data(np.ascontiguousarray(x), targets, weights)


# ---- the compute floor --------------------------------------------------------------

def compute_floor_fn(w: Workload, data: Data, device: str) -> Any:
    """A no-argument function computing the workload's loss in-process with torch.

    It does what lossd's answer requires and nothing else: host tensors (as they come off
    the wire) to the device, float32 upcast of bf16, ``F.cross_entropy(reduction='none')``,
    per-sample mean over valid positions for sequences, per-sample values back on the host,
    and sum/mean (plus weighted sum) in float64. On CUDA the final ``.cpu()`` synchronises.
    """
    import torch
    import torch.nn.functional as F

    pred, targ, weights = data.torch()
    dev = torch.device(device)
    ignore = int(w.options.get("ignore_index", -100))
    wd = None if weights is None else weights.to(torch.float64)

    def run() -> Any:
        x = pred.to(dev)
        if x.dtype != torch.float32:
            x = x.float()
        t = targ.to(dev)
        v = F.cross_entropy(x, t, ignore_index=ignore, reduction="none")
        if v.dim() > 1:
            counts = (t != ignore).sum(dim=1)
            v = v.sum(dim=1) / counts.clamp(min=1).to(v.dtype)
        per = v.cpu()
        d = per.to(torch.float64)
        total = float(d.sum())
        mean = total / per.shape[0]
        if wd is not None:
            ws = float((d * wd).sum()) / float(wd.sum())
            return per, mean, ws
        return per, mean

    return run


# ---- the transport floor's request: the same bytes, one copy --------------------------

_PROTO_DTYPE = {np.dtype("<f4"): pb.FLOAT32, np.dtype("<u2"): pb.BFLOAT16,
                np.dtype("<i8"): pb.INT64}


def request_bytes(w: Workload, predictions: Any, targets: Any, weights: Any) -> bytes:
    """The serialised EvaluateRequest lossd's client sends, built with one payload copy.

    The same bytes as LossClient's (checked in tests/test_bench.py): the small fields
    serialised by protobuf, the tensors appended from the arrays by
    ``lossd.wire.encode_with_tensors`` (one ``bytes.join``), the least a Python gRPC client
    can copy.
    """
    options = {name: pb.OptionValue(int_value=int(value)) for name, value in w.options.items()}
    arrays = [(2, predictions), (3, targets)] + ([] if weights is None else [(4, weights)])
    return encode_with_tensors(pb.EvaluateRequest(loss=w.loss, options=options),
                               [(number, arr, _PROTO_DTYPE[arr.dtype]) for number, arr in arrays])


def wire_bytes(request: Any) -> bytes:
    """A request as ``Requests.build`` returns it (a message, or already bytes) -> bytes."""
    if isinstance(request, bytes | bytearray | memoryview):
        return bytes(request) if not isinstance(request, bytes) else request
    return bytes(request.SerializeToString())


def arrays_for_wire(pred: Any, targ: Any, weights: Any) -> tuple[Any, ...]:
    """Torch tensors -> numpy views for the floor client (bf16 as its uint16 bits)."""
    import torch

    p = pred.view(torch.int16).numpy().view(np.uint16) if pred.dtype == torch.bfloat16 \
        else pred.numpy()
    return p, targ.numpy(), (None if weights is None else weights.numpy())
