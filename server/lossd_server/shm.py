"""Shared-memory regions for co-located callers (like Triton's system shared memory).

A caller on the same host, or in the same pod, writes its tensors into a POSIX
shared-memory object and sends only region names, offsets and sizes. Safety:

- regions live in a *session* (one SharedMemorySession stream); requests quote the session
  id, an unguessable token, so one caller cannot name another's regions;
- every reference is checked against the size the region was registered with, and the
  object must be at least that large when it is mapped;
- keys are plain names in ``/dev/shm`` (no paths);
- unregistering is explicit, and a session's regions are released when its stream ends
  (the caller closed it, crashed or went away).

A mapped region stays valid while a request still uses it: unmapping waits for the last
view to go.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lossd_server.validate import RequestError

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


@dataclass
class Region:
    name: str
    key: str
    size: int
    mapping: mmap.mmap

    def close(self) -> None:
        # While a request still views it, the mapping goes with the last view instead.
        with contextlib.suppress(BufferError):
            self.mapping.close()


@dataclass
class Session:
    id: str
    regions: dict[str, Region] = field(default_factory=dict)


class SharedMemoryRegistry:
    """All sessions of one server. Thread-safe."""

    def __init__(self, root: Path = Path("/dev/shm"), *, max_regions: int = 64) -> None:
        self.root = root
        self.max_regions = max_regions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open_session(self) -> Session:
        session = Session(secrets.token_hex(16))
        with self._lock:
            self._sessions[session.id] = session
        return session

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            for region in session.regions.values():
                region.close()

    def register(self, session: Session, name: str, key: str, byte_size: int) -> None:
        if not name:
            raise RequestError("register.name", "missing")
        if not _KEY.match(key):
            raise RequestError("register.key", f"{key!r} is not a plain shared-memory name")
        if byte_size <= 0:
            raise RequestError("register.byte_size", f"must be positive, got {byte_size}")
        with self._lock:
            if name in session.regions:
                raise RequestError("register.name", f"{name!r} is already registered; "
                                                    "unregister it first")
            if len(session.regions) >= self.max_regions:
                raise RequestError("register", f"at most {self.max_regions} regions a session")
        try:
            fd = os.open(self.root / key, os.O_RDWR)
        except FileNotFoundError:
            raise RequestError("register.key", f"no shared-memory object {key!r}") from None
        except OSError as exc:
            raise RequestError("register.key", f"cannot open {key!r}: {exc.strerror}") from None
        try:
            actual = os.fstat(fd).st_size
            if actual < byte_size:
                raise RequestError("register.byte_size", f"{byte_size} bytes asked, but "
                                                         f"{key!r} holds {actual}")
            mapping = mmap.mmap(fd, byte_size)
        finally:
            os.close(fd)
        with self._lock:
            session.regions[name] = Region(name, key, byte_size, mapping)

    def unregister(self, session: Session, name: str) -> None:
        with self._lock:
            region = session.regions.pop(name, None)
        if region is None:
            raise RequestError("unregister", f"no region {name!r} in this session")
        region.close()

    def view(self, session_id: str, region: str, offset: int, byte_size: int,
             field: str) -> memoryview:
        """The bytes a reference names, checked against the region's registered size."""
        with self._lock:
            session = self._sessions.get(session_id)
            found = session.regions.get(region) if session is not None else None
        if session is None:
            raise RequestError("shared_memory_session", "unknown or closed session")
        if found is None:
            raise RequestError(f"{field}.region", f"no region {region!r} in this session")
        if offset < 0 or byte_size < 0 or offset + byte_size > found.size:
            raise RequestError(field, f"bytes [{offset}, {offset + byte_size}) outside region "
                                      f"{region!r} of {found.size} bytes")
        return memoryview(found.mapping)[offset:offset + byte_size]
