"""A ``grpc.Server`` whose calls gRPC C++ carries: the native front.

:class:`NativeServer` serves the handlers lossd registers on any ``grpc.Server`` (the
generated ``add_*_to_server`` functions, health, reflection, the Open Inference Protocol)
with the same interceptors and the same semantics (status codes, ``abort``, trailing
metadata, deadlines, cancellation, the concurrent-RPC limit), so nothing above it knows
which front it runs on. What differs is who carries a call:

- gRPC C++ accepts it and reads its first message; no Python runs for a call whose
  message has not arrived;
- one Python thread, the dispatcher, takes call after call from C++ without giving the GIL
  up, and runs a small unary call itself (``inline_bytes``, and only while ``can_inline()``
  says a compute slot is free, so it never waits behind a long evaluation);
- every other call (streams, large requests) runs on the thread pool, as on grpcio, and so
  do the queued calls while the dispatcher has taken none for ``SPILL_SECONDS``: a spill
  thread hands them over, so a dispatcher held up (a slow evaluation, a stalled device)
  holds up no call. (Calls merely queued behind a busy dispatcher stay: on the pool they
  would only contend for the GIL.)

A C++ thread sends each answer (``Call.finish`` returns at once), so the dispatcher goes on
to the next call while gRPC writes. With grpcio every call moves between its polling thread
and a pool thread, each move a GIL hand-off; here a small call makes none
(docs/performance.md, "Small calls").

With ``yield_io_threads`` (Linux), the threads that carry calls to and from Python (gRPC
C++'s for the server and the front's own) run at ``SCHED_BATCH``: woken by a call's bytes,
they wait for a core instead of preempting the dispatcher in the middle of a call, whose
caches (and the GIL) it then keeps: fewer context switches a call on a host whose cores
are busy (docs/performance.md, "Knobs"). Elsewhere the setting does nothing.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, NamedTuple

import grpc

from lossd_server.limits import LimitMetrics, MessageWaits
from lossd_server.native.build import load

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Largest unary request the dispatcher runs itself (larger ones go to the pool)."""

SPILL_SECONDS = 0.005
"""A call the dispatcher has not taken within this long (it is busy with a call that
waits, or calls come faster than it runs them) goes to the thread pool."""

_OK = grpc.StatusCode.OK.value[0]
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]


class TlsPems(NamedTuple):
    """A TLS port's PEMs (grpc.ServerCredentials hides them; gRPC C++ needs them)."""

    private_key: bytes
    certificate_chain: bytes
    root_certificates: bytes | None = None
    require_client_auth: bool = False


class _Details(NamedTuple):  # grpc.HandlerCallDetails
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class _Aborted(Exception):
    """Raised by ``context.abort`` (grpcio raises a bare Exception)."""


