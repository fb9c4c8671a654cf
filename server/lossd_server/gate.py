"""The server interceptor every call passes: authentication, drain, in-flight count.

For each call but the health service's (probes stay open, with no token and while
draining):

1. with tokens configured, a call without an accepted bearer token ends UNAUTHENTICATED;
2. while the server drains, a new call ends UNAVAILABLE (clients retry on another replica);
3. otherwise the call runs and is counted in flight until it ends, so a drain knows when
   the last one finished.

It also parses request messages itself: a message that does not parse ends
INVALID_ARGUMENT naming ``request`` (gRPC's own deserializer would answer INTERNAL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health

from lossd_server.limits import LimitMetrics, Refused
from lossd_server.metrics import METHODS, Metrics
from lossd_server.security import TokenStore
from lossd_server.validate import RequestError

log = logging.getLogger(__name__)

OPEN_SERVICES = (health.SERVICE_NAME,)


def _service(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


class Gate(grpc.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. ``drain()`` starts refusing; ``wait_idle`` waits out calls."""

    def __init__(self, *, metrics: Metrics, tokens: TokenStore | None = None) -> None:
        self.metrics = metrics
        self.limits = LimitMetrics.of(metrics.registry)
        self.tokens = tokens if tokens is not None and tokens.enabled else None
        self._draining = threading.Event()
        self._idle = threading.Condition()
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
        """Refuse new calls (UNAVAILABLE) from now on."""
        self._draining.set()
        self.limits.draining.set(1)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is in flight or ``timeout`` passed; True when idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or _service(details.method) in OPEN_SERVICES:
            return handler
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
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._tracked(handler))
        return cached[1]

    # -- refusals -------------------------------------------------------------------------

    def _refusal(self, handler: Any, method: str, exc: Refused) -> Any:
        short = method.rsplit("/", 1)[-1]

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
            context.abort(exc.code, exc.message)

        def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            refuse(request, context)
            yield  # unreachable: abort raises

        return _replace(handler, lambda _inner: refuse, lambda _inner: refuse_stream,
                        parse=False)

    # -- tracked calls -------------------------------------------------------------------

    def _enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _tracked(self, handler: Any) -> Any:
        def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                self._enter()
                try:
                    return behavior(request, context)
                finally:
                    self._exit()
            return run

        def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._enter()
                try:
                    yield from behavior(request, context)
                finally:
                    self._exit()
            return run

        return _replace(handler, unary_response, stream_response, parse=True)


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


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def _replace(handler: Any, unary_response: Wrapper, stream_response: Wrapper, *,
             parse: bool) -> Any:
    """``handler`` with its behavior wrapped, taking raw request bytes: parsed here when
    ``parse`` (a message that does not parse ends INVALID_ARGUMENT), else left raw."""
    deserializer = handler.request_deserializer if parse else None
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    kind = ("stream" if streaming_in else "unary") + "_" + ("stream" if streaming_out
                                                            else "unary")
    behavior = getattr(handler, kind)

    def inner(received: Any, context: grpc.ServicerContext) -> Any:
        if streaming_in:  # a stream that fails to parse midway raises in the servicer
            return behavior((_parse(deserializer, raw) for raw in received), context)
        try:
            request = _parse(deserializer, received)
        except (RequestError, Refused) as exc:
            context.abort(exc.code, str(exc))
        return behavior(request, context)

    wrapped = (stream_response if streaming_out else unary_response)(inner)
    return handler._replace(**{kind: wrapped, "request_deserializer": None})
