"""The application's components, as typed keys of the aiohttp application."""

from __future__ import annotations

from aiohttp import web

from s3cache.cluster import Cluster
from s3cache.config import LiveSettings, WorkerRole
from s3cache.fill import Filler
from s3cache.listing import ListingCache
from s3cache.multipart import Multipart
from s3cache.prefetch import Prefetcher
from s3cache.reader import Reader
from s3cache.server.auth import Authenticator
from s3cache.server.hub import WorkerHub
from s3cache.store.cache import CacheStore
from s3cache.upstream import Upstream
from s3cache.writes import Writer

LIVE_SETTINGS = web.AppKey("live_settings", LiveSettings)
UPSTREAM = web.AppKey("upstream", Upstream)
STORE = web.AppKey("store", CacheStore)
FILLER = web.AppKey("filler", Filler)
PREFETCHER = web.AppKey("prefetcher", Prefetcher)
READER = web.AppKey("reader", Reader)
LISTINGS = web.AppKey("listings", ListingCache)
AUTH = web.AppKey("auth", Authenticator)
CLUSTER = web.AppKey("cluster", Cluster)
WRITER = web.AppKey("writer", Writer)
MULTIPART = web.AppKey("multipart", Multipart)
# With several workers: this worker's role; on the primary, its side of the channel.
ROLE = web.AppKey("role", WorkerRole)
HUB = web.AppKey("hub", WorkerHub)
