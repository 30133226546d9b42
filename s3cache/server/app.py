"""Build the aiohttp application and run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from s3cache.config import Settings
from s3cache.fill import Filler
from s3cache.reader import Reader
from s3cache.server.handlers import FILLER, READER, SETTINGS, STORE, UPSTREAM, handle
from s3cache.server.middleware import add_request_id, s3_errors
from s3cache.store.cache import CacheStore
from s3cache.upstream import Upstream

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish after SIGTERM.
DRAIN_SECONDS = 30.0


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[s3_errors], client_max_size=0)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_components)
    app.on_response_prepare.append(add_request_id)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _components(app: web.Application) -> AsyncIterator[None]:
    """Start the upstream client and the cache; on shutdown, stop fills, then flush
    and close the index."""
    settings = app[SETTINGS]
    upstream = Upstream(settings)
    await upstream.start()
    store = CacheStore(settings)
    await store.open()
    filler = Filler(settings, store, upstream)
    app[UPSTREAM] = upstream
    app[STORE] = store
    app[FILLER] = filler
    app[READER] = Reader(settings, store, filler, upstream)
    try:
        yield
    finally:
        await filler.close()
        await store.close()
        await upstream.close()


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
