"""Cache-hit send paths, side by side: how fast a page-cached file leaves the server.

Four servers, each its own process on loopback, serve the same file:

    A  uvloop   + send_file_range, zero-copy path (os.sendfile in a worker pool)
    B  uvloop   + send_file_range, fallback path (1 MiB os.pread in the pool + write)
    C  uvloop   + aiohttp web.FileResponse (uvloop has no loop.sendfile: aiohttp reads
                  chunks in the default executor and copies them through the transport)
    D  asyncio  + aiohttp web.FileResponse (the default loop has loop.sendfile)

The file (``--size``, 256 MiB) is written once and read once so it is page-cached. The
client is curl (``-s -o /dev/null -w '%{speed_download}'``), or, without curl, a Python
socket reader that discards into a bytearray with recv_into. For each stream count
(``--streams``, 1 and 8) it runs ``--runs`` rounds, each alternating A B C D, and prints
the median MB/s (1 MB = 10^6 bytes; for N streams, N x size / wall time of the batch),
the server process's CPU seconds (user + system, all threads) per GB sent, and its peak
RSS over the whole run. A variant may carry overrides of s3cache.sendfile's
tuning constants, measured side by side with the default: ``--variants A,A+CORK=1,B``.

A benchmark, not a test: it reports, it does not assert.

    .venv/bin/python bench/sendfile_paths.py [--size 256MiB] [--runs 5] [--streams 1,8]
        [--variants A,B,C,D]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import uvloop
from aiohttp import web

from s3cache import sendfile

MiB = 1024**2
Getter = Callable[[str], float]  # one GET of a URL -> bytes per second
VARIANTS = {
    "A": "uvloop + send_file_range (zero-copy)",
    "B": "uvloop + send_file_range (fallback)",
    "C": "uvloop + web.FileResponse",
    "D": "asyncio + web.FileResponse (loop.sendfile)",
}


# --- the servers (run as subprocesses: python sendfile_paths.py --serve X) -------------


def serve(variant: str, port: int, path: Path, overrides: list[str]) -> None:
    for item in overrides:
        name, value = item.split("=", 1)
        setattr(sendfile, name, type(getattr(sendfile, name))(float(value)))

    async def with_send_file_range(request: web.Request) -> web.StreamResponse:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            response = web.StreamResponse()
            response.content_length = size
            await response.prepare(request)
            await sendfile.send_file_range(request, response, fd, 0, size)
            await response.write_eof()
            return response
        finally:
            os.close(fd)

    async def with_file_response(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    sendfile.set_mode("fallback" if variant == "B" else "sendfile")
    app = web.Application()
    app.router.add_get("/", with_file_response if variant in "CD" else with_send_file_range)
    loop_factory = asyncio.new_event_loop if variant == "D" else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_forever(app, port))


async def _serve_forever(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# --- the client ------------------------------------------------------------------------


def curl_get(url: str) -> float:
    """Bytes per second for one GET, as curl measures it."""
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out)


def socket_get(url: str) -> float:
    """Bytes per second for one GET read with recv_into and discarded."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    buf = bytearray(1 * MiB)
    view = memoryview(buf)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        total = 0
        while n := sock.recv_into(view):
            total += n
    return total / (time.perf_counter() - started)


