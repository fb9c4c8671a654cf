"""The host a serving process runs on: how many processes, on which devices, with how many
threads, and the set-up every serving process does before its server starts.

Probing never initialises CUDA (the supervisor never touches a device): it reads the CPU
affinity, the cgroup CPU quota, ``CUDA_VISIBLE_DEVICES`` and the driver's device list.

A pod's processes share one metrics directory; whoever is last out of it removes it, even
when the supervisor was killed outright (:func:`make_pod_directory`, and
:func:`leave_pod_directory`'s ``wait``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from lossd_server.settings import Settings

GPU_PROCESSES = 4
"""``--processes auto`` on a GPU host: worker processes per GPU."""
EXIT_CONFIG = 2
"""The exit status of ``lossd serve`` (and of a worker) on a configuration error."""


def available_cpus() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup CPU quota (a
    Kubernetes CPU limit), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (cgroup v2, else v1), or None without one."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without initialising CUDA (the supervisor never
    touches a device): ``CUDA_VISIBLE_DEVICES`` when set, else the driver's device list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):  # CUDA stops at the first invalid entry
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def device_list(device: str) -> list[str]:
    """The devices workers spread over: a given list, every visible GPU for ``cuda`` or
    ``auto`` on a multi-GPU host, else the one device."""
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    if device in ("auto", "cuda") and visible_gpus() > 1:
        return [f"cuda:{i}" for i in range(visible_gpus())]
    return [device]


def resolve_processes(settings: Settings) -> int:
    """``--processes``: a number, or ``auto``: the CPU cores available on a CPU host,
    ``GPU_PROCESSES`` per GPU on a GPU host (each worker holds its own CUDA context)."""
    if settings.processes != "auto":
        return int(settings.processes)
    devices = device_list(settings.device)
    on_gpu = any(d.startswith("cuda") for d in devices) or (
        settings.device == "auto" and visible_gpus() > 0)
    return GPU_PROCESSES * len(devices) if on_gpu else available_cpus()


def torch_threads(settings: Settings, processes: int) -> int:
    """Intra-op threads of each process: ``--torch-threads``, or the cores divided among
    the processes (N processes of all-core thread pools would fight over the cores)."""
    return settings.torch_threads or max(1, available_cpus() // processes)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_allocator() -> bool:
    """Make glibc keep and reuse freed memory: large requests then reuse warm pages instead
    of faulting in fresh ones (about 3 us per 4 KiB page on the VMs measured, 25-55 ms per
    32-64 MiB request). Must run before the server starts its threads. Returns whether it
    applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        return False


def prepare_process(settings: Settings, processes: int) -> None:
    """Process-wide set-up of a serving process, before any server thread starts."""
    if settings.malloc_reuse:
        tune_allocator()
    import torch

    torch.set_num_threads(torch_threads(settings, processes))


def exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, once every log line is out: no interpreter
    teardown, which joins every non-daemon thread (one stuck in a loss would never end it)
    and spends seconds garbage-collecting torch."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_from_signal(*events: threading.Event, then: Callable[[], None] | None = None
                    ) -> None:
    """Set ``events`` (then call ``then``) from a signal handler, on a thread of its own.

    A handler runs in the main thread between two of its bytecodes, possibly while that
    thread holds an Event's lock (waking from ``wait``, it takes the lock back): an
    ``Event.set`` in the handler would then wait for itself for ever. A worker stranded so
    kept its listener on the pod's port after its supervisor had gone."""
    def run() -> None:
        for event in events:
            event.set()
        if then is not None:
            then()

    threading.Thread(target=run, name="lossd-signal", daemon=True).start()


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux), so a
    worker never outlives a supervisor killed outright. Returns whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


_PF_EXITING = 0x4  # linux/sched.h: the task is exiting (set before its death signals)


def parent_gone(pid: int) -> bool:
    """Whether ``pid``, this process's parent when it started, has died.

    Already once its main thread is exiting: the kernel sends :func:`die_with_parent`'s
    signal then, while the parent's other threads may still be exiting (on a loaded host,
    for a while), and until the last of them is gone ``getppid()`` still returns ``pid``
    and the parent's files, its lock on the pod directory among them, stay open."""
    if os.getppid() != pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # state is field 3, flags field 9
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):  # no /proc: getppid() is all there is
        return False


POD_DIRECTORY_PREFIX = "lossd-metrics-"
_OWNERS = ".owners"
"""A pod directory's lock file: each process of the pod holds a shared ``flock`` on it for
its life, so an exclusive lock succeeds only when none is left (the kernel drops the locks
of a killed process)."""


def make_pod_directory() -> tuple[str, int]:
    """A new pod directory in the temp directory, after removing those no live pod holds
    (left by pods killed before their last process was out); returns it and the held lock
    (see :func:`leave_pod_directory`)."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if name.startswith(POD_DIRECTORY_PREFIX):
                _remove_if_unheld(os.path.join(root, name))
    directory = tempfile.mkdtemp(prefix=POD_DIRECTORY_PREFIX)
    # Locked before it has its name: a sweeping pod never sees it unheld.
    fd = os.open(os.path.join(directory, _OWNERS + ".new"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.rename(os.path.join(directory, _OWNERS + ".new"), os.path.join(directory, _OWNERS))
    return directory, fd


def join_pod_directory(directory: str) -> int:
    """Hold ``directory`` (a worker's share of its pod's); returns the lock to leave with."""
    fd = os.open(os.path.join(directory, _OWNERS), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


LEAVE_RETRY_SECONDS = 0.02
"""How often a process leaving with ``wait`` tries again to be the last one out."""


def leave_pod_directory(directory: str, fd: int, wait: float = 0.0) -> bool:
    """Let go of ``directory``; the last process out removes it. Returns whether this one
    did.

    ``wait``: for up to this many seconds, keep trying while another process still holds
    it, until one has removed it: what a worker whose supervisor died does, since the dying
    supervisor's hold may outlast every worker's own (:func:`parent_gone`)."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    deadline = time.monotonic() + wait
    while not _remove_if_unheld(directory):
        if time.monotonic() >= deadline or not os.path.exists(
                os.path.join(directory, _OWNERS)):  # a sibling removed it
            return False
        time.sleep(LEAVE_RETRY_SECONDS)
    return True


def _remove_if_unheld(directory: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, _OWNERS), os.O_RDWR)
    except OSError:  # not a pod directory (yet), or removed already
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    shutil.rmtree(directory, ignore_errors=True)
    os.close(fd)
    return True
