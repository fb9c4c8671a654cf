"""Limits and backpressure: bounded admission, request size, deadlines, out-of-memory.

* :class:`Admission`: ``slots`` evaluations run at once; up to ``max_waiting`` more wait,
  first come first served, for a slot (the ``queue`` stage). A unary call beyond that is
  refused at once with RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer. A stream is
  admitted or refused (``max_streams`` open already; with the same trailer) at the door,
  when it starts; each batch of an admitted stream then waits for a slot and is never
  refused for contention. Nothing queues without bound: a stream has at most one batch waiting. A
  waiting evaluation whose caller cancelled or whose deadline passed leaves the queue
  without computing. It records when each slot was taken (``longest_hold``): a slot held
  too long is stuck work, which :mod:`lossd_server.watchdog` reports.
* :class:`ElementBudget`: the elements a request claims (its shapes), checked against
  ``--max-elements`` as each tensor is decoded, before its bytes are looked at;
  :func:`claim_working_memory`: the same budget for them plus what the loss allocates
  (``Loss.working_elements``), checked before the loss runs.
* :func:`is_out_of_memory` / :func:`release_memory`: CUDA OOM and host allocation failures
  become RESOURCE_EXHAUSTED; the device cache is released and the server goes on.
* :class:`MessageWaits`: what a caller's unsent messages may hold. A pool thread waits
  for each call's request message; at most ``max_receiving`` unary calls wait at once (one
  more ends the longest wait of the caller holding most), each at most ``timeout``
  seconds. A stream idle (waiting for its next message) ``stream_idle`` seconds gives its
  admission up when another stream needs it. So unsent calls and idle streams can never
  hold every thread or every stream admission (docs/limits.md).
* :func:`release_freed_soon`: memory large stream messages freed goes back to the system
  once they pause for a second, so idle streams hold only what they really keep.
* :class:`LimitMetrics`: rejections by reason, dropped (cancelled or expired) calls, the
  admission queue and the ended message waits, registered on the server's metrics registry.

Every refusal is an :class:`~lossd_server.errors.Refused` carrying its status and reason.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import ctypes
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from lossd_server.errors import Refused, RequestError, retry_after
from lossd_server.metrics import METHODS, ValueWriter

OTHER_METHOD = "other"
REJECT_REASONS = ("queue_full", "too_many_streams", "too_large", "out_of_memory",
                  "unauthenticated", "draining")
DROP_REASONS = ("cancelled", "deadline_exceeded")
# Why the server ended a call waiting for its caller's message (MessageWaits).
WAIT_REASONS = ("message_timeout", "evicted", "idle_stream", "draining")

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Metrics


class LimitMetrics:
    """Counters and gauges of this module, one set per registry."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, LimitMetrics]] = (
        weakref.WeakKeyDictionary())
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "lossd_rejected_requests", "Calls refused before evaluation, by method and reason "
            "(queue_full, too_many_streams, too_large, out_of_memory, unauthenticated, "
            "draining).",
            ("method", "reason"), registry=registry)
        self.dropped = Counter(
            "lossd_cancelled_requests", "Calls dropped unanswered because their caller "
            "cancelled or their deadline passed, by method and reason.", ("method", "reason"),
            registry=registry)
        # With worker processes the queue gauges add up over the pod's workers.
        self.waiting = Gauge("lossd_queue_waiting", "Evaluations waiting for a compute slot.",
                             registry=registry, multiprocess_mode="livesum")
        self.running = Gauge("lossd_queue_running", "Evaluations holding a compute slot.",
                             registry=registry, multiprocess_mode="livesum")
        self.streams = Gauge("lossd_streams_open", "Admitted streams (EvaluateStream, "
                             "SharedMemorySession) now open.", registry=registry,
                             multiprocess_mode="livesum")
        self.draining = Gauge("lossd_draining", "1 while the server drains (SIGTERM), else 0.",
                              registry=registry, multiprocess_mode="livemax")
        self.waits_ended = Counter(
            "lossd_message_waits_ended", "Calls the server ended while they waited for their "
            "caller's message, by method and reason (message_timeout: a unary request not "
            "sent within --message-timeout-seconds; evicted: the longest wait, past "
            "--max-receiving; idle_stream: a stream idle --stream-idle-seconds whose "
            "admission another stream needed; draining: a unary request still unsent when "
            "the server began to drain).", ("method", "reason"), registry=registry)
        self.receiving = Gauge("lossd_receiving_calls", "Unary calls waiting for their request "
                               "message (sampled every 0.25 s).", registry=registry,
                               multiprocess_mode="livesum")
        # Written on every call: through the hot path's writers.
        self.waiting_value = ValueWriter(self.waiting)
        self.running_value = ValueWriter(self.running)
        for method in (*METHODS, OTHER_METHOD):
            for reason in REJECT_REASONS:
                self.rejected.labels(method, reason)
            for reason in DROP_REASONS:
                self.dropped.labels(method, reason)
            for reason in WAIT_REASONS:
                self.waits_ended.labels(method, reason)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> LimitMetrics:
        with cls._lock:
            found = cls._by_registry.get(registry)
            if found is None:
                found = cls._by_registry[registry] = cls(registry)
            return found

    @staticmethod
    def method_label(method: str) -> str:
        """A bounded label from a method name (``Evaluate``) or path (``/pkg.Svc/Evaluate``)."""
        short = method.rsplit("/", 1)[-1]
        return short if short in METHODS else OTHER_METHOD

    def count(self, method: str, exc: Refused) -> None:
        label = self.method_label(method)
        if exc.reason in DROP_REASONS:
            self.dropped.labels(label, exc.reason).inc()
        else:
            self.rejected.labels(label, exc.reason).inc()