def batch(get: Getter, url: str, streams: int) -> float:
    """Wall time of ``streams`` concurrent GETs."""
    threads = [threading.Thread(target=get, args=(url,)) for _ in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


# --- bookkeeping -----------------------------------------------------------------------


@dataclass
class Server:
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    speeds: dict[int, list[float]] = field(default_factory=dict)  # streams -> MB/s
    cpu: dict[int, list[float]] = field(default_factory=dict)  # streams -> CPU s per GB

    def cpu_seconds(self) -> float:
        """CPU time of all the server's threads: schedstat (ns) where the kernel has it,
        else utime + stime from /proc/PID/stat (clock ticks, 10 ms)."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        try:
            return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def parse_size(text: str) -> int:
    units = {"KIB": 1024, "MIB": MiB, "GIB": 1024**3, "": 1}
    t = text.strip().upper()
    for unit in ("KIB", "MIB", "GIB"):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()} {platform.system()} {platform.release()}, {cpu}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"aiohttp {version('aiohttp')}, uvloop {version('uvloop')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--variants", default="A,B,C,D")
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.file, args.set)
        return

    size = parse_size(args.size)
    stream_counts = [int(s) for s in args.streams.split(",")]
    curl = shutil.which("curl")
    get: Getter = curl_get if curl else socket_get
    if curl:
        curl_version = subprocess.run([curl, "--version"], capture_output=True, text=True)
        client = f"curl {curl_version.stdout.split()[1]} -s -o /dev/null -w %{{speed_download}}"
    else:
        client = "Python socket reader, recv_into a 1 MiB bytearray, discarded"
    with tempfile.TemporaryDirectory(prefix="sendfile-bench-") as tmp:
        path = Path(tmp) / "object"
        with path.open("wb") as f:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
            f.write(block[: size % MiB])
        path.read_bytes()  # into the page cache
        servers = [start(v, path) for v in args.variants.split(",")]
        try:
            print("method:")
            print(f"  machine: {machine()}")
            print(f"  file: {size / MiB:.0f} MiB, page-cached, in {tmp}")
            order = " ".join(v.split("+")[0] for v in args.variants.split(","))
            print(f"  client: {client}; {args.runs} rounds per stream count, {order} alternating")
            print("  servers: one process each on 127.0.0.1:")
            for s in servers:
                print(f"    {s.variant:<10} {VARIANTS[s.variant[0]]}")
            for s in servers:  # warm up: one GET each
                get(f"http://127.0.0.1:{s.port}/")
            for streams in stream_counts:
                for _ in range(args.runs):
                    for s in servers:
                        measure(s, get, streams, size)
            report(servers, stream_counts)
        finally:
            for s in servers:
                s.process.terminate()
                s.process.wait(10)


def start(variant: str, path: Path) -> Server:
    """Start a server for ``X`` or ``X+NAME=VALUE+...`` (overrides for A and B)."""
    base, *overrides = variant.split("+")
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", base, "--port", str(port), "--file", str(path)]
    for item in overrides:
        cmd += ["--set", item]
    process = subprocess.Popen(cmd)
    wait_listening(port)
    return Server(variant, port, process)


def measure(server: Server, get: Getter, streams: int, size: int) -> None:
    url = f"http://127.0.0.1:{server.port}/"
    cpu_before = server.cpu_seconds()
    # One stream: curl's own figure; several: all bytes over the batch's wall time.
    speed = get(url) if streams == 1 else streams * size / batch(get, url, streams)
    cpu = server.cpu_seconds() - cpu_before
    server.speeds.setdefault(streams, []).append(speed / 1e6)
    server.cpu.setdefault(streams, []).append(cpu / (streams * size / 1e9))


def report(servers: list[Server], stream_counts: list[int]) -> None:
    w = max(len(s.variant) for s in servers) + 2
    print()
    print(f"{'variant':<{w}}{'streams':>7}{'MB/s':>8}{'min-max':>12}{'CPU s/GB':>10}{'RSS MiB':>9}")
    for streams in stream_counts:
        for s in servers:
            speeds = s.speeds[streams]
            spread = f"{min(speeds):.0f}-{max(speeds):.0f}"
            print(
                f"{s.variant:<{w}}{streams:>7}{statistics.median(speeds):>8.0f}{spread:>12}"
                f"{statistics.median(s.cpu[streams]):>10.3f}{s.peak_rss_mib():>9.0f}"
            )
    print("MB/s: median (and range) over the rounds; CPU s/GB: server process, median;")
    print("RSS: the server's peak resident memory over the whole run.")
    print("On loopback, part of the receiver's TCP work runs in the sender's system calls")
    print("and counts as server CPU; the client's own copy is the limit for one stream.")


if __name__ == "__main__":
    main()
