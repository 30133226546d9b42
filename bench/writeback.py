"""Saving a checkpoint through s3cache over an emulated WAN link: time until the client
is answered, by write mode (issue #16, point 6).

A checkpoint of ``--size`` bytes (default 4 GiB) is saved with boto3's
``upload_fileobj`` (its defaults: multipart, 8 MiB parts, 10 threads), as
``torch.save`` into a buffer and then ``upload_fileobj`` do, to a real S3 server
(SeaweedFS on loopback) behind an emulated WAN link, in these ways:

    direct    client -> WAN -> upstream (no s3cache)
    around    client -> s3cache (write_rules: around) -> WAN -> upstream
    through   the same with write-through
    back      the same with write-back: answered once on local disk; the drain (the
              upload to the upstream, ``s3cache flush``) is timed after it
    disk      the reference: the same bytes written to a file on the cache dir's file
              system, 8 MiB at a time, then fsync'd

The WAN link is a TCP forwarder in its own process (``--delay-ms`` one way per
direction, ``--bandwidth`` bytes/s per connection and direction). It is not the
sandbox Relay that bench/epochs.py uses: that one paces response bodies only, and
here the bytes go up (request bodies). Each mode runs ``--runs`` times (median shown),
each on a fresh cache. The body comes from a 64 MiB random buffer, repeated (the
client's own reading costs nothing measurable). Goal (PASS/MISS, never asserted): back
within 1.5x the disk reference.

    .venv/bin/python bench/writeback.py [--size 4GiB] [--runs 3] [--delay-ms 20]
        [--bandwidth 25MB] [--modes disk,direct,around,through,back]

Prints the method and a table; writes bench/results/writeback.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `s3cache` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boto3.s3.transfer import TransferConfig

from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

RESULTS = Path(__file__).resolve().parent / "results"
PIECE = 8 * 1024 * 1024

# The WAN link: listens on an ephemeral port, prints it, forwards to HOST:PORT; every
# chunk is delivered DELAY seconds after it was read, at most BANDWIDTH bytes/s per
# connection and direction. Stops when its stdin closes.
_LINK_SCRIPT = r"""
import asyncio, sys, time
target_host, target_port = sys.argv[1], int(sys.argv[2])
delay, bandwidth = float(sys.argv[3]), float(sys.argv[4])

async def pipe(reader, writer):
    queue = asyncio.Queue(64)
    async def read():
        while data := await reader.read(65536):
            await queue.put((time.monotonic() + delay, data))
        await queue.put(None)
    async def write():
        sent_at = time.monotonic()
        while (item := await queue.get()) is not None:
            due, data = item
            sent_at = max(sent_at, due)
            sent_at += len(data) / bandwidth
            pause = sent_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            writer.write(data)
            await writer.drain()
        writer.close()
    await asyncio.gather(read(), write(), return_exceptions=True)

async def serve(client_reader, client_writer):
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(target_host, target_port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=512)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class Body(io.RawIOBase):
    """``size`` bytes of a repeated random buffer, read as a file."""

    def __init__(self, size: int, pattern: bytes) -> None:
        self._size, self._pattern, self._position = size, pattern, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        count = min(len(view), self._size - self._position)
        done = 0
        while done < count:
            offset = (self._position + done) % len(self._pattern)
            piece = min(count - done, len(self._pattern) - offset)
            view[done : done + piece] = self._pattern[offset : offset + piece]
            done += piece
        self._position += count
        return count


