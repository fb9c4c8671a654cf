"""The evaluation service every front calls (MLServer's DataPlane idea).

A front (``servicer.py`` for lossd.v1, ``kserve.py`` for the Open Inference Protocol)
decodes its protocol's message into an engine :class:`~lossd_server.engine.Batch`, hands
it here, and encodes the :class:`~lossd_server.engine.Evaluation` it gets back. Here, for
every front alike: admission (compute slots, their queue, the door of a stream), the
request-size budget, batching, compute, out-of-memory handling, the evaluation metrics,
and a stream's running state (:class:`StreamState`).

The rule: no protocol here. Nothing imports a front's messages or a servicer context; the
caller's state comes as a :class:`~lossd_server.limits.CallState`, and failures are raised
as the errors of :mod:`lossd_server.errors`, which the front maps to its status.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from lossd_server import analysis, limits
from lossd_server.batching import Batcher, BatchingSettings
from lossd_server.describe import sample_offset
from lossd_server.engine import Batch, Engine, Evaluation
from lossd_server.errors import Refused, RequestError
from lossd_server.limits import Admission, CallState, LimitMetrics
from lossd_server.metrics import CallRecord, Metrics
from lossd_server.reduce import Aggregate


class EvaluationService:
    """Evaluates decoded batches on an :class:`Engine` for every front.

    ``slots`` evaluations run on the device at once and ``max_waiting`` more may wait for
    one (the ``queue`` stage); beyond that a call is refused RESOURCE_EXHAUSTED with a
    ``retry-after-ms`` trailer (see :class:`limits.Admission`). Streams are admitted when
    they start (at most ``max_streams``); their batches wait for a slot and are never
    refused for contention. A request claiming more than ``max_elements`` elements (0: no
    limit) is refused while a front decodes it (``limits.ElementBudget``), before its bytes
    are looked at. A call whose caller cancelled or whose deadline passed is dropped before
    compute, or between the chunks of a long evaluation (``Engine.evaluate``'s
    ``still_wanted``; not for batches coalesced with other callers'), and never answered
    late; an evaluation that runs out of memory ends RESOURCE_EXHAUSTED and frees the cache.
    With ``batching``, small concurrent calls are evaluated together (:class:`Batcher`).
    """

    def __init__(self, engine: Engine, *, metrics: Metrics | None = None, slots: int = 2,
                 max_waiting: int = 16, max_streams: int = 0, max_elements: int = 0,
                 batching: BatchingSettings | None = None,
                 in_flight: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics(process=False)
        # Bound once: every call of every front starts here.
        self.call: Callable[[str], CallRecord] = self.metrics.call
        self.limits = LimitMetrics.of(self.metrics.registry)
        self.admission = Admission(slots, max_waiting, max_streams=max_streams,
                                   metrics=self.limits)
        self.max_elements = max_elements
        # On CUDA, host tensors are staged through pinned memory: decoding copies the
        # predictions there once (see the lossd.v1 front's decode).
        self.pin_memory = engine.device.type == "cuda"
        self.batcher = None if batching is None else Batcher(
            engine, max_samples=batching.max_samples, max_delay=batching.max_delay,
            in_flight=in_flight)

    def refused(self, method: str, exc: Refused) -> None:
        """Count a refused or dropped call of ``method`` (by its reason): a front calls it
        for what it refuses itself (a request over ``max_elements`` as it decodes, a
        stream whose caller went away)."""
        self.limits.count(method, exc)

    def evaluate(self, call: CallRecord, batch: Batch, state: CallState, *,
                 stream: bool = False, admitted: bool = False) -> Evaluation:
        """queue -> compute for a decoded batch: admission, deadlines, out-of-memory.

        ``stream``: a batch of a stream (its weights may sum to zero); ``admitted``: the
        batch belongs to an admitted stream and waits for its slot, never refused.
        """
        try:
            oom = False
            try:
                if self.batcher is not None:
                    with call.stage("compute"):  # a leader's queue stage nests in it
                        ev = self.batcher.evaluate(
                            batch, allow_zero_weight_sum=stream,
                            run=lambda device_call: self._in_slot(call, state, device_call,
                                                                  admitted=admitted))
                else:
                    ev = self._in_slot(call, state, lambda: [self.engine.evaluate(
                        batch, allow_zero_weight_sum=stream,
                        still_wanted=lambda: state.check("while computing"))],
                        compute_stage=True, admitted=admitted)[0]
            except Exception as exc:
                if not limits.is_out_of_memory(exc):
                    raise
                oom = True  # handled below, once the exception (and its frames) are gone
            if oom:
                samples = batch.predictions.shape[0] if batch.predictions.dim() else 0
                del batch
                limits.release_memory(self.engine.device)
                raise limits.out_of_memory(self.engine.device, samples,
                                           self.admission.retry_after_seconds())
            state.check("after compute")
        except Refused as exc:
            self.limits.count(call.method, exc)
            raise
        return ev

    def _in_slot(self, call: CallRecord, state: CallState,
                 device_call: Callable[[], list[Evaluation]], *,
                 compute_stage: bool = False, admitted: bool = False) -> list[Evaluation]:
        """Run ``device_call`` holding a compute slot (the wait is the ``queue`` stage)."""
        with call.stage("queue"):
            state.check("before compute")
            started = self.admission.acquire(state, admitted=admitted)
        try:
            if not compute_stage:
                return device_call()
            with call.stage("compute"):
                return device_call()
        finally:
            self.admission.release(started)

    @contextlib.contextmanager
    def stream(self, method: str) -> Iterator[None]:
        """The door of a stream: admitted for as long as it is open, or Refused now."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.admission.stream())
            except Refused as exc:
                self.limits.count(method, exc)
                raise
            yield


@dataclasses.dataclass
class StreamState:
    """The running state of one stream of batches.

    Every message of a stream asks for the same loss, weights and sample ids on all or
    none, and the same analyses as its first (:meth:`check`). A batch may span several
    messages (``more``): its sample numbers count from the batch's start (:meth:`evaluating`),
    and the answer to each message carries the batch so far and the whole stream so far
    (:meth:`add`). With ``hardest_batches`` K, the stream's K completed batches of the
    largest mean loss are kept (memory K, whatever the stream's length).
    """

    running: Aggregate | None = None
    batch: Aggregate | None = None  # the batch so far, while messages carry `more`
    # The same for the analyses asked for (sample positions are theirs to count).
    running_analysis: analysis.Analysis | None = None
    batch_analysis: analysis.Analysis | None = None
    offset: int = 0  # samples of the batch in earlier messages
    index: int = 0  # batches completed
    samples: int = 0  # samples of the completed batches
    hardest_batches: analysis.HardestBatches | None = None
    mergeable: bool = False  # the stream ends with its state (EvaluateRequest.mergeable)
    at_end: bool = False  # answers carry no analyses: the state does (analyses_at_end)
    options: str = ""  # the canonical options of its messages, where mergeable
    _first: tuple[str, bool, bool, int, analysis.Request] | None = None

    @property
    def asked(self) -> tuple[str, analysis.Request, int] | None:
        """What the stream's first message asked: its loss, analyses and hardest batches K
        (None before it)."""
        if self._first is None:
            return None
        loss, _, _, k, analyses = self._first
        return loss, analyses, k

    @property
    def where(self) -> str:
        """Which batch an error is about, for its message."""
        return f"(batch {self.index} of the stream)"

    def check(self, loss: str, weighted: bool, analyses: analysis.Request, *,
              identified: bool = False, hardest_batches: int = 0, mergeable: bool = False,
              at_end: bool = False, options: Callable[[], str] = str) -> None:
        """Raise RequestError when a message asks for something its stream's first did not
        (``identified``: it carries sample ids; ``mergeable``: it asks for the stream's
        state, and then ``options()``, its canonical options, must stay the same;
        ``at_end``: its analyses only at the stream's end, which needs ``mergeable``), or
        for ``hardest_batches`` out of range."""
        if self._first is None:
            if not 0 <= hardest_batches <= analysis.MAX_HARDEST_BATCHES:
                raise RequestError("hardest_batches", f"{hardest_batches} out of range "
                                                      f"[0, {analysis.MAX_HARDEST_BATCHES}]")
            self._first = (loss, weighted, identified, hardest_batches, analyses)
            if hardest_batches:
                self.hardest_batches = analysis.HardestBatches(hardest_batches)
            if at_end and not mergeable:
                raise RequestError("analyses_at_end", "needs mergeable: the stream's final "
                                                      "message (its state) carries them")
            self.mergeable, self.at_end = mergeable, at_end
            if mergeable:
                self.options = options()
            return
        if mergeable != self.mergeable:
            raise RequestError("mergeable", f"differs from the stream's first batch {self.where}")
        if at_end != self.at_end:
            raise RequestError("analyses_at_end", "differs from the stream's first batch "
                                                  f"{self.where}")
        if mergeable and options() != self.options:
            raise RequestError("options", "differ from the stream's first batch; a mergeable "
                                          f"stream keeps one set of options {self.where}")
        first_loss, first_weighted, first_identified, first_k, first_analyses = self._first
        if identified != first_identified:
            raise RequestError("sample_ids", "must be given on every batch of a stream or on "
                                             f"none {self.where}")
        if hardest_batches != first_k:
            raise RequestError("hardest_batches", "differs from the stream's first batch "
                                                  f"{self.where}")
        if loss != first_loss:
            raise RequestError("loss", f"{loss!r} differs from the stream's first batch "
                                       f"({first_loss!r}) {self.where}")
        if weighted != first_weighted:
            raise RequestError("weights", "must be given on every batch of a stream or on "
                                          f"none {self.where}")
        for f in dataclasses.fields(analyses):
            if getattr(analyses, f.name) != getattr(first_analyses, f.name):
                raise RequestError(f.name, "differs from the stream's first batch; every "
                                           f"batch asks for the same analyses {self.where}")

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The block evaluating one message: sample numbers in errors count from its
        batch's start, and a RequestError says which batch of the stream it is about."""
        token = sample_offset.set(self.offset)
        try:
            yield
        except RequestError as exc:
            raise RequestError(exc.field, f"{exc.problem} {self.where}", exc.code) from None
        finally:
            sample_offset.reset(token)

    def add(self, ev: Evaluation, *, more: bool, batch_id: int | None = None
            ) -> tuple[Aggregate, Aggregate, analysis.Analysis | None,
                       analysis.Analysis | None]:
        """Merge one message's evaluation; returns the batch so far, the stream so far and
        the same for the analyses. ``more``: the next message continues this batch;
        ``batch_id``: the caller's id of the batch (default: its ordinal), read when it
        completes."""
        self.running = running = (ev.aggregate if self.running is None
                                  else self.running.merge(ev.aggregate))
        self.batch = batch = ev.aggregate if self.batch is None else self.batch.merge(ev.aggregate)
        batch_analysis = running_analysis = None
        if ev.analysis is not None:
            self.running_analysis = running_analysis = (
                ev.analysis if self.running_analysis is None
                else self.running_analysis.merge(ev.analysis))
            self.batch_analysis = batch_analysis = (
                ev.analysis if self.batch_analysis is None
                else self.batch_analysis.merge(ev.analysis))
        size = ev.losses.shape[0]
        if more:
            self.offset += size
        else:
            if self.hardest_batches is not None:
                self.hardest_batches = self.hardest_batches.add(
                    batch_id, self.index, self.samples,
                    self.offset + size, batch.count, batch.mean)
            self.samples += self.offset + size
            self.batch, self.batch_analysis, self.offset = None, None, 0
            self.index += 1
        return batch, running, batch_analysis, running_analysis
