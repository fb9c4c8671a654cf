"""Metric files that cannot kill their process: a full metrics filesystem loses metrics,
never a worker.

prometheus-client's multiprocess mode keeps each worker's values in memory-mapped files
(``MmapedDict``), which grow by ``ftruncate`` and a new ``mmap``. On a filesystem with no
space left (a small ``emptyDir``, a tmpfs) the truncate succeeds, since it only makes a
sparse file, and the first write to a page that has no block behind it gets the process
SIGBUS. :class:`SpaceCheckedDict` asks for the blocks first (``posix_fallocate``) before
the file is mapped and before each growth: when the space is not there, the series that
needed it is kept in memory only, dropped from the exposition, and counted
(``lossd_metric_series_dropped_total``, and one warning log line). Values already in the
file keep being written: their blocks were allocated before anything was mapped.

:func:`install` puts it in place of prometheus-client's class, in a worker process before
its first metric is created.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from typing import Any

from prometheus_client import mmap_dict, values

log = logging.getLogger("lossd")

_INITIAL_SIZE: int = mmap_dict._INITIAL_MMAP_SIZE


class _Drops:
    """How many series this process could not store, and where to count them."""

    count = 0
    sink: Any = None  # an object with inc(), lock-free (metrics.ValueWriter)

    @classmethod
    def add(cls, filename: str, exc: OSError) -> None:
        cls.count += 1
        if cls.count == 1:
            log.warning("metrics filesystem full; new metric series are dropped",
                        extra={"file": filename, "error": exc.strerror})
        if cls.sink is not None:
            cls.sink.inc()


def dropped() -> int:
    """Metric series this process has dropped for lack of space so far."""
    return _Drops.count


def count_drops(sink: Any) -> None:
    """Count every drop on ``sink.inc()`` from now on (and those before). It is called
    under prometheus-client's value lock, so it must not take it (a ``ValueWriter``,
    whose increments are written later, from the flusher's thread)."""
    _Drops.sink = sink
    if _Drops.count:
        sink.inc(_Drops.count)


class SpaceCheckedDict(mmap_dict.MmapedDict):
    """``MmapedDict`` whose file blocks are allocated before they are mapped; see the
    module docstring. Read mode (the supervisor's scrape) is the original's."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        self._memory: dict[str, tuple[float, float]] = {}
        if read_mode:
            super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]
            return
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, max(_INITIAL_SIZE, os.fstat(fd).st_size))
            except OSError:
                if os.fstat(fd).st_size == 0:  # an empty file is no metrics file: a scrape
                    os.unlink(filename)  # would fail on it
                raise
            finally:
                os.close(fd)
        except OSError as exc:
            # No file at all: every series of this dict lives in memory only.
            _Drops.add(filename, exc)
            self._f = None  # type: ignore[assignment]
            self._fname = filename
            self._capacity = 0
            self._used = 8
            self._positions = {}
            return
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        encoded = key.encode("utf-8")
        need = self._used + struct.calcsize(f"i{len(encoded) + 8 - (len(encoded) + 4) % 8}sdd")
        if self._f is None:
            self._memory[key] = (0.0, 0.0)
            return
        if need > self._capacity:
            capacity = self._capacity
            while need > capacity:
                capacity *= 2
            try:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
                _Drops.add(self._fname, exc)
                self._memory[key] = (0.0, 0.0)
                return
        super()._init_value(key)  # type: ignore[no-untyped-call]

    def read_value(self, key: str) -> tuple[float, float]:
        if key not in self._positions and key not in self._memory:
            self._init_value(key)
        if key in self._memory:
            return self._memory[key]
        value: tuple[float, float] = mmap_dict._unpack_two_doubles(self._m,
                                                                   self._positions[key])
        return value

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        if key not in self._positions and key not in self._memory:
            self._init_value(key)
        if key in self._memory:
            self._memory[key] = (value, timestamp)
            return
        mmap_dict._pack_two_doubles(  # type: ignore[no-untyped-call]
            self._m, self._positions[key], value, timestamp)

    def close(self) -> None:
        if self._f is not None:
            super().close()  # type: ignore[no-untyped-call]


def install() -> None:
    """Use :class:`SpaceCheckedDict` for this process's metric files from now on."""
    values.MmapedDict = SpaceCheckedDict  # type: ignore[attr-defined]
