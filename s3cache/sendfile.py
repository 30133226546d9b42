"""Send a byte range of an open file as (part of) an aiohttp response body, zero-copy.

uvloop does not implement ``loop.sendfile`` (MagicStack/uvloop#228), so aiohttp's
``web.FileResponse`` falls back to reading chunks in a thread and copying them through
the transport. :func:`send_file_range` does what ``loop.sendfile`` would do instead:
``os.sendfile`` from the cache file straight into the client's socket, in a bounded pool
of worker threads, so that neither a disk read nor a slow client ever blocks the loop.

How the zero-copy path keeps the loop, the connection and aiohttp consistent:

1. Order. aiohttp (>= 3.10) buffers the headers until the first body write, and earlier
   ``response.write()`` calls may still sit in the transport's buffer. Both must reach
   the socket before the file's bytes: we flush the headers (``send_headers``), then
   wait until ``transport.get_write_buffer_size() == 0`` by lowering the transport's
   write watermarks to zero and awaiting aiohttp's own drain.
2. The socket fd. The transport owns its fd and may close it at any moment (peer reset,
   shutdown), after which the number can be reused by another connection or file; the
   caller may close the file's fd once a cancelled call returns. A worker therefore
   never uses an fd it does not own: each job gets its own ``os.dup`` of the socket and
   of the file, made on the loop while both are open, and closes them itself.
3. Slow clients. A worker calls ``os.sendfile`` on the non-blocking socket until the
   range is sent or its time slice ends, waiting for POLLOUT in the thread only briefly.
   A client that stays slow gives the thread back: the loop then waits for
   writability with ``loop.add_writer`` on a *duplicate* fd (uvloop refuses the
   transport's own fd; a dup is a separate epoll registration, which uvloop removes
   from epoll when the writer is removed: MagicStack/uvloop#61). Slices are queued
   FIFO on the pool, so streams share the threads in turn.
4. aiohttp's books. The raw bytes are charged to the StreamWriter (``length``,
   ``output_size``), so Content-Length clipping, ``body_length`` and keep-alive work as
   if the bytes had gone through ``response.write()``.
5. Failure. Once a response's body has begun it cannot be finished another way. If
   anything fails or the task is cancelled, the socket is shut down (so a worker
   mid-``sendfile`` fails with EPIPE and sends nothing more) and the transport is
   aborted: the client sees a short body and a closed connection, never a short body
   as complete, and no later response shares the connection.

Small ranges whose pages are all in the page cache skip both: sending them cannot wait
for the disk, so the loop does it, with no thread hand-off. Where the kernel tells what
the page cache holds (``cachestat``, Linux 6.5+: :mod:`s3cache.pagecache`), the loop
flushes the head and calls ``os.sendfile`` on the non-blocking socket once, zero-copy;
whatever the socket did not take then goes the zero-copy way above. Elsewhere (and for
responses that cannot go zero-copy) the loop reads the range with
``os.preadv(..., RWF_NOWAIT)``, which copies from the page cache or fails at once with
EAGAIN instead of waiting for the disk, and writes it like any body. What is not cached,
or a filesystem without RWF_NOWAIT (tmpfs, older kernels), takes the paths below.

The fallback (TLS, no socket fd, no ``os.sendfile``, a body without Content-Length, or
``set_mode("fallback")``) reads 1 MiB chunks with ``os.pread`` in the same pool, one
chunk ahead of ``response.write()``. It works on any transport and any loop.

Invariant for callers: if :func:`send_file_range` raises anything but ``ValueError``
(bad arguments, raised before any byte is written), the connection has been aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import must_be_empty_body

from s3cache.pagecache import PROBE

__all__ = [
    "Mode",
    "SendStats",
    "get_mode",
    "send_file_range",
    "set_executor",
    "set_mode",
    "stats",
]

Mode = Literal["auto", "sendfile", "fallback"]
_T = TypeVar("_T")

# Workers in the default pool. Each job holds a thread for at most SLICE_SECONDS and a
# slow client holds none, so a few threads serve many streams.
DEFAULT_THREADS: Final = 4
# How long one job may send before it goes to the back of the pool's queue (fairness).
SLICE_SECONDS: Final = 0.02
# How long a worker waits in poll() for a full socket buffer to drain before it hands
# the stream back to the loop. Fast clients drain within this; slow ones release the
# thread. Measured in bench/sendfile_paths.py.
POLL_SECONDS: Final = 0.005
# Fallback read size. Memory bound per stream: about two chunks (one being written, one
# read ahead) plus the transport's high-water mark.
FALLBACK_CHUNK: Final = 1 << 20
# Ranges up to this size that the page cache holds are sent by the loop itself (one
# sendfile, or an RWF_NOWAIT copy): that much keeps the loop's pause short, and spares a
# small hit the thread hand-off. Larger ranges go to the pool. Measured in
# bench/profile_hits.py.
INLINE_MAX: Final = 1 << 20
# Cork the socket (Linux TCP_CORK) while a range streams, uncork when it ends. aiohttp
# sets TCP_NODELAY, which makes sendfile emit a short segment whenever the send buffer
# frees a little room; corked, only full segments go out. Uncorking at the end of every
# call pushes the tail at once, so there is no cork stall between keep-alive responses.
# Measured in bench/sendfile_paths.py.
CORK: Final = False

_SENDFILE_ERRORS_MEANING_GONE: Final = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT}
)


@dataclass(frozen=True, slots=True)
class SendStats:
    """Totals since the process started (for tests and the benchmark)."""

    zero_copy_bytes: int
    fallback_bytes: int
    inline_bytes: int  # sent from the page cache by the loop itself
    slices: int  # worker jobs run by the zero-copy path
    writable_waits: int  # times a slow client gave its thread back to the loop
    aborts: int  # connections aborted after a failed or cancelled send


class _Counters:
    __slots__ = (
        "aborts",
        "fallback_bytes",
        "inline_bytes",
        "slices",
        "writable_waits",
        "zero_copy_bytes",
    )

    def __init__(self) -> None:
        self.zero_copy_bytes = 0
        self.fallback_bytes = 0
        self.inline_bytes = 0
        self.slices = 0
        self.writable_waits = 0
        self.aborts = 0


_counters = _Counters()
_mode: Mode = "auto"
_executor: ThreadPoolExecutor | None = None


def set_mode(mode: Mode) -> None:
    """Choose the path: ``auto`` (page cache on the loop for small ranges, else
    zero-copy where possible), or force one path.

    ``sendfile`` raises ``RuntimeError`` for a response that cannot go zero-copy, rather
    than silently taking the fallback.
    """
    global _mode
    if mode not in ("auto", "sendfile", "fallback"):
        raise ValueError(f"unknown sendfile mode {mode!r}")
    _mode = mode


def get_mode() -> Mode:
    return _mode


def set_executor(executor: ThreadPoolExecutor | None) -> None:
    """Use ``executor`` for all file work; ``None`` restores the lazily built default.

    The caller owns ``executor`` and shuts it down.
    """
    global _executor
    _executor = executor


def stats() -> SendStats:
    c = _counters
    return SendStats(
        c.zero_copy_bytes, c.fallback_bytes, c.inline_bytes, c.slices, c.writable_waits, c.aborts
    )


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(DEFAULT_THREADS, thread_name_prefix="s3cache-sendfile")
    return _executor


async def send_file_range(
    request: web.Request, response: web.StreamResponse, fd: int, offset: int, count: int
) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` as the next part of the body.

    ``response`` must be prepared. May be called several times per response, between
    ``response.write()`` calls. Raises ``ConnectionResetError`` if the client is gone.
    """
    writer = response._payload_writer
    if writer is None:
        raise RuntimeError("send_file_range() needs a prepared response")
    if offset < 0 or count < 0:
        raise ValueError(f"bad file range: offset={offset} count={count}")
    if writer.length is not None and count > writer.length:
        # More bytes than Content-Length has left would corrupt the next response on
        # this keep-alive connection.
        raise ValueError(f"{count} bytes exceed the {writer.length} left of Content-Length")
    # RFC 9110 section 9.3.2 (HEAD), 15.3.5 (204), 15.4.5 (304): no content.
    if count == 0 or must_be_empty_body(request.method, response.status):
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client connection is closed")

    blocker = _zero_copy_blocker(transport, writer)
    if _mode == "sendfile" and blocker is not None:
        raise RuntimeError(f"zero-copy sendfile is not possible here: {blocker}")
    try:
        if _mode == "auto" and count <= INLINE_MAX:
            sent = await _send_inline(transport, response, fd, offset, count, blocker is None)
            offset += sent
            count -= sent
            if count == 0:
                return
        if _mode == "fallback" or blocker is not None:
            await _send_fallback(response, fd, offset, count)
        else:
            await _send_zero_copy(transport, writer, fd, offset, count)
    except ConnectionResetError:
        _abort(transport)
        raise
    except ConnectionError as exc:
        # aiohttp's drain reports a lost connection as a bare ConnectionError.
        _abort(transport)
        raise ConnectionResetError(str(exc)) from exc
    except BaseException:
        _abort(transport)
        raise


