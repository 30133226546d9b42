"""Build the aiohttp application and run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from s3cache.cluster import Cluster
from s3cache.config import RELOADABLE, ConfigError, LiveSettings, Settings, WorkerRole
from s3cache.fill import Filler
from s3cache.listing import ListingCache
from s3cache.multipart import Multipart
from s3cache.prefetch import Prefetcher
from s3cache.reader import Reader
from s3cache.server.auth import Authenticator
from s3cache.server.handlers import handle
from s3cache.server.hub import WorkerHub
from s3cache.server.keys import (
    AUTH,
    CLUSTER,
    FILLER,
    HUB,
    LISTINGS,
    LIVE_SETTINGS,
    MULTIPART,
    PREFETCHER,
    READER,
    ROLE,
    STORE,
    UPSTREAM,
    WRITER,
)
from s3cache.server.middleware import observe, on_response_prepare
from s3cache.server.secondary import handle_secondary, secondary_components
from s3cache.server.workerlink import WorkerSigner, unix_path
from s3cache.store.cache import CacheStore
from s3cache.upstream import Upstream
from s3cache.writes import Writer

if TYPE_CHECKING:
    from blockbuster import BlockBuster

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish after SIGTERM.
DRAIN_SECONDS = 30.0
# Accept queue of the listening sockets (the kernel caps it at net.core.somaxconn).
# aiohttp's default of 128 drops SYNs when hundreds of clients connect at once (a
# training job starting): each then waits 1 s, 3 s, 7 s... to retry.
LISTEN_BACKLOG = 4096
# S3 clients send a dozen or two headers; a hundred is plenty.
MAX_HEADERS = 100


def make_app(settings: LiveSettings, role: WorkerRole | None = None) -> web.Application:
    """The application; with several workers (``role``), the primary's (the cache
    itself, and the hub its secondaries link to) or a secondary's."""
    app = web.Application(middlewares=[observe], client_max_size=0)
    app[LIVE_SETTINGS] = settings
    secondary = role is not None and not role.primary
    if role is not None:
        app[ROLE] = role
    app.cleanup_ctx.append(secondary_components if secondary else _components)
    app.on_response_prepare.append(on_response_prepare)
    # Any path at all: keys may hold newlines, which "." does not match.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle_secondary if secondary else handle)
    return app


async def _components(app: web.Application) -> AsyncIterator[None]:
    """Start the upstream client and the cache; on shutdown, stop fills, then flush
    and close the index."""
    live = app[LIVE_SETTINGS]
    settings = live.current
    upstream = Upstream(settings)
    await upstream.start()
    store = CacheStore(settings, live=live)
    await store.open()
    filler = Filler(settings, store, upstream)
    prefetcher = Prefetcher(settings, store, filler, upstream)
    await prefetcher.start()
    app[UPSTREAM] = upstream
    app[STORE] = store
    app[FILLER] = filler
    app[PREFETCHER] = prefetcher
    app[AUTH] = Authenticator(live, upstream)
    cluster = Cluster(settings)
    await cluster.start()
    app[CLUSTER] = cluster
    # What this node cached before it took keys over from another node (at start-up, or
    # a peer gone) is asked for again before it is served: writes made there meanwhile.
    store.expire_validated_before(cluster.ownership.gained_at)
    cluster.on_change.append(lambda: store.expire_validated_before(cluster.ownership.gained_at))
    role = app.get(ROLE)
    hub = None
    if role is not None:
        hub = app[HUB] = WorkerHub(WorkerSigner(role.secret), store, prefetcher, cluster)
    app[READER] = Reader(
        live, store, filler, upstream, prefetcher, on_read=None if hub is None else hub.on_read
    )
    # The listing cache and the write-back each tell the other something: the objects
    # not upstream yet (listed), and when one got there (its bucket's listings go).
    writer = app[WRITER] = Writer(
        settings,
        store,
        upstream,
        filler,
        on_uploaded=lambda bucket, _key: listings.invalidate(bucket),
    )
    listings = app[LISTINGS] = ListingCache(
        settings.list_cache_ttl, upstream, pending=writer.pending_keys
    )
    await writer.start()
    app[MULTIPART] = Multipart(store, upstream, writer, settings.cache_dirs)
    await app[MULTIPART].start()
    try:
        yield
    finally:
        await cluster.close()
        await writer.close()
        await prefetcher.close()
        await filler.close()
        await store.close()
        await upstream.close()


