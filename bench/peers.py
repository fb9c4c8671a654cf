"""Helpers for the servers a benchmark starts, lossd's and the peers': free loopback ports
and stopping a server's process group. Standard library only, so any bench process (a
peer's client included, which must not load lossd's protos) can use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], wait: float) -> None:
    """SIGTERM ``proc``'s process group (started with ``start_new_session``), SIGKILL it
    after ``wait`` seconds, and reap ``proc``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
