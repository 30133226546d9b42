"""An HTTP/1.1 relay between s3cache and its upstream S3, for the tests and the benchmarks.

It sits where the upstream would be (``S3CacheProcess(..., upstream_endpoint=relay.endpoint_url)``)
and forwards every request to the real upstream, so that a test can

- count what s3cache asks of the upstream, seen from the upstream's side
  (:meth:`Relay.records`, :meth:`Relay.count`, :meth:`Relay.bytes_sent`);
- emulate a WAN link: ``delay`` seconds before the first byte of each response (an RTT)
  and a ``bandwidth`` cap in bytes/s per connection on response bodies;
- inject faults (:class:`Fault`): an S3 error status instead of the upstream's answer, a
  connection reset after N body bytes, a stall between the headers and the body.

Transparency (SigV4 signs the method, the raw path and query, the Host header and the
other signed headers, and the body's hash): the relay is a byte stream relay that parses
only the HTTP/1.1 framing it needs. The request head (request line, every header with its
case, order and duplicates, the client's own Host) goes to the upstream byte for byte;
request bodies (Content-Length, or chunked: the chunk framing is relayed as is; aws-chunked
bodies are plain Content-Length bytes) are streamed. Response heads come back byte for
byte, bodies streamed: none for HEAD, 1xx, 204 and 304; chunked framing relayed as is;
without Content-Length or chunked, until the upstream closes. ``Expect: 100-continue``
works by relaying the upstream's interim ``100 Continue`` (the request body is pumped
concurrently with reading the response). Each client connection gets its own upstream
connection, opened on its first request and kept alive as long as both sides allow.

The relay runs its own event loop (uvloop when installed) in a daemon thread, so that it
can be used from synchronous test code: ``start()``/``stop()`` or a ``with`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import itertools
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

__all__ = ["Fault", "Relay", "RequestRecord"]

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
#: Longest request or response head accepted (and the StreamReader buffer limit).
_MAX_HEAD = 256 * 1024
#: Read size for bodies when no bandwidth cap is set.
_READ_SIZE = 256 * 1024
#: Largest slice written at once under a bandwidth cap; smallest one.
_MAX_SLICE = 64 * 1024
_MIN_SLICE = 4 * 1024
#: Under a cap, slices are sized for about this many writes per second.
_SLICES_PER_SECOND = 50

#: S3 error code answered for a fault status, when the Fault names none.
_S3_CODES: dict[int, tuple[str, str]] = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    408: (
        "RequestTimeout",
        "Your socket connection to the server was not read from or "
        "written to within the timeout period.",
    ),
    409: ("OperationAborted", "A conflicting conditional operation is currently in progress."),
    412: ("PreconditionFailed", "At least one of the preconditions you specified did not hold."),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies unimplemented functionality."),
    502: ("BadGateway", "The relay could not get an answer from the upstream."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "The upstream did not answer in time."),
}


# -- public types ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A fault the relay applies to matching requests (``relay.fault = Fault(...)``).

    Actions (at least one):

    - ``status``: answer this status with an S3 error XML body (``<Error><Code>``) instead
      of forwarding; the code is ``error_code`` or the usual one for the status (503
      SlowDown, 500 InternalError, 404 NoSuchKey, ...). A request body is read and dropped
      first, unless the client sent ``Expect: 100-continue`` (then the connection is closed
      after the answer).
    - ``reset_after_bytes``: relay the response head and the first N bytes of its body (as
      framed on the wire: for Content-Length bodies, as all object GETs are, the payload),
      then abort the client connection with a TCP RST. A body of at most N bytes is
      relayed whole and the connection is reset right after.
    - ``stall_seconds``: after the response head, wait this long before relaying the body.

    Matching: ``match_method`` (case-insensitive) and ``match_path_prefix``, a prefix of
    the raw request target as sent on the wire (percent-encoded, query included, e.g.
    ``/bucket/my%20key``). ``times``: apply to the next N matching requests, then the
    relay clears its fault; ``None`` applies until ``relay.fault = None``.
    """

    status: int | None = None
    reset_after_bytes: int | None = None
    stall_seconds: float | None = None
    times: int | None = None
    match_method: str | None = None
    match_path_prefix: str | None = None
    error_code: str | None = None

    def __post_init__(self) -> None:
        if self.status is None and self.reset_after_bytes is None and self.stall_seconds is None:
            raise ValueError("a Fault needs status, reset_after_bytes or stall_seconds")
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError(f"fault status must be 200-599, not {self.status}")
        if self.reset_after_bytes is not None and self.reset_after_bytes < 0:
            raise ValueError("reset_after_bytes must be >= 0")
        if self.stall_seconds is not None and self.stall_seconds < 0:
            raise ValueError("stall_seconds must be >= 0")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 (or None for every matching request)")

    def matches(self, method: str, target: str) -> bool:
        if self.match_method is not None and method.upper() != self.match_method.upper():
            return False
        return self.match_path_prefix is None or target.startswith(self.match_path_prefix)

    def describe(self) -> str:
        """What the relay did, as recorded in ``RequestRecord.fault``: e.g. ``status=503``."""
        parts = []
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.reset_after_bytes is not None:
            parts.append(f"reset_after_bytes={self.reset_after_bytes}")
        if self.stall_seconds is not None:
            parts.append(f"stall_seconds={self.stall_seconds:g}")
        return " ".join(parts)


