"""Route each request to the part of s3cache that answers it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from aiohttp import web

from s3cache.errors import MethodNotAllowed
from s3cache.forward import (
    forward,
    is_signed_streaming,
    relay_response,
    response_headers,
    send_upstream,
)
from s3cache.metrics import SERVED_BYTES, ByteSource, CacheOutcome, labelled
from s3cache.reader import OUTCOME, Reader
from s3cache.s3.addressing import S3Address, resolve
from s3cache.s3.operations import Operation, classify
from s3cache.server.admin import ADMIN_PREFIX, handle_admin
from s3cache.server.keys import (
    AUTH,
    CLUSTER,
    FILLER,
    HUB,
    LISTINGS,
    LIVE_SETTINGS,
    READER,
    UPSTREAM,
)
from s3cache.server.middleware import BUCKET, KEY_ID, OPERATION

# A DeleteObjects answer lists at most 1,000 keys: a few hundred KiB at the very most.
PEER_KEY_ID = "peer"
MAX_DELETE_RESULT_BYTES = 4 * 1024 * 1024
MAX_DELETE_REQUEST_BYTES = 2 * 1024 * 1024


async def handle(request: web.Request) -> web.StreamResponse:
    """The single entry point for every request on the S3 port."""
    hub = request.app.get(HUB)
    if hub is not None:
        hub.signer.verify(request)  # a request a secondary worker passed on
    if request.raw_path.startswith(ADMIN_PREFIX):
        request[OPERATION] = Operation.ADMIN
        return await handle_admin(request, request.path[len(ADMIN_PREFIX) :])
    app = request.app
    domains = app[LIVE_SETTINGS].current.virtual_host_domains
    address = resolve(request.host, request.raw_path, domains)
    request[OPERATION] = classify(request.method, address, request.headers)
    request[BUCKET] = address.bucket or "-"
    if address.bucket is None and request.method not in ("GET", "HEAD"):
        # The service itself answers only ListBuckets.
        raise MethodNotAllowed(
            "The specified method is not allowed against this resource.", resource="/"
        )
    cluster = app[CLUSTER]
    from_peer = cluster.verify(request)
    request[KEY_ID] = PEER_KEY_ID if from_peer else app[AUTH].authorize(request, address)
    if Reader.cacheable(request, address):
        assert address.bucket is not None and address.key is not None
        owner = None if from_peer else cluster.owner(address.bucket, address.key)
        if owner is not None:
            answer = await cluster.read_from(owner, request, address)
            if answer is not None:
                request[OUTCOME] = CacheOutcome.PEER
                labelled(SERVED_BYTES, ByteSource.PEER.value).inc(answer.body_length)
                return answer
        return await app[READER].read(request, address)
    if request[OPERATION] is Operation.LIST and address.bucket is not None:
        return await app[LISTINGS].list(request, address)
    if request.method in ("GET", "HEAD", "OPTIONS") or address.bucket is None:
        return await forward(request, address, app[UPSTREAM])
    return await forward_write(request, address)


async def forward_write(request: web.Request, address: S3Address) -> web.StreamResponse:
    """Pass a write through; once the upstream has taken it, and before the client
    hears so, drop what the cache holds of the keys it changed (read-after-write)."""
    app = request.app
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
        app[LISTINGS].invalidate(address.bucket)
        if address.key is not None:
            await _invalidate(app, address.bucket, [address.key])
            return await relay_response(request, response)
        if request.method == "POST" and address.has_param("delete"):
            result = await response.content.read(MAX_DELETE_RESULT_BYTES)
            await _invalidate(app, address.bucket, [*{*requested, *keys_in(result, "Deleted")}])
            return web.Response(
                status=response.status, headers=response_headers(response), body=result
            )
        return await relay_response(request, response)


async def _invalidate(app: web.Application, bucket: str, keys: list[str]) -> None:
    """Drop the keys here and at their owners in the cluster."""
    for key in keys:
        await app[FILLER].invalidate(bucket, key)
    await app[CLUSTER].invalidate(bucket, keys)
    hub = app.get(HUB)
    if hub is not None:
        await hub.sync()  # no secondary worker serves what the write changed


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
