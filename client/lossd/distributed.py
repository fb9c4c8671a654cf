"""Results of torch.distributed ranks, merged exactly: :func:`gather`.

The rule: every rank of the group calls :func:`gather`, whatever it holds (a result, None
when it evaluated nothing, or the exception its evaluation raised), because it is a
collective: a rank that skips it, or raises before it, leaves the others waiting. What
travels is each rank's saved result (:meth:`lossd.Aggregates.to_bytes`: the exact state,
whose size grows with the classes, the hardest samples and the quantile sketch, never with
the samples) over torch.distributed's object collectives (which pickle what they carry:
the ranks of one job trust one another); the ranks' results merge with
:func:`lossd.merge` in rank order. torch is imported only when :func:`gather` runs:
``import lossd`` needs no torch.

Example (torchrun, one shard per rank; docs/training.md, "DDP")::

    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from lossd import LossClient
    from lossd.distributed import gather

    dist.init_process_group("gloo")      # "nccl": torch.cuda.set_device(local_rank) first
    loader = DataLoader(val_set, batch_size=256,
                        sampler=DistributedSampler(val_set, shuffle=False))
    with LossClient("127.0.0.1:50051") as client, torch.no_grad():
        shard = client.evaluate_all((model(x), y) for x, y in loader)
    whole = gather(shard, dst=0)         # rank 0: every rank's shard merged; others: None
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lossd._result import Aggregates, LossResult
from lossd.state import NO_STATE_HINT, MergeError, merge_labelled

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["gather"]

Payload = bytes | str | None
"""What one rank sends: its saved result, why it has none to merge (text), or None (it
evaluated nothing)."""


def gather(result: LossResult | Aggregates | BaseException | None,
           group: ProcessGroup | None = None, dst: int | None = None) -> Aggregates | None:
    """Every rank's ``result`` merged, in rank order: equal to one stream over rank 0's
    batches, then rank 1's, ... (sums and means bit for bit, per class, accuracy, top-k,
    calibration, quantiles; hardest samples by loss, their indices positions in that
    order and their sample ids kept; hardest batches), as :func:`lossd.merge` gives.

    Every rank of ``group`` (None: the default group) must call it. ``result``: this
    rank's result (a :class:`lossd.LossResult` counts with its ``running`` aggregates, as
    in :func:`lossd.merge`); it needs its exact state, which ``evaluate_stream`` and
    ``evaluate_all`` keep by default (``evaluate``: ``mergeable=True``). None: this rank
    evaluated nothing (an empty shard); it takes part and is left out of the merge, and
    when every rank passes None the merge is None. An exception: this rank's evaluation
    failed; pass the one it caught so that the others learn it instead of waiting.

    ``dst`` None: every rank gets the merged result (``all_gather_object``). ``dst`` a
    rank (global, as ``torch.distributed.gather_object`` takes it): only ``dst`` merges
    and gets it, the others get None (``gather_object``).

    Raises :class:`lossd.MergeError` on every rank that merges when a rank failed, sent a
    result without state, or sent one that does not merge with the first rank's result
    (another loss, options, analyses or class names): the message names the rank (its rank in
    ``group``). A ``result`` of any other type is a TypeError, raised before the
    collective.

    Backends: gloo and nccl. nccl's object collectives move the bytes through the current
    CUDA device, so each rank sets its own first (``torch.cuda.set_device(local_rank)``;
    Lightning and most launchers' templates do). When torch.distributed is not
    initialized (or not installed) or the group has one rank, nothing is sent: the
    result is this rank's own, through the same merge.
    """
    payload = _payload(result)
    if not _initialized():
        return _merged([payload])
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return _merged([payload])
    payloads: list[Payload] = [None] * dist.get_world_size(group)
    if dst is None:
        dist.all_gather_object(payloads, payload, group=group)
        return _merged(payloads)
    here = dist.get_rank() == dst
    dist.gather_object(payload, payloads if here else None, dst=dst, group=group)
    return _merged(payloads) if here else None


def _payload(result: LossResult | Aggregates | BaseException | None) -> Payload:
    """What this rank sends for ``result`` (see :data:`Payload`)."""
    if result is None:
        return None
    if isinstance(result, BaseException):
        return f"failed: {type(result).__name__}: {result}"
    whole = result.whole if isinstance(result, LossResult) else result
    if not isinstance(whole, Aggregates):
        raise TypeError(f"gather: a {type(result).__name__}, not a LossResult, Aggregates, "
                        "an exception or None")
    if whole.state is None:
        return f"sent a result without mergeable state: {NO_STATE_HINT}"
    return whole.to_bytes()


def _merged(payloads: Sequence[Payload]) -> Aggregates | None:
    """The ranks' payloads (by rank) merged; a rank's problem is a MergeError naming it."""
    parts: list[tuple[str, Aggregates]] = []
    for rank, payload in enumerate(payloads):
        if isinstance(payload, str):
            raise MergeError(f"rank {rank} {payload}")
        if payload is not None:
            try:
                parts.append((f"rank {rank}", Aggregates.from_bytes(payload)))
            except MergeError as exc:
                raise MergeError(f"rank {rank}: {exc}") from None
    return merge_labelled(parts) if parts else None


def _initialized() -> bool:
    """Whether torch is installed and torch.distributed has a process group."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()