def _zero_copy_blocker(transport: asyncio.Transport, writer: AbstractStreamWriter) -> str | None:
    """Why this response cannot go out with os.sendfile, or None if it can."""
    if not hasattr(os, "sendfile"):
        return "the OS has no os.sendfile"
    if transport.get_extra_info("sslcontext") is not None:
        return "the connection is TLS"
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return "the transport exposes no socket"
    if writer.length is None:
        return "aiohttp frames this body (chunked or compressed)"
    return None


def _abort(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        _counters.aborts += 1
        transport.abort()


# --- page-cache path -------------------------------------------------------------------


def _read_cached(fd: int, offset: int, count: int) -> bytearray | None:
    """What of the range the page cache holds, from its start, without waiting for the
    disk; None if nothing (or the filesystem cannot say)."""
    buffer = bytearray(count)
    try:
        n = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except (BlockingIOError, OSError):
        # EAGAIN: not cached; EOPNOTSUPP/EINVAL: no RWF_NOWAIT here. Real read errors
        # come back from the worker paths, which read the same bytes.
        return None
    if n <= 0:
        return None
    del buffer[n:]
    return buffer


async def _send_inline(
    transport: asyncio.Transport,
    response: web.StreamResponse,
    fd: int,
    offset: int,
    count: int,
    zero_copy: bool,
) -> int:
    """Send what the page cache holds of the range's start; the number of bytes sent."""
    if zero_copy and PROBE is not None:
        if not PROBE.holds(fd, offset, count):
            return 0
        sent = _sendfile_now(transport, response, fd, offset, count)
        if sent is not None:
            return sent
    # Each buffer is fresh and never reused: uvloop may queue it without copying.
    data = _read_cached(fd, offset, count) if hasattr(os, "RWF_NOWAIT") else None
    if data is None:
        return 0
    await response.write(data)
    _counters.inline_bytes += len(data)
    return len(data)


def _sendfile_now(
    transport: asyncio.Transport, response: web.StreamResponse, fd: int, offset: int, count: int
) -> int | None:
    """One ``os.sendfile`` into the socket, from the loop, once the head is out; the
    bytes the socket took. None if earlier writes still wait in the transport (the body
    must queue behind them)."""
    writer = response._payload_writer
    assert writer is not None
    writer.send_headers()
    if transport.get_write_buffer_size():
        return None
    try:
        sent = os.sendfile(transport.get_extra_info("socket").fileno(), fd, offset, count)
    except BlockingIOError:
        sent = 0
    _charge(writer, sent)
    _counters.inline_bytes += sent
    return sent


# --- zero-copy path --------------------------------------------------------------------


class _Stop:
    """Set on the loop, read by the worker between system calls."""

    __slots__ = ("stopped",)

    def __init__(self) -> None:
        self.stopped = False


async def _send_zero_copy(
    transport: asyncio.Transport, writer: AbstractStreamWriter, fd: int, offset: int, count: int
) -> None:
    # The loop's own duplicate of the socket: for add_writer, TCP_CORK and shutdown.
    # Made now, while the transport (and so its fd) is certainly open.
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    corked = CORK and _set_cork(sock, True)
    stop = _Stop()
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        writer.send_headers()
        await _drain_completely(transport, writer)
        if transport.is_closing():
            raise ConnectionResetError("client connection closed")
        while sent < count:
            n, blocked = await _run_slice(sock, stop, fd, offset + sent, count - sent)
            sent += n
            _charge(writer, n)
            _counters.zero_copy_bytes += n
            if sent == count:
                break
            if transport.is_closing():
                raise ConnectionResetError("client connection closed")
            if blocked:
                _counters.writable_waits += 1
                await _writable(loop, sock.fileno())
    except BaseException:
        stop.stopped = True
        # Acts on the socket, not the fd: a worker mid-sendfile gets EPIPE now.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise
    else:
        if corked:
            _set_cork(sock, False)  # pushes the last partial segment out now
    finally:
        sock.close()


def _set_cork(sock: socket.socket, on: bool) -> bool:
    """TCP_CORK on a TCP socket; False where there is none (not Linux, not TCP)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "TCP_CORK"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
    except OSError:
        return False
    return True


def _charge(writer: AbstractStreamWriter, n: int) -> None:
    """Book ``n`` raw body bytes to aiohttp's writer, as its write() would have."""
    writer.output_size += n
    if writer.length is not None:
        writer.length -= n


async def _drain_completely(transport: asyncio.Transport, writer: AbstractStreamWriter) -> None:
    """Wait until the transport has handed every buffered byte to the kernel.

    ``drain()`` alone only waits for the low-water mark. With both marks at zero the
    transport pauses the protocol while anything is buffered and resumes it when the
    buffer is empty; uvloop and asyncio both call the protocol back, so no polling.
    """
    while transport.get_write_buffer_size() and not transport.is_closing():
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)


