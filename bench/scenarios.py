"""The scenarios of the benchmark suite (a-g), one function each.

Each scenario measures every target it applies to, ``runs`` times, alternating the
targets inside each run (A B C D, then B C D A, ...: the order rotates so that no target
always goes first), and returns its metrics: per target, one value per run (NaN where a
run failed; why is in the metric's notes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import loadgen
from bench.peers import (
    Direct,
    LogNotes,
    NginxCache,
    PeerTools,
    S3CacheTarget,
    Target,
    remove_tree,
    start_cache,
)
from s3cache.sandbox.proxy import client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

KiB = 1024
MiB = 1024**2
GiB = 1024**3
MB = 1e6
NAN = float("nan")
SAMPLE_SECONDS = 0.1
WAN_DELAY = 0.020  # seconds before each response's first byte (an RTT)
WAN_BANDWIDTH = 50e6  # bytes/s per connection
PRESIGN_SECONDS = 12 * 3600
TTFB_PROBES = 8  # cold small GETs per target and run in d


@dataclass(frozen=True)
class Sizes:
    """How big and how long: the full suite, or ``--quick`` for a smoke check."""

    large: int = 256 * MiB  # a, e
    streams: int = 16  # a
    small: int = 100 * KiB  # b
    small_count: int = 1000  # b
    small_connections: int = 64  # b
    huge: int = 1 * GiB  # c, d, f
    huge_count: int = 2  # c, f
    range_span: int = 1 * MiB  # c
    range_connections: int = 16  # c
    wrk_seconds: float = 10.0  # b, c
    coalesce_clients: int = 64  # e
    rss_streams: int = 256  # f
    rss_seconds: float = 20.0  # f
    startup_entries: int = 1_000_000  # g


FULL = Sizes()
QUICK = Sizes(
    large=32 * MiB,
    small_count=200,
    huge=64 * MiB,
    wrk_seconds=3.0,
    coalesce_clients=16,
    rss_seconds=4.0,
    startup_entries=200_000,  # startup_index HEADs entry 123456
)


@dataclass
class Metric:
    key: str
    scenario: str
    title: str
    unit: str
    higher_is_better: bool
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)

    def add(self, target: str, run: int, value: float) -> None:
        column = self.values.setdefault(target, [])
        column.extend([NAN] * (run + 1 - len(column)))
        column[run] = value

    def fail(self, target: str, run: int, why: str) -> None:
        self.add(target, run, NAN)
        self.notes.append(f"{target} run {run + 1}: {why}")
        print(f"    ! {self.key} {target} run {run + 1}: {why}", flush=True)


@dataclass(frozen=True)
class Objects:
    bucket: str
    large: str
    smalls: tuple[str, ...]
    huges: tuple[str, ...]


class Presigner:
    """Presigned GET URLs (SigV4, path style), so that curl and wrk need no signing.

    Each URL is made once per endpoint and object and then reused: a new one would carry
    a new date and signature, and nginx's cache key includes the query string."""

    def __init__(self, upstream: SeaweedS3) -> None:
        self._upstream = upstream
        self._clients: dict[str, Any] = {}
        self._urls: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def url(self, endpoint_url: str, bucket: str, key: str) -> str:
        with self._lock:
            url = self._urls.get((endpoint_url, bucket, key))
            if url is None:
                client = self._clients.get(endpoint_url)
                if client is None:
                    client = self._clients[endpoint_url] = client_of(
                        endpoint_url, self._upstream, signature_version="s3v4"
                    )
                url = client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": bucket, "Key": key},
                    ExpiresIn=PRESIGN_SECONDS,
                )
                self._urls[endpoint_url, bucket, key] = url
            return url


