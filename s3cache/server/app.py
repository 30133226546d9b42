"""Build the aiohttp application and run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from s3cache.config import Settings
from s3cache.server.handlers import SETTINGS, UPSTREAM, handle
from s3cache.server.middleware import s3_errors
from s3cache.upstream import Upstream

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish after SIGTERM.
DRAIN_SECONDS = 30.0


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[s3_errors], client_max_size=0)
    app[SETTINGS] = settings
    app[UPSTREAM] = Upstream(settings)
    app.cleanup_ctx.append(_upstream_lifetime)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _upstream_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[UPSTREAM].start()
    yield
    await app[UPSTREAM].close()


async def serve(settings: Settings, started: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests."""
    runner = web.AppRunner(make_app(settings), access_log=None, shutdown_timeout=DRAIN_SECONDS)
    await runner.setup()
    host, port = settings.listen
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("s3cache listening on http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining in-flight requests")
        await runner.cleanup()