async def serve(
    settings: Settings,
    reload: Callable[[], Settings] | None = None,
    role: WorkerRole | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests.
    SIGHUP re-reads the settings with ``reload`` and applies the reloadable ones.
    With ``role``, this is one of several workers sharing the ports (SO_REUSEPORT); the
    primary also listens on the Unix socket its secondaries reach it at."""
    live = LiveSettings(settings)
    runner = web.AppRunner(
        make_app(live, role),
        access_log=None,
        shutdown_timeout=DRAIN_SECONDS,
        # Bodies pass through as they came: a gzip object is stored gzipped.
        auto_decompress=False,
        # Idle connections, and clients dribbling their request head, are closed.
        keepalive_timeout=settings.idle_timeout,
        max_line_size=settings.max_header_size,
        max_field_size=settings.max_header_size,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    tls = _tls_context(settings)
    for host, port in filter(None, (settings.listen, settings.admin_listen)):
        site = web.TCPSite(
            runner,
            host,
            port,
            reuse_address=True,
            reuse_port=role is not None,
            ssl_context=tls,
            backlog=LISTEN_BACKLOG,
        )
        await site.start()
        log.info("s3cache listening on %s://%s:%d", "https" if tls else "http", host, port)
    if role is not None and role.primary:
        await web.UnixSite(runner, unix_path(role.primary_url), backlog=LISTEN_BACKLOG).start()
    buster = None
    if settings.debug_blocking:
        # Start-up may block (reading AWS config files, opening the index); serving
        # must not.
        buster = _fail_on_blocking_calls()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, _start_reload, live, reload, reloads)
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining in-flight requests")
        await runner.cleanup()
        if buster is not None:
            # Served: the loop's own shutdown (joining the executor's threads) blocks.
            buster.deactivate()


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _start_reload(
    live: LiveSettings, reload: Callable[[], Settings], reloads: set[asyncio.Task[None]]
) -> None:
    task = asyncio.get_running_loop().create_task(_reload(live, reload))
    reloads.add(task)
    task.add_done_callback(reloads.discard)


async def _reload(live: LiveSettings, reload: Callable[[], Settings]) -> None:
    """SIGHUP: read the settings again (off the loop: files are read) and apply the
    reloadable ones; a bad file keeps the settings in force."""
    try:
        new = await asyncio.get_running_loop().run_in_executor(None, reload)
    except ConfigError as exc:
        log.error("SIGHUP: settings not reloaded: %s", exc)
        return
    needs_restart = live.reload(new)
    logging.getLogger().setLevel(live.current.log_level.upper())
    log.info("SIGHUP: reloaded %s", ", ".join(RELOADABLE))
    if needs_restart:
        log.warning(
            "SIGHUP: changes to %s take effect at the next restart", ", ".join(needs_restart)
        )


def _fail_on_blocking_calls() -> BlockBuster:
    """Make every blocking call (file I/O, SQLite, sleep…) that s3cache's own code
    makes on the event loop raise BlockingError. Tests run s3cache this way."""
    from blockbuster import BlockBuster

    buster = BlockBuster(scanned_modules=["s3cache"])
    # prometheus-client guards each metric with an in-memory lock that is never held
    # across I/O; s3cache itself takes no threading locks on the loop.
    buster.functions["threading.Lock.acquire"].deactivate()
    buster.functions["threading.Lock.acquire_lock"].deactivate()
    # The loop sends a range itself only once cachestat said the page cache holds it,
    # into a non-blocking socket.
    buster.functions["os.sendfile"].can_block_in("s3cache/sendfile.py", "_sendfile_now")
    buster.activate()
    log.info("debug_blocking: blocking calls on the event loop will raise")
    return buster