@dataclass
class Suite:
    """What the scenarios share: one upstream, its objects, the targets, the settings."""

    sizes: Sizes
    runs: int
    workdir: Path
    upstream: SeaweedS3
    objects: Objects
    tools: PeerTools
    caches: tuple[str, ...]  # the caches that will be measured (skipped peers left out)
    notes: LogNotes
    presigner: Presigner
    warm: dict[str, Target] = field(default_factory=dict)
    stopper: list[Callable[[], None]] = field(default_factory=list)
    _counter: int = 0

    @property
    def cache_size(self) -> int:
        s = self.sizes
        held = s.large + s.small * s.small_count + s.huge * s.huge_count
        return max(4 * GiB, 2 * held)

    def url(self, target: Target, key: str) -> str:
        return self.presigner.url(target.endpoint_url, self.objects.bucket, key)

    def rounds(self, names: list[str]) -> Iterator[tuple[int, list[str]]]:
        for run in range(self.runs):
            shift = run % len(names)
            yield run, names[shift:] + names[:shift]

    def fresh_dir(self, label: str) -> Path:
        self._counter += 1
        path = self.workdir / f"{label}-{self._counter}"
        path.mkdir(parents=True)
        return path

    def fresh_cache(self, name: str, upstream_url: str, label: str) -> Any:
        return start_cache(
            name,
            self.tools,
            self.fresh_dir(f"{label}-{name}"),
            self.upstream,
            upstream_url,
            self.cache_size,
            self.notes,
        )


def _timeout(size: int, streams: int = 1, rate: float = 20 * MB) -> float:
    """A generous bound for moving ``streams`` x ``size`` bytes (never below 60 s)."""
    return max(60.0, streams * size / rate)


def _check(fetch: loadgen.Fetch, size: int) -> str | None:
    if fetch.status not in (200, 206) or fetch.size != size:
        return f"status {fetch.status}, {fetch.size} of {size} bytes"
    return None


# --- warm targets ----------------------------------------------------------------------------


def start_warm_targets(suite: Suite) -> list[dict[str, Any]]:
    """Start the caches in front of the upstream and read every object once through each
    (and directly: the upstream's page cache); returns how long each read took."""
    suite.warm["direct"] = Direct("direct", suite.upstream.endpoint_url)
    for name in suite.caches:
        server = suite.fresh_cache(name, suite.upstream.endpoint_url, "warm")
        suite.warm[name] = server
        suite.stopper.append(server.stop)
    objects = suite.objects
    keys = [objects.large, *objects.huges, *objects.smalls]
    report = []
    for name, target in suite.warm.items():
        began = time.monotonic()
        fetches = loadgen.read_all([suite.url(target, key) for key in keys])
        seconds = time.monotonic() - began
        bad = [f for f in fetches if f.status != 200]
        total = sum(f.size for f in fetches)
        print(
            f"  warm-up {name}: {len(keys)} objects, {total / MB:.0f} MB in {seconds:.1f} s"
            + (f", {len(bad)} not 200 (first: {bad[0].status})" if bad else ""),
            flush=True,
        )
        report.append({"target": name, "seconds": seconds, "bytes": total, "not_200": len(bad)})
    # A second read of everything is what the scenarios will see: make it a hit.
    for name, target in suite.warm.items():
        if name != "direct":
            loadgen.read_all([suite.url(target, key) for key in keys])
    return report


def cache_evidence(suite: Suite) -> dict[str, Any]:
    """Whether the warm caches answer from their cache (nginx header, s3cache stats)."""
    evidence: dict[str, Any] = {}
    for target in suite.warm.values():
        if isinstance(target, NginxCache):
            url = suite.url(target, suite.objects.smalls[0])
            with urllib.request.urlopen(url, timeout=30) as answer:
                evidence["nginx X-Cache-Status"] = answer.headers.get("X-Cache-Status")
        elif isinstance(target, S3CacheTarget):
            stats = target.stats()
            evidence["s3cache stats"] = {
                k: stats.get(k) for k in ("reads", "served_bytes", "upstream_block_fetches")
            }
    return evidence


# --- a. warm 256 MiB GET ---------------------------------------------------------------------


def warm_large(suite: Suite) -> list[Metric]:
    s = suite.sizes
    size_label = _size(s.large)
    one = Metric("a1", "a", f"warm {size_label} GET, 1 stream", "MB/s", True)
    many = Metric("a16", "a", f"warm {size_label} GET, {s.streams} streams", "MB/s", True)
    for run, order in suite.rounds(list(suite.warm)):
        for name in order:
            url = suite.url(suite.warm[name], suite.objects.large)
            fetch = loadgen.fetch(url, _timeout(s.large))
            problem = _check(fetch, s.large)
            if problem:
                one.fail(name, run, problem)
            else:
                one.add(name, run, fetch.bytes_per_second / MB)
            fetches, wall = loadgen.fetch_parallel([url] * s.streams, _timeout(s.large, s.streams))
            problems = [p for p in (_check(f, s.large) for f in fetches) if p]
            if problems:
                many.fail(name, run, f"{len(problems)} streams failed: {problems[0]}")
            else:
                many.add(name, run, s.streams * s.large / wall / MB)
            print(
                f"  a run {run + 1} {name}: 1 stream {one.values[name][run]:.0f} MB/s, "
                f"{s.streams} streams {many.values[name][run]:.0f} MB/s",
                flush=True,
            )
    return [one, many]


