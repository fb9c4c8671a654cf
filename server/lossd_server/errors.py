"""Every error the server raises, and the one mapping from an error to the status it ends with.

A leaf: this module imports only grpc and the standard library, so any module can raise
without pulling in validation or the loss catalogue.

The tree::

    Exception
    ├── RequestError        a bad request: the field at fault and the problem
    │   │                   (INVALID_ARGUMENT unless it carries another code)
    │   └── MalformedMessage   bytes that are no protobuf message (field ``request``)
    ├── LossFailed          a loss function raised or returned a bad output (INTERNAL)
    └── Refused             a call the server will not serve now: busy, too large, out of
                            memory, unauthenticated, draining, cancelled, deadline passed
    ValueError
    ├── RegistrationError   a loss declaration that cannot be served (at registration)
    └── PluginError         a plugin that cannot be loaded (at start)

:func:`status_of` maps an error to its :class:`Status` (code, message, trailers, how to log
it); every front's abort path (:func:`abort`, through :func:`unary_errors` and
:func:`stream_errors`), the gate, the call metrics and the shared-memory session's in-band
answers use it. Anything else is an internal error: it answers the generic
``internal error; see the server log``, never the exception's own text.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

log = logging.getLogger("lossd_server.errors")

RETRY_AFTER = "retry-after-ms"
"""The trailer (whole milliseconds) with which a refusal says when to try again."""

INTERNAL_MESSAGE = "internal error; see the server log"

T = TypeVar("T")


class RequestError(Exception):
    """A bad request: ``field`` names what is wrong, ``problem`` says how."""

    def __init__(self, field: str, problem: str,
                 code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.code = code


class MalformedMessage(RequestError):
    """Request bytes that do not parse as the protobuf message they claim to be."""

    def __init__(self, problem: str) -> None:
        super().__init__("request", f"malformed protobuf: {problem}")


class LossFailed(Exception):
    """A loss function (built-in or plugin) raised or returned a bad output: INTERNAL.

    The message names the loss and what went wrong, never the function's own exception
    text (that goes to the server log with its traceback, where it happened).
    """

    code = grpc.StatusCode.INTERNAL

    def __init__(self, loss: str, problem: str) -> None:
        super().__init__(f"loss {loss!r}: {problem}")
        self.loss = loss
        self.problem = problem


class Refused(Exception):
    """A call the server will not serve: ``code``, ``message`` and trailing metadata.

    ``reason`` is the metrics label (see ``limits.REJECT_REASONS`` and
    ``limits.DROP_REASONS``).
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str,
                 trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.trailers = tuple(trailers)


class RegistrationError(ValueError):
    """A loss declaration that cannot be served (bad name, option, input or function)."""


class PluginError(ValueError):
    """A plugin that cannot be loaded; the message names the plugin and the problem."""


def retry_after(seconds: float) -> tuple[tuple[str, str], ...]:
    """The ``retry-after-ms`` trailer (whole milliseconds, at least 1)."""
    return ((RETRY_AFTER, str(max(1, math.ceil(seconds * 1000)))),)


@dataclass(frozen=True)
class Status:
    """How a call that raised ends: its gRPC ``code``, ``message`` and ``trailers``, and
    the level at which it is logged where it is answered (None: logged where it was
    raised, with its traceback)."""

    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()
    log_level: int | None = logging.INFO

    @property
    def code_number(self) -> int:
        """The status code's number, as in-band answers carry it (``INVALID_ARGUMENT``: 3)."""
        number: int = self.code.value[0]
        return number

    @property
    def retry_after_ms(self) -> int:
        """The ``retry-after-ms`` trailer's value; 0 when there is none."""
        retry = dict(self.trailers).get(RETRY_AFTER)
        return int(retry) if retry else 0


def status_of(exc: BaseException) -> Status:
    """The status ``exc`` ends a call with (see the module docstring).

    >>> status_of(RequestError("targets", "missing")).message
    'targets: missing'
    >>> status_of(KeyError("secret")).message
    'internal error; see the server log'
    """
    if isinstance(exc, RequestError):
        return Status(exc.code, str(exc))
    if isinstance(exc, Refused):
        return Status(exc.code, exc.message, exc.trailers)
    if isinstance(exc, LossFailed):
        return Status(exc.code, str(exc), log_level=None)
    return Status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, log_level=logging.ERROR)


def log_error(exc: BaseException, status: Status) -> None:
    """Log ``exc`` answered as ``status``: a rejection or refusal in one line, an internal
    error with its traceback."""
    if status.log_level is None:
        return
    if isinstance(exc, Refused):
        log.info("refused: %s", exc.message, extra={"code": exc.code.name,
                                                     "reason": exc.reason})
    elif isinstance(exc, RequestError):
        log.info("rejected: %s", exc)
    else:
        log.error("internal error", exc_info=exc)


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call of ``context`` with the status of ``exc`` (logged, trailers set)."""
    status = status_of(exc)
    log_error(exc, status)
    if status.trailers:
        context.set_trailing_metadata(status.trailers)
    context.abort(status.code, status.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def unary_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """A servicer method (``self, request, context``) whose errors end its call through
    :func:`abort`."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except Exception as exc:
            abort(context, exc)
    return wrapper


def stream_errors(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """:func:`unary_errors` for response-streaming methods."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            abort(context, exc)
    return wrapper