@dataclass(frozen=True)
class RequestRecord:
    """One request the relay received, appended once its response was fully relayed
    (``completed=True``) or broken off (``completed=False``).

    ``target`` is the raw request target (path and query as sent); ``headers`` are the
    request's, with lower-case names (repeated headers joined with ``", "``); ``status``
    is the status relayed to the client (``None`` if none was); ``response_body_bytes``
    counts the response body payload bytes relayed (chunk framing excluded);
    ``started``/``finished`` are ``time.monotonic()`` values: request head received,
    response done. ``fault`` describes the fault applied, if any. ``connection`` numbers
    the client connection (requests on one kept-alive connection share it).
    """

    method: str
    target: str
    headers: Mapping[str, str]
    status: int | None
    response_body_bytes: int
    started: float
    finished: float
    completed: bool
    fault: str | None = None
    request_body_bytes: int = 0
    connection: int = 0

    @property
    def path(self) -> str:
        """The raw target without its query."""
        return self.target.partition("?")[0]

    @property
    def duration(self) -> float:
        return self.finished - self.started


# -- HTTP/1.1 framing -------------------------------------------------------------------


class _BadMessage(Exception):
    """A request or response the relay cannot frame."""


class _ConnectionGone(Exception):
    """The client connection has been closed or reset: stop serving it."""


@dataclass
class _Head:
    raw: bytes
    start: list[str]  # the start line split in three
    headers: list[tuple[str, str]]  # (lower-case name, value)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def tokens(self, name: str) -> list[str]:
        """Comma-separated tokens of a header, lower-cased, over all its occurrences."""
        return [
            token.strip().lower()
            for value in self.values(name)
            for token in value.split(",")
            if token.strip()
        ]

    def as_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.headers:
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) != 3:
        raise _BadMessage(f"malformed start line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadMessage(f"malformed header line {line!r}")
        headers.append((name.lower(), value.strip(" \t")))
    return _Head(raw, start, headers)


def _content_length(head: _Head) -> int | None:
    values = {v.strip() for value in head.values("content-length") for v in value.split(",")}
    if not values:
        return None
    if len(values) > 1 or not all(v.isdigit() for v in values):
        raise _BadMessage(f"bad Content-Length {sorted(values)}")
    return int(values.pop())


#: Body framings.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = "none", "length", "chunked", "until-close"

#: One piece of a body as relayed: raw bytes, payload bytes among them, last piece?
_Piece = tuple[bytes, int, bool]


async def _body_pieces(
    reader: asyncio.StreamReader, framing: str, length: int, piece_size: Callable[[], int]
) -> AsyncIterator[_Piece]:
    """The raw bytes of one message body, read from ``reader`` in pieces of at most
    ``piece_size()`` payload bytes (chunk framing rides along with the data after it)."""
    if framing == _LENGTH:
        remaining = length
        while remaining:
            data = await reader.read(min(remaining, piece_size()))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data, len(data), remaining == 0
    elif framing == _UNTIL_CLOSE:
        while True:
            data = await reader.read(piece_size())
            if not data:
                yield b"", 0, True
                return
            yield data, len(data), False
    elif framing == _CHUNKED:
        pending = b""  # framing bytes not yet relayed: CRLFs and chunk-size lines
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadMessage(f"bad chunk size line {line[:80]!r}") from None
            pending += line
            if size == 0:
                while True:  # trailer fields, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    pending += trailer
                    if trailer == b"\r\n":
                        break
                yield pending, 0, True
                return
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, piece_size()))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                yield pending + data, len(data), False
                pending = b""
            pending = await reader.readexactly(2)
            if pending != b"\r\n":
                raise _BadMessage("chunk data not followed by CRLF")


