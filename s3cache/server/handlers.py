"""Route each request to the part of s3cache that answers it."""

from __future__ import annotations

from aiohttp import web

from s3cache.config import Settings
from s3cache.errors import NoSuchKey
from s3cache.forward import forward
from s3cache.s3.addressing import resolve
from s3cache.upstream import Upstream

ADMIN_PREFIX = "/_s3cache/"

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", Upstream)


async def handle(request: web.Request) -> web.StreamResponse:
    """The single entry point for every request on the S3 port."""
    if request.raw_path.startswith(ADMIN_PREFIX):
        return await handle_admin(request)
    app = request.app
    address = resolve(request.host, request.raw_path, app[SETTINGS].virtual_host_domains)
    return await forward(request, address, app[UPSTREAM])


async def handle_admin(request: web.Request) -> web.StreamResponse:
    name = request.path[len(ADMIN_PREFIX) :]
    if name == "healthz" and request.method in ("GET", "HEAD"):
        return web.Response(text="ok\n")
    raise NoSuchKey("No such s3cache admin endpoint.", resource=request.path)
