"""Dynamic batching: concurrent small requests that can share one device call do.

Requests coalesce when they have the same loss, options, dtypes and trailing shapes of
every tensor, extra inputs included (see :func:`coalesce_key`); the first to arrive leads:
it waits up to ``max_delay`` for others to join (only while other calls are in flight, so
a lone caller pays nothing), runs one
``Engine.evaluate_many`` and hands each caller exactly its own per-sample losses and
aggregates. Validation happens per caller before joining, so one bad request fails alone;
and when the joint device call fails (a loss function that raises on one caller's values,
memory that the joint batch ran out of), every member runs again on its own, under its own
admission, so only the culprit fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from lossd_server.engine import Batch, Checked, Engine, Evaluation
from lossd_server.errors import Refused

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BatchingSettings:
    """``max_samples``: a coalesced call's most samples; ``max_delay``: seconds to wait."""

    max_samples: int = 4096
    max_delay: float = 0.0005


Runner = Callable[[Callable[[], list[Evaluation]]], list[Evaluation]]


def coalesce_key(c: Checked) -> Hashable | None:
    """What must match for two checked batches to share a device call (None: never)."""
    b = c.batch
    if b.gradient is not None or c.nan_policy == "raise":
        return None
    options: list[tuple[str, Any]] = []
    for name, value in sorted(c.options.items()):
        if isinstance(value, torch.Tensor):
            value = (str(value.dtype), tuple(value.shape), value.contiguous().numpy().tobytes())
        options.append((name, value))
    targets = None if b.targets is None else (b.targets.dtype, tuple(b.targets.shape[1:]))
    inputs = tuple(sorted((name, t.dtype, tuple(t.shape[1:])) for name, t in b.inputs.items()))
    return (b.loss, tuple(options), c.nan_policy, b.predictions.dtype,
            tuple(b.predictions.shape[1:]), targets, inputs, b.weights is not None, b.analyses)


@dataclass
class _Group:
    members: list[Checked] = field(default_factory=list)
    results: list[Evaluation] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def samples(self) -> int:
        return sum(m.batch.predictions.shape[0] for m in self.members)


class Batcher:
    """Coalesces concurrent evaluations; ``evaluate`` is called from many threads.

    ``max_samples``: a group closes when it holds this many samples (larger requests run
    alone). ``max_delay``: seconds a leader waits for company. ``in_flight``: how many calls
    the server is serving now (a leader alone in the server does not wait). ``run``: wraps
    the device call (e.g. to hold a compute slot).
    """

    def __init__(self, engine: Engine, *, max_samples: int, max_delay: float,
                 in_flight: Callable[[], int] = lambda: 0,
                 run: Runner = lambda f: f()) -> None:
        self.engine = engine
        self.max_samples = max_samples
        self.max_delay = max_delay
        self._in_flight = in_flight
        self._run = run
        self._open: dict[Hashable, _Group] = {}
        self._cond = threading.Condition()
        self.coalesced_calls = 0
        self.split_calls = 0
        """Requests that ran alone after the coalesced call they joined failed."""

    def evaluate(self, batch: Batch, *, allow_zero_weight_sum: bool = False,
                 run: Runner | None = None) -> Evaluation:
        """``engine.evaluate(batch)``, possibly in one device call with concurrent callers.

        ``run`` overrides the constructor's wrapper for the device call this caller leads.
        """
        run = run or self._run
        if self._in_flight() <= 1:  # alone in the server: nobody to batch with
            return run(lambda: [self.engine.evaluate(
                batch, allow_zero_weight_sum=allow_zero_weight_sum)])[0]
        checked = self.engine.check(batch, allow_zero_weight_sum=allow_zero_weight_sum)
        key = coalesce_key(checked)
        n = batch.predictions.shape[0]
        if key is None or n >= self.max_samples:
            return run(lambda: self.engine.evaluate_many([checked]))[0]
        with self._cond:
            group = self._open.get(key)
            leader = group is None
            if group is None:
                group = self._open[key] = _Group()
            index = len(group.members)
            group.members.append(checked)
            if group.samples >= self.max_samples:
                self._open.pop(key, None)
                self._cond.notify_all()
            if leader:
                deadline = time.monotonic() + self.max_delay
                while self._open.get(key) is group and self._in_flight() > len(group.members):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._open.get(key) is group:
                    del self._open[key]
        if leader:
            try:
                group.results = run(lambda: self.engine.evaluate_many(group.members))
                if len(group.members) > 1:
                    self.coalesced_calls += 1
            except BaseException as exc:
                group.error = exc
                if (len(group.members) == 1 or isinstance(exc, Refused)
                        or not isinstance(exc, Exception)):
                    raise  # its own call, its own admission, or an interrupt
                log.info("a coalesced call failed; its requests run again one by one",
                         extra={"loss": batch.loss, "requests": len(group.members),
                                "error": type(exc).__name__})
            finally:
                group.done.set()
        else:
            with self._cond:
                self._cond.notify_all()  # the leader may be waiting for this arrival
            group.done.wait()
        if group.error is not None:
            # The joint call failed (the leader's admission: queue full, cancelled, deadline;
            # or one member's values): no member is known to be at fault, so each runs
            # alone, under its own admission, and gets its own answer.
            self.split_calls += 1
            return run(lambda: self.engine.evaluate_many([checked]))[0]
        assert group.results is not None
        return group.results[index]