# ---------------------------------------------------------------------------------------
# Deadlines and cancellation


@dataclass
class CallState:
    """What the servicer knows of the caller: still there, and time left."""

    is_active: Callable[[], bool] = lambda: True
    time_remaining: Callable[[], float | None] = lambda: None

    @classmethod
    def of(cls, context: grpc.ServicerContext | None) -> CallState:
        """The state of ``context``'s call (None, as in direct calls from benchmarks: a
        caller that stays and has no deadline)."""
        if context is None:
            return cls()
        return cls(is_active=context.is_active, time_remaining=context.time_remaining)

    def check(self, where: str) -> None:
        """Raise Refused (CANCELLED or DEADLINE_EXCEEDED) when the answer is not wanted."""
        left = self.time_remaining()
        if left is not None and left <= 0:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"deadline passed {where}; dropped unanswered",
                          reason="deadline_exceeded")
        if not self.is_active():
            raise Refused(grpc.StatusCode.CANCELLED, f"caller cancelled {where}; dropped",
                          reason="cancelled")


# ---------------------------------------------------------------------------------------
# Waits for a caller's message


Ender = Callable[[grpc.StatusCode, str], None]


@dataclass(eq=False)
class Wait:
    """One call as :class:`MessageWaits` sees it: who sent it, how to end it from another
    thread, and whether it holds a stream admission (set by :meth:`Admission.stream`)."""

    waits: MessageWaits
    method: str  # the metrics label (LimitMetrics.method_label)
    # gRPC's peer (``ipv4:1.2.3.4:5678``), or how to read it: only an eviction asks.
    address: str | Callable[[], str]
    end: Ender
    since: float = 0.0  # when its current wait for a message began
    admitted: bool = False
    ended: Refused | None = None  # the status it was ended with
    probe: bool = False  # a health check: a drain leaves it to be answered (NOT_SERVING)

    @property
    def peer(self) -> str:
        """The caller's address without its port: calls of one host count together."""
        address = self.address
        if callable(address):
            address = self.address = address()
        return address.rsplit(":", 1)[0]