async def _bytes_pieces(data: bytes, piece_size: Callable[[], int]) -> AsyncIterator[_Piece]:
    offset = 0
    while offset < len(data):
        piece = data[offset : offset + piece_size()]
        offset += len(piece)
        yield piece, len(piece), offset == len(data)


def _request_framing(head: _Head) -> tuple[str, int]:
    codings = head.tokens("transfer-encoding")
    if codings:
        if codings[-1] != "chunked":
            raise _BadMessage(f"request Transfer-Encoding {codings} does not end in chunked")
        return _CHUNKED, 0
    length = _content_length(head)
    if length:
        return _LENGTH, length
    return _NONE, 0


def _response_framing(method: str, status: int, head: _Head) -> tuple[str, int]:
    if method == "HEAD" or status < 200 or status in (204, 304):
        return _NONE, 0
    codings = head.tokens("transfer-encoding")
    if codings:
        return (_CHUNKED, 0) if codings[-1] == "chunked" else (_UNTIL_CLOSE, 0)
    length = _content_length(head)
    if length is None:
        return _UNTIL_CLOSE, 0
    return (_LENGTH, length) if length else (_NONE, 0)


def _keeps_alive(head: _Head) -> bool:
    """Whether the message's sender keeps its connection open after this exchange."""
    tokens = head.tokens("connection")
    if "close" in tokens:
        return False
    # A response's start line begins with the version, a request's ends with it.
    version = head.start[0] if head.start[0].startswith("HTTP/") else head.start[2]
    return version.upper() != "HTTP/1.0" or "keep-alive" in tokens


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- per connection and per exchange state ----------------------------------------------


class _Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.exchanges = 0

    def usable(self) -> bool:
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.transport.abort()


