"""send_file_range() on a real aiohttp server under uvloop, spoken to over real sockets.

Every send test runs twice: once forced onto the zero-copy path (``sendfile``) and once
onto the chunked fallback, with a pool of POOL_THREADS workers. The server runs on its
own uvloop loop (tests marked LOOPS: also the default asyncio loop) in a background
thread, inside ``blockbuster()``, so any blocking call made on its loop fails the
request. Clients are blocking sockets, http.client, and an aiohttp client on its own
loop. The remaining tests check how ``auto`` picks a path (plain TCP, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx

from s3cache import sendfile
from s3cache.pagecache import PROBE
from s3cache.sendfile import send_file_range

KiB = 1024
MiB = 1024 * KiB
SIZES = {"empty": 0, "one": 1, "small": 64 * KiB, "four": 4 * MiB, "big": 20 * MiB}
POOL_THREADS = 4
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@contextlib.contextmanager
def blockbuster() -> Iterator[BlockBuster]:
    """Any blocking call on the loop fails, except the one sendfile the loop makes for
    a range the page cache holds (as s3cache's own debug_blocking allows)."""
    with blockbuster_ctx() as buster:
        buster.functions["os.sendfile"].can_block_in("s3cache/sendfile.py", "_sendfile_now")
        yield buster


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sendfile")


@pytest.fixture(scope="module")
def files(root: Path) -> dict[str, bytes]:
    """name -> content of the files served from ``root``."""
    rng = random.Random(20261127)
    out = {}
    for name, size in SIZES.items():
        out[name] = rng.randbytes(size)
        (root / name).write_bytes(out[name])
    return out


# --- the server ------------------------------------------------------------------------


class _BufferedHeaders(web.StreamResponse):
    """A response whose headers aiohttp holds back until the first body write, as it
    does for web.Response (aiohttp >= 3.10, StreamWriter.send_headers)."""

    _send_headers_immediately = False


@dataclass
class Server:
    """An aiohttp app on uvloop in a thread. Handlers serve files with send_file_range."""

    root: Path
    loop_factory: LoopFactory = uvloop.new_event_loop
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    loop_errors: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # tag -> "ok" or exception name
    peers: list[tuple[str, int]] = field(default_factory=list)
    tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    _started: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Server:
        self._thread = threading.Thread(target=self._run, name="test-server")
        self._thread.start()
        assert self._started.wait(10), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        assert self._thread is not None
        self._thread.join(30)
        assert not self._thread.is_alive()

    def url(self, path: str) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/file/{name}", self._file)
        app.router.add_get("/regions/{name}", self._regions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = runner.addresses[0][1]
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _open(self, name: str) -> int:
        return await asyncio.to_thread(os.open, self.root / name, os.O_RDONLY)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """GET /file/NAME?offset=&count=&tag=&declare=&sndbuf=: the range as the whole
        body (``sndbuf``: the connection's SO_SNDBUF first)."""
        q = request.query
        tag = q.get("tag", "")
        self.peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        if "sndbuf" in q:
            sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(q["sndbuf"]))
        self.tasks[tag] = asyncio.current_task()  # type: ignore[assignment]
        fd = await self._open(request.match_info["name"])
        try:
            size = os.fstat(fd).st_size
            offset = int(q.get("offset", 0))
            count = int(q.get("count", size - offset))
            response = web.StreamResponse()
            response.content_length = int(q.get("declare", count))
            await response.prepare(request)
            await send_file_range(request, response, fd, offset, count)
            await response.write_eof()
            self.outcomes[tag] = "ok"
            return response
        except BaseException as exc:
            self.outcomes[tag] = type(exc).__name__
            raise
        finally:
            os.close(fd)

    async def _regions(self, request: web.Request) -> web.StreamResponse:
        """GET /regions/NAME?r=OFF:LEN,...&w=N&raw=: ``w`` lead bytes, then for each
        region a literal marker from response.write() and the region, then "end".

        With ``raw`` the lead goes straight to ``transport.write()``, which does not
        wait, so megabytes are still in the transport's buffer when the first region
        starts (aiohttp's own writes drain down to the low-water mark only)."""
        regions = [tuple(map(int, r.split(":"))) for r in request.query["r"].split(",")]
        lead = b"L" * int(request.query.get("w", 0))
        raw = "raw" in request.query
        fd = await self._open(request.match_info["name"])
        try:
            response = web.StreamResponse() if raw else _BufferedHeaders()
            response.content_length = len(lead) + sum(8 + n for _, n in regions) + 3
            await response.prepare(request)
            if raw:
                assert request.transport is not None
                request.transport.write(lead)
                response._payload_writer.length -= len(lead)  # type: ignore[operator,union-attr]
            else:
                await response.write(lead)
            for i, (offset, count) in enumerate(regions):
                await response.write(b"<%06d>" % i)
                await send_file_range(request, response, fd, offset, count)
            await response.write(b"end")
            await response.write_eof()
            return response
        finally:
            os.close(fd)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="test-sendfile")
    sendfile.set_executor(executor)
    yield executor
    sendfile.set_executor(None)
    executor.shutdown(wait=True)  # hangs (and times out) if a worker is stuck