async def _run_slice(
    sock: socket.socket, stop: _Stop, fd: int, offset: int, count: int
) -> tuple[int, bool]:
    job = _submit_owning((sock.fileno(), fd), _sendfile_slice, offset, count, stop)
    _counters.slices += 1
    return await asyncio.wrap_future(job)


def _submit_owning(fds: tuple[int, ...], fn: Callable[..., _T], *args: object) -> Future[_T]:
    """Run ``fn(*dups, *args)`` in the pool on duplicates of ``fds`` that the job owns.

    The transport or the caller may close their fds while the job runs (disconnect,
    cancellation), and the numbers may then be reused; the job's own duplicates stay
    valid until it closes them. Duplicates are made here, on the loop, while the
    originals are known to be open.
    """
    dups = tuple(os.dup(fd) for fd in fds)

    def close_dups() -> None:
        for dup in dups:
            os.close(dup)

    def job() -> _T:
        try:
            return fn(*dups, *args)
        finally:
            close_dups()

    try:
        future = _pool().submit(job)
    except BaseException:
        close_dups()
        raise
    # A job cancelled before it started never runs, so it cannot close its dups.
    future.add_done_callback(lambda f: close_dups() if f.cancelled() else None)
    return future


def _sendfile_slice(
    out_fd: int, in_fd: int, offset: int, count: int, stop: _Stop
) -> tuple[int, bool]:
    """Worker: sendfile until done, the slice ends, or the client stays slow.

    Returns (bytes sent, True if the socket stayed full for POLL_SECONDS).
    """
    sent = 0
    deadline = time.monotonic() + SLICE_SECONDS
    poller = select.poll()
    poller.register(out_fd, select.POLLOUT)
    while sent < count and not stop.stopped:
        try:
            n = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
        except BlockingIOError:
            if not poller.poll(POLL_SECONDS * 1000):
                return sent, True
            continue
        except OSError as exc:
            if exc.errno in _SENDFILE_ERRORS_MEANING_GONE:
                raise ConnectionResetError(exc.errno, "client went away") from exc
            raise
        if n == 0:
            raise EOFError(f"file ended {count - sent} bytes before the requested range")
        sent += n
        if time.monotonic() >= deadline:
            break
    return sent, False


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


