"""Clients of the benchmark suite: curl (large GETs), wrk (request rates, ranges), a
Python reader (fallback and warm-ups) and an asyncio streamer (many slow streams).

Every client discards what it reads and is bounded in time: each function takes a
timeout or a deadline and kills what it started when it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import http.client
import re
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1024**2
READ_BUFFER = 1 * MiB
STREAM_BUFFER = 256 * 1024
CURL_FORMAT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


@dataclass(frozen=True)
class Fetch:
    """One GET as the client saw it."""

    status: int
    size: int
    ttfb: float  # request sent -> first response byte (curl: time_starttransfer)
    seconds: float  # whole transfer

    @property
    def bytes_per_second(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, raw target with query) of an http:// URL."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port, target


# --- curl --------------------------------------------------------------------------------


def curl_path() -> str | None:
    return shutil.which("curl")


def _start_curl(curl: str, url: str, timeout: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [curl, "-s", "-o", "/dev/null", "--max-time", f"{timeout:.0f}", "-w", CURL_FORMAT, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _finish_curl(process: subprocess.Popen[str], deadline: float) -> Fetch:
    try:
        out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return Fetch(0, 0, 0.0, 0.0)
    fields = out.split()
    if len(fields) != 4:
        return Fetch(0, 0, 0.0, 0.0)
    return Fetch(int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3]))


def fetch_parallel(urls: Sequence[str], timeout: float) -> tuple[list[Fetch], float]:
    """GET every URL at once (curl processes, else Python threads); the fetches and the
    wall time from the first start to the last end."""
    curl = curl_path()
    began = time.monotonic()
    deadline = began + timeout
    if curl is None:
        results: list[Fetch] = [Fetch(0, 0, 0.0, 0.0)] * len(urls)

        def work(i: int, url: str) -> None:
            results[i] = python_fetch(url, timeout=timeout)

        threads = [threading.Thread(target=work, args=(i, u)) for i, u in enumerate(urls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return results, time.monotonic() - began
    processes: list[subprocess.Popen[str]] = []
    try:
        processes = [_start_curl(curl, url, timeout) for url in urls]
        fetches = [_finish_curl(process, deadline) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return fetches, time.monotonic() - began


def fetch(url: str, timeout: float) -> Fetch:
    """One GET with curl, or with the Python reader when curl is missing."""
    fetches, _ = fetch_parallel([url], timeout)
    return fetches[0]


# --- the Python reader ---------------------------------------------------------------------


def python_fetch(
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 600.0,
    connection: http.client.HTTPConnection | None = None,
) -> Fetch:
    """GET ``url``, discarding the body into one reused buffer (recv_into)."""
    host, port, target = split_url(url)
    conn = connection or http.client.HTTPConnection(host, port, timeout=timeout)
    buffer = bytearray(READ_BUFFER)
    view = memoryview(buffer)
    began = time.perf_counter()
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
        ttfb = time.perf_counter() - began
        size = 0
        while read := response.readinto(view):
            size += read
        return Fetch(response.status, size, ttfb, time.perf_counter() - began)
    finally:
        if connection is None:
            conn.close()


def read_all(urls: Sequence[str], timeout: float = 600.0) -> list[Fetch]:
    """GET each URL once in order over one kept-alive connection per host (warm-ups)."""
    connections: dict[tuple[str, int], http.client.HTTPConnection] = {}
    fetches = []
    try:
        for url in urls:
            host, port, _ = split_url(url)
            conn = connections.get((host, port))
            if conn is None:
                conn = connections[host, port] = http.client.HTTPConnection(
                    host, port, timeout=timeout
                )
            fetches.append(python_fetch(url, timeout=timeout, connection=conn))
    finally:
        for conn in connections.values():
            conn.close()
    return fetches


# --- wrk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    output: str = field(repr=False)
    cpu_seconds: float = 0.0  # wrk's own CPU time (user + system), where measured

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / max(self.requests, 1) * 1e6


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_wrk_script(
    path: Path, targets: Sequence[str], range_span: int = 0, object_size: int = 0
) -> None:
    """A wrk script: each request is the next target of the list (each thread starts at
    its own place), or, with ``range_span``, a random target with a random
    ``Range: bytes=a-(a+span-1)`` inside ``object_size``."""
    items = ",\n".join(f"  {_lua_string(t)}" for t in targets)
    path.write_text(
        f"""-- generated by bench/loadgen.py
