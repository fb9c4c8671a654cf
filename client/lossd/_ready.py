"""``wait_for_ready``'s I/O-free pieces, shared by ``LossClient`` and ``AsyncLossClient``.

The server is ready when the channel connects and the standard gRPC health service answers
SERVING (``lossd serve`` turns it so once a warm-up evaluation passed; the health service
stays open without a token). A server that has no health service (one behind a proxy
that does not route it) counts as ready once it answers ListLosses. The client does not
depend on grpcio-health-checking: the two messages are small enough to write by hand.
"""

from __future__ import annotations

import math
import time

import grpc

from lossd._errors import DeadlineExceeded

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_REQUEST = b""
"""A serialised ``HealthCheckRequest(service="")``: the whole server's health."""
SERVING = b"\x08\x01"
"""A serialised ``HealthCheckResponse(status=SERVING)``: field 1, varint 1."""
POLL_SECONDS = 0.1
"""The wait between health checks while the server answers NOT_SERVING (warming up):
short against a warm-up of seconds, long against a check's microseconds."""
FALL_BACK, AGAIN, RAISE = "fall back", "again", "raise"
"""``ReadyWait.failed``'s verdicts."""


class ReadyWait:
    """One ``wait_for_ready(timeout)``: the time left (``timeout`` None: no limit) and what
    the server last answered; the clients make the calls and follow its verdicts."""

    def __init__(self, target: str, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        self.last = "could not connect"
        self._end = math.inf if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left (at least 0), or None without a limit."""
        return None if self.timeout is None else max(0.0, self._end - time.monotonic())

    def answered(self, reply: bytes) -> bool:
        """Whether a serialised HealthCheckResponse says SERVING (else it is noted)."""
        if reply == SERVING:
            return True
        self.last = "the server's health is NOT_SERVING (warming up or draining)"
        return False

    def failed(self, exc: grpc.RpcError) -> str:
        """What a failed health check means: ``FALL_BACK`` (no health service: ask
        ListLosses), ``AGAIN`` (not reachable yet: check again) or ``RAISE`` (a real
        error, e.g. a wrong token's)."""
        code = exc.code() if hasattr(exc, "code") else None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return FALL_BACK
        if code == grpc.StatusCode.UNAVAILABLE:
            self.last = f"unavailable ({exc.details() if hasattr(exc, 'details') else ''})"
            return AGAIN
        return AGAIN if code == grpc.StatusCode.DEADLINE_EXCEEDED else RAISE

    def pause(self) -> float:
        """The wait before the next check, ``POLL_SECONDS`` or what is left; raises
        :class:`DeadlineExceeded`, saying what the server last answered, once none is."""
        if time.monotonic() >= self._end:
            raise DeadlineExceeded(f"{self.target} not ready within {self.timeout:g} s: "
                                   f"{self.last}")
        left = self.left()
        return POLL_SECONDS if left is None else min(POLL_SECONDS, left)