# --- b. warm 100 KiB GETs with wrk -----------------------------------------------------------


def _wrk_metrics(
    suite: Suite, key: str, title: str, script_for: Callable[[Target, Path], None], conns: int
) -> list[Metric]:
    wrk = loadgen.wrk_path()
    rate_unit = "ranges/s" if key == "c" else "req/s"
    rate = Metric(f"{key}_rate", key, f"{title}: {rate_unit}", rate_unit, True)
    p50 = Metric(f"{key}_p50", key, f"{title}: p50 latency", "ms", False)
    p99 = Metric(f"{key}_p99", key, f"{title}: p99 latency", "ms", False)
    if wrk is None:
        rate.notes.append("skipped: wrk not found (apt-get install wrk)")
        return [rate, p50, p99]
    scripts: dict[str, Path] = {}
    for name, target in suite.warm.items():
        scripts[name] = suite.fresh_dir(f"wrk-{key}") / f"{name}.lua"
        script_for(target, scripts[name])
    for run, order in suite.rounds(list(suite.warm)):
        for name in order:
            target = suite.warm[name]
            try:
                result = loadgen.run_wrk(
                    wrk, target.endpoint_url, scripts[name], 2, conns, suite.sizes.wrk_seconds
                )
            except (ValueError, OSError) as exc:
                for metric in (rate, p50, p99):
                    metric.fail(name, run, str(exc)[:300])
                continue
            _record_wrk(key, rate, p50, p99, name, run, result)
    return [rate, p50, p99]


def _record_wrk(
    key: str,
    rate: Metric,
    p50: Metric,
    p99: Metric,
    name: str,
    run: int,
    result: loadgen.WrkResult,
) -> None:
    rate.add(name, run, result.requests_per_second)
    p50.add(name, run, result.p50_ms)
    p99.add(name, run, result.p99_ms)
    detail = {"target": name, "run": run + 1, "requests": result.requests}
    detail.update(non_2xx=result.non_2xx, socket_errors=result.socket_errors)
    wrk_us = result.cpu_us_per_request
    detail.update(wrk_cpu_seconds=round(result.cpu_seconds, 2), wrk_cpu_us_per_request=wrk_us)
    rate.details.append(detail)
    if result.non_2xx or result.socket_errors:
        rate.notes.append(
            f"{name} run {run + 1}: {result.non_2xx} non-2xx, "
            f"{result.socket_errors} socket errors of {result.requests}"
        )
    print(
        f"  {key} run {run + 1} {name}: {result.requests_per_second:,.0f} {rate.unit}, "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, wrk CPU {wrk_us:.0f} us/request"
        + (f", {result.non_2xx} non-2xx" if result.non_2xx else ""),
        flush=True,
    )


def _targets_of(suite: Suite, target: Target, keys: tuple[str, ...]) -> list[str]:
    prefix = len(target.endpoint_url)
    return [suite.url(target, key)[prefix:] for key in keys]


def warm_small(suite: Suite) -> list[Metric]:
    s = suite.sizes

    def script(target: Target, path: Path) -> None:
        loadgen.write_wrk_script(path, _targets_of(suite, target, suite.objects.smalls))

    title = f"warm {_size(s.small)} GETs, {s.small_connections} connections"
    return _wrk_metrics(suite, "b", title, script, s.small_connections)


# --- c. 1 MiB random ranges ------------------------------------------------------------------


def warm_ranges(suite: Suite) -> list[Metric]:
    s = suite.sizes

    def script(target: Target, path: Path) -> None:
        targets = _targets_of(suite, target, suite.objects.huges)
        loadgen.write_wrk_script(path, targets, s.range_span, s.huge)

    title = (
        f"warm {_size(s.range_span)} random ranges of {_size(s.huge)} objects, "
        f"{s.range_connections} connections"
    )
    return _wrk_metrics(suite, "c", title, script, s.range_connections)


