"""Typed errors. Every error the client raises from a call derives from ``LossdError``::

    LossdError                  .code (grpc.StatusCode), .message (the server's text)
    ├── InvalidArgument         bad input: the message names the field and the problem
    ├── ResourceExhausted       too large, or the server is at capacity (retry later)
    ├── Unauthenticated         missing or wrong token
    ├── PermissionDenied
    ├── NotFound
    ├── Unavailable             server unreachable or draining (retried where safe)
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


class LossdError(Exception):
    """Root of lossd's errors; carries the gRPC status code and the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

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
                NotFound, Unavailable, DeadlineExceeded, Cancelled, Unimplemented,
                InternalError)
}


def from_rpc_error(exc: grpc.RpcError) -> LossdError:
    """Translate a grpc error (which is also a ``grpc.Call``) into a typed LossdError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, LossdError)
    return cls(details or code.name, code=code)
