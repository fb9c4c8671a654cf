"""Free loopback ports for the servers a benchmark starts (no imports beyond the standard
library, so any bench process, a peer's client included, can use it)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