# --- d. cold 1 GiB through an emulated WAN link ----------------------------------------------


def cold_wan(suite: Suite) -> list[Metric]:
    s = suite.sizes
    link = f"{WAN_DELAY * 1000:.0f} ms, {WAN_BANDWIDTH / MB:.0f} MB/s per connection"
    title = f"cold {_size(s.huge)} GET through a WAN link ({link})"
    speed = Metric("d_speed", "d", f"{title}: MB/s", "MB/s", True)
    ttfb = Metric("d_ttfb", "d", f"{title}: time to first byte", "ms", False)
    probe_title = f"cold {_size(s.small)} GETs through the WAN link: median time to first byte"
    probe = Metric("d_ttfb_small", "d", f"{probe_title} of {TTFB_PROBES}", "ms", False)
    for run, order in suite.rounds(["direct", *suite.caches]):
        for name in order:
            relay = Relay(suite.upstream.endpoint_url, delay=WAN_DELAY, bandwidth=WAN_BANDWIDTH)
            relay.start()
            server: Any = None
            try:
                endpoint = relay.endpoint_url
                if name != "direct":
                    server = suite.fresh_cache(name, relay.endpoint_url, "cold")
                    endpoint = server.endpoint_url
                fetch, upstream_bytes, first_requests = _cold_huge(suite, relay, endpoint)
                probes = _ttfb_probes(suite, endpoint)
            finally:
                _stop_fresh(server)
                relay.stop()
            _record_probes(probe, name, run, probes)
            problem = _check(fetch, s.huge)
            if problem:
                speed.fail(name, run, problem)
                ttfb.add(name, run, NAN)
                continue
            speed.add(name, run, fetch.bytes_per_second / MB)
            ttfb.add(name, run, fetch.ttfb * 1000)
            speed.details.append(
                {"target": name, "run": run + 1, "upstream_bytes": upstream_bytes}
                | {"first_upstream_requests": first_requests}
            )
            print(
                f"  d run {run + 1} {name}: {fetch.bytes_per_second / MB:.0f} MB/s, "
                f"TTFB {fetch.ttfb * 1000:.1f} ms, upstream {upstream_bytes / s.huge:.2f}x; "
                f"{_size(s.small)} TTFB median {probe.values[name][run]:.1f} ms",
                flush=True,
            )
    return [speed, ttfb, probe]


def _cold_huge(
    suite: Suite, relay: Relay, endpoint_url: str
) -> tuple[loadgen.Fetch, int, list[str]]:
    """The cold GET of the big object (curl), the bytes it took from the upstream, and
    the upstream requests it began with."""
    url = suite.presigner.url(endpoint_url, suite.objects.bucket, suite.objects.huges[0])
    fetch = loadgen.fetch(url, _timeout(suite.sizes.huge, rate=10 * MB))
    return fetch, relay.bytes_sent(), _first_requests(relay)


def _ttfb_probes(suite: Suite, endpoint_url: str) -> list[loadgen.Fetch]:
    """Cold GETs of small objects, one after the other, each on a new connection."""
    keys = suite.objects.smalls[:TTFB_PROBES]
    bucket = suite.objects.bucket
    return [loadgen.python_fetch(suite.presigner.url(endpoint_url, bucket, k)) for k in keys]


def _record_probes(metric: Metric, name: str, run: int, probes: list[loadgen.Fetch]) -> None:
    bad = [p for p in probes if p.status != 200]
    if bad or not probes:
        metric.fail(name, run, f"{len(bad)} of {len(probes)} probes not 200")
        return
    times = [p.ttfb * 1000 for p in probes]
    metric.add(name, run, statistics.median(times))
    metric.details.append({"target": name, "run": run + 1, "ttfb_ms": times})


def _first_requests(relay: Relay, count: int = 6) -> list[str]:
    """What the target asked of the upstream first: method, Range, status, and when
    (ms after the first request began), to see what its time to first byte is made of."""
    records = sorted(relay.records(), key=lambda r: r.started)[:count]
    if not records:
        return []
    zero = records[0].started
    return [
        f"{r.method} {r.headers.get('range', 'no Range')} -> {r.status} "
        f"at {(r.started - zero) * 1000:.1f} ms, done {(r.finished - zero) * 1000:.1f} ms"
        for r in records
    ]