# --- fallback path ---------------------------------------------------------------------


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    # Worker; ``fd`` is the job's own duplicate.
    data = os.pread(fd, size, offset)
    if len(data) != size:
        # A regular file returns short only at its end.
        raise EOFError(f"file ended {size - len(data)} bytes before the requested range")
    return data


async def _send_fallback(response: web.StreamResponse, fd: int, offset: int, count: int) -> None:
    """Read FALLBACK_CHUNK at a time in the pool, one read ahead of the write.

    Each chunk is a fresh ``bytes``, not a reused buffer filled with ``os.preadv``:
    uvloop queues a partly sent non-bytes buffer as a memoryview, without copying it
    (``UVStream._buffer_write``), so refilling the buffer would corrupt queued data.
    """
    end = offset + count
    pos = offset
    ahead: Future[bytes] | None = _submit_owning(
        (fd,), _pread_exact, min(FALLBACK_CHUNK, count), pos
    )
    try:
        while ahead is not None:
            data = await asyncio.wrap_future(ahead)
            pos += len(data)
            ahead = None
            if pos < end:
                ahead = _submit_owning((fd,), _pread_exact, min(FALLBACK_CHUNK, end - pos), pos)
            await response.write(data)
            _counters.fallback_bytes += len(data)
    finally:
        if ahead is not None:
            ahead.cancel()  # a read nobody will await; its result or error is dropped
