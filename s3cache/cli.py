"""Command line: ``s3cache serve`` and ``s3cache demo``."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import queue
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop
from aiohttp.http_exceptions import HttpProcessingError

from s3cache import __version__
from s3cache.config import ConfigError, Settings, WorkerRole, add_arguments, load_settings

PROGRESS_SECONDS = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s3cache", description="S3 read-through cache")
    parser.add_argument("--version", action="version", version=f"s3cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the S3 endpoint")
    add_arguments(serve_parser)
    demo_parser = commands.add_parser(
        "demo", help="start an embedded upstream and s3cache, and read through it"
    )
    demo_parser.add_argument("--objects", type=int, default=64, help="objects in the dataset")
    demo_parser.add_argument("--object-size", default="1MiB", help="size of each object")
    stats_parser = commands.add_parser("stats", help="print a running s3cache's statistics")
    stats_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    warm_parser = commands.add_parser(
        "warm", help="bring objects into a running s3cache before they are read"
    )
    warm_parser.add_argument("target", nargs="?", help="s3://BUCKET/PREFIX")
    warm_parser.add_argument("--from-file", type=Path, help="a file of keys, one per line")
    warm_parser.add_argument("--bucket", help="the bucket of --from-file's keys")
    warm_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    warm_parser.add_argument("--no-wait", action="store_true", help="start the job and return")
    jobs_parser = commands.add_parser("jobs", help="list warm jobs, or cancel one")
    jobs_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    jobs_parser.add_argument("--cancel", metavar="ID", help="cancel this job")
    verify_parser = commands.add_parser(
        "verify",
        help="check every cache file and block; drop what is damaged or missing (exit 3 if "
        "anything was)",
    )
    verify_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    flush_parser = commands.add_parser(
        "flush", help="return once every write-back object (under s3://BUCKET/PREFIX) is upstream"
    )
    flush_parser.add_argument("target", nargs="?", help="s3://BUCKET[/PREFIX]; none: everything")
    flush_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    args = parser.parse_args(argv)
    if args.command == "flush":
        return flush(args.endpoint, args.target)
    if args.command == "warm":
        return warm(args)
    if args.command == "jobs":
        return jobs(args.endpoint, args.cancel)
    if args.command == "stats":
        return _print_table(_admin(args.endpoint, "stats"))
    if args.command == "verify":
        return verify(args.endpoint)
    if args.command == "demo":
        from s3cache.sandbox.demo import run_demo

        return run_demo(args.objects, args.object_size)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"s3cache: {exc}", file=sys.stderr)
        return 2
    role = WorkerRole.from_environment()
    if settings.workers > 1 and role is None:
        from s3cache.supervisor import Supervisor

        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        return Supervisor(settings, sys.argv[1:] if argv is None else argv).run()
    return _serve(settings, lambda: load_settings(args), role)


def _serve(settings: Settings, reload: Callable[[], Settings], role: WorkerRole | None) -> int:
    from s3cache.server.app import serve

    listener = _log_off_the_loop(settings.log_level)
    try:
        uvloop.run(serve(settings, reload, role))
    finally:
        listener.stop()
    return 0


def _log_off_the_loop(level: str) -> logging.handlers.QueueListener:
    """Log records are queued by the event loop and written to stderr by a thread, so
    a slow terminal or log collector never stalls a request."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = logging.StreamHandler()
    output.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    enqueue = logging.handlers.QueueHandler(records)
    enqueue.setFormatter(logging.Formatter("%(message)s"))  # the listener formats
    logging.basicConfig(level=level.upper(), handlers=[enqueue])
    listener = logging.handlers.QueueListener(records, output)
    listener.start()
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    return listener


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """Requests that are not HTTP at all (aiohttp answers them 400 itself) are a client's
    problem: logged at DEBUG, not as an ERROR with a traceback any client could flood."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname, record.exc_info = logging.DEBUG, "DEBUG", None
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def _admin(endpoint: str, name: str, method: str = "GET", body: object = None) -> Any:
    """A JSON admin endpoint of a running s3cache; None (after saying why) if it fails."""
    url = f"{endpoint.rstrip('/')}/_s3cache/{name}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=3600) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        print(
            f"s3cache: {method} {url}: {exc.code} {exc.read().decode(errors='replace')}",
            file=sys.stderr,
        )
    except (OSError, ValueError) as exc:
        print(f"s3cache: {method} {url} failed: {exc}", file=sys.stderr)
    return None


def warm(args: argparse.Namespace) -> int:
    """Start a warm job and follow it with a progress line until it ends."""
    if args.from_file is not None:
        if not args.bucket:
            print("s3cache: --from-file needs --bucket", file=sys.stderr)
            return 2
        keys = [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
        request: dict[str, object] = {"bucket": args.bucket, "keys": keys}
    elif args.target and args.target.startswith("s3://"):
        bucket, _, prefix = args.target.removeprefix("s3://").partition("/")
        request = {"bucket": bucket, "prefix": prefix}
    else:
        print("s3cache: give s3://BUCKET/PREFIX or --from-file KEYS --bucket B", file=sys.stderr)
        return 2
    job = _admin(args.endpoint, "prefetch", "POST", request)
    if job is None:
        return 1
    if args.no_wait:
        print(job["id"])
        return 0
    while job["state"] in ("listing", "running"):
        _progress(job)
        time.sleep(PROGRESS_SECONDS)
        job = _admin(args.endpoint, f"jobs/{job['id']}") or job
    _progress(job)
    print(file=sys.stderr)
    print(
        f"{job['state']}: {job['objects_done']:,}/{job['objects_total']:,} objects, "
        f"{_size(job['bytes_done'])} in cache{'; ' + job['message'] if job['message'] else ''}"
    )
    return 0 if job["state"] == "done" else 1


def _progress(job: dict[str, Any]) -> None:
    total = max(job["bytes_total"], 1)
    done = job["bytes_done"]
    width = 30
    filled = int(width * min(done / total, 1.0))
    eta = job.get("eta_seconds")
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {job['objects_done']:,}/"
        f"{job['objects_total']:,} objects  {_size(done)}/{_size(job['bytes_total'])}  "
        f"{_size(job['bytes_per_second'])}/s  ETA {f'{eta:.0f}s' if eta is not None else '-'}  ",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1024
    return f"{nbytes} B"


def verify(endpoint: str) -> int:
    """Run a running s3cache's verify and print its report: the counts as a table, then
    one line per damaged entry. Exit 0 if nothing was damaged, 3 if something was (and
    was repaired), 1 if the report could not be had."""
    report = _admin(endpoint, "verify", method="POST")
    if not isinstance(report, dict):
        return 1
    damaged = report.pop("damaged", [])
    _print_table(report)
    for item in damaged:
        blocks = ",".join(str(block) for block in item.get("blocks", []))
        detail = f" ({item['detail']})" if item.get("detail") else ""
        where = f"s3://{item['bucket']}/{item['key']}"
        print(f"{item['problem']:<9}  {where}  blocks {blocks or '-'}{detail}")
    found = sum(report.get(name, 0) for name in DAMAGE_COUNTS)
    return 3 if found else 0


def flush(endpoint: str, target: str | None) -> int:
    """Wait until nothing written back under ``target`` is pending; 0 once so, 1 if the
    running s3cache could not be asked, 2 for a target that is not s3://BUCKET[/PREFIX]."""
    body = None
    if target is not None:
        if not target.startswith("s3://") or not target.removeprefix("s3://").strip("/"):
            print(f"s3cache: flush: not s3://BUCKET[/PREFIX]: {target}", file=sys.stderr)
            return 2
        bucket, _, prefix = target.removeprefix("s3://").partition("/")
        body = {"bucket": bucket, "prefix": prefix}
    answer = _admin(endpoint, "flush", method="POST", body=body)
    if not isinstance(answer, dict):
        return 1
    print(f"flushed: {answer['flushed']} write-back objects were pending, now upstream")
    return 0