@pytest.fixture(params=["sendfile", "fallback"])
def mode(request: pytest.FixtureRequest, pool: ThreadPoolExecutor) -> Iterator[str]:
    sendfile.set_mode(request.param)
    yield request.param
    sendfile.set_mode("auto")


LOOPS = pytest.mark.parametrize(
    "loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"]
)


@pytest.fixture
def loop_factory() -> LoopFactory:
    """The server's loop; tests marked LOOPS also run on the default asyncio loop."""
    return uvloop.new_event_loop


@pytest.fixture
def server(
    root: Path, files: dict[str, bytes], mode: str, loop_factory: LoopFactory
) -> Iterator[Server]:
    with blockbuster(), Server(root, loop_factory=loop_factory) as srv:
        yield srv
    assert srv.loop_errors == []


# --- clients ---------------------------------------------------------------------------


def http_get(conn: http.client.HTTPConnection, path: str, method: str = "GET") -> bytes:
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body[:200]
    assert len(body) == int(response.headers["Content-Length"]) or method == "HEAD"
    return body


def fetch(server: Server, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        return http_get(conn, path)
    finally:
        conn.close()


class RawClient:
    """A GET over a bare socket, so the test decides when and how much to read."""

    def __init__(self, server: Server, path: str, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        self.length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            .split(b":")[1]
            .strip()
        )
        self.body = bytearray()

    def read(self, n: int) -> int:
        """Read up to n body bytes; returns how many arrived (0 at EOF)."""
        chunk = self.sock.recv(min(n, self.length - len(self.body)) or 1)
        self.body += chunk
        return len(chunk)

    def read_to_end(self) -> bytes:
        """Read until Content-Length or until the server closes the connection."""
        try:
            while len(self.body) < self.length and self.read(1 * MiB):
                pass
        except ConnectionResetError:
            pass
        return bytes(self.body)

    def close(self) -> None:
        self.sock.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def pool_is_idle(pool: ThreadPoolExecutor) -> bool:
    """All POOL_THREADS workers can run at once: none is stuck in a send."""
    barrier = threading.Barrier(POOL_THREADS + 1)
    jobs = [pool.submit(barrier.wait, 5) for _ in range(POOL_THREADS)]
    barrier.wait(5)
    return all(job.result() >= 0 for job in jobs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def path_bytes(mode: str) -> int:
    s = sendfile.stats()
    return s.zero_copy_bytes if mode == "sendfile" else s.fallback_bytes


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty", "one", "small", "big"])
def test_whole_file(server: Server, files: dict[str, bytes], mode: str, name: str) -> None:
    before = path_bytes(mode)
    assert fetch(server, f"/file/{name}") == files[name]
    # The forced path carried it (its books close just after the client has the bytes).
    wait_for(lambda: path_bytes(mode) - before == len(files[name]))


@pytest.mark.parametrize(
    ("offset", "count"),
    [(0, 1), (20 * MiB - 1, 1), (12345, 1 * MiB), (3 * MiB + 7, 9 * MiB), (0, 20 * MiB - 1)],
)
def test_ranges(server: Server, files: dict[str, bytes], offset: int, count: int) -> None:
    body = fetch(server, f"/file/big?offset={offset}&count={count}")
    assert body == files["big"][offset : offset + count]


@pytest.mark.parametrize("lead", [0, 8 * MiB])
def test_regions_interleaved_with_writes(
    server: Server, files: dict[str, bytes], lead: int
) -> None:
    regions = [(0, 100), (5 * MiB, 3 * MiB), (5 * MiB, 1), (20 * MiB - 10, 10), (7, 65537)]
    spec = ",".join(f"{o}:{n}" for o, n in regions)
    body = fetch(server, f"/regions/big?r={spec}&w={lead}")
    big = files["big"]
    expected = b"L" * lead
    expected += b"".join(b"<%06d>" % i + big[o : o + n] for i, (o, n) in enumerate(regions))
    assert body == expected + b"end"


def test_regions_behind_a_slow_client(server: Server, files: dict[str, bytes]) -> None:
    """Bytes still in the transport's buffer (the client is not reading) must reach
    the socket before the raw send; it must wait for them, not overtake them."""
    regions = [(0, 3 * MiB), (1, 1 * MiB), (5 * MiB, 2 * MiB), (9, 9)]
    spec = ",".join(f"{o}:{n}" for o, n in regions)
    client = RawClient(server, f"/regions/big?r={spec}&w={8 * MiB}&raw=1", rcvbuf=64 * KiB)
    time.sleep(0.3)  # kernel buffers fill up
    body = client.read_to_end()
    client.close()
    big = files["big"]
    expected = b"L" * 8 * MiB
    expected += b"".join(b"<%06d>" % i + big[o : o + n] for i, (o, n) in enumerate(regions))
    assert body == expected + b"end"


def test_keep_alive_reuse(server: Server, files: dict[str, bytes]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        big = files["big"]
        assert http_get(conn, "/file/big") == big
        local = conn.sock.getsockname()
        assert http_get(conn, "/file/small") == files["small"]
        assert http_get(conn, "/file/big?offset=1000&count=3000000") == big[1000:3001000]
        assert http_get(conn, "/file/big", method="HEAD") == b""
        assert http_get(conn, "/file/one") == files["one"]
        # Back-to-back small responses: a socket left corked, or a tail held back by
        # Nagle, would add a delayed-ACK stall (~40 ms) to each.
        started = time.monotonic()
        for _ in range(50):
            assert http_get(conn, "/file/small") == files["small"]
        assert time.monotonic() - started < 1.5
        assert conn.sock.getsockname() == local
    finally:
        conn.close()
    assert len(server.peers) == 55 and len(set(server.peers)) == 1  # one connection


@pytest.mark.parametrize("stall", [False, True], ids=["reading", "stalled"])
def test_client_disconnects_midway(
    server: Server, pool: ThreadPoolExecutor, files: dict[str, bytes], mode: str, stall: bool
) -> None:
    fds = open_fds()
    client = RawClient(server, "/file/big?tag=gone", rcvbuf=64 * KiB)
    if not stall:
        while len(client.body) < 1 * MiB:
            client.read(64 * KiB)
    time.sleep(0.2)  # the server is now waiting for the socket to drain
    # Unread data in the receive buffer makes close() send RST.
    client.close()
    wait_for(lambda: "gone" in server.outcomes)
    assert server.outcomes["gone"] in ("ConnectionResetError", "ClientConnectionResetError")
    assert pool_is_idle(pool)
    assert fetch(server, "/file/big") == files["big"]  # still healthy
    wait_for(lambda: open_fds() <= fds)  # no duplicate fd leaked


@LOOPS
@pytest.mark.parametrize("reader", ["steady", "stalled"])
def test_cancelled_mid_send(
    server: Server,
    pool: ThreadPoolExecutor,
    files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    reader: str,
) -> None:
    """The handler task is cancelled while a worker is inside its sendfile/poll loop:
    the worker must stop at once, the connection must end with a short body.

    Long slices and poll waits keep the worker in the thread for the whole response,
    so the cancellation lands mid-job; only the socket shutdown can stop it in time."""
    monkeypatch.setattr(sendfile, "SLICE_SECONDS", 60.0)
    monkeypatch.setattr(sendfile, "POLL_SECONDS", 60.0)
    fds = open_fds()
    client = RawClient(server, "/file/big?tag=cancel", rcvbuf=64 * KiB)
    while len(client.body) < 2 * MiB:
        client.read(64 * KiB)
    if reader == "steady":  # keeps reading until the connection ends
        drain = threading.Thread(target=client.read_to_end)
        drain.start()
    else:
        time.sleep(0.2)
    assert server.loop is not None
    server.loop.call_soon_threadsafe(server.tasks["cancel"].cancel)
    wait_for(lambda: "cancel" in server.outcomes)
    assert server.outcomes["cancel"] == "CancelledError"
    assert pool_is_idle(pool)  # well before the 60 s slice or poll would end
    started = time.monotonic()
    if reader == "steady":
        drain.join(5)
    body = client.read_to_end()  # what was sent before, then EOF or RST
    assert time.monotonic() - started < 5
    assert len(body) < len(files["big"])
    assert body == files["big"][: len(body)]
    client.close()
    assert fetch(server, "/file/small") == files["small"]
    wait_for(lambda: open_fds() <= fds)


def test_many_concurrent_clients(
    server: Server, pool: ThreadPoolExecutor, files: dict[str, bytes]
) -> None:
    """64 concurrent 4 MiB reads through a pool of 4 threads: all complete, bytes exact."""
    want = hashlib.sha256(files["four"]).hexdigest()

    async def one(session: aiohttp.ClientSession) -> str:
        async with session.get(server.url("/file/four")) as response:
            assert response.status == 200
            digest = hashlib.sha256()
            async for chunk in response.content.iter_chunked(1 * MiB):
                digest.update(chunk)
            return digest.hexdigest()

    async def run() -> list[str]:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await asyncio.gather(*(one(session) for _ in range(64)))

    assert asyncio.run(run()) == [want] * 64
    assert pool_is_idle(pool)


@LOOPS
def test_slow_readers_do_not_starve_a_fast_one(
    server: Server, files: dict[str, bytes], mode: str
) -> None:
    """Stalled and slow clients must not hold the pool: with one worker thread, a fast
    client still gets 20 MiB quickly while eight others barely read."""
    sendfile.set_executor(single := ThreadPoolExecutor(1))
    try:
        waits = sendfile.stats().writable_waits
        slow = [RawClient(server, f"/file/big?tag=slow{i}", rcvbuf=64 * KiB) for i in range(8)]
        time.sleep(0.3)  # all eight now have a full socket buffer
        if mode == "sendfile":  # and have given the thread back to the loop
            wait_for(lambda: sendfile.stats().writable_waits - waits >= 8)
        for client in slow[:4]:  # half trickle, half stall
            client.read(64 * KiB)
        started = time.monotonic()
        assert fetch(server, "/file/big") == files["big"]
        fast = time.monotonic() - started
        assert fast < 5, f"fast client took {fast:.1f} s behind slow ones"
        for client in slow:
            assert client.read_to_end() == files["big"]
            client.close()
    finally:
        sendfile.set_executor(None)
        single.shutdown(wait=True)


def test_file_shorter_than_range_aborts(server: Server, files: dict[str, bytes]) -> None:
    """The client must never take a short body as complete."""
    client = RawClient(server, "/file/small?tag=short&offset=1000&count=70000")
    body = client.read_to_end()
    client.close()
    assert len(body) < client.length == 70000
    assert body == files["small"][1000 : 1000 + len(body)]
    wait_for(lambda: "short" in server.outcomes)
    assert server.outcomes["short"] == "EOFError"
    assert fetch(server, "/file/one") == files["one"]


def test_count_beyond_content_length_is_refused(server: Server) -> None:
    client = RawClient(server, "/file/small?tag=over&count=1000&declare=999")
    client.read_to_end()
    client.close()
    wait_for(lambda: "over" in server.outcomes)
    assert server.outcomes["over"] == "ValueError"


# --- path selection --------------------------------------------------------------------


@pytest.fixture
def auto_mode() -> Iterator[None]:
    sendfile.set_mode("auto")
    yield
    sendfile.set_mode("auto")
    sendfile.set_executor(None)


@LOOPS
def test_auto_is_zero_copy_on_plain_tcp(
    root: Path, files: dict[str, bytes], auto_mode: None, loop_factory: LoopFactory
) -> None:
    with blockbuster(), Server(root, loop_factory=loop_factory) as server:
        before = sendfile.stats().zero_copy_bytes
        assert fetch(server, "/file/big") == files["big"]
        # The client can have every byte just before the handler books the last slice.
        wait_for(lambda: sendfile.stats().zero_copy_bytes - before == len(files["big"]))
    assert server.loop_errors == []


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    return server_ctx, client_ctx


def test_tls_takes_the_fallback(
    root: Path,
    files: dict[str, bytes],
    auto_mode: None,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    with blockbuster(), Server(root, ssl_context=server_ctx) as server:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_ctx)
        try:
            before = sendfile.stats()
            assert http_get(conn, "/file/big?offset=5&count=5000000") == files["big"][5:5000005]
            wait_for(lambda: sendfile.stats().fallback_bytes - before.fallback_bytes == 5000000)
            assert sendfile.stats().zero_copy_bytes == before.zero_copy_bytes
            sendfile.set_mode("sendfile")  # forcing zero-copy over TLS is refused
            conn.request("GET", "/file/small?tag=forced")
            with pytest.raises(http.client.IncompleteRead):  # 200 sent, then closed
                conn.getresponse().read()
        finally:
            conn.close()
    assert server.outcomes["forced"] == "RuntimeError"
    assert server.loop_errors == []


def test_set_mode_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        sendfile.set_mode("splice")  # type: ignore[arg-type]


@LOOPS
def test_auto_sends_small_cached_ranges_from_the_loop(
    root: Path, files: dict[str, bytes], auto_mode: None, loop_factory: LoopFactory
) -> None:
    """A small range whose pages are cached is sent by the loop (one sendfile where
    cachestat tells what is cached, else an RWF_NOWAIT read), without a worker; the same
    range once dropped from the page cache takes the zero-copy path."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT on this platform")
    probe = os.open(root / "small", os.O_RDONLY)
    try:
        os.preadv(probe, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:
        pytest.skip("this filesystem has no RWF_NOWAIT")
    finally:
        os.close(probe)
    with blockbuster(), Server(root, loop_factory=loop_factory) as server:
        before = sendfile.stats()
        assert fetch(server, "/file/small") == files["small"]
        # The books close just after the client has the bytes.
        wait_for(lambda: sendfile.stats().inline_bytes - before.inline_bytes == len(files["small"]))
        assert sendfile.stats().zero_copy_bytes == before.zero_copy_bytes

        fd = os.open(root / "small", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        before = sendfile.stats()
        assert fetch(server, "/file/small") == files["small"]
        # Pages the kernel kept anyway go inline; the rest goes zero-copy.
        wait_for(
            lambda: (
                (s := sendfile.stats()).inline_bytes
                + s.zero_copy_bytes
                - before.inline_bytes
                - before.zero_copy_bytes
                == len(files["small"])
            )
        )
    assert server.loop_errors == []


@pytest.mark.skipif(PROBE is None, reason="no cachestat (Linux 6.5+) here")
def test_auto_cached_range_to_a_slow_client_finishes_zero_copy(
    root: Path, files: dict[str, bytes], auto_mode: None
) -> None:
    """The loop's one sendfile into a client that reads slowly sends only what the
    socket takes at once; the rest of the range goes the zero-copy way, in order."""
    assert PROBE is not None
    offset, count = 12345, sendfile.INLINE_MAX
    with open(root / "four", "rb") as warm:
        warm.read()  # every page cached
        assert PROBE.holds(warm.fileno(), offset, count)
    with blockbuster(), Server(root) as server:
        before = sendfile.stats()
        path = f"/file/four?offset={offset}&count={count}&sndbuf=65536"
        client = RawClient(server, path, rcvbuf=4096)
        try:
            time.sleep(0.2)  # the socket fills up and stays full for a while
            body = client.read_to_end()
        finally:
            client.close()
        assert body == files["four"][offset : offset + count]
        wait_for(lambda: server.outcomes.get("") == "ok")
        after = sendfile.stats()
        inline = after.inline_bytes - before.inline_bytes
        zero_copy = after.zero_copy_bytes - before.zero_copy_bytes
        assert inline > 0 and zero_copy > 0 and inline + zero_copy == count
    assert server.loop_errors == []


@pytest.mark.skipif(PROBE is None, reason="no cachestat (Linux 6.5+) here")
def test_page_cache_probe_tells_cached_from_dropped(root: Path, files: dict[str, bytes]) -> None:
    assert PROBE is not None
    fd = os.open(root / "four", os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.pread(fd, size, 0)
        assert PROBE.holds(fd, 0, size) and PROBE.holds(fd, 5000, 1)
        assert PROBE.holds(fd, 0, 0)
        os.fsync(fd)  # the fixture just wrote it: dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not PROBE.holds(fd, 0, size)
        assert not PROBE.holds(-1, 0, 1)  # a bad fd: "not known to be cached"
    finally:
        os.close(fd)
