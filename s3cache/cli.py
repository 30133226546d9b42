"""Command line: ``s3cache serve`` and ``s3cache demo``."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import queue
import sys

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from s3cache.sandbox.demo import run_demo

        return run_demo(args.objects, args.object_size)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"s3cache: {exc}", file=sys.stderr)
        return 2
    return _serve(settings)


def _serve(settings: Settings) -> int:
    from s3cache.server.app import serve

    listener = _log_off_the_loop(settings.log_level)
    try:
        uvloop.run(serve(settings))
    finally:
        listener.stop()
    return 0


def _log_off_the_loop(level: str) -> logging.handlers.QueueListener:
    """Log records are queued by the event loop and written to stderr by a thread, so
    a slow terminal or log collector never stalls a request."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = logging.StreamHandler()
    output.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[logging.handlers.QueueHandler(records)])
    listener = logging.handlers.QueueListener(records, output)
    listener.start()
    return listener
