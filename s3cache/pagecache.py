"""Whether the page cache holds a byte range of a file, asked without reading it.

Linux 6.5 added ``cachestat(2)``: how many pages of a file range are in the page cache
(https://man7.org/linux/man-pages/man2/cachestat.2.html). Python has no binding, so it
is called through libc's ``syscall``. Elsewhere (older kernels, other systems, a
seccomp filter that refuses it) :data:`PROBE` is None and callers read with
``RWF_NOWAIT`` instead.

The answer is a snapshot: a page may be evicted just after. Callers use it to decide
whether a read can be done on the event loop; a page evicted in between costs that one
read a wait for the disk, nothing worse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Final

# The same number on every Linux architecture (syscalls added since 4.x are unified).
_SYS_CACHESTAT: Final = 451


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


class PageCacheProbe:
    """``holds(fd, offset, count)``: every page of the range is cached. One instance per
    thread (the arguments are reused between calls)."""

    def __init__(self) -> None:
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._range = _Range()
        self._stat = _Stat()
        self._range_ref = ctypes.byref(self._range)
        self._stat_ref = ctypes.byref(self._stat)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def holds(self, fd: int, offset: int, count: int) -> bool:
        if count <= 0:
            return True
        self._range.off = offset
        self._range.len = count
        if self._syscall(_SYS_CACHESTAT, fd, self._range_ref, self._stat_ref, 0) != 0:
            return False
        pages = (offset + count - 1) // self._page - offset // self._page + 1
        return bool(self._stat.nr_cache >= pages)

    def works(self) -> bool:
        """The kernel has cachestat (a bad fd gets EBADF, not ENOSYS or EPERM)."""
        result = self._syscall(_SYS_CACHESTAT, -1, self._range_ref, self._stat_ref, 0)
        return result != 0 and ctypes.get_errno() == errno.EBADF


def _probe() -> PageCacheProbe | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        probe = PageCacheProbe()
    except (OSError, AttributeError):
        return None
    return probe if probe.works() else None


# For the event loop's thread. None where cachestat is not available.
PROBE: Final = _probe()