def _stop_fresh(server: Any) -> None:
    if server is not None:
        server.stop()
        remove_tree(server.workdir)


# --- e. coalescing of concurrent cold GETs ---------------------------------------------------


def coalescing(suite: Suite) -> list[Metric]:
    s = suite.sizes
    title = (
        f"{s.coalesce_clients} concurrent cold GETs of one {_size(s.large)} object "
        f"(WAN link): upstream bytes / object size"
    )
    ratio = Metric("e_ratio", "e", title, "x", False)
    wall = Metric(
        "e_seconds", "e", f"{s.coalesce_clients} concurrent cold GETs: seconds", "s", False
    )
    for run, order in suite.rounds(list(suite.caches)):
        for name in order:
            relay = Relay(suite.upstream.endpoint_url, delay=WAN_DELAY, bandwidth=WAN_BANDWIDTH)
            relay.start()
            server: Any = None
            try:
                server = suite.fresh_cache(name, relay.endpoint_url, "coalesce")
                url = suite.url(server, suite.objects.large)
                fetches, seconds = loadgen.fetch_parallel(
                    [url] * s.coalesce_clients, _timeout(s.large, rate=10 * MB)
                )
                upstream_bytes = relay.bytes_sent()
                requests = len(relay.records())
            finally:
                _stop_fresh(server)
                relay.stop()
            problems = [p for p in (_check(f, s.large) for f in fetches) if p]
            if problems:
                ratio.notes.append(
                    f"{name} run {run + 1}: {len(problems)} GETs failed: {problems[0]}"
                )
            ratio.add(name, run, upstream_bytes / s.large)
            wall.add(name, run, seconds)
            ratio.details.append(
                {
                    "target": name,
                    "run": run + 1,
                    "upstream_bytes": upstream_bytes,
                    "upstream_requests": requests,
                    "failed_gets": len(problems),
                }
            )
            print(
                f"  e run {run + 1} {name}: upstream {upstream_bytes / s.large:.3f}x object "
                f"in {requests} requests, {seconds:.1f} s"
                + (f", {len(problems)} GETs failed" if problems else ""),
                flush=True,
            )
    return [ratio, wall]


# --- f. RSS of s3cache under many streams ----------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (s3cache's workers under its supervisor)."""
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found += process_tree(int(child))
    return found


def read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB of ``pid`` and its descendants, summed (pages the
    processes share count once per process: an upper bound); (0, 0) if it is gone."""
    rss = hwm = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            pass
    return rss, hwm


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(read_status(self.pid)[0])
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def memory(suite: Suite) -> list[Metric]:
    s = suite.sizes
    title = f"s3cache with {s.rss_streams} streams of cached {_size(s.huge)} objects"
    hwm = Metric("f_hwm", "f", f"{title}: peak RSS (VmHWM)", "MiB", False)
    rss = Metric("f_rss", "f", f"{title}: highest sampled VmRSS", "MiB", False)
    rate = Metric("f_rate", "f", f"{title}: MB/s served", "MB/s", True)
    starved = Metric(
        "f_starved",
        "f",
        f"{title}: streams that got < 1 MiB in {s.rss_seconds:g} s",
        "streams",
        False,
    )
    target = suite.warm.get("s3cache")
    if not isinstance(target, S3CacheTarget):
        hwm.notes.append("skipped: s3cache is not among the targets")
        return [hwm, rss, rate, starved]
    huges = suite.objects.huges
    urls = [suite.url(target, huges[i % len(huges)]) for i in range(s.rss_streams)]
    for run in range(suite.runs):
        target.restart()  # a new process: VmHWM covers this run only
        found = _streams_run(target, urls, s.rss_seconds)
        hwm.add("s3cache", run, found["vmhwm_mib"])
        rss.add("s3cache", run, found["max_vmrss_mib"])
        rate.add("s3cache", run, found["mb_per_s"])
        starved.add("s3cache", run, found["streams_under_1MiB"])
        hwm.details.append({"run": run + 1, **found})
        if found["streams_under_1MiB"] or found["bad_status"]:
            hwm.notes.append(
                f"run {run + 1}: {found['streams_under_1MiB']} streams got < 1 MiB (least: "
                f"{found['min_stream_bytes']} bytes), {found['bad_status']} responses not 200"
            )
        print(
            f"  f run {run + 1}: VmHWM {found['vmhwm_mib']:.0f} MiB (idle "
            f"{found['idle_rss_mib']:.0f} MiB), {found['mb_per_s']:.0f} MB/s over "
            f"{s.rss_streams} streams, {found['streams_under_1MiB']} got < 1 MiB",
            flush=True,
        )
    return [hwm, rss, rate, starved]


def _streams_run(target: S3CacheTarget, urls: list[str], seconds: float) -> dict[str, Any]:
    """Serve one stream per URL for ``seconds``, sampling the process's RSS."""
    pid = target.pid()
    assert pid is not None
    idle = read_status(pid)[0]
    sampler = RssSampler(pid)
    sampler.start()
    try:
        stats = loadgen.stream_for(urls, seconds)
    finally:
        sampler.stop()
    per_stream = stats.bytes_per_stream
    return {
        "idle_rss_mib": idle / KiB,
        "vmhwm_mib": read_status(pid)[1] / KiB,
        "max_vmrss_mib": max(sampler.samples, default=0) / KiB,
        "mb_per_s": sum(per_stream) / stats.seconds / MB,
        "responses": stats.responses,
        "bad_status": stats.bad_status,
        "streams_under_1MiB": sum(1 for n in per_stream if n < MiB),
        "min_stream_bytes": min(per_stream),
        "median_stream_bytes": statistics.median(per_stream),
    }


