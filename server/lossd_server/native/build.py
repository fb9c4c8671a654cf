"""Build and load the native front's C++ module (``front.cpp``), once per machine.

The module is compiled on first use, like a torch C++ extension loaded just in time: it
links gRPC C++ from the system (Debian: ``apt-get install g++ pkg-config libgrpc++-dev``,
which ``make serve`` and the Dockerfile install), so it is built where it runs rather than
shipped in the wheel. The result is cached under ``$LOSSD_NATIVE_CACHE`` (default
``~/.cache/lossd/native``), keyed by the source, the Python build and the gRPC version; a
build takes a few seconds, later starts load the cached file. An image can build it in a
build stage and ship the cache with gRPC's shared libraries only (the Dockerfile does).
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

SOURCE = Path(__file__).with_name("front.cpp")
_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
INSTALL_HINT = ("it needs a C++ compiler and gRPC C++ with pkg-config (Debian/Ubuntu: "
                "apt-get install g++ pkg-config libgrpc++-dev)")

_lock = threading.Lock()
_loaded: ModuleType | None = None


class NativeUnavailable(RuntimeError):
    """The native front cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
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


def _home() -> Path:
    """Where this source's builds for this Python live (one per gRPC version)."""
    key = hashlib.sha256(SOURCE.read_bytes() + f"|{sys.version}|{_SUFFIX}".encode())
    return cache_dir() / key.hexdigest()[:16]


def build(*, force: bool = False) -> Path:
    """Compile ``front.cpp`` unless its cached build exists; returns the module's path.
    Raises :class:`NativeUnavailable` naming what is missing."""
    version, flags = _grpc_flags()
    target = _home() / f"_front-grpc{version}{_SUFFIX}"
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
              f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", tmp, *flags])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def find() -> Path:
    """The module to load: built (or found built) with the build tools where they are;
    without them (a runtime image holding only gRPC's shared libraries), the build made
    for this source and Python, if one is cached."""
    try:
        return build()
    except NativeUnavailable:
        built = sorted(_home().glob(f"_front-grpc*{_SUFFIX}"))
        if not built:
            raise
        return built[-1]


def load() -> ModuleType:
    """The native module, built first if needed (see :func:`find`)."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = find()
            spec = importlib.util.spec_from_file_location("lossd_server._front", path)
            if spec is None or spec.loader is None:  # pragma: no cover
                raise NativeUnavailable(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as exc:
                raise NativeUnavailable(f"cannot load {path}: {exc}; {INSTALL_HINT}") from None
            _loaded = module
        return _loaded