class NativeContext(grpc.ServicerContext):  # type: ignore[misc]
    """The ``grpc.ServicerContext`` of one call on the native front."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.code_: grpc.StatusCode | None = None
        self.details_: str | None = None
        self.trailing: Sequence[tuple[str, str | bytes]] = ()
        self.aborted = False

    # -- the caller ---------------------------------------------------------------------
    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.metadata  # type: ignore[no-any-return]

    def peer(self) -> str:
        return self._call.peer  # type: ignore[no-any-return]

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        if deadline == float("inf"):
            return None
        return max(0.0, deadline - time.time())  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return self._call.is_active()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._call.add_done_callback(callback)
        return True

    def cancel(self) -> None:
        self.end_with_status(grpc.StatusCode.CANCELLED, "Cancelled")

    def end_with_status(self, code: grpc.StatusCode, message: str) -> None:
        """End the call now with a status, from any thread (a blocked read returns)."""
        self._call.finish(code.value[0], message, ())

    # -- the answer ---------------------------------------------------------------------
    def send_initial_metadata(self, initial_metadata: Any) -> None:
        raise NotImplementedError("the native front sends initial metadata with the answer")

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]
                              ) -> None:
        self.trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.trailing

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        if code == grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; returning UNKNOWN")
            code, details = grpc.StatusCode.UNKNOWN, ""
        self.code_, self.details_, self.aborted = code, details, True
        raise _Aborted()

    def abort_with_status(self, status: Any) -> None:
        self.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code_ = code

    def set_details(self, details: str) -> None:
        self.details_ = details

    def code(self) -> grpc.StatusCode | None:
        return self.code_

    def details(self) -> str | None:
        return self.details_

    def disable_next_message_compression(self) -> None:
        pass

    def status(self) -> tuple[int, str]:
        code = self.code_.value[0] if self.code_ is not None else _OK
        return code, self.details_ or ""


class NativeServer(grpc.Server):  # type: ignore[misc]
    """The ``grpc.Server`` surface lossd uses, on gRPC C++ (see the module docstring).

    ``thread_pool`` runs the calls the dispatcher does not; ``initializer`` runs once on
    the dispatcher thread (the pool's own initializer runs on its threads);
    ``maximum_concurrent_rpcs`` refuses calls beyond it RESOURCE_EXHAUSTED, as grpcio does.
    ``waits``: the bounds on calls whose request has not arrived (``max_receiving``,
    ``timeout``) and their metrics, which gRPC C++ enforces here for a call's first
    message with the words and policy of :class:`~lossd_server.limits.MessageWaits`
    (which still bounds a stream's later messages, read in Python). ``require_auth``
    (tokens configured): a call without an ``authorization`` header reaches the
    interceptors before its message is read, so they refuse it at once.
    ``yield_io_threads``: the server's gRPC and C++ threads run at ``SCHED_BATCH`` (see the
    module docstring; :attr:`io_yielding` says whether they do).
    """

    def __init__(self, thread_pool: futures.ThreadPoolExecutor, *,
                 options: Iterable[tuple[str, Any]] = (),
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 maximum_concurrent_rpcs: int | None = None,
                 initializer: Callable[[], None] | None = None,
                 can_inline: Callable[[], bool] = lambda: True,
                 inline_bytes: int = INLINE_BYTES,
                 waits: MessageWaits | None = None, require_auth: bool = False,
                 yield_io_threads: bool = False) -> None:
        self._module = load()
        self._yield_io = yield_io_threads
        self._waits = waits if waits is not None else MessageWaits()
        self._require_auth = require_auth
        self._options = [(name, value) for name, value in options]
        self._server: Any = None
        self._pool = thread_pool
        self._interceptors = tuple(interceptors)
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._limit = maximum_concurrent_rpcs
        self._initializer = initializer
        self._can_inline = can_inline
        self._inline_bytes = inline_bytes
        self._lock = threading.Lock()
        self._active = 0
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._stopped = threading.Event()

    # -- grpc.Server ------------------------------------------------------------------------
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, grpc.RpcMethodHandler]
                                       ) -> None:
        for method, handler in method_handlers.items():
            self._registered[f"/{service_name}/{method}"] = handler

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address)

    def add_secure_port(self, address: str, credentials: TlsPems) -> int:
        if not isinstance(credentials, TlsPems):
            raise TypeError("the native front takes its TLS credentials as TlsPems")
        return self._bind(address, credentials.private_key, credentials.certificate_chain,
                          credentials.root_certificates, credentials.require_client_auth)

    def start(self) -> None:
        if self._server is None:
            raise RuntimeError("add a port before start()")
        self._threads = [threading.Thread(target=self._dispatch, name="lossd-front",
                                          daemon=True),
                         threading.Thread(target=self._spill, name="lossd-front-spill",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, let those in flight finish within ``grace`` seconds (None:
        without limit), end the rest UNAVAILABLE; the event is set once the server has
        stopped (a handler still running then may run on, as on grpcio)."""
        def run() -> None:
            if self._server is not None:
                self._server.shutdown(1e9 if grace is None else float(grace))
            self._closing = True  # the dispatcher threads end with the queue
            self._stopped.set()

        if not self._stopped.is_set():
            threading.Thread(target=run, name="lossd-front-stop", daemon=True).start()
        return self._stopped

    @property
    def io_yielding(self) -> bool:
        """Whether the server's threads run at ``SCHED_BATCH`` (asked for, and started)."""
        return self._server is not None and bool(self._server.io_yielding())

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def drain(self) -> None:
        """End every call whose request has not arrived (UNAVAILABLE), as
        :meth:`MessageWaits.drain` does on grpcio; health checks stay to be answered."""
        if self._server is not None:
            self._server.end_unsent(
                grpc.StatusCode.UNAVAILABLE.value[0], "server is draining (shutting down) and "
                "the request message had not arrived; retry on another replica",
                "/grpc.health.v1.Health/")

    def _waits_event(self, method: str, reason: str | None, waiting: int) -> None:
        """From C++: a call waiting for its first message ended (``reason``), or how many
        wait now."""
        metrics = self._waits.metrics
        if reason is None:
            if metrics is not None:
                metrics.receiving.set(waiting)
            return
        label = LimitMetrics.method_label(method)
        log.info("ended a call waiting for its message",
                 extra={"method": label, "reason": reason})
        if metrics is not None:
            metrics.waits_ended.labels(label, reason).inc()

    # -- serving ----------------------------------------------------------------------------
    def _bind(self, address: str, *tls: Any) -> int:
        # gRPC C++ binds when it starts: one port, and C++ starts with it (calls wait in
        # C++ until start() starts the dispatcher).
        if self._server is not None:
            raise RuntimeError("the native front serves one port")
        server = self._module.Server(self._options, self._waits.max_receiving,
                                     self._waits.timeout, self._waits_event, self._yield_io)
        server.set_streaming([method for method, handler in self._registered.items()
                              if handler.request_streaming])
        if self._require_auth:
            server.require_auth()
        server.add_port(address, *tls)
        try:
            port = server.start()[0]
        except RuntimeError:
            return 0
        self._server = server
        if self._yield_io and not server.io_yielding() and sys.platform == "linux":
            log.warning("native front: could not start its threads at SCHED_BATCH; they run "
                        "at the process's policy")
        return int(port)

    def _dispatch(self) -> None:
        if self._initializer is not None:
            self._initializer()
        self._take(0.0, inline=True)

    def _spill(self) -> None:
        self._take(SPILL_SECONDS, inline=False)

    def _take(self, min_age: float, *, inline: bool) -> None:
        """Take calls until the server stops: the dispatcher (``inline``: it may run a call
        itself) every call at once, the spill thread those ``min_age`` old."""
        next_call = self._server.next_call
        while not self._closing:
            call = next_call(0.5, min_age)
            if call is None:
                continue
            try:
                self._handle(call, inline=inline)
            except Exception:  # an interceptor's or the pool's: this call's, not the server's
                log.exception("native front: a call failed before its handler ran")
                call.finish(_UNKNOWN, "internal error", ())
            del call

    def _handle(self, call: Any, *, inline: bool) -> None:
        details = _Details(call.method, call.metadata)
        found = self._registered.get(details.method) or self._find(details)
        handler = self._intercepted(details, found) if self._interceptors else found
        if handler is None:
            call.finish(grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!", ())
            return
        with self._lock:
            full = self._limit is not None and self._active >= self._limit
            if not full:
                self._active += 1
        if full:
            call.finish(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                        "Concurrent RPC limit exceeded!", ())
            return
        if (inline and found is not None and not found.request_streaming
                and not found.response_streaming
                and 0 <= call.request_size <= self._inline_bytes and self._can_inline()):
            self._run(call, handler)
        else:
            try:
                self._pool.submit(self._run, call, handler)
            except RuntimeError:  # the pool has shut down: so has the server
                with self._lock:
                    self._active -= 1
                call.finish(grpc.StatusCode.UNAVAILABLE.value[0], "server is shutting down",
                            ())

    def _find(self, details: _Details) -> grpc.RpcMethodHandler | None:
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _intercepted(self, details: _Details, found: grpc.RpcMethodHandler | None
                     ) -> grpc.RpcMethodHandler | None:
        # Built from the last interceptor back, as partials: a recursive closure would make
        # each call a reference cycle for the garbage collector.
        def handler(_details: _Details) -> grpc.RpcMethodHandler | None:
            return found

        continuation: Callable[[Any], Any] = handler
        for interceptor in reversed(self._interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        return continuation(details)

    def _run(self, call: Any, handler: grpc.RpcMethodHandler) -> None:
        """One call, as grpcio's server runs it: the handler's behaviour for its kind, its
        answer serialised, its status from ``abort``/``set_code`` or its exception."""
        context = NativeContext(call)
        response: Any = None
        try:
            request = self._request(call, handler, context)
            if handler.response_streaming:
                behavior = (handler.stream_stream if handler.request_streaming
                            else handler.unary_stream)
                self._stream_out(call, handler, behavior(request, context))
            else:
                behavior = (handler.stream_unary if handler.request_streaming
                            else handler.unary_unary)
                answer = behavior(request, context)
                if context.code_ is None or context.code_ == grpc.StatusCode.OK:
                    serialize = handler.response_serializer
                    response = serialize(answer) if serialize is not None else answer
            code, details = context.status()
        except Exception as exc:
            code, details = self._failed(context, exc)
            response = None
        finally:
            with self._lock:
                self._active -= 1
        call.finish(code, details, context.trailing, response)

    def _request(self, call: Any, handler: grpc.RpcMethodHandler, context: NativeContext
                 ) -> Any:
        deserialize = handler.request_deserializer
        if handler.request_streaming:
            return _messages(call, deserialize)
        # (Not read yet for a call handed over before its message: a refusal's, see
        # ``require_auth``.)
        raw = call.read() if call.streaming else call.take_request()
        if raw is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f'"{call.method}" requires exactly one request message.')
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:
            log.exception("Exception deserializing request!")
            context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")

    def _stream_out(self, call: Any, handler: grpc.RpcMethodHandler,
                    responses: Iterator[Any]) -> None:
        serialize = handler.response_serializer
        try:
            for response in responses:
                if not call.write(serialize(response) if serialize is not None else response):
                    break  # the caller went away: the generator is closed below
                del response
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _failed(context: NativeContext, exc: Exception) -> tuple[int, str]:
        """The status of a call whose handler raised: its ``abort``'s, or grpcio's
        UNKNOWN "Exception calling application" (its code and details when set)."""
        if context.aborted:
            return context.status()
        try:
            details = f"Exception calling application: {exc}"
        except Exception:
            details = "Calling application raised unprintable Exception!"
        log.exception(details)
        code = context.code_.value[0] if context.code_ is not None else _UNKNOWN
        return code, context.details_ or details


def _messages(call: Any, deserialize: Callable[[bytes], Any] | None) -> Iterator[Any]:
    """A request stream's messages, each as it arrives (the first read by C++ already,
    unless the method is request-streaming)."""
    raw = call.read() if call.streaming else call.take_request()
    while raw is not None:
        message = deserialize(raw) if deserialize is not None else raw
        del raw  # nothing of a message is held while the next is awaited
        yield message
        del message
        raw = call.read()
