"""Build and load lossd's C++ modules (the server's gRPC front, the client's native
transport), once per machine.

A module is compiled on first use, like a torch C++ extension loaded just in time: it
links gRPC C++ from the system (Debian: ``apt-get install g++ pkg-config libgrpc++-dev``,
which ``make serve`` and the Dockerfile install), so it is built where it runs rather than
shipped in the wheel. The result is cached under ``$LOSSD_NATIVE_CACHE`` (default
``~/.cache/lossd/native``), keyed by the source, the Python build and the gRPC version; a
build takes a few seconds, later starts load the cached file. An image can build it in a
build stage and ship the cache with gRPC's shared libraries only (the Dockerfile does).

>>> NativeModule(Path("front.cpp"), "lossd_server._front").name
'_front'
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
INSTALL_HINT = ("it needs a C++ compiler and gRPC C++ with pkg-config (Debian/Ubuntu: "
                "apt-get install g++ pkg-config libgrpc++-dev)")


class NativeUnavailable(RuntimeError):
    """A native module cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    """Where builds are cached: ``$LOSSD_NATIVE_CACHE``, else ``~/.cache/lossd/native``."""
    configured = os.environ.get("LOSSD_NATIVE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lossd" / "native"


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise NativeUnavailable(f"cannot run {cmd[0]} ({exc.strerror}); {INSTALL_HINT}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise NativeUnavailable(f"{shlex.join(cmd[:3])} ... failed; {INSTALL_HINT}\n{tail}")
    return done.stdout.strip()


def _grpc_flags() -> tuple[str, list[str]]:
    version = _run(["pkg-config", "--modversion", "grpc++"])
    flags = _run(["pkg-config", "--cflags", "--libs", "grpc++"])
    return version, shlex.split(flags)


class NativeModule:
    """One C++ source built into a CPython extension imported as ``import_name``."""

    def __init__(self, source: Path, import_name: str) -> None:
        self.source = source
        self.import_name = import_name
        self.name = import_name.rpartition(".")[2]
        self._lock = threading.Lock()
        self._loaded: ModuleType | None = None
        self._failed: NativeUnavailable | None = None  # (a process tries once)

    def _home(self) -> Path:
        """Where this source's builds for this Python live (one per gRPC version)."""
        key = hashlib.sha256(self.source.read_bytes() + f"|{sys.version}|{_SUFFIX}".encode())
        return cache_dir() / key.hexdigest()[:16]

    def build(self, *, force: bool = False) -> Path:
        """Compile the source unless its cached build exists; returns the module's path.
        Raises :class:`NativeUnavailable` naming what is missing."""
        version, flags = _grpc_flags()
        target = self._home() / f"{self.name}-grpc{version}{_SUFFIX}"
        if target.exists() and not force:
            return target
        compiler = os.environ.get("CXX", "c++")
        # Built beside the target and renamed into place: processes that build at once each
        # write their own file, and a loader never sees half of one.
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        except OSError as exc:  # a read-only root, an image's cache without this build
            raise NativeUnavailable(f"cannot write its build under {target.parent} "
                                    f"({exc.strerror}); set LOSSD_NATIVE_CACHE to a writable "
                                    "directory") from None
        os.close(fd)
        try:
            _run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
                  f"-I{sysconfig.get_paths()['include']}", str(self.source), "-o", tmp, *flags])
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def cached(self) -> Path | None:
        """The newest build of this source for this Python, if any (no build tools asked:
        pkg-config alone takes about a second on gRPC C++'s dependency tree)."""
        built = sorted(self._home().glob(f"{self.name}-grpc*{_SUFFIX}"),
                       key=lambda p: p.stat().st_mtime)
        return built[-1] if built else None

    def load(self) -> ModuleType:
        """The module: its cached build where one loads (a runtime image holding only
        gRPC's shared libraries has no build tools), else built now. A process tries once: a
        module that could not be built or loaded raises the same error at once after."""
        with self._lock:
            if self._failed is not None:
                raise NativeUnavailable(str(self._failed))
            if self._loaded is None:
                try:
                    self._loaded = self._load()
                except NativeUnavailable as exc:
                    self._failed = exc
                    raise
            return self._loaded

    def _load(self) -> ModuleType:
        cached = self.cached()
        if cached is not None:
            try:
                return self._import(cached)
            except NativeUnavailable:  # built against a gRPC C++ no longer installed
                pass
        return self._import(self.build(force=cached is not None))

    def _import(self, path: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location(self.import_name, path)
        if spec is None or spec.loader is None:  # pragma: no cover
            raise NativeUnavailable(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            raise NativeUnavailable(f"cannot load {path}: {exc}; {INSTALL_HINT}") from None
        return module


TRANSPORT = NativeModule(Path(__file__).with_name("transport.cpp"), "lossd._native_transport")
"""The client's native transport (see ``LossClient(transport=)``); ``python -m lossd.native``
builds it ahead and prints where it is."""
