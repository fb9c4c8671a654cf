"""Typed errors. Every error the client raises from a call derives from ``LossdError``::

    LossdError                  .code (grpc.StatusCode), .message (the server's text),
    │                           .attempts (the most tries the retry policy allowed),
    │                           .retry_after (seconds the server asked to wait, or None)
    ├── InvalidArgument         bad input: the message names the field and the problem
    ├── ResourceExhausted       too large, out of memory, or the server is at capacity:
    │                           then .retry_after says when to try again
    ├── Unauthenticated         missing or wrong token
    ├── PermissionDenied
    ├── NotFound
    ├── FailedPrecondition      the server is not set up for the call (e.g. shared memory
    │                           off, or its descriptor socket not reachable from here)
    ├── Unavailable             server unreachable or draining; raised once the client's
    │                           retries (UNAVAILABLE only, with backoff) ran out; an address
    │                           that answers in HTTP/1 (a metrics port) is named as such
    ├── DeadlineExceeded        the call's timeout passed
    ├── Cancelled
    ├── Unimplemented
    └── InternalError           a server fault (the server logs the details)

Catch the root to handle them all, or a leaf for one case::

    try:
        client.evaluate(logits, targets)
    except lossd.InvalidArgument as exc:
        print(exc.code, exc.message)
"""

from __future__ import annotations

import grpc

from lossd._channel import DEFAULT_PORT


class LossdError(Exception):
    """Root of lossd's errors; carries the gRPC status code and the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 attempts: int = 1, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.attempts = attempts
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(LossdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(LossdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(LossdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LossdError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(LossdError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(LossdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(LossdError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LossdError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LossdError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(LossdError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LossdError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LossdError]] = {
    cls.code: cls
    for cls in (InvalidArgument, ResourceExhausted, Unauthenticated, PermissionDenied,
                NotFound, FailedPrecondition, Unavailable, DeadlineExceeded, Cancelled,
                Unimplemented, InternalError)
}


RETRY_AFTER = "retry-after-ms"  # the server's hint, in trailing metadata

HTTP1_ANSWERS = ("Trying to connect an http1.x server", "Failed parsing HTTP/2",
                 "Expected SETTINGS frame as the first frame")
"""gRPC's words when the address answers in HTTP/1 (its framing error on the first bytes)."""
METRICS_PORT = 9464
"""``lossd serve --metrics-port``'s default: the HTTP/1 server a caller most likely hit."""


def _likely_cause(details: str) -> str:
    """``details`` with the mistake it most likely reveals named first."""
    if any(marker in details for marker in HTTP1_ANSWERS):
        return (f"this looks like an HTTP server, not lossd's gRPC port: e.g. lossd's metrics "
                f"port ({METRICS_PORT} by default); the gRPC port is {DEFAULT_PORT} unless "
                "`lossd serve --port` says otherwise (its 'lossd serving' log line names the "
                f"address). gRPC said: {details}")
    return details


def _trailer(exc: grpc.RpcError, key: str) -> str | None:
    try:
        trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    except Exception:  # a call that never reached a server may have none
        trailers = None
    for k, v in trailers or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def from_rpc_error(exc: grpc.RpcError, *, retry_attempts: int = 1) -> LossdError:
    """Translate a grpc error (which is also a ``grpc.Call``) into a typed LossdError.

    ``retry_attempts``: the most attempts the channel's retry policy allowed the call;
    an UNAVAILABLE error then says the retries ran out. RESOURCE_EXHAUSTED carries the
    server's ``retry-after-ms`` hint as ``retry_after`` (seconds).
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, LossdError)
    retry_ms = _number(_trailer(exc, RETRY_AFTER))
    message = _likely_cause(details) if details else code.name
    attempts = 1
    if code == grpc.StatusCode.UNAVAILABLE and retry_attempts > 1:
        attempts = retry_attempts
        message += (f" (retries exhausted: UNAVAILABLE is retried up to {retry_attempts} "
                    "attempts with exponential backoff)")
    return cls(message, code=code, attempts=attempts,
               retry_after=None if retry_ms is None else retry_ms / 1000.0)


_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The StatusCode of a status in gRPC's numbering (UNKNOWN for one it does not know)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(code: int, message: str, retry_after_ms: int = 0) -> LossdError:
    """The typed error for a status sent inside a message (a shared-memory session's
    answers): ``code`` in gRPC's numbering, ``retry_after_ms`` 0 for none."""
    status = status_code(code)
    return _BY_CODE.get(status, LossdError)(
        message, code=status, retry_after=retry_after_ms / 1000.0 if retry_after_ms else None)
