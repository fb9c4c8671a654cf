"""Shared-memory regions for co-located callers, safe by construction.

A caller on the same host, or in the same pod, puts its tensors in shared memory and sends
only region names, offsets and sizes. What makes that safe for the server and for every
other caller:

- **Sealed memfds only.** A region is a memfd the caller created and sealed with
  ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``, passed to the server over a Unix-domain
  socket (SCM_RIGHTS). Before mapping, the server checks with ``F_GET_SEALS`` that the
  object can never change size (seals are never removed, and ``F_SEAL_SEAL`` freezes the
  set), that it is a plain shmem file (hugetlbfs pages may be missing at fault time) and
  that the server may write to it. A mapping can then never run past the object's end,
  the cause of the SIGBUS a truncated ``/dev/shm`` object raises; plain ``/dev/shm``
  names cannot be sealed after the fact and are refused.
- **Sessions.** Regions live in a session (one SharedMemorySession stream) whose id, an
  unguessable token, is needed both to pass a descriptor and to use a region: one caller
  cannot name another's regions. A session's regions and unclaimed descriptors are
  released when its stream ends (the caller closed it, crashed or went away).
- **Bounds.** Every reference is checked against the region's mapped size; a session
  holds at most ``max_regions`` regions, and this process maps at most ``max_bytes``
  (pages the server faults in are charged to its memory) and holds at most
  ``max_descriptors`` shared-memory descriptors.
- **Lifetimes.** Descriptors are closed as soon as they are mapped or refused; a mapping
  stays valid while a request still views it and goes with its last view.

Each server process has its own registry and its own descriptor socket
(:class:`DescriptorSocket`), announced in each session's first response, so a
descriptor always reaches the process holding the session.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import resource
import secrets
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lossd_server.errors import RequestError
from lossd_server.logs import shown

log = logging.getLogger(__name__)

F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not exported by Python's fcntl
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
WRITE_SEALS = fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE
TMPFS_MAGIC = 0x01021994
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class _Statfs(ctypes.Structure):
    # struct statfs starts with f_type (__fsword_t, a long) on every 64-bit Linux ABI.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(None, use_errno=True)


def _fs_type(fd: int) -> int:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(buf.f_type) & 0xFFFFFFFF


def check_memfd(fd: int) -> int:
    """The size of ``fd`` if it is a sealed shmem memfd the server may map and write;
    else RequestError naming what is wrong."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError("descriptor", "not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RequestError("descriptor", "not a memfd (the file does not take seals)") from None
    if _fs_type(fd) != TMPFS_MAGIC:
        raise RequestError("descriptor", "not a shmem memfd (hugetlbfs memfds are refused: "
                                         "their pages may be missing when touched)")
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        missing = [name for name, bit in (("F_SEAL_SHRINK", fcntl.F_SEAL_SHRINK),
                                          ("F_SEAL_GROW", fcntl.F_SEAL_GROW),
                                          ("F_SEAL_SEAL", fcntl.F_SEAL_SEAL))
                   if not seals & bit]
        raise RequestError("descriptor", f"not sealed with {' | '.join(missing)}: the object "
                                         "could change size under the server's mapping "
                                         "(create it with MFD_ALLOW_SEALING and add "
                                         "F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)")
    if seals & WRITE_SEALS:
        raise RequestError("descriptor", "write-sealed: the server writes per-sample losses "
                                         "into regions; leave F_SEAL_WRITE and "
                                         "F_SEAL_FUTURE_WRITE off")
    if st.st_size <= 0:
        raise RequestError("descriptor", "the memfd is empty")
    return int(st.st_size)


@dataclass
class Region:
    name: str
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
    pending: dict[str, int] = field(default_factory=dict)  # descriptor handle -> fd
    closed: bool = False


