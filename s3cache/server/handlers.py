"""Route each request to the part of s3cache that answers it."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

from aiohttp import web

from s3cache.errors import NoSuchKey
from s3cache.fill import Filler
from s3cache.forward import (
    forward,
    is_signed_streaming,
    relay_response,
    response_headers,
    send_upstream,
)
from s3cache.metrics import (
    CACHE_EVICTED_BYTES,
    CACHE_EVICTIONS,
    CACHE_READS,
    FILLS_IN_FLIGHT,
    SERVED_BYTES,
    UPSTREAM_BLOCK_FETCHES,
    ByteSource,
    CacheOutcome,
    exposition,
    sample,
)
from s3cache.reader import Reader
from s3cache.s3.addressing import S3Address, resolve
from s3cache.s3.operations import Operation, classify
from s3cache.server.middleware import BUCKET, LIVE_SETTINGS, OPERATION
from s3cache.store.cache import CacheStore
from s3cache.upstream import Upstream

ADMIN_PREFIX = "/_s3cache/"
# A DeleteObjects answer lists at most 1,000 keys: a few hundred KiB at the very most.
MAX_DELETE_RESULT_BYTES = 4 * 1024 * 1024
MAX_DELETE_REQUEST_BYTES = 2 * 1024 * 1024

UPSTREAM = web.AppKey("upstream", Upstream)
FILLER = web.AppKey("filler", Filler)
READER = web.AppKey("reader", Reader)
STORE = web.AppKey("store", CacheStore)


async def handle(request: web.Request) -> web.StreamResponse:
    """The single entry point for every request on the S3 port."""
    if request.raw_path.startswith(ADMIN_PREFIX):
        request[OPERATION] = Operation.ADMIN
        return await handle_admin(request)
    app = request.app
    domains = app[LIVE_SETTINGS].current.virtual_host_domains
    address = resolve(request.host, request.raw_path, domains)
    request[OPERATION] = classify(request.method, address, request.headers)
    request[BUCKET] = address.bucket or "-"
    if Reader.cacheable(request, address):
        return await app[READER].read(request, address)
    if request.method in ("GET", "HEAD", "OPTIONS") or address.bucket is None:
        return await forward(request, address, app[UPSTREAM])
    return await forward_write(request, address)


async def forward_write(request: web.Request, address: S3Address) -> web.StreamResponse:
    """Pass a write through; once the upstream has taken it, and before the client
    hears so, drop what the cache holds of the keys it changed (read-after-write)."""
    app = request.app
    filler = app[FILLER]
    assert address.bucket is not None
    body = None
    requested: list[str] = []
    if request.method == "POST" and address.has_param("delete"):
        # A quiet DeleteObjects answer names no key: take them from the request.
        body = await _read_small_body(request)
        requested = keys_in(body, "Object") if body is not None else []
    response = await send_upstream(request, address, app[UPSTREAM], body=body)
    async with response:
        if response.status >= 300:
            return await relay_response(request, response)
        if address.key is not None:
            await filler.invalidate(address.bucket, address.key)
            return await relay_response(request, response)
        if request.method == "POST" and address.has_param("delete"):
            result = await response.content.read(MAX_DELETE_RESULT_BYTES)
            for key in {*requested, *keys_in(result, "Deleted")}:
                await filler.invalidate(address.bucket, key)
            return web.Response(
                status=response.status, headers=response_headers(response), body=result
            )
        return await relay_response(request, response)


async def _read_small_body(request: web.Request) -> bytes | None:
    """The whole body of a small request (DeleteObjects: at most 1,000 keys), or None
    if it is too big or signed chunk by chunk (then it streams through as usual)."""
    length = request.content_length
    if length is None or length > MAX_DELETE_REQUEST_BYTES or is_signed_streaming(request):
        return None
    return await request.content.readexactly(length)


def keys_in(document: bytes, parent: str) -> list[str]:
    """The ``<Key>`` children of every ``<parent>`` element: ``Object`` in a
    DeleteObjects request, ``Deleted`` in its answer. Nothing if it does not parse."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        return []
    return [
        child.text or ""
        for element in root.iter()
        if _local_name(element) == parent
        for child in element
        if _local_name(child) == "Key"
    ]


def _local_name(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


async def handle_admin(request: web.Request) -> web.StreamResponse:
    name = request.path[len(ADMIN_PREFIX) :]
    if name == "verify" and request.method == "POST":
        return web.json_response(await request.app[STORE].verify_all())
    if request.method not in ("GET", "HEAD"):
        raise NoSuchKey("No such s3cache admin endpoint.", resource=request.path)
    if name == "healthz":
        return web.Response(text="ok\n")
    if name == "readyz":
        problems = await readiness_problems(request.app)
        return web.json_response(
            {"ready": not problems, "problems": problems}, status=503 if problems else 200
        )
    if name == "stats":
        return web.json_response(stats(request.app))
    if name == "metrics":
        body = await asyncio.get_running_loop().run_in_executor(None, exposition)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")
    raise NoSuchKey("No such s3cache admin endpoint.", resource=request.path)


async def readiness_problems(app: web.Application) -> dict[str, str]:
    """Ready: the upstream answers, every cache dir takes writes, the index is open."""
    problems = await app[STORE].check()
    unreachable = await app[UPSTREAM].probe()
    if unreachable:
        problems["upstream"] = unreachable
    return problems


def stats(app: web.Application) -> dict[str, object]:
    """The cache at a glance, as JSON."""
    store = app[STORE]
    reads = {outcome.value: sample(CACHE_READS, outcome=outcome.value) for outcome in CacheOutcome}
    served = {source.value: sample(SERVED_BYTES, source=source.value) for source in ByteSource}
    served_total = sum(served.values())
    return {
        "capacity_bytes": store.capacity,
        "used_bytes": store.used,
        "entries": store.entries,
        "entries_in_memory": store.entries_in_view(),
        "degraded": store.degraded,
        "reads": reads,
        "served_bytes": served,
        "byte_hit_ratio": served["cache"] / served_total if served_total else None,
        "upstream_block_fetches": sample(UPSTREAM_BLOCK_FETCHES),
        "fills_in_flight": sample(FILLS_IN_FLIGHT),
        "evictions": sample(CACHE_EVICTIONS),
        "evicted_bytes": sample(CACHE_EVICTED_BYTES),
    }
