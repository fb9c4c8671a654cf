"""Headless Chromium (Debian's ``chromium``, installed by scripts/bootstrap_system.sh) for
tests and scripts that render HTML: a screenshot, or the DOM after the page loaded.

Every run gets a fresh profile directory and no network, sync, update or GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")


def executable() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise FileNotFoundError("chromium missing: scripts/bootstrap_system.sh installs it")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="lossd-chromium-") as profile:
        proc = subprocess.run([executable(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def screenshot(page: Path, png: Path, *, width: int = 1200, height: int = 3000,
               timeout: float = 120) -> Path:
    """A PNG of ``page`` rendered in a window of ``width`` x ``height`` pixels."""
    _run([f"--screenshot={png}", f"--window-size={width},{height}",
          page.resolve().as_uri()], timeout)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def dump_dom(page: Path, *, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The serialised DOM of ``page`` once loaded (scripts ran for ``budget_ms`` of
    virtual time)."""
    return _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()],
                timeout).stdout