# Counts of a verify report that mean damage was found (and repaired).
DAMAGE_COUNTS = ("corrupt_blocks", "missing_files", "truncated_files")


def jobs(endpoint: str, cancel: str | None) -> int:
    if cancel:
        job = _admin(endpoint, f"jobs/{cancel}", "DELETE")
        return _print_table(job)
    listed = _admin(endpoint, "jobs")
    if listed is None:
        return 1
    print(f"{'ID':<12}  {'STATE':<9}  {'OBJECTS':>15}  {'BYTES':>23}  WHAT")
    for job in listed:
        objects = f"{job['objects_done']:,}/{job['objects_total']:,}"
        nbytes = f"{_size(job['bytes_done'])}/{_size(job['bytes_total'])}"
        print(f"{job['id']:<12}  {job['state']:<9}  {objects:>15}  {nbytes:>23}  {job['what']}")
    return 0


def _print_table(stats: dict[str, object] | None) -> int:
    """A JSON object as a two-column table."""
    if stats is None:
        return 1
    rows = list(_flatten(stats))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _flatten(stats: dict[str, object], prefix: str = "") -> Iterator[tuple[str, str]]:
    for name, value in stats.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            yield f"{prefix}{name}", f"{value:,.3f}" if value % 1 else f"{int(value):,}"
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{name}", f"{value:,}"
        else:
            yield f"{prefix}{name}", str(value)
