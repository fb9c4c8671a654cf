"""The client's transport for unary Evaluate calls: grpcio, or gRPC C++ (``native``).

grpcio's Python call path costs a small call more CPU in the client than lossd's server
spends answering it; a call through gRPC C++ (``lossd/native/transport.cpp``, the GIL released
from sending the request to receiving the answer) costs a fraction of that, and lowers
the latency of every call. The native channel is configured from the same options as
grpcio's (message limits, the service config with its retries and load balancing,
keepalive), so a call behaves the same: the same deadline, retries on UNAVAILABLE, status
and trailing metadata, raised as an ``RpcError`` like grpcio's.

It is opt-in (``transport="native"``, or ``"auto"``: native where it builds; the default
is grpcio, or ``$LOSSD_TRANSPORT``). It carries plaintext channels (a bearer token too);
a TLS channel, a channel the caller
built, and the clients of a process forked after a native channel was opened (gRPC C++
does not survive a fork) stay on grpcio. A blocked call still ends on Ctrl-C. Its module
is built on first use where a C++ compiler and gRPC C++ with pkg-config are installed
(see :mod:`lossd.native`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from lossd._errors import status_code
from lossd.native import TRANSPORT as MODULE
from lossd.native import NativeUnavailable

ENV_TRANSPORT = "LOSSD_TRANSPORT"
TRANSPORTS = ("auto", "native", "grpcio")
DEFAULT = "grpcio"  # until the native transport has run in production as long as grpcio

# The process whose gRPC C++ has started (its first native channel): a child forked from it
# inherits gRPC C++'s state without its threads, so clients there use grpcio.
_started_in: int | None = None

Metadata = tuple[tuple[str, str | bytes], ...]  # as grpcio gives it: bytes for -bin keys


class NativeRpcError(grpc.RpcError):  # type: ignore[misc]
    """A native call's error status, read as grpcio's ``RpcError`` (``code()``,
    ``details()``, ``trailing_metadata()``)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def initial_metadata(self) -> Metadata:
        return ()

    def debug_error_string(self) -> str:
        return f"native transport: {self._code.name}: {self._details}"


class NativeChannel:
    """Unary calls over one gRPC C++ channel (a connection of its own), opened with
    grpcio's channel ``options`` and sending ``metadata`` (the bearer token) on each."""

    def __init__(self, address: str, options: Sequence[tuple[str, Any]],
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        global _started_in
        if _started_in is None:
            _started_in = os.getpid()
        self._channel = MODULE.load().Channel(address, [
            (name, int(value) if isinstance(value, bool) else value)
            for name, value in options])
        self._metadata = metadata

    def unary_unary(self, method: str, response_deserializer: Callable[[bytes], Any]
                    ) -> Callable[..., Any]:
        """A callable as grpcio's ``channel.unary_unary(method, request_serializer=None,
        response_deserializer=...)``: ``call(request_bytes, timeout=None)``."""
        native, metadata = self._channel.call, self._metadata

        def call(request: bytes, timeout: float | None = None) -> Any:
            code, details, trailing, response = native(
                method, request, -1.0 if timeout is None else timeout, metadata)
            if code:
                raise NativeRpcError(status_code(code), details, trailing)
            return response_deserializer(response)

        return call

    def close(self) -> None:
        """No more calls (calls in flight finish first)."""
        self._channel.close()


def choose(transport: str | None, *, custom_channel: bool, tls: bool,
           env: Mapping[str, str] | None = None) -> str:
    """``native`` or ``grpcio`` for a client's unary Evaluate calls. ``transport`` None:
    ``$LOSSD_TRANSPORT``, else ``grpcio``. ``native`` asked for where it cannot serve raises
    :class:`NativeUnavailable` (or ValueError) saying why; ``auto`` falls back to grpcio."""
    env = os.environ if env is None else env
    asked = transport if transport is not None else env.get(ENV_TRANSPORT) or DEFAULT
    if asked not in TRANSPORTS:
        raise ValueError(f"transport={asked!r}: one of {', '.join(TRANSPORTS)}")
    if asked == "grpcio":
        return "grpcio"
    forked = _started_in is not None and _started_in != os.getpid()
    if custom_channel or tls or forked:
        if asked == "native":
            raise ValueError("transport='native' carries plaintext channels the client opens "
                             "itself, in a process not forked after one was opened; this "
                             "one is " + ("the caller's" if custom_channel else "TLS"
                                          if tls else "in a forked child"))
        return "grpcio"
    try:
        MODULE.load()
    except NativeUnavailable:
        if asked == "native":
            raise
        return "grpcio"
    return "native"
