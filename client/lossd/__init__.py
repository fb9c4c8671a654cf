"""lossd: per-sample losses and batch aggregates from a lossd server.

    from lossd import LossClient
    with LossClient("127.0.0.1:50051") as client:
        r = client.evaluate(logits, targets, loss="cross_entropy")
        r.per_sample, r.mean

Installs without torch; torch tensors are accepted when torch is present.

The names below are the API; the modules behind them are private. For advanced use,
four public modules: ``lossd.wire`` (the dtype table and tensor encoding, shared with the
server), ``lossd.requests`` (the clients' request builder), ``lossd.channel`` (their
channel options, credentials and gRPC error translation) and ``lossd.state`` (a result's
exact, mergeable state, shared with the server); ``lossd.torch`` adds autograd (it needs
torch) and ``lossd.distributed`` merges results across torch.distributed ranks.
"""

from lossd._async_client import AsyncLossClient
from lossd._client import LossClient
from lossd._errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    LossdError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from lossd._requests import Batch
from lossd._result import (
    Aggregates,
    Calibration,
    ClassAggregates,
    HardBatch,
    Hardest,
    HardestBatches,
    HardSample,
    InputInfo,
    LossInfo,
    LossResult,
    OptionInfo,
    PerClass,
    Quantiles,
)
from lossd._shm import SharedMemory
from lossd.state import MergeError, load_result, merge

__version__ = "0.1.0"

__all__ = [
    "Aggregates",
    "AsyncLossClient",
    "Batch",
    "Calibration",
    "Cancelled",
    "ClassAggregates",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HardBatch",
    "HardSample",
    "Hardest",
    "HardestBatches",
    "InputInfo",
    "InternalError",
    "InvalidArgument",
    "LossClient",
    "LossInfo",
    "LossResult",
    "LossdError",
    "MergeError",
    "NotFound",
    "OptionInfo",
    "PerClass",
    "PermissionDenied",
    "Quantiles",
    "ResourceExhausted",
    "SharedMemory",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "load_result",
    "merge",
]