class _Client:
    """One client connection, with its upstream connection and its bandwidth pacer."""

    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.reader = reader
        self.writer = writer
        self.upstream: _Upstream | None = None
        self.free_at = 0.0  # pacer: when the link is free for the next slice

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def write(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise _ConnectionGone
        self.writer.write(data)
        await self.writer.drain()

    async def flushed(self) -> None:
        """Wait until the transport has handed all written bytes to the kernel."""
        if self.writer.transport.is_closing():
            return
        # With both limits at 0, drain() returns only once the buffer is empty.
        self.writer.transport.set_write_buffer_limits(high=0, low=0)
        await self.writer.drain()


class _Exchange:
    """The record being built for one request."""

    def __init__(self, relay: Relay, client: _Client, method: str, target: str, head: _Head):
        self.relay = relay
        self.client = client
        self.method = method
        self.target = target
        self.headers = head.as_dict()
        self.started = time.monotonic()
        self.status: int | None = None
        self.response_body_bytes = 0
        self.request_body_bytes = 0
        self.fault: str | None = None
        self.head_sent = False
        self.done = False

    def finish(self, completed: bool) -> None:
        """Append the record (once). Called before the last bytes of a complete response
        are written, so that a client that has read its response sees it counted."""
        if self.done:
            return
        self.done = True
        self.relay._append(
            RequestRecord(
                method=self.method,
                target=self.target,
                headers=self.headers,
                status=self.status,
                response_body_bytes=self.response_body_bytes,
                started=self.started,
                finished=time.monotonic(),
                completed=completed,
                fault=self.fault,
                request_body_bytes=self.request_body_bytes,
                connection=self.client.number,
            )
        )


# -- the relay ---------------------------------------------------------------------------


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of s3cache
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Relay:
    """An HTTP/1.1 relay on 127.0.0.1 (a free port) to ``target_url`` (http only).

    ``delay``, ``bandwidth`` and ``fault`` may be changed at any time, from any thread;
    ``delay`` and ``fault`` apply from the next request on, ``bandwidth`` from the next
    slice of a response body on.
    """

    def __init__(
        self, target_url: str, *, delay: float = 0.0, bandwidth: float | None = None
    ) -> None:
        parts = urlsplit(target_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Relay target must be an http:// URL, not {target_url!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"Relay target must have no path or query: {target_url!r}")
        self.target_url = target_url
        self._target_host = parts.hostname
        self._target_port = parts.port or 80
        self.delay = delay
        self.bandwidth = bandwidth
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._fault: Fault | None = None
        self._fault_left: int | None = None
        self._upstream_connections = 0
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)

    # -- settings ------------------------------------------------------------------------

    @property
    def delay(self) -> float:
        """Seconds added before the first byte of each response (models an RTT)."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(value)

    @property
    def bandwidth(self) -> float | None:
        """Cap on response body bytes/s per connection, or None for no cap."""
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("bandwidth must be > 0 (or None for no cap)")
        self._bandwidth = None if value is None else float(value)

    @property
    def fault(self) -> Fault | None:
        """The fault in force (None once its ``times`` are used up)."""
        with self._lock:
            return self._fault

    @fault.setter
    def fault(self, value: Fault | None) -> None:
        with self._lock:
            self._fault = value
            self._fault_left = None if value is None else value.times

    # -- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("Relay has not been started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def upstream_connections(self) -> int:
        """How many connections to the upstream the relay has opened so far."""
        with self._lock:
            return self._upstream_connections

    # -- records -------------------------------------------------------------------------

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget the records (and the upstream connection count)."""
        with self._lock:
            self._records.clear()
            self._upstream_connections = 0

    def count(self, method: str | None = None, path_prefix: str | None = None) -> int:
        """Requests recorded, optionally only of ``method`` and whose raw target starts
        with ``path_prefix`` (percent-encoded as on the wire)."""
        return sum(
            1
            for record in self.records()
            if (method is None or record.method == method.upper())
            and (path_prefix is None or record.target.startswith(path_prefix))
        )

    def bytes_sent(self) -> int:
        """Response body bytes relayed to clients, over all records."""
        return sum(record.response_body_bytes for record in self.records())

    def _append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or not fault.matches(method, target):
                return None
            if self._fault_left is not None:
                self._fault_left -= 1
                if self._fault_left <= 0:
                    self._fault = None
                    self._fault_left = None
            return fault

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("Relay is already started")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(
            target=self._run, name=f"relay->{self.target_url}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"Relay did not start within {timeout} s")
        if self._startup_error is not None:
            error = self._startup_error
            self.stop()
            raise RuntimeError(f"Relay could not start: {error}") from error

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection. Idempotent; the port stays known."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("relay thread did not stop within %s s", timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "not started"
        return f"Relay({where} -> {self.target_url})"

    def _run(self) -> None:
        loop = _new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # pragma: no cover - reported through start()
            self._startup_error = exc
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._serve, _HOST, 0, limit=_MAX_HEAD)
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- serving -------------------------------------------------------------------------

    def _piece_size(self) -> int:
        bandwidth = self._bandwidth
        if bandwidth is None:
            return _READ_SIZE
        return int(max(_MIN_SLICE, min(_MAX_SLICE, bandwidth / _SLICES_PER_SECOND)))

    async def _pace(self, client: _Client, size: int) -> None:
        """Token bucket of one slice: wait until the link is free, then book ``size``."""
        bandwidth = self._bandwidth
        if bandwidth is None:
            return
        now = time.monotonic()
        begin = max(now, client.free_at)
        if begin > now:
            await asyncio.sleep(begin - now)
        client.free_at = begin + size / bandwidth

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(next(self._numbers), reader, writer)
        graceful = False
        try:
            while await self._exchange(client):
                pass
            graceful = True
        except (_ConnectionGone, ConnectionError, asyncio.IncompleteReadError, _BadMessage):
            pass  # the client or the upstream broke off (or a fault reset the connection)
        except asyncio.CancelledError:
            pass  # the relay is stopping
        except Exception:
            log.exception("relay: connection %d failed", client.number)
        finally:
            self._tasks.discard(task)
            client.drop_upstream()
            if graceful:
                writer.close()  # after what is buffered has been sent
            else:
                writer.transport.abort()

    async def _exchange(self, client: _Client) -> bool:
        """Serve one request of ``client``; whether the connection stays open."""
        try:
            raw = await client.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed between requests
        except asyncio.LimitOverrunError:
            await self._refuse(client, 431, "RequestHeaderSectionTooLarge")
            return False
        raw = raw.lstrip(b"\r\n")  # empty lines before a request line are allowed
        if not raw:
            return True
        try:
            head = _parse_head(raw)
            framing, length = _request_framing(head)
        except _BadMessage as exc:
            log.warning("relay: bad request from connection %d: %s", client.number, exc)
            await self._refuse(client, 400, "BadRequest")
            return False
        method, target, _version = head.start
        exchange = _Exchange(self, client, method, target, head)
        fault = self._take_fault(method, target)
        if fault is not None:
            exchange.fault = fault.describe()
        try:
            if fault is not None and fault.status is not None:
                return await self._answer_fault(client, exchange, head, framing, length, fault)
            return await self._forward(client, exchange, head, framing, length, fault)
        finally:
            exchange.finish(completed=False)  # a no-op once the response went out

    async def _refuse(self, client: _Client, status: int, code: str) -> None:
        reason = http.HTTPStatus(status).phrase
        body = f"<Error><Code>{code}</Code><Message>{reason}</Message></Error>".encode()
        with contextlib.suppress(Exception):
            await client.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    # -- forwarding ----------------------------------------------------------------------

    async def _connect(self, client: _Client) -> _Upstream:
        if client.upstream is not None and client.upstream.usable():
            return client.upstream
        client.drop_upstream()
        reader, writer = await asyncio.open_connection(
            self._target_host, self._target_port, limit=_MAX_HEAD
        )
        with self._lock:
            self._upstream_connections += 1
        client.upstream = _Upstream(reader, writer)
        return client.upstream

    async def _forward(
        self,
        client: _Client,
        exchange: _Exchange,
        head: _Head,
        framing: str,
        length: int,
        fault: Fault | None,
    ) -> bool:
        for attempt in (1, 2):
            try:
                upstream = await self._connect(client)
            except OSError as exc:
                log.warning("relay: cannot connect to %s: %s", self.target_url, exc)
                return await self._answer_error(client, exchange, head, 502, close=True)
            reused = upstream.exchanges > 0
            upstream.exchanges += 1
            upstream.writer.write(head.raw)
            pump: asyncio.Task[bool] | None = None
            if framing != _NONE:
                pump = asyncio.create_task(self._pump(client, upstream, exchange, framing, length))
            try:
                try:
                    response = await upstream.reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    client.drop_upstream()
                    if reused and pump is None and attempt == 1:
                        continue  # a kept-alive connection the upstream had closed: retry
                    return await self._answer_error(client, exchange, head, 502, close=True)
                return await self._relay_response(client, exchange, head, response, fault, pump)
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pump(
        self, client: _Client, upstream: _Upstream, exchange: _Exchange, framing: str, length: int
    ) -> bool:
        """Stream the request body to the upstream; on failure, break the upstream
        connection so that the response side stops waiting."""
        try:
            async for raw, payload, _last in _body_pieces(
                client.reader, framing, length, lambda: _READ_SIZE
            ):
                upstream.writer.write(raw)
                exchange.request_body_bytes += payload
                await upstream.writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            upstream.close()
            return False
        return True

    async def _relay_response(
        self,
        client: _Client,
        exchange: _Exchange,
        request: _Head,
        raw: bytes,
        fault: Fault | None,
        pump: asyncio.Task[bool] | None,
    ) -> bool:
        upstream = client.upstream
        assert upstream is not None
        await self._wait_delay()
        while True:
            try:
                head = _parse_head(raw)
                status = int(head.start[1])
            except (_BadMessage, ValueError):
                log.warning("relay: bad response head from upstream: %r", raw[:200])
                client.drop_upstream()
                return await self._answer_error(client, exchange, request, 502, close=True)
            if 100 <= status < 200 and status != 101:
                await client.write(raw)  # interim (100 Continue): relay, then read on
                raw = await upstream.reader.readuntil(b"\r\n\r\n")
                continue
            break
        exchange.status = status
        try:
            framing, length = _response_framing(request.start[0].upper(), status, head)
        except _BadMessage:
            client.drop_upstream()
            return await self._answer_error(client, exchange, request, 502, close=True)
        body = None
        if framing != _NONE:
            body = _body_pieces(upstream.reader, framing, length, self._piece_size)
        try:
            keep = await self._send(client, exchange, raw, body, fault)
        except BaseException:
            # Mid-body: the upstream's connection is in an unknown state; the client's
            # response is truncated, which only closing its connection can tell it.
            client.drop_upstream()
            raise
        body_sent = pump is None or (pump.done() and pump.result())
        upstream_keeps = status != 101 and framing != _UNTIL_CLOSE and _keeps_alive(head)
        if not (upstream_keeps and body_sent):
            client.drop_upstream()
        return keep and body_sent and upstream_keeps and _keeps_alive(request)

    async def _wait_delay(self) -> None:
        delay = self._delay
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send(
        self,
        client: _Client,
        exchange: _Exchange,
        head: bytes,
        body: AsyncIterator[_Piece] | None,
        fault: Fault | None,
    ) -> bool:
        """Relay a response head and body with pacing and the fault's stall and reset;
        whether the connection is still usable."""
        stall = fault.stall_seconds if fault is not None else None
        cut = fault.reset_after_bytes if fault is not None else None
        if body is None and stall is None and cut is None:
            exchange.finish(completed=True)
            exchange.head_sent = True
            await client.write(head)
            return True
        exchange.head_sent = True
        await client.write(head)
        if stall:
            await asyncio.sleep(stall)
        sent = 0
        if body is not None:
            async for raw, payload, last in body:
                if cut is not None and (
                    sent + len(raw) > cut or (sent + len(raw) == cut and not last)
                ):
                    take = cut - sent
                    exchange.response_body_bytes += max(0, take - (len(raw) - payload))
                    if take:
                        await self._pace(client, take)
                        await client.write(raw[:take])
                    await client.flushed()
                    exchange.finish(completed=False)
                    _abort_with_rst(client.writer)
                    raise _ConnectionGone
                await self._pace(client, len(raw))
                sent += len(raw)
                exchange.response_body_bytes += payload
                if last and cut is None:
                    exchange.finish(completed=True)
                await client.write(raw)
        exchange.finish(completed=True)
        if cut is not None:  # the whole body was shorter than the cut: reset after it
            await client.flushed()
            _abort_with_rst(client.writer)
            raise _ConnectionGone
        return True

    # -- answers of the relay itself -----------------------------------------------------

    async def _answer_fault(
        self,
        client: _Client,
        exchange: _Exchange,
        head: _Head,
        framing: str,
        length: int,
        fault: Fault,
    ) -> bool:
        assert fault.status is not None
        close = not _keeps_alive(head)
        if framing != _NONE:
            if "100-continue" in head.tokens("expect"):
                close = True  # answer without the body: the client may not send it
            else:
                async for _raw, payload, _last in _body_pieces(
                    client.reader, framing, length, lambda: _READ_SIZE
                ):
                    exchange.request_body_bytes += payload
        return await self._answer_error(
            client, exchange, head, fault.status, close=close, fault=fault
        )

    async def _answer_error(
        self,
        client: _Client,
        exchange: _Exchange,
        request: _Head,
        status: int,
        *,
        close: bool,
        fault: Fault | None = None,
    ) -> bool:
        """Answer an S3 error document of the relay's own (a fault, or 502)."""
        if exchange.head_sent:
            raise _ConnectionGone  # too late for an answer: break the connection
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        code, message = _S3_CODES.get(status, ("InternalError", reason))
        if fault is not None and fault.error_code is not None:
            code = fault.error_code
        request_id = uuid.uuid4().hex[:16].upper()
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(exchange.target.partition('?')[0])}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        lines = [
            f"HTTP/1.1 {status} {reason}",
            "Server: s3cache-relay",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"x-amz-request-id: {request_id}",
            "Content-Type: application/xml",
            f"Content-Length: {len(document)}",
        ]
        if close:
            lines.append("Connection: close")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        exchange.status = status
        await self._wait_delay()
        body = None
        if exchange.method.upper() != "HEAD":
            body = _bytes_pieces(document, self._piece_size)
        keep = await self._send(client, exchange, raw, body, fault)
        return keep and not close
