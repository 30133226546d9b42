"""The ceiling of a Python server on this machine: how many 100 KiB responses per second
a server that does nothing else can send to wrk (64 connections, 2 threads).

    aiohttp  an aiohttp app on uvloop answering every GET with the same bytes
    raw      an asyncio.Protocol on uvloop writing a canned response per request head

each with 1 and 2 processes sharing the port (SO_REUSEPORT). s3cache's hit path does
the same work plus SigV4 verification, S3 semantics, metrics and the cache lookup.

A benchmark, not a test: it reports, it does not assert.

    .venv/bin/python -m bench.http_ceiling [--seconds 8] [--size 102400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import uvloop
from aiohttp import web

from bench import loadgen
from s3cache.sandbox.proxy import free_port


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


class _Canned(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            _, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            assert self._transport is not None
            self._transport.write(self._response)


async def _serve(kind: str, port: int, size: int) -> None:
    body = os.urandom(size)
    sock = _listen(port)
    if kind == "aiohttp":

        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_get("/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _Canned(head + body), sock=sock)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=100 * 1024)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve(args.serve[0], int(args.serve[1]), args.size))
        return
    wrk = loadgen.wrk_path()
    if wrk is None:
        sys.exit("wrk not found (apt-get install wrk)")
    for kind in ("aiohttp", "raw"):
        for processes in (1, 2):
            port = free_port()
            command = [sys.executable, "-m", "bench.http_ceiling", "--size", str(args.size)]
            servers = [
                subprocess.Popen([*command, "--serve", kind, str(port)]) for _ in range(processes)
            ]
            try:
                time.sleep(1.5)
                done = subprocess.run(
                    [wrk, "-t2", "-c64", f"-d{args.seconds:g}s", "--latency",
                     f"http://127.0.0.1:{port}/x"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                result = loadgen.parse_wrk(done.stdout)
                print(
                    f"{kind:8} {processes} process(es): {result.requests_per_second:,.0f} req/s, "
                    f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms",
                    flush=True,
                )
            finally:
                for server in servers:
                    server.terminate()
                    server.wait()


if __name__ == "__main__":
    main()