class Link:
    def __init__(self, target: str, delay: float, bandwidth: float) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self._process = subprocess.Popen(
            [sys.executable, "-c", _LINK_SCRIPT, host, port.rstrip("/"), str(delay)]
            + [str(bandwidth)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.endpoint_url = f"http://127.0.0.1:{self._process.stdout.readline().strip()}"

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(10)


def disk_reference(directory: Path, size: int, pattern: bytes) -> float:
    path = directory / "reference.bin"
    body = Body(size, pattern)
    buffer = bytearray(PIECE)
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as file:
        while count := body.readinto(buffer):
            file.write(memoryview(buffer)[:count])
        os.fsync(file.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def save(client: Any, bucket: str, key: str, size: int, pattern: bytes) -> float:
    started = time.perf_counter()
    client.upload_fileobj(Body(size, pattern), bucket, key, Config=TransferConfig())
    return time.perf_counter() - started


def flush(endpoint: str) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(f"{endpoint}/_s3cache/flush", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=3600) as answer:
        answer.read()
    return time.perf_counter() - started


def run_mode(
    mode: str, args: argparse.Namespace, upstream: SeaweedS3, link: Link, work: Path, run: int
) -> dict[str, float]:
    pattern = os.urandom(64 * 1024 * 1024)
    bucket = f"bench-{mode}-{run}-{os.getpid()}"
    direct = client_of(upstream.endpoint_url, upstream)
    direct.create_bucket(Bucket=bucket)
    try:
        if mode == "disk":
            return {"answered": disk_reference(work, args.size, pattern)}
        if mode == "direct":
            client = client_of(link.endpoint_url, upstream, max_pool_connections=16)
            return {"answered": save(client, bucket, "checkpoint.pt", args.size, pattern)}
        room = max(2 * args.size, 1024**3)
        proxy = S3CacheProcess(
            work / f"s3cache-{mode}-{run}",
            upstream,
            upstream_endpoint=link.endpoint_url,
            extra_args=[
                "--access-log", "off", "--log-level", "warning",
                "--cache-size", str(room), "--writeback-max", str(room),
                "--write-rule", f"{bucket}={mode}",
            ],
        )
        with proxy:
            client = client_of(proxy.endpoint_url, upstream, max_pool_connections=16)
            answered = save(client, bucket, "checkpoint.pt", args.size, pattern)
            result = {"answered": answered}
            if mode == "back":
                result["drained_after"] = flush(proxy.endpoint_url)
        return result
    finally:
        for item in direct.list_objects_v2(Bucket=bucket).get("Contents", []):
            direct.delete_object(Bucket=bucket, Key=item["Key"])
        direct.delete_bucket(Bucket=bucket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=4 * 1024**3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth", type=parse_size, default=25_000_000)
    parser.add_argument("--modes", default="disk,direct,around,through,back")
    parser.add_argument("--out", default="writeback")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    print(
        f"checkpoint {args.size / 2**20:.0f} MiB, boto3 upload_fileobj (8 MiB parts, 10 "
        f"threads); WAN link {args.delay_ms:g} ms one way, {args.bandwidth / 1e6:g} MB/s per "
        f"connection and direction; {args.runs} runs per mode, median; {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="s3cache-bench-") as tmp:
        work = Path(tmp)
        # Room upstream for every mode's copy of every run (deleted objects' space is
        # not given back at once): volumes of 100 MB.
        volumes = 30 + args.runs * len(modes) * math.ceil(args.size / 100e6)
        with SeaweedS3(work / "seaweed", volumes=volumes) as upstream:
            link = Link(upstream.endpoint_url, args.delay_ms / 1000, args.bandwidth)
            try:
                for run in range(args.runs):
                    for mode in modes:
                        result = run_mode(mode, args, upstream, link, work, run)
                        results[mode].append(result)
                        print(f"  run {run + 1} {mode:<8} " + ", ".join(
                            f"{name} {value:.2f} s" for name, value in result.items()
                        ), flush=True)
            finally:
                link.close()
    summary = {
        mode: {
            name: statistics.median(run[name] for run in runs) for name in runs[0]
        }
        for mode, runs in results.items() if runs
    }
    lines = ["| mode | answered after (median) | x disk | drained after |", "|---|---|---|---|"]
    disk = summary.get("disk", {}).get("answered")
    for mode, values in summary.items():
        ratio = f"{values['answered'] / disk:.2f}" if disk else "-"
        drained = f"{values['drained_after']:.2f} s" if "drained_after" in values else ""
        lines.append(f"| {mode} | {values['answered']:.2f} s | {ratio} | {drained} |")
    if disk and "back" in summary:
        ratio = summary["back"]["answered"] / disk
        verdict = "PASS" if ratio <= 1.5 else "MISS"
        lines.append(f"\nback within 1.5x the disk reference: {verdict} ({ratio:.2f}x)")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    payload = {"size": args.size, "delay_ms": args.delay_ms, "bandwidth": args.bandwidth,
               "runs": results, "median": summary}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