local targets = {{
{items}
}}
local span = {range_span}
local size = {object_size}
local counter = 1
local position = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  math.randomseed(id * 7919 + os.time())
  position = (id * 7919) % #targets
end

function request()
  local headers = {{ Host = wrk.headers["Host"] }}
  local target
  if span > 0 then
    target = targets[math.random(#targets)]
    local first = math.random(0, size - span)
    headers["Range"] = "bytes=" .. first .. "-" .. (first + span - 1)
  else
    position = position % #targets + 1
    target = targets[position]
  end
  return wrk.format("GET", target, headers)
end
"""
    )


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    count = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if not (rate and p50 and p99 and count):
        raise ValueError(f"cannot parse wrk output:\n{output}")
    return WrkResult(
        requests_per_second=float(rate.group(1)),
        p50_ms=_to_ms(*p50.groups()),
        p99_ms=_to_ms(*p99.groups()),
        requests=int(count.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        output=output,
    )


def run_wrk(
    wrk: str, endpoint_url: str, script: Path, threads: int, connections: int, seconds: float
) -> WrkResult:
    command = [
        wrk,
        "--latency",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        endpoint_url + "/",
    ]
    before = _children_cpu_seconds()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    cpu = _children_cpu_seconds() - before
    return dataclasses.replace(parse_wrk(done.stdout + done.stderr), cpu_seconds=cpu)


def _children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children: the load generator shares the
    machine with the servers, and its share bounds theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- many slow streams (asyncio) -------------------------------------------------------------


class _Discard(asyncio.BufferedProtocol):
    """Reads a response into a shared scratch buffer; counts bytes, keeps the first line."""

    def __init__(self, buffer: bytearray, closed: asyncio.Future[None]) -> None:
        self.buffer = buffer
        self.closed = closed
        self.received = 0
        self.first = b""

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.received == 0:
            self.first = bytes(self.buffer[:12])
        self.received += nbytes

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class StreamStats:
    bytes_per_stream: list[int]
    responses: int
    bad_status: int
    seconds: float


async def _one_stream(
    url: str, deadline: float, buffer: bytearray, index: int, stats: StreamStats
) -> None:
    loop = asyncio.get_running_loop()
    host, port, target = split_url(url)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    ).encode()
    while loop.time() < deadline:
        closed: asyncio.Future[None] = loop.create_future()
        transport, protocol = await loop.create_connection(
            functools.partial(_Discard, buffer, closed), host, port
        )
        transport.write(request)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), max(0.0, deadline - loop.time()))
        finally:
            transport.abort()
            stats.bytes_per_stream[index] += protocol.received
            stats.responses += 1
            if protocol.received and not protocol.first.startswith(b"HTTP/1.1 200"):
                stats.bad_status += 1


async def _streams(urls: Sequence[str], seconds: float) -> StreamStats:
    loop = asyncio.get_running_loop()
    stats = StreamStats([0] * len(urls), 0, 0, 0.0)
    buffer = bytearray(STREAM_BUFFER)
    began = loop.time()
    deadline = began + seconds
    tasks = [
        asyncio.create_task(_one_stream(url, deadline, buffer, i, stats))
        for i, url in enumerate(urls)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stats.seconds = loop.time() - began
    return stats


def stream_for(urls: Sequence[str], seconds: float) -> StreamStats:
    """One concurrent stream per URL, each GETting its URL again and again (discarding
    the bytes) until ``seconds`` have passed; then every connection is cut."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of s3cache
        return asyncio.run(_streams(urls, seconds))
    return uvloop.run(_streams(urls, seconds))