class SharedMemoryRegistry:
    """All sessions of one server process. Thread-safe."""

    def __init__(self, *, max_regions: int = 64, max_bytes: int = 4 << 30,
                 max_descriptors: int | None = None) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        # Each region holds a descriptor (Python's mmap keeps a duplicate), as does each
        # descriptor passed and not registered yet: bounded per process, so callers
        # cannot run the server out of descriptors (it could not accept connections).
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_descriptors = max_descriptors if max_descriptors is not None else (
            min(1024, soft // 4) if soft != resource.RLIM_INFINITY else 1024)
        self._sessions: dict[str, Session] = {}
        self._mapped = 0
        self._descriptors = 0
        self._lock = threading.Lock()

    @property
    def mapped_bytes(self) -> int:
        return self._mapped

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def open_session(self) -> Session:
        session = Session(secrets.token_hex(16))
        with self._lock:
            self._sessions[session.id] = session
        return session

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            session.closed = True
            regions, session.regions = list(session.regions.values()), {}
            pending, session.pending = list(session.pending.values()), {}
            self._mapped -= sum(r.size for r in regions)
            self._descriptors -= len(regions) + len(pending)
        for region in regions:
            region.close()
        for fd in pending:
            os.close(fd)

    def holds(self, session_id: str) -> bool:
        return session_id in self._sessions

    def deposit(self, session_id: str, fd: int) -> str:
        """Keep a descriptor passed for ``session_id`` until a RegisterRegion claims it;
        returns its handle. Takes ownership of ``fd``: it is closed on any error."""
        try:
            check_memfd(fd)
            with self._lock:
                session = self._sessions.get(session_id)
                if session is None or session.closed:
                    raise RequestError("session", "unknown or closed session (descriptors "
                                                  "go to the socket its stream announced)")
                if len(session.pending) >= self.max_regions:
                    raise RequestError("descriptor", f"{len(session.pending)} descriptors "
                                                     "passed and not registered yet; register "
                                                     "or close them first")
                if self._descriptors >= self.max_descriptors:
                    raise RequestError("descriptor", f"this server process holds "
                                                     f"{self._descriptors} shared-memory "
                                                     "descriptors, its most; retry later",
                                       grpc.StatusCode.RESOURCE_EXHAUSTED)
                handle = secrets.token_hex(8)
                session.pending[handle] = fd
                self._descriptors += 1
            return handle
        except BaseException:
            os.close(fd)
            raise

    def register(self, session: Session, name: str, byte_size: int, *, descriptor: str = "",
                 key: str = "") -> None:
        if not name:
            raise RequestError("register.name", "missing")
        if key:
            raise RequestError("register.key", "plain /dev/shm names are refused: the object "
                                               "could be truncated under the server's mapping, "
                                               "which crashes it; pass a sealed memfd over the "
                                               "session's descriptor socket instead (the lossd "
                                               "client does: client.shared_memory(size))")
        if not descriptor:
            raise RequestError("register.descriptor", "missing: pass a sealed memfd to the "
                                                      "session's descriptor socket first")
        if byte_size <= 0:
            raise RequestError("register.byte_size", f"must be positive, got {byte_size}")
        with self._lock:
            if name in session.regions:
                raise RequestError("register.name", f"{shown(name)} is already registered; "
                                                    "unregister it first")
            if len(session.regions) >= self.max_regions:
                raise RequestError("register", f"at most {self.max_regions} regions a session")
            if descriptor not in session.pending:
                raise RequestError("register.descriptor", f"no descriptor {shown(descriptor)} "
                                                          "passed for this session (or already "
                                                          "registered)")
            if self._mapped + byte_size > self.max_bytes:
                raise RequestError("register.byte_size",
                                   f"{byte_size} bytes would bring this server process to "
                                   f"{self._mapped + byte_size} mapped bytes; it maps at most "
                                   f"{self.max_bytes} (--shm-max-mb)",
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
            fd = session.pending.pop(descriptor)
            self._mapped += byte_size  # reserved; given back below if mapping fails
        try:
            size = os.fstat(fd).st_size
            if byte_size > size:
                raise RequestError("register.byte_size", f"{byte_size} bytes asked, but the "
                                                         f"memfd holds {size}")
            try:
                mapping = mmap.mmap(fd, byte_size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise RequestError("register.descriptor", f"cannot map the memfd "
                                                          f"read-write: {exc.strerror}") from None
        except BaseException:
            with self._lock:
                self._mapped -= byte_size
                self._descriptors -= 1
            raise
        finally:
            os.close(fd)  # (the mapping keeps a duplicate of its own)
        with self._lock:
            if session.closed:  # closed while mapping: nothing may outlive the session
                self._mapped -= byte_size
                self._descriptors -= 1
                mapping.close()
                raise RequestError("session", "closed")
            session.regions[name] = Region(name, byte_size, mapping)

    def unregister(self, session: Session, name: str) -> None:
        with self._lock:
            region = session.regions.pop(name, None)
            if region is not None:
                self._mapped -= region.size
                self._descriptors -= 1
        if region is None:
            raise RequestError("unregister", f"no region {shown(name)} in this session")
        region.close()

    def view(self, session_id: str, region: str, offset: int, byte_size: int,
             field: str) -> memoryview:
        """The bytes a reference names, checked against the region's mapped size."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise RequestError("shared_memory_session", "unknown or closed session; a "
                                   "session lives in the server process serving its "
                                   "SharedMemorySession stream, so evaluate on that stream "
                                   "(SharedMemoryRequest.evaluate)")
            found = session.regions.get(region)
            if found is None:
                raise RequestError(f"{field}.region", f"no region {shown(region)} in this session")
            if offset < 0 or byte_size < 0 or offset + byte_size > found.size:
                raise RequestError(field, f"bytes [{offset}, {offset + byte_size}) outside "
                                          f"region {shown(region)} of {found.size} bytes")
            # Made under the lock, so an unregister cannot close the mapping in between.
            return memoryview(found.mapping)[offset:offset + byte_size]


# ---------------------------------------------------------------------------------------
# The descriptor socket

_MAX_CONNECTIONS = 64
_CONNECTION_SECONDS = 5.0
_socket_numbers = itertools.count()


class DescriptorSocket:
    """A Unix-domain SOCK_SEQPACKET socket that takes memfds for the registry's sessions.

    One message per connection: the session id as the payload and exactly one descriptor
    (SCM_RIGHTS); the answer is ``ok <handle>`` or ``error <problem>``. Anything else
    (no descriptor, several, another kind of file, an unknown session) is answered with an
    error and every descriptor received is closed. One thread serves all connections
    without blocking; a connection that sends nothing is closed after a few seconds.

    The socket file is ``<directory>/lossd-shm-<pid>-<n>.sock``, mode 0660: per process,
    so several server processes (and servers) share a directory.
    """

    def __init__(self, registry: SharedMemoryRegistry, directory: Path) -> None:
        self.registry = registry
        self.directory = directory
        self.path = directory / f"lossd-shm-{os.getpid()}-{next(_socket_numbers)}.sock"
        if len(os.fsencode(self.path)) >= 108:
            raise ValueError(f"--shm-socket-dir: {self.path} is too long for a Unix socket "
                             "(at most 107 bytes)")
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._wake: tuple[int, int] | None = None  # wakes the serving thread to stop
        self._thread = threading.Thread(target=self._serve, name="lossd-shm-fds", daemon=True)

    def start(self) -> DescriptorSocket:
        """Bind the socket file (replacing a stale one) and serve it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # left by an earlier process that had the same pid
            sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o660)
            sock.listen(_MAX_CONNECTIONS)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"--shm-socket-dir: cannot serve the descriptor socket "
                                     f"{self.path}: {exc.strerror} (give it a writable "
                                     "directory, or --no-shared-memory)") from None
        self._sock = sock
        self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and remove the socket file (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
            self._thread.join(10)
            for fd in self._wake:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _serve(self) -> None:
        assert self._sock is not None and self._wake is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake[0], selectors.EVENT_READ, None)
        open_since: dict[socket.socket, float] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._sock:
                        self._accept(sel, open_since)
                    elif isinstance(key.fileobj, socket.socket):
                        conn = key.fileobj
                        self._answer(conn)
                        sel.unregister(conn)
                        del open_since[conn]
                        conn.close()
                now = time.monotonic()
                for conn in [c for c, t in open_since.items() if now - t > _CONNECTION_SECONDS]:
                    sel.unregister(conn)
                    del open_since[conn]
                    conn.close()
        except Exception:  # never let the thread die silently: shared memory would stop
            log.exception("descriptor socket failed; shared memory is off from now on")
        finally:
            for conn in open_since:
                conn.close()
            sel.close()
            self._sock.close()

    def _accept(self, sel: selectors.BaseSelector, open_since: dict[socket.socket, float]
                ) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: refuse this one, keep serving
            log.warning("descriptor socket: accept failed: %s", exc.strerror)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)
            return
        if len(open_since) >= _MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, None)
        open_since[conn] = time.monotonic()

    def _answer(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            msg, fds, flags, _ = socket.recv_fds(conn, 256, 4, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("descriptor socket: receive failed: %s", exc.strerror)
            return
        try:
            reply = self._deposit(msg, fds, flags)
        except Exception:
            log.exception("descriptor socket: deposit failed")
            reply = "error descriptor: internal error; see the server log"
        finally:
            for fd in fds:  # what the registry did not take
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(reply.encode())

    def _deposit(self, msg: bytes, fds: list[int], flags: int) -> str:
        """Hands at most one fd to the registry (removing it from ``fds``)."""
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 1:
            return (f"error descriptor: send exactly one descriptor with the session id "
                    f"({len(fds)}{'+' if flags & socket.MSG_CTRUNC else ''} received)")
        session_id = msg.decode("ascii", "replace")
        if not _SESSION_ID.match(session_id):
            return "error session: the message must be the session id"
        fd = fds.pop()
        try:
            handle = self.registry.deposit(session_id, fd)
        except RequestError as exc:
            log.info("descriptor refused: %s", exc)
            return f"error {exc}"
        return f"ok {handle}"