# --- g. start-up with a big index ------------------------------------------------------------


def _startup_module() -> ModuleType:
    """bench/startup_index.py, loaded by path (bench/ is not a package)."""
    path = Path(__file__).with_name("startup_index.py")
    spec = importlib.util.spec_from_file_location("bench_startup_index", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def startup(suite: Suite) -> list[Metric]:
    s = suite.sizes
    startup_index = _startup_module()
    title = f"start-up with {s.startup_entries:,} index entries"
    ready = Metric("g_ready", "g", f"{title}: to healthz", "s", False)
    first = Metric("g_first", "g", f"{title}: to first cached HEAD", "s", False)
    # startup_index.time_start sends an unsigned HEAD, which s3cache refuses since it
    # authenticates clients; its s3cache inherits our environment, so let it read.
    ready.notes.append("s3cache run with S3CACHE_ALLOW_ANONYMOUS=true (unsigned HEAD)")
    with (
        _environment(S3CACHE_ALLOW_ANONYMOUS="true"),
        tempfile.TemporaryDirectory(prefix="startup-", dir=suite.workdir) as tmp,
    ):
        began = time.monotonic()
        startup_index.build_index(Path(tmp), s.startup_entries)
        ready.details.append({"index_build_seconds": time.monotonic() - began})
        for run in range(suite.runs):
            try:
                to_ready, to_first = startup_index.time_start(Path(tmp))
            except Exception as exc:  # a benchmark reports failures, it does not stop
                ready.fail("s3cache", run, f"{type(exc).__name__}: {exc}")
                first.add("s3cache", run, NAN)
                continue
            ready.add("s3cache", run, to_ready)
            first.add("s3cache", run, to_first)
            print(f"  g run {run + 1}: healthz {to_ready:.3f} s, first hit {to_first:.3f} s")
    return [ready, first]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


SCENARIOS: dict[str, Callable[[Suite], list[Metric]]] = {
    "a": warm_large,
    "b": warm_small,
    "c": warm_ranges,
    "d": cold_wan,
    "e": coalescing,
    "f": memory,
    "g": startup,
}
NEEDS_WARM = frozenset("abcf")
DESCRIPTIONS = {
    "a": "warm large GET, 1 and 16 streams (curl, presigned URL)",
    "b": "warm 100 KiB GETs, 64 connections (wrk)",
    "c": "warm 1 MiB random ranges of 1 GiB objects, 16 connections (wrk)",
    "d": "cold 1 GiB (curl) and 100 KiB GETs through an emulated WAN link vs direct over it",
    "e": "64 concurrent cold GETs of one object: upstream bytes (Relay count)",
    "f": "s3cache RSS while serving 256 streams of cached 1 GiB objects (asyncio client)",
    "g": "s3cache start-up with a 1M-entry index (bench/startup_index.py)",
}


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"
