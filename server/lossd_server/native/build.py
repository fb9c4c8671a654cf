"""The native front's C++ module (``front.cpp``), built and loaded once per machine by
:class:`lossd.native.NativeModule` (how and where: see :mod:`lossd.native`)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from lossd.native import NativeModule, NativeUnavailable

SOURCE = Path(__file__).with_name("front.cpp")
FRONT = NativeModule(SOURCE, "lossd_server._front")

__all__ = ["FRONT", "SOURCE", "NativeUnavailable", "build", "load"]


def build(*, force: bool = False) -> Path:
    """Compile ``front.cpp`` unless its cached build exists (see
    :meth:`~lossd.native.NativeModule.build`)."""
    return FRONT.build(force=force)


def load() -> ModuleType:
    """The front's module, built first if needed."""
    return FRONT.load()
