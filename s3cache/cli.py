"""Command line: ``s3cache serve`` and ``s3cache demo``."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import queue
import sys
import urllib.request
from collections.abc import Callable, Iterator

import uvloop

from s3cache import __version__
from s3cache.config import ConfigError, Settings, add_arguments, load_settings


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
    verify_parser = commands.add_parser(
        "verify", help="check every cached block against its hash; drop damaged ones"
    )
    verify_parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="its URL")
    args = parser.parse_args(argv)
    if args.command == "stats":
        return _print_table(_admin(args.endpoint, "stats"))
    if args.command == "verify":
        report = _admin(args.endpoint, "verify", method="POST")
        code = _print_table(report)
        return code or (3 if isinstance(report, dict) and report.get("corrupt_blocks") else 0)
    if args.command == "demo":
        from s3cache.sandbox.demo import run_demo

        return run_demo(args.objects, args.object_size)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"s3cache: {exc}", file=sys.stderr)
        return 2
    return _serve(settings, lambda: load_settings(args))


def _serve(settings: Settings, reload: Callable[[], Settings]) -> int:
    from s3cache.server.app import serve

    listener = _log_off_the_loop(settings.log_level)
    try:
        uvloop.run(serve(settings, reload))
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
    return listener


def _admin(endpoint: str, name: str, method: str = "GET") -> dict[str, object] | None:
    """A JSON admin endpoint of a running s3cache; None (after saying why) if it fails."""
    url = f"{endpoint.rstrip('/')}/_s3cache/{name}"
    try:
        request = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(request, timeout=3600) as answer:
            data: dict[str, object] = json.load(answer)
            return data
    except (OSError, ValueError) as exc:
        print(f"s3cache: {method} {url} failed: {exc}", file=sys.stderr)
        return None


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
