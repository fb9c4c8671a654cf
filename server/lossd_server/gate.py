"""The server interceptor every call passes: authentication, drain, in-flight count, and
the bounds on waiting for a caller's messages.

For each call but the health service's (probes stay open, with no token and while
draining):

1. with tokens configured, a call without an accepted bearer token ends UNAUTHENTICATED;
2. while the server drains, a new call ends UNAVAILABLE (clients retry on another replica);
3. otherwise the call runs and is counted in flight until it ends, so a drain knows when
   the last one finished.

Rule: nothing reads a request message before these checks. grpcio's sync server reads a
unary call's request in the pool thread *before* the handler runs, so a caller that opens
calls and never sends would hold a thread each, token or not. Every handler is therefore
served here as a request-streaming one (the same bytes on the wire): refusals answer
without reading, and every call, health checks included, reads its messages through
:class:`limits.MessageWaits`, which bounds how many calls wait for a message and for how
long, and lets an idle stream give its admission up.

It also parses request messages itself: a message that does not parse ends
INVALID_ARGUMENT naming ``request`` (gRPC's own deserializer would answer INTERNAL).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health

from lossd_server import limits
from lossd_server.errors import Refused, RequestError, status_of
from lossd_server.limits import LimitMetrics, MessageWaits, Wait
from lossd_server.metrics import METHODS, Metrics
from lossd_server.security import TokenStore

log = logging.getLogger(__name__)

OPEN_SERVICES = (health.SERVICE_NAME,)
# Their methods' names: a registered method is "/<service>/<method>" (only those reach the
# check, so a prefix test answers it without splitting the name per call).
_OPEN_PREFIXES = tuple(f"/{service}/" for service in OPEN_SERVICES)

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class Gate(grpc.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. ``drain()`` starts refusing; ``wait_idle`` waits out calls.
    ``received``: the transport hands unary calls over with their message, the wait for it
    bounded already (the native front); they are parsed here, not read."""

    def __init__(self, *, metrics: Metrics, tokens: TokenStore | None = None,
                 waits: MessageWaits | None = None, received: bool = False) -> None:
        self.metrics = metrics
        self.received = received
        self.limits = LimitMetrics.of(metrics.registry)
        self.waits = waits if waits is not None else MessageWaits(metrics=self.limits)
        self.tokens = tokens if tokens is not None and tokens.enabled else None
        self._draining = threading.Event()
        # Every call enters and exits under the plain lock (C-level, unlike a Condition's
        # with-block); the Condition on it is notified only while wait_idle waits.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._idle_waiters = 0
        self._in_flight = 0
        # method -> (grpc's handler, our wrapped one): wrapping builds closures and a new
        # handler, so it is done once per method, not once per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def drain(self) -> None:
        """Refuse new calls (UNAVAILABLE) from now on, and end those whose request message
        has not arrived yet."""
        self._draining.set()
        self.limits.draining.set(1)
        self.waits.drain()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is in flight or ``timeout`` passed; True when idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            self._idle_waiters += 1
            try:
                while self._in_flight:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._idle.wait(left)
                return True
            finally:
                self._idle_waiters -= 1

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if details.method.startswith(_OPEN_PREFIXES):
            return self._cached(details.method, handler, self._open)
        if self.tokens is not None:
            problem = self.tokens.check(details.invocation_metadata)
            if problem is not None:
                return self._refusal(handler, details.method, Refused(
                    grpc.StatusCode.UNAUTHENTICATED, f"authorization: {problem}",
                    reason="unauthenticated"))
        if self._draining.is_set():
            return self._refusal(handler, details.method, Refused(
                grpc.StatusCode.UNAVAILABLE, "server is draining (shutting down); retry on "
                "another replica", reason="draining"))
        return self._cached(details.method, handler, self._tracked)

    def _cached(self, method: str, handler: Any, wrap: Callable[[Any, str], Any]) -> Any:
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, wrap(handler, method))
        return cached[1]

    # -- refusals -------------------------------------------------------------------------

    def _refusal(self, handler: Any, method: str, exc: Refused) -> Any:
        short = method.rsplit("/", 1)[-1]
        status = status_of(exc)

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            self.limits.count(method, exc)
            log.info("refused", extra={"method": short, "code": exc.code.name,
                                       "reason": exc.reason})
            if short in METHODS:  # counted in lossd_requests_total like any finished call
                try:
                    with self.metrics.call(short):
                        raise exc
                except Refused:
                    pass
            context.abort(status.code, status.message)

        def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            refuse(request, context)
            yield  # unreachable: abort raises

        # Request-streaming whatever the method: gRPC then reads no message before this.
        if handler.response_streaming:
            return handler._replace(request_streaming=True, request_deserializer=None,
                                    unary_stream=None, stream_stream=refuse_stream)
        return handler._replace(request_streaming=True, request_deserializer=None,
                                unary_unary=None, stream_unary=refuse)

    # -- tracked calls -------------------------------------------------------------------

    def _exit(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight and self._idle_waiters:
                self._idle.notify_all()

    def _open(self, handler: Any, method: str) -> Any:
        """A health service handler: messages bounded like any call's, nothing else."""
        return self._receiving(handler, method, _unchanged, _unchanged, probe=True)

    def _tracked(self, handler: Any, method: str) -> Any:
        def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                with self._lock:  # (entering inline: one call fewer per call)
                    self._in_flight += 1
                try:
                    return behavior(request, context)
                finally:
                    self._exit()
            return run

        def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with self._lock:  # (entering inline: one call fewer per call)
                    self._in_flight += 1
                try:
                    yield from behavior(request, context)
                finally:
                    self._exit()
            return run

        return self._receiving(handler, method, unary_response, stream_response)

    def _receiving(self, handler: Any, method: str, unary_response: Wrapper,
                   stream_response: Wrapper, *, probe: bool = False) -> Any:
        """``handler`` as a request-streaming handler that reads its messages through
        :attr:`waits` and parses them (a message that does not parse ends
        INVALID_ARGUMENT), then runs its behavior wrapped by ``unary_response`` or
        ``stream_response``: a unary request's call starts (is counted in flight) once its
        message arrived, so an unsent call never holds a drain up. ``probe``: a health
        check, which a drain does not end while it waits for its message."""
        deserializer = handler.request_deserializer
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        kind = ("stream" if streaming_in else "unary") + "_" + ("stream" if streaming_out
                                                                else "unary")
        run = (stream_response if streaming_out else unary_response)(getattr(handler, kind))
        waits, label = self.waits, LimitMetrics.method_label(method)

        if self.received and not streaming_in:
            def parse(raw: bytes, context: grpc.ServicerContext) -> Any:
                try:
                    request = _parse(deserializer, raw)
                except (RequestError, Refused) as exc:  # as receive() below
                    status = status_of(exc)
                    context.abort(status.code, status.message)
                return run(request, context)
            return handler._replace(**{kind: parse, "request_deserializer": None})

        def receive(received: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            end = functools.partial(_end, context)
            if streaming_in:  # a stream that fails to parse midway raises in the servicer
                wait = waits.call(label, context.peer, end)  # (current_wait: its admission)
                return run(_parsed(deserializer, _messages(wait, received)), context)
            # Not waits.call: a unary request's call holds no stream admission, so its Wait
            # needs no place in the call's contextvars context, which grpcio's call state
            # holds: the Wait's reference back to that state would make each call a cycle
            # of ~20 objects left to the garbage collector.
            wait = Wait(waits, label, context.peer, end, probe=probe)
            try:
                raw = waits.receive_first(wait, received.__next__)
            except StopIteration:  # as grpcio answers a unary call without its message
                context.abort(grpc.StatusCode.UNIMPLEMENTED,
                              f'"{method}" requires exactly one request message.')
            except Refused as exc:  # ended while waiting: its status is on the wire already
                context.abort(exc.code, exc.message)
            try:
                request = _parse(deserializer, raw)
            except (RequestError, Refused) as exc:  # Refused: a limit the parser enforces
                status = status_of(exc)
                context.abort(status.code, status.message)
            return run(request, context)

        new_kind = "stream_" + ("stream" if streaming_out else "unary")
        return handler._replace(**{kind: None, new_kind: receive, "request_streaming": True,
                                   "request_deserializer": None})


def _messages(wait: Wait, received: Iterator[bytes]) -> Iterator[bytes]:
    """A stream's messages, each awaited through ``wait``'s :class:`MessageWaits` (a
    stream it ended raises :class:`Refused`, which the servicer answers with its status)."""
    waits = wait.waits
    while True:
        try:
            yield waits.receive_next(wait, received.__next__)
        except StopIteration:
            return


def _parsed(deserializer: Callable[[bytes], Any] | None, messages: Iterator[bytes]
            ) -> Iterator[Any]:
    """A stream's messages parsed, none of them held while the next is awaited: an idle
    stream must not pin its last message, nor the freed memory a large one leaves
    (:func:`limits.release_freed_soon`)."""
    for raw in messages:
        yield _parse(deserializer, raw)
        if len(raw) >= limits.TRIM_BYTES:
            limits.release_freed_soon()
        del raw


def _end(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End ``context``'s call with a status from another thread: cancelling it wakes the
    thread waiting for its message. grpcio's ``context.cancel()`` takes no status; its
    call object does (the caller then reads the status, not a bare CANCELLED); the native
    front's context has ``end_with_status``. Bound to its context with
    ``functools.partial`` (no closure built per call)."""
    end_with_status = getattr(context, "end_with_status", None)
    if end_with_status is not None:
        end_with_status(code, message)
        return
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        call.cancel(code.value[0], message)
    else:
        context.cancel()


def _unchanged(behavior: Callable[..., Any]) -> Callable[..., Any]:
    return behavior


def _parse(deserializer: Callable[[bytes], Any] | None, raw: Any) -> Any:
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Refused:  # a limit the deserializer enforces (its own status and words)
        raise
    except Exception as exc:
        raise RequestError("request", f"not a valid message ({type(exc).__name__}); "
                                      f"{len(raw)} bytes did not parse") from None