# The call this thread serves (grpcio runs each call in a contextvars context of its own),
# so that Admission.stream can reclaim an idle stream without knowing the servicer's call.
_CURRENT: contextvars.ContextVar[Wait | None] = contextvars.ContextVar("lossd_wait",
                                                                      default=None)


def current_wait() -> Wait | None:
    """The :class:`Wait` of the call being served here, if it passed a :class:`Gate`."""
    return _CURRENT.get()


class MessageWaits:
    """Calls whose pool thread waits for the caller's next message, and the bounds on them.

    * A unary call's request must arrive within ``timeout`` seconds, or the call ends
      UNAVAILABLE (``message_timeout``).
    * At most ``max_receiving`` unary calls wait at once. One more ends (RESOURCE_EXHAUSTED,
      ``evicted``) the longest wait of the host holding most waits: a caller holding many
      unsent calls loses its own first, and a new call, health checks included, is never
      the one refused. Honest messages arrive in milliseconds; a held call waits longest.
    * :meth:`reclaim_stream`: when every stream admission is taken, the admitted stream
      idle longest (waiting for its next message), if idle ``stream_idle`` seconds or more,
      ends UNAVAILABLE (``idle_stream``) to make room; lossd's shared-memory client opens
      a new session on UNAVAILABLE. Streams are never closed for idleness while there is
      room: a training loop's session may wait minutes between steps.

    Ending a call from another thread cancels it with a status, which wakes the thread
    waiting for its message. A daemon thread enforces ``timeout`` (every
    ``TICK_SECONDS``); the hot path only adds and removes a wait under a lock.
    """

    TICK_SECONDS = 0.25

    def __init__(self, *, max_receiving: int = 32, timeout: float = 30.0,
                 stream_idle: float = 10.0, metrics: LimitMetrics | None = None) -> None:
        if max_receiving < 1 or timeout <= 0 or stream_idle < 0:
            raise ValueError("max_receiving >= 1, timeout > 0 and stream_idle >= 0")
        self.max_receiving = max_receiving
        self.timeout = timeout
        self.stream_idle = stream_idle
        self.metrics = metrics
        self._lock = threading.Lock()
        # Insertion order is age order: the first entry has waited longest.
        self._unary: dict[Wait, None] = {}
        self._streams: dict[Wait, None] = {}
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def receiving(self) -> int:
        """Unary calls now waiting for their request message."""
        return len(self._unary)

    def call(self, method: str, peer: str | Callable[[], str], end: Ender) -> Wait:
        """The :class:`Wait` of a call starting in this thread (see :func:`current_wait`).
        ``peer`` is gRPC's (``ipv4:1.2.3.4:5678``) or a function returning it (read only
        when an eviction ranks hosts: most calls never need it); ``end`` cancels the call
        with a status."""
        wait = Wait(self, method, peer, end)
        _CURRENT.set(wait)
        return wait

    def receive_first(self, wait: Wait, read: Callable[[], T]) -> T:
        """``read()`` a unary call's request within the bounds of the class doc; raises
        :class:`Refused` when the call was ended (its status is already on the wire)."""
        wait.since = time.monotonic()
        evicted = None
        with self._lock:
            if len(self._unary) >= self.max_receiving:
                evicted = self._victim()
                del self._unary[evicted]
            self._unary[wait] = None
            if self._watchdog is None:
                self._start_watchdog()
        if evicted is not None:
            self._end(evicted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"request message not received after {time.monotonic() - evicted.since:.1f}"
                      f" s while {self.max_receiving} calls waited for theirs "
                      "(--max-receiving); this call waited longest", "evicted")
        try:
            return read()
        except grpc.RpcError:  # (read in place, not through a helper: one call per message)
            if wait.ended is None:
                raise  # the caller went away: gRPC's own error
            raise wait.ended from None
        finally:
            with self._lock:
                self._unary.pop(wait, None)

    def receive_next(self, wait: Wait, read: Callable[[], T]) -> T:
        """``read()`` a stream's next message; raises :class:`Refused` when the stream was
        ended by :meth:`reclaim_stream`."""
        wait.since = time.monotonic()
        with self._lock:
            self._streams[wait] = None
        try:
            return read()
        except grpc.RpcError:  # (read in place, not through a helper: one call per message)
            if wait.ended is None:
                raise  # the caller went away: gRPC's own error
            raise wait.ended from None
        finally:
            with self._lock:
                self._streams.pop(wait, None)

    def drain(self) -> None:
        """End every unary call still waiting for its request (UNAVAILABLE: the caller
        retries elsewhere), so that unsent calls do not hold a drain for its grace period.
        Streams are left to finish, and health checks to be answered: a probe during a
        drain is told NOT_SERVING, not refused."""
        with self._lock:
            waiting = [w for w in self._unary if not w.probe]
            for w in waiting:
                del self._unary[w]
        for w in waiting:
            self._end(w, grpc.StatusCode.UNAVAILABLE, "server is draining (shutting down) and "
                      "the request message had not arrived; retry on another replica",
                      "draining")

    def _victim(self) -> Wait:
        """The longest wait of the host holding most waits (called under the lock)."""
        counts = collections.Counter(w.peer for w in self._unary)
        most = max(counts.values())
        return next(w for w in self._unary if counts[w.peer] == most)

    def reclaim_stream(self) -> float:
        """End the admitted stream idle longest if idle ``stream_idle`` s or more: 0.0.
        Otherwise the seconds until one will be (``inf``: no admitted stream is idle)."""
        now = time.monotonic()
        with self._lock:
            idle = [w for w in self._streams if w.admitted and w.ended is None]
        if not idle:
            return math.inf
        oldest = min(idle, key=lambda w: w.since)
        waited = now - oldest.since
        if waited < self.stream_idle:
            return self.stream_idle - waited
        self._end(oldest, grpc.StatusCode.UNAVAILABLE,
                  f"stream idle for {waited:.0f} s (no message) closed: another stream needed "
                  f"its admission (--max-streams; --stream-idle-seconds {self.stream_idle:g});"
                  " open a new one", "idle_stream")
        return 0.0

    def _end(self, wait: Wait, code: grpc.StatusCode, message: str, reason: str) -> None:
        if wait.ended is not None:
            return
        wait.ended = Refused(code, message, reason=reason)
        log.info("ended a call waiting for its message", extra={
            "method": wait.method, "code": code.name, "reason": reason})
        if self.metrics is not None:
            self.metrics.waits_ended.labels(wait.method, reason).inc()
        wait.end(code, message)

    def _start_watchdog(self) -> None:
        self._watchdog = threading.Thread(target=self._watch, name="lossd-message-waits",
                                          daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._closed.wait(self.TICK_SECONDS):
            cutoff = time.monotonic() - self.timeout
            with self._lock:
                expired = []
                for w in self._unary:  # oldest first: stop at the first one in time
                    if w.since > cutoff:
                        break
                    expired.append(w)
                for w in expired:
                    del self._unary[w]
                waiting = len(self._unary)
            for w in expired:
                self._end(w, grpc.StatusCode.UNAVAILABLE,
                          f"request message not received within {self.timeout:g} s "
                          "(--message-timeout-seconds)", "message_timeout")
            if self.metrics is not None:
                self.metrics.receiving.set(waiting)

    def close(self) -> None:
        """Stop the watchdog thread (it is a daemon: a server that exits needs not)."""
        self._closed.set()


# ---------------------------------------------------------------------------------------
# Admission


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    granted: bool = False


class Admission:
    """``slots`` evaluations at once, ``max_waiting`` more waiting in FIFO order.

    ``slot(call)`` is a context manager holding a slot; it raises :class:`Refused`:
    RESOURCE_EXHAUSTED (queue full, with a retry-after hint), or CANCELLED /
    DEADLINE_EXCEEDED when the caller goes away while waiting. ``slot(call,
    admitted=True)`` is a batch of an admitted stream: it waits whatever the queue's length.

    ``stream()`` is the door of a stream, held while it is open: refused (with a
    retry-after hint) when ``max_streams`` streams are open (0: no limit) and none of them
    has been idle long enough to give its place up (:class:`MessageWaits`). A stream is a
    long commitment, so the door counts streams, not the queue of the moment; each open
    stream has at most one batch waiting, so the queue stays within ``max_waiting`` plus
    ``max_streams``.

    >>> a = Admission(slots=1, max_waiting=0)
    >>> with a.slot():
    ...     try:
    ...         with a.slot():
    ...             pass
    ...     except Refused as exc:
    ...         print(exc.code.name, exc.reason)
    RESOURCE_EXHAUSTED queue_full
    """

    POLL_SECONDS = 0.05  # how often a waiter checks whether its caller is still there
    # How long a stream waits for the place of an idle stream it had closed: that stream's
    # thread wakes at once and only unwinds.
    RECLAIM_SECONDS = 2.0

    def __init__(self, slots: int, max_waiting: int, *, max_streams: int = 0,
                 metrics: LimitMetrics | None = None) -> None:
        if slots < 1 or max_waiting < 0 or max_streams < 0:
            raise ValueError("slots >= 1, max_waiting >= 0 and max_streams >= 0")
        self.slots = slots
        self.max_waiting = max_waiting
        self.max_streams = max_streams
        self.metrics = metrics
        self._lock = threading.Lock()
        self._free = slots
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._streams = 0
        self._door = threading.Condition(self._lock)  # notified when a stream ends
        # When each slot now held was taken (perf_counter -> how many at that instant), for
        # the watchdog: a slot held past a bound is stuck work (lossd_server.watchdog).
        self._held: dict[float, int] = {}
        # Exponentially weighted mean of how long a slot is held, for the retry-after hint.
        self._hold = 0.05
        self._shown = (0, 0)  # the gauges' values (waiting, running): written on change

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self.slots - self._free

    def has_free_slot(self) -> bool:
        """Whether an evaluation would start now, without waiting (read without the lock:
        a hint, as the native front uses it to run a small call on its dispatcher)."""
        return self._free > 0 and not self._queue

    @property
    def streams(self) -> int:
        return self._streams

    def longest_hold(self) -> float:
        """Seconds the longest-held slot has been held by now (0 while none is)."""
        with self._lock:
            oldest = min(self._held, default=None)
        return 0.0 if oldest is None else time.perf_counter() - oldest

    def retry_after_seconds(self) -> float:
        """About when a slot frees for one more caller: the queue ahead, per slot."""
        return self._hold * (len(self._queue) + 1) / self.slots

    def _gauges(self) -> None:
        if self.metrics is not None:
            waiting, running = len(self._queue), self.slots - self._free
            if waiting != self._shown[0]:
                self.metrics.waiting_value.set(waiting)
            if running != self._shown[1]:
                self.metrics.running_value.set(running)
            self._shown = (waiting, running)

    def acquire(self, call: CallState | None = None, *, admitted: bool = False) -> float:
        """Take a slot (waiting in line for one); returns when it was taken, for
        :meth:`release`. Raises :class:`Refused` as ``slot`` does."""
        return self._acquire(call or CallState(), admitted)

    def release(self, acquired: float) -> None:
        """Give back a slot taken by :meth:`acquire` at ``acquired``."""
        self._release(acquired, time.perf_counter() - acquired)

    def _busy(self) -> Refused:
        hint = self.retry_after_seconds()
        return Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server busy: {self.slots - self._free} evaluations running and "
            f"{len(self._queue)} waiting (--concurrency {self.slots}, --max-waiting "
            f"{self.max_waiting}); retry after {math.ceil(hint * 1000)} ms",
            reason="queue_full", trailers=retry_after(hint))

    def _acquire(self, call: CallState, admitted: bool) -> float:
        with self._lock:
            if self._free > 0 and not self._queue:
                self._free -= 1
                self._gauges()
                return self._held_from_now()
            if not admitted and len(self._queue) >= self.max_waiting:
                raise self._busy()
            waiter = _Waiter()
            self._queue.append(waiter)
            self._gauges()
        while True:
            left = call.time_remaining()
            timeout = self.POLL_SECONDS if left is None else max(0.0, min(left,
                                                                          self.POLL_SECONDS))
            waiter.event.wait(timeout)
            with self._lock:
                if waiter.granted:
                    return self._held_from_now()
                try:
                    call.check("while waiting for a compute slot")
                except Refused:
                    self._queue.remove(waiter)
                    self._gauges()
                    raise

    def _held_from_now(self) -> float:
        """Note a slot taken now (under the lock, where it was taken); returns when."""
        acquired = time.perf_counter()
        self._held[acquired] = self._held.get(acquired, 0) + 1
        return acquired

    def _release(self, acquired: float, held: float) -> None:
        with self._lock:
            count = self._held.pop(acquired, 1) - 1
            if count > 0:
                self._held[acquired] = count
            self._hold = 0.8 * self._hold + 0.2 * held
            if self._queue:
                waiter = self._queue.popleft()  # the slot passes straight to it
                waiter.granted = True
                waiter.event.set()
            else:
                self._free += 1
            self._gauges()

    @contextmanager
    def slot(self, call: CallState | None = None, *, admitted: bool = False) -> Iterator[None]:
        acquired = self.acquire(call, admitted=admitted)
        try:
            yield
        finally:
            self.release(acquired)

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Admit a stream for as long as the block runs (see the class doc). When every
        admission is taken, a stream idle long enough gives its own up (see
        :meth:`MessageWaits.reclaim_stream`) and this one waits up to ``RECLAIM_SECONDS``
        for the place."""
        wait = current_wait()
        with self._door:
            admitted = self._admit()
        if not admitted:
            ready_in = wait.waits.reclaim_stream() if wait is not None else math.inf
            with self._door:
                admitted = ready_in == 0.0 and self._door.wait_for(
                    self._admit, self.RECLAIM_SECONDS)
                if not admitted:
                    hint = max(1.0, ready_in if ready_in < math.inf
                               else self.retry_after_seconds())
                    raise Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server busy: {self._streams} streams open (--max-streams "
                        f"{self.max_streams}); retry after {math.ceil(hint * 1000)} ms",
                        reason="too_many_streams", trailers=retry_after(hint))
        if wait is not None:
            wait.admitted = True
        try:
            yield
        finally:
            if wait is not None:
                wait.admitted = False
            with self._door:
                self._streams -= 1
                self._stream_gauge()
                self._door.notify()

    def _admit(self) -> bool:
        """Take a stream admission if one is free (called under the door's lock)."""
        if self.max_streams and self._streams >= self.max_streams:
            return False
        self._streams += 1
        self._stream_gauge()
        return True

    def _stream_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.streams.set(self._streams)


# ---------------------------------------------------------------------------------------
# Request size


def claimed_elements(shape: Iterable[int]) -> int:
    """Elements a shape claims; 0 for a negative dimension (decoding rejects it)."""
    n = 1
    for d in shape:
        if d < 0:
            return 0
        n *= d
    return n


MAX_DIM_PRODUCT = 1 << 62  # beyond it torch's size and stride arithmetic overflows


class ElementBudget:
    """The elements a request's tensors claim (their shapes), checked one tensor at a time
    against ``max_elements`` (0: no limit) before its bytes are looked at.

    ``claim`` raises RESOURCE_EXHAUSTED (naming the field that crosses the limit) when the
    total goes over. A shape with a zero dimension claims no elements, but its other
    dimensions still count: one larger than ``max_elements`` is refused too, and dimensions
    whose product overflows are INVALID_ARGUMENT whatever the limit.
    """

    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements
        self.total = 0

    def claim(self, name: str, shape: Iterable[int]) -> None:
        max_elements = self.max_elements
        dims = list(shape)
        positive = not dims or min(dims) > 0
        if positive:
            n = nonzero = math.prod(dims)
        else:
            nonzero = math.prod(d for d in dims if d > 0)
            n = claimed_elements(dims)
        if nonzero > MAX_DIM_PRODUCT:
            raise RequestError(f"{name}.shape", f"{dims}: dimensions too large (their "
                                                "product overflows)")
        # With every dimension positive, none exceeds the limit unless their product does.
        if (max_elements and dims and (not positive or n > max_elements)
                and max(dims) > max_elements):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{name}.shape: {dims} has a dimension over {max_elements} "
                          "(--max-elements)", reason="too_large")
        self.total += n
        if max_elements and self.total > max_elements:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{name}.shape: {dims} brings the request to {self.total} "
                          f"elements; this server takes at most {max_elements} per message "
                          "(--max-elements); split the batch", reason="too_large")


