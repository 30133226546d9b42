"""Load soak: 1,000 concurrent client connections against s3cache for a bounded time.

Starts a real S3 server (SeaweedFS) on loopback, a relay between it and s3cache (in its
own process; ``--wan-delay`` and ``--wan-bandwidth`` emulate a WAN link) and s3cache,
uploads a dataset straight to the upstream, reads the "hot" objects once through
s3cache (so that they are cached), then runs ``--connections`` asyncio workers for
``--seconds`` with one aiohttp session of as many connections. Each worker sends, one
after the other, SigV4-signed requests of four kinds:

- ``hit``:   GET of a whole hot object (cached);
- ``miss``:  GET of a whole object of the cold pool (much larger than the cache: most
  are not cached, the others were evicted since);
- ``range``: GET of a byte range of a hot or a pool object;
- ``head``:  HEAD of any object.

Every answer is checked: status, length, and the body's SHA-256 (whole objects) or
bytes (ranges) against what was uploaded; HEAD's Content-Length and ETag. Any error or
mismatch is a failure, reported with its error. A sampler thread reads s3cache's open
file descriptors (``/proc/PID/fd``, and how many are sockets) and VmRSS every second.
The bench raises its own RLIMIT_NOFILE to the hard limit before it starts s3cache, which
inherits it (s3cache does not raise its own); the limit s3cache runs with is reported.

It prints a method line and the results (requests and failures by kind; p50/p99/max
latency, and p99 of the requests that did not open their connection; connect times,
s3cache's accept queue and the machine's listen overflows; s3cache's own read outcomes
and its log's warnings and errors; fds and RSS at start/peak/end) and writes them to
bench/results/soak.json. A benchmark, not a test: it reports, it does not assert.

    .venv/bin/python bench/soak.py [--seconds 60] [--connections 1000] [--wan-delay 20ms]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3cache.config import parse_duration, parse_size
from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

KiB = 1024
MiB = 1024**2
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SAMPLE_SECONDS = 1.0
RESIGN_SECONDS = 300.0  # signatures are good for 15 minutes (SigV4 clock skew)
RANGES_PER_OBJECT = 4
KINDS = ("hit", "miss", "range", "head")
# Hot objects: some of each size, cycled (empty, tiny, under a block, over, several).
HOT_SIZES = (0, 1, 4 * KiB, 100_000, 300 * KiB + 7, 1 * MiB + 5, 2 * MiB + 12345)
POOL_SIZES = (16 * KiB, 200_000, 700 * KiB + 3, 1536 * KiB + 1)
MAX_FAILURE_EXAMPLES = 20


# --- the dataset -------------------------------------------------------------------------


@dataclass
class Obj:
    key: str
    body: bytes
    hot: bool
    etag: str = ""
    sha256: str = ""
    ranges: list[tuple[int, int]] = field(default_factory=list)


def make_dataset(hot: int, pool: int, seed: int) -> list[Obj]:
    rng = random.Random(seed)
    objects = []
    for number in range(hot):
        size = HOT_SIZES[number % len(HOT_SIZES)]
        objects.append(Obj(f"soak/hot/{number:04d}", rng.randbytes(size), hot=True))
    for number in range(pool):
        size = POOL_SIZES[number % len(POOL_SIZES)]
        objects.append(Obj(f"soak/pool/{number:05d}", rng.randbytes(size), hot=False))
    for obj in objects:
        obj.sha256 = hashlib.sha256(obj.body).hexdigest()
        if obj.body:
            for _ in range(RANGES_PER_OBJECT):
                first = rng.randrange(len(obj.body))
                last = min(len(obj.body) - 1, first + rng.randrange(1, 600 * KiB))
                obj.ranges.append((first, last))
    return objects


def upload(direct: Any, bucket: str, objects: list[Obj]) -> None:
    def put(obj: Obj) -> None:
        obj.etag = direct.put_object(Bucket=bucket, Key=obj.key, Body=obj.body)["ETag"]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects))


# --- signed request templates --------------------------------------------------------------


class Signer:
    """SigV4 headers of every request the workers send, signed ahead of time (and again
    every few minutes): signing each request would cost the client more CPU than
    parsing the answer. A signature covers the method, path, Range and date only."""

    def __init__(self, endpoint: str, bucket: str, upstream: SeaweedS3) -> None:
        self._endpoint = endpoint
        self._bucket = bucket
        self._credentials = Credentials(upstream.access_key, upstream.secret_key)
        self._region = upstream.region
        self.headers: dict[tuple[str, str, str], dict[str, str]] = {}
        self.signed_at = 0.0

    def url(self, obj: Obj) -> str:
        return f"{self._endpoint}/{self._bucket}/{obj.key}"

    def sign_all(self, objects: list[Obj]) -> None:
        headers = {}
        for obj in objects:
            headers[("GET", obj.key, "")] = self._sign("GET", obj, None)
            headers[("HEAD", obj.key, "")] = self._sign("HEAD", obj, None)
            for first, last in obj.ranges:
                spec = f"bytes={first}-{last}"
                headers[("GET", obj.key, spec)] = self._sign("GET", obj, spec)
        self.headers = headers
        self.signed_at = time.monotonic()

    def _sign(self, method: str, obj: Obj, spec: str | None) -> dict[str, str]:
        request = AWSRequest(
            method=method, url=self.url(obj), headers={"Range": spec} if spec else {}
        )
        S3SigV4Auth(self._credentials, "s3", self._region).add_auth(request)
        return dict(request.headers.items())


# --- the relay, in its own process -----------------------------------------------------------


def relay_main(target: str, delay: float, bandwidth: float | None, conn: Connection) -> None:
    with Relay(target, delay=delay, bandwidth=bandwidth) as relay:
        conn.send(relay.endpoint_url)
        conn.recv()  # until told to stop


@contextlib.contextmanager
def relay_process(target: str, delay: float, bandwidth: float | None) -> Any:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=relay_main, args=(target, delay, bandwidth, theirs), name="relay", daemon=True
    )
    process.start()
    try:
        if not ours.poll(30):
            raise RuntimeError("the relay did not start")
        yield ours.recv()
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


# --- sampling -----------------------------------------------------------------------------


def fd_counts(pid: int) -> tuple[int, int]:
    """(open fds, of which sockets) of a process; (0, 0) if it is gone."""
    fds = sockets = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0, 0
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        fds += 1
        sockets += target.startswith("socket:")
    return fds, sockets


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files_limit(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft} soft / {hard} hard"
    except OSError:
        pass
    return "unknown"


def listen_overflows() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (whole machine): connection attempts a
    full accept queue turned away (the client retries its SYN after 1 s, 3 s, 7 s...)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {n: int(table.get(n, 0)) for n in ("ListenOverflows", "ListenDrops")}
    return {}


def listen_backlog(port: int) -> str:
    """The accept queue size of the listening socket on ``port`` (ss's Send-Q)."""
    ss = shutil.which("ss")
    if ss is None:
        return "unknown"
    try:
        output = subprocess.run(
            [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return output[2] if len(output) > 2 else "unknown"


@dataclass
class Sample:
    t: float
    fds: int
    sockets: int
    rss_kib: int
    client_fds: int


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()
        self._began = time.monotonic()

    def sample(self) -> Sample:
        fds, sockets = fd_counts(self.pid)
        own, _ = fd_counts(os.getpid())
        sample = Sample(
            round(time.monotonic() - self._began, 2), fds, sockets, rss_kib(self.pid), own
        )
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- the load --------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # Latencies of requests sent on a connection opened before (no connect in them).
    reused: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    connect_seconds: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    bytes_read: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    connections_opened: int = 0

    def fail(self, kind: str, message: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < MAX_FAILURE_EXAMPLES:
            self.examples.append(f"{kind}: {message}")


def check(kind: str, obj: Obj, spec: str, status: int, headers: Any, body: bytes) -> str | None:
    """What is wrong with an answer (None: nothing)."""
    if kind == "head":
        if status != 200:
            return f"HEAD {obj.key}: status {status}"
        if headers.get("Content-Length") != str(len(obj.body)) or headers.get("ETag") != obj.etag:
            return f"HEAD {obj.key}: {headers.get('Content-Length')} {headers.get('ETag')}"
        return None
    if spec:
        first, last = (int(n) for n in spec.removeprefix("bytes=").split("-"))
        if status != 206:
            return f"GET {obj.key} {spec}: status {status}: {body[:200]!r}"
        expected_range = f"bytes {first}-{last}/{len(obj.body)}"
        if headers.get("Content-Range") != expected_range:
            return f"GET {obj.key} {spec}: Content-Range {headers.get('Content-Range')}"
        if body != obj.body[first : last + 1]:
            return f"GET {obj.key} {spec}: {len(body)} bytes, not the object's"
        return None
    if status != 200:
        return f"GET {obj.key}: status {status}: {body[:200]!r}"
    if len(body) != len(obj.body) or hashlib.sha256(body).hexdigest() != obj.sha256:
        return f"GET {obj.key}: {len(body)} bytes, SHA-256 differs"
    return None


async def worker(
    number: int,
    session: aiohttp.ClientSession,
    signer: Signer,
    hot: list[Obj],
    pool: list[Obj],
    weights: list[float],
    deadline: float,
    start_at: float,
    tally: Tally,
    seed: int,
) -> None:
    rng = random.Random(seed * 1_000_003 + number)
    everything = hot + pool
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    while time.monotonic() < deadline:
        kind = rng.choices(KINDS, weights)[0]
        spec = ""
        if kind == "hit":
            obj = rng.choice(hot)
        elif kind == "miss":
            obj = rng.choice(pool)
        elif kind == "range":
            obj = rng.choice([o for o in (rng.choice(hot), rng.choice(pool)) if o.ranges])
            first, last = rng.choice(obj.ranges)
            spec = f"bytes={first}-{last}"
        else:
            obj = rng.choice(everything)
        method = "HEAD" if kind == "head" else "GET"
        headers = signer.headers[(method, obj.key, spec)]
        tally.in_flight += 1
        tally.peak_in_flight = max(tally.peak_in_flight, tally.in_flight)
        began = time.monotonic()
        context = SimpleNamespace(connect_began=None, connected=False)
        try:
            async with session.request(
                method, signer.url(obj), headers=headers, trace_request_ctx=context
            ) as response:
                body = await response.read()
                problem = check(kind, obj, spec, response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{method} {obj.key} {spec}: {type(exc).__name__}: {exc}"
            body = b""
        finally:
            tally.in_flight -= 1
        elapsed = time.monotonic() - began
        if problem is None:
            tally.latencies[kind].append(elapsed)
            if not context.connected:
                tally.reused[kind].append(elapsed)
            tally.bytes_read += len(body)
        else:
            tally.fail(kind, problem)


async def resign_forever(signer: Signer, objects: list[Obj]) -> None:
    while True:
        await asyncio.sleep(RESIGN_SECONDS)
        signer.sign_all(objects)


async def run_load(
    args: argparse.Namespace, signer: Signer, objects: list[Obj], tally: Tally
) -> float:
    hot = [o for o in objects if o.hot]
    pool = [o for o in objects if not o.hot]
    weights = [args.mix[kind] for kind in KINDS]
    trace = aiohttp.TraceConfig()

    async def connecting(_: Any, context: SimpleNamespace, __: Any) -> None:
        context.trace_request_ctx.connect_began = time.monotonic()

    async def connected(_: Any, context: SimpleNamespace, __: Any) -> None:
        request = context.trace_request_ctx
        tally.connections_opened += 1
        tally.connect_seconds.append(time.monotonic() - request.connect_began)
        request.connected = True

    trace.on_connection_create_start.append(connecting)
    trace.on_connection_create_end.append(connected)
    connector = aiohttp.TCPConnector(
        limit=args.connections, limit_per_host=args.connections, keepalive_timeout=120
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trace_configs=[trace], auto_decompress=False
    ) as session:
        began = time.monotonic()
        deadline = began + args.ramp + args.seconds
        resigner = asyncio.create_task(resign_forever(signer, objects))
        workers = [
            worker(
                number,
                session,
                signer,
                hot,
                pool,
                weights,
                deadline,
                began + args.ramp * number / args.connections,
                tally,
                args.seed,
            )
            for number in range(args.connections)
        ]
        await asyncio.gather(*workers)
        resigner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resigner
        return time.monotonic() - began


async def warm(signer: Signer, objects: list[Obj]) -> list[str]:
    """Read every hot object once (whole, checked), so that hits are hits."""
    problems = []
    async with aiohttp.ClientSession() as session:
        for obj in objects:
            headers = signer.headers[("GET", obj.key, "")]
            async with session.get(signer.url(obj), headers=headers) as response:
                body = await response.read()
                problem = check("hit", obj, "", response.status, response.headers, body)
            if problem:
                problems.append(problem)
    return problems


# --- reporting ---------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        data: dict[str, Any] = json.load(answer)
        return data


def wait_for_quiet(endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while fetch_json(f"{endpoint}/_s3cache/stats")["fills_in_flight"]:
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def raise_open_files_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def isolate_aws_environment(workdir: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    for name in ("config", "credentials"):
        (workdir / f"aws-{name}").write_text("")
    os.environ["AWS_CONFIG_FILE"] = str(workdir / "aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def parse_mix(text: str) -> dict[str, float]:
    mix = {kind: 0.0 for kind in KINDS}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in mix:
            raise argparse.ArgumentTypeError(f"unknown request kind {kind!r} (use {KINDS})")
        mix[kind.strip()] = float(weight)
    return mix


def problems_in_log(path: Path) -> dict[str, Any]:
    """s3cache's warnings and errors (not the access log): counts and a few examples."""
    counts: Counter[str] = Counter()
    examples: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        for level in ("WARNING", "ERROR", "CRITICAL"):
            if f" {level} " in line and "s3cache.access" not in line:
                counts[level] += 1
                if len(examples) < 10:
                    examples.append(line[:300])
        if line.startswith("Traceback"):
            counts["traceback"] += 1
    return {"counts": dict(counts), "examples": examples}


def summary_of(samples: list[Sample], name: str) -> dict[str, int]:
    values = [getattr(s, name) for s in samples]
    return {"start": values[0], "peak": max(values), "end": values[-1]} if values else {}


def run(args: argparse.Namespace) -> int:
    soft, hard = raise_open_files_limit()
    if soft < args.connections + 256:
        print(f"RLIMIT_NOFILE is {soft}: too low for {args.connections} connections")
        return 2
    objects = make_dataset(args.hot_objects, args.pool_objects, args.seed)
    dataset_bytes = sum(len(o.body) for o in objects)
    hot_bytes = sum(len(o.body) for o in objects if o.hot)
    machine = {
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
    }
    method = {
        **machine,
        "seconds": args.seconds,
        "ramp_seconds": args.ramp,
        "connections": args.connections,
        "mix": args.mix,
        "hot_objects": args.hot_objects,
        "hot_bytes": hot_bytes,
        "pool_objects": args.pool_objects,
        "dataset_bytes": dataset_bytes,
        "cache_size": args.cache_size,
        "block_size": args.block_size,
        "wan_delay_seconds": args.wan_delay,
        "wan_bandwidth": args.wan_bandwidth,
        "seed": args.seed,
        "bench_rlimit_nofile": f"{soft} soft / {hard} hard",
        "client": (
            f"one asyncio process (uvloop), aiohttp {version('aiohttp')} session with a "
            f"{args.connections}-connection pool, {args.connections} workers each sending "
            "requests back to back; SigV4 headers signed ahead (botocore S3SigV4Auth)"
        ),
        "checks": "GET: status, length, SHA-256; range: 206, Content-Range, bytes; HEAD: "
        "Content-Length, ETag",
        "sampling": f"s3cache /proc/PID/fd (and sockets among them) and VmRSS every "
        f"{SAMPLE_SECONDS:g} s",
        "note": "client, relay, s3cache and SeaweedFS share the machine's CPUs",
    }
    print(
        f"method: {args.connections} connections for {args.seconds:g}s (+{args.ramp:g}s ramp), "
        f"mix {args.mix}; {args.hot_objects} hot objects ({hot_bytes / MiB:.1f} MiB, read "
        f"once before) and a pool of {args.pool_objects} ({(dataset_bytes - hot_bytes) / MiB:.1f}"
        f" MiB) behind a {args.cache_size / MiB:g} MiB cache, {args.block_size / KiB:g} KiB "
        f"blocks; relay delay {args.wan_delay * 1000:g} ms, bandwidth "
        f"{args.wan_bandwidth or 'uncapped'}; {method['client']}; checks: {method['checks']}; "
        f"{method['sampling']}; nproc {machine['nproc']}, Linux {machine['kernel']}, Python "
        f"{machine['python']}; {method['note']}",
        flush=True,
    )
    tally = Tally()
    samples: list[Sample] = []
    outcome_delta: dict[str, float] = {}
    overflows: dict[str, int] = {}
    limit = backlog = "unknown"
    log_tail = ""
    log_problems: dict[str, Any] = {}
    elapsed = 0.0
    with tempfile.TemporaryDirectory(prefix="s3cache-soak-") as tmp:
        workdir = Path(tmp)
        isolate_aws_environment(workdir)
        (workdir / "seaweed").mkdir()
        (workdir / "s3cache").mkdir()
        with SeaweedS3(workdir / "seaweed") as upstream:
            direct = upstream.client()
            bucket = f"soak-{uuid.uuid4().hex[:12]}"
            direct.create_bucket(Bucket=bucket)
            began = time.monotonic()
            upload(direct, bucket, objects)
            print(
                f"uploaded {len(objects)} objects ({dataset_bytes / MiB:.1f} MiB) in "
                f"{time.monotonic() - began:.1f}s",
                flush=True,
            )
            with relay_process(upstream.endpoint_url, args.wan_delay, args.wan_bandwidth) as url:
                proxy = S3CacheProcess(
                    workdir / "s3cache",
                    upstream,
                    upstream_endpoint=url,
                    extra_args=[
                        "--cache-size",
                        str(args.cache_size),
                        "--block-size",
                        str(args.block_size),
                        "--access-log",
                        args.access_log,
                    ],
                )
                with proxy:
                    assert proxy.pid is not None
                    limit = open_files_limit(proxy.pid)
                    backlog = listen_backlog(proxy.port)
                    print(
                        f"s3cache pid {proxy.pid}: RLIMIT_NOFILE {limit}, accept queue {backlog}",
                        flush=True,
                    )
                    signer = Signer(proxy.endpoint_url, bucket, upstream)
                    signer.sign_all(objects)
                    problems = asyncio.run(warm(signer, [o for o in objects if o.hot]))
                    for problem in problems:
                        tally.fail("warm-up", problem)
                    wait_for_quiet(proxy.endpoint_url)
                    before = fetch_json(f"{proxy.endpoint_url}/_s3cache/stats")["reads"]
                    sampler = Sampler(proxy.pid)
                    sampler.sample()
                    sampler.start()
                    overflows_before = listen_overflows()
                    try:
                        elapsed = asyncio.run(run_load(args, signer, objects, tally), debug=False)
                        overflows = {
                            name: value - overflows_before.get(name, 0)
                            for name, value in listen_overflows().items()
                        }
                        time.sleep(3.0)  # connections closed, fills done: the end sample
                        sampler.sample()
                    finally:
                        sampler.stop()
                    samples = sampler.samples
                    after = fetch_json(f"{proxy.endpoint_url}/_s3cache/stats")["reads"]
                    outcome_delta = {k: after[k] - before.get(k, 0) for k in after}
                    log_tail = proxy.log_tail(15)
                log_problems = problems_in_log(proxy.log_path)
            direct.close()
    server = {
        "rlimit_nofile": limit,
        "accept_queue": backlog,
        "listen_overflows": overflows,
        "log": log_problems,
    }
    return report(method, tally, samples, outcome_delta, server, elapsed, log_tail)


def latency_row(values: list[float], reused: list[float], failed: int) -> dict[str, Any]:
    return {
        "ok": len(values),
        "failed": failed,
        "p50_ms": round(percentile(values, 0.5) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "max_ms": round(max(values, default=0.0) * 1000, 1),
        "reused_connection_p99_ms": round(percentile(reused, 0.99) * 1000, 1),
    }


def report(
    method: dict[str, Any],
    tally: Tally,
    samples: list[Sample],
    outcomes: dict[str, float],
    server: dict[str, Any],
    elapsed: float,
    log_tail: str,
) -> int:
    total = sum(len(v) for v in tally.latencies.values()) + sum(tally.failures.values())
    rows = {
        kind: latency_row(
            tally.latencies.get(kind, []), tally.reused.get(kind, []), tally.failures[kind]
        )
        for kind in KINDS
    }
    rows["all"] = latency_row(
        [x for values in tally.latencies.values() for x in values],
        [x for values in tally.reused.values() for x in values],
        sum(tally.failures.values()),
    )
    print(
        f"\n{'kind':<8}{'ok':>8}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'p99 ms, reused conn.':>22}"
    )
    for kind, row in rows.items():
        print(
            f"{kind:<8}{row['ok']:>8}{row['failed']:>8}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
            f"{row['max_ms']:>9.1f}{row['reused_connection_p99_ms']:>22.1f}"
        )
    rate = total / elapsed if elapsed else 0.0
    connects = tally.connect_seconds
    slow_connects = sum(1 for c in connects if c >= 0.9)
    print(
        f"\n{total} requests in {elapsed:.1f}s ({rate:.0f}/s), {tally.bytes_read / MiB:.0f} MiB "
        f"read; {tally.connections_opened} client connections opened (connect p50 "
        f"{percentile(connects, 0.5) * 1000:.1f} ms, max {max(connects, default=0) * 1000:.0f} "
        f"ms, {slow_connects} took >= 0.9 s: a SYN retried), at most {tally.peak_in_flight} "
        f"requests in flight"
    )
    print(
        f"s3cache accept queue {server['accept_queue']}; TCP listen overflows/drops during the "
        f"load (machine-wide) {server['listen_overflows']}"
    )
    print(f"s3cache read outcomes during the soak: {outcomes}")
    log = server["log"]
    print(f"s3cache log warnings/errors (access log aside): {log.get('counts') or 'none'}")
    for line in log.get("examples", []):
        print(f"  {line}")
    fds = summary_of(samples, "fds")
    sockets = summary_of(samples, "sockets")
    rss = summary_of(samples, "rss_kib")
    print(
        f"s3cache RLIMIT_NOFILE {server['rlimit_nofile']}; open fds start/peak/end "
        f"{fds.get('start')}/{fds.get('peak')}/{fds.get('end')} (sockets "
        f"{sockets.get('start')}/{sockets.get('peak')}/{sockets.get('end')}); RSS "
        f"start/peak/end {rss.get('start', 0) / 1024:.1f}/{rss.get('peak', 0) / 1024:.1f}/"
        f"{rss.get('end', 0) / 1024:.1f} MiB (end: 3 s after the load stopped)"
    )
    if tally.examples:
        print(f"failures ({sum(tally.failures.values())}), first {len(tally.examples)}:")
        for example in tally.examples:
            print(f"  {example}")
    else:
        print("failures: none")
    results = {
        "benchmark": "soak",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method,
        "elapsed_seconds": round(elapsed, 2),
        "requests": total,
        "requests_per_second": round(rate, 1),
        "bytes_read": tally.bytes_read,
        "client_connections_opened": tally.connections_opened,
        "client_connect_ms": {
            "p50": round(percentile(connects, 0.5) * 1000, 1),
            "p99": round(percentile(connects, 0.99) * 1000, 1),
            "max": round(max(connects, default=0.0) * 1000, 1),
            "at_least_900ms": slow_connects,
        },
        "peak_requests_in_flight": tally.peak_in_flight,
        "by_kind": rows,
        "failures": dict(tally.failures),
        "failure_examples": tally.examples,
        "s3cache_read_outcomes": outcomes,
        "s3cache_log_problems": server["log"],
        "s3cache_rlimit_nofile": server["rlimit_nofile"],
        "s3cache_accept_queue": server["accept_queue"],
        "listen_overflows_machine_wide": server["listen_overflows"],
        "s3cache_fds": fds,
        "s3cache_socket_fds": sockets,
        "s3cache_rss_kib": rss,
        "samples": [vars(s) for s in samples],
        "s3cache_log_tail": log_tail,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to start all workers")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix("hit=40,miss=20,range=25,head=15"),
        help="request kinds and weights, e.g. hit=40,miss=20,range=25,head=15",
    )
    parser.add_argument("--hot-objects", type=int, default=70)
    parser.add_argument("--pool-objects", type=int, default=240)
    parser.add_argument("--cache-size", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--block-size", type=parse_size, default=parse_size("1MiB"))
    parser.add_argument("--wan-delay", type=parse_duration, default=0.02, help="e.g. 20ms")
    parser.add_argument(
        "--wan-bandwidth", type=parse_size, default=None, help="bytes/s per upstream connection"
    )
    parser.add_argument("--access-log", default="text", choices=["text", "json", "off"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
