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
from s3cache.server.middleware import ACCESS_LOG_FORMAT, observe, on_response_prepare
from s3cache.store.cache import CacheStore
from s3cache.upstream import Upstream

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish after SIGTERM.
DRAIN_SECONDS = 30.0


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[observe], client_max_size=0)
    app[SETTINGS] = settings
    app[ACCESS_LOG_FORMAT] = settings.access_log
    app.cleanup_ctx.append(_components)
    app.on_response_prepare.append(on_response_prepare)
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
    if settings.debug_blocking:
        # Start-up may block (reading AWS config files, opening the index); serving
        # must not.
        _fail_on_blocking_calls()
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


def _fail_on_blocking_calls() -> None:
    """Make every blocking call (file I/O, SQLite, sleep…) that s3cache's own code
    makes on the event loop raise BlockingError. Tests run s3cache this way."""
    from blockbuster import BlockBuster

    buster = BlockBuster(scanned_modules=["s3cache"])
    # prometheus-client guards each metric with an in-memory lock that is never held
    # across I/O; s3cache itself takes no threading locks on the loop.
    buster.functions["threading.Lock.acquire"].deactivate()
    buster.functions["threading.Lock.acquire_lock"].deactivate()
    buster.activate()
    log.info("debug_blocking: blocking calls on the event loop will raise")