def claim_working_memory(loss: str, held: int, working: int, max_elements: int) -> None:
    """Refuse (RESOURCE_EXHAUSTED, ``too_large``) a request whose ``held`` tensor elements
    and the ``working`` elements its loss allocates for them pass ``max_elements`` (0: no
    limit): the element budget of what the request costs, not only of what it sends."""
    if max_elements and held + working > max_elements:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"predictions.shape: {loss} needs {working} working elements for this "
                      f"request besides its {held}; this server takes at most {max_elements} "
                      "per message (--max-elements); send fewer or shorter sequences",
                      reason="too_large")


# ---------------------------------------------------------------------------------------
# Out of memory

_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory",
             "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (``torch.OutOfMemoryError``), ``MemoryError``, or a host allocator failure
    (torch raises those as RuntimeError: "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


def release_memory(device: torch.device) -> None:
    """Free what a failed evaluation left: Python garbage, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        # A second failure here must not turn the answer INTERNAL.
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


TRIM_BYTES = 4 * 1024 * 1024
"""A stream message at least this large asks for :func:`release_freed_soon` once answered.
Smaller ones leave too little behind to be worth a trim."""
TRIM_DELAY = 1.0
"""Seconds without another large message before the trim: a stream busy with large
messages is not trimmed, so it goes on reusing warm pages."""

_trim_lock = threading.Lock()
_trim_last = 0.0  # when release_freed_soon was last called (monotonic)
_trim_pending = False


def release_freed_soon() -> None:
    """Give the memory that the process freed back to the system once no call has asked
    for ``TRIM_DELAY`` s (glibc's ``malloc_trim``; nothing elsewhere).

    The server keeps freed memory for reuse (``serve.host.tune_allocator``), and the small
    objects a call leaves live between its large blocks split the free ones: each stream
    that sent a large message and then idles would pin most of a payload's worth of freed,
    unusable pages. The trim returns every free page, wherever it lies.
    """
    global _trim_last, _trim_pending
    with _trim_lock:
        _trim_last = time.monotonic()
        if _trim_pending:
            return
        _trim_pending = True
    _trim_later(TRIM_DELAY)


def _trim_later(delay: float) -> None:
    timer = threading.Timer(delay, _trim)
    timer.daemon = True
    timer.start()


def _trim() -> None:
    global _trim_pending
    with _trim_lock:
        quiet = time.monotonic() - _trim_last
        if quiet < TRIM_DELAY:  # asked again meanwhile: wait until it is quiet
            _trim_later(TRIM_DELAY - quiet)
            return
        _trim_pending = False
    # Not glibc: no malloc_trim, and its allocator returns memory by itself.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def out_of_memory(device: torch.device, samples: int, retry_seconds: float) -> Refused:
    return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"predictions: out of {device.type} memory evaluating {samples} samples; "
                   "the server released its cache and serves on; retry later or send a "
                   "smaller batch", reason="out_of_memory", trailers=retry_after(retry_seconds))
