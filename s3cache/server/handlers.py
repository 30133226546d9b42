"""Route each request to the part of s3cache that answers it."""

from __future__ import annotations

from aiohttp import web

from s3cache.errors import MalformedXML, MethodNotAllowed
from s3cache.forward import (
    forward,
    is_signed_streaming,
    relay_response,
    response_headers,
    send_upstream,
)
from s3cache.metrics import SERVED_BYTES, ByteSource, CacheOutcome, labelled
from s3cache.reader import OUTCOME, Reader
from s3cache.s3.access import copy_source_of, deleted_keys, keys_in
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
    MULTIPART,
    READER,
    UPSTREAM,
    WRITER,
)
from s3cache.server.middleware import BUCKET, KEY_ID, OPERATION
from s3cache.writes import AROUND

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
    delete_body = None
    if from_peer:
        request[KEY_ID] = PEER_KEY_ID
    elif _is_delete_objects(request, address):
        # The keys to delete are in the body: read it once the signature is checked,
        # and authorize every one of them.
        key = app[AUTH].authenticate(request, address)
        delete_body = await _read_small_body(request)
        app[AUTH].permit(key, request, address, delete_body)
        request[KEY_ID] = key.access_key
    else:
        request[KEY_ID] = app[AUTH].authorize(request, address)
    if not from_peer and _written_at_owner(request, address):
        written = await _write_at_owner(request, address)
        if written is not None:
            return written
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
    return await forward_write(request, address, delete_body)


async def forward_write(
    request: web.Request, address: S3Address, delete_body: bytes | None = None
) -> web.StreamResponse:
    """Pass a write through; once the upstream has taken it, and before the client
    hears so, drop what the cache holds of the keys it changed (read-after-write).
    ``delete_body``: a DeleteObjects body already read."""
    app = request.app
    assert address.bucket is not None
    bucket = address.bucket
    writer = app[WRITER]
    copy_source = request.headers.get("x-amz-copy-source")
    source = None
    if copy_source is not None and address.key is not None and request.method == "PUT":
        # A copy (CopyObject, UploadPartCopy) reads its source at the upstream: after the
        # source's pending write-back, at whichever node of the cluster it is.
        source = copy_source_of(copy_source)
        await _settle(app, source[0], [source[1]])
    if request[OPERATION] is Operation.PUT_OBJECT and address.key is not None:
        mode = writer.mode(bucket, address.key)
        if mode != AROUND:
            key = address.key

            async def changed() -> None:
                app[LISTINGS].invalidate(bucket)
                await _invalidate(app, bucket, [key])

            return await writer.put(request, address, mode, changed)
    multipart = app[MULTIPART]
    if request[OPERATION] is Operation.MULTIPART and address.key is not None:
        key = address.key
        mode = writer.mode(bucket, key)
        if multipart.handles(request, address) and (mode != AROUND or address.param("uploadId")):

            async def changed_by_upload() -> None:
                app[LISTINGS].invalidate(bucket)
                await _invalidate(app, bucket, [key])

            return await multipart.handle(request, address, mode, changed_by_upload)
    if source is not None and request[OPERATION] is Operation.COPY_OBJECT:
        assert address.key is not None
        key = address.key
        if writer.mode(bucket, key) != AROUND:

            async def copied() -> None:
                app[LISTINGS].invalidate(bucket)
                await _invalidate(app, bucket, [key])

            return await writer.copy(request, address, source, copied)
    # A quiet DeleteObjects answer names no key: take them from the request too.
    requested = deleted_keys(delete_body) if delete_body is not None else []
    # Any other write of a key with a write-back pending goes upstream after it (a
    # DeleteObjects after those of every key it names, at their owners).
    await _settle(app, bucket, [address.key] if address.key is not None else requested)
    response = await send_upstream(request, address, app[UPSTREAM], body=delete_body)
    async with response:
        if response.status >= 300:
            return await relay_response(request, response)
        writer.bucket_exists(bucket)
        app[LISTINGS].invalidate(address.bucket)
        if address.key is not None:
            await _invalidate(app, address.bucket, [address.key])
            return await relay_response(request, response)
        if _is_delete_objects(request, address):
            result = await response.content.read(MAX_DELETE_RESULT_BYTES)
            await _invalidate(app, address.bucket, [*{*requested, *_keys_deleted(result)}])
            return web.Response(
                status=response.status, headers=response_headers(response), body=result
            )
        return await relay_response(request, response)


# The writes of one key that its owner handles in a cluster (ListParts too: it is
# about an upload that lives at the owner).
_KEY_WRITES = frozenset(
    {Operation.PUT_OBJECT, Operation.COPY_OBJECT, Operation.DELETE, Operation.MULTIPART}
)


def _written_at_owner(request: web.Request, address: S3Address) -> bool:
    return address.key is not None and request[OPERATION] in _KEY_WRITES


async def _write_at_owner(
    request: web.Request, address: S3Address
) -> web.StreamResponse | None:
    """A write of one key, passed to its owner (to the next node in rendezvous order
    while the owner cannot be connected to); None if this node is the one to handle
    it. The owner applies its write mode, keeps the cache and orders the key's writes
    (README, "Several nodes, one cache")."""
    assert address.bucket is not None and address.key is not None
    app = request.app
    cluster = app[CLUSTER]
    owner = cluster.owner(address.bucket, address.key)
    if owner is None:
        return None
    # A write-back of the key still pending here (taken while the owner was down) goes
    # upstream before this write.
    await app[WRITER].settle(address.bucket, address.key)
    while owner is not None:
        response = await cluster.write_to(owner, request, address)
        if response is None:
            owner = cluster.owner(address.bucket, address.key)  # it is taken as down now
            continue
        async with response:
            if response.status < 300:
                # What this node still holds of the key (a copy it read while the owner
                # was down) and its listings are stale now.
                app[LISTINGS].invalidate(address.bucket)
                await _forget_copy(app, address.bucket, address.key)
            return await relay_response(request, response)
    return None


async def _settle(app: web.Application, bucket: str, keys: list[str]) -> None:
    """Wait until none of ``keys`` has a write-back pending, here or at its owner."""
    for key in keys:
        await app[WRITER].settle(bucket, key)
    await app[CLUSTER].settle(bucket, keys)


async def _forget_copy(app: web.Application, bucket: str, key: str) -> None:
    """Drop this node's cached copy of a key, unless it is a write-back not yet upstream
    (that one is uploaded, in order, before anything newer of the key goes from here)."""
    if not app[WRITER].pending(bucket, key):
        await app[FILLER].invalidate(bucket, key)
        hub = app.get(HUB)
        if hub is not None:
            await hub.sync()  # and no secondary worker of this node serves it any more


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


def _is_delete_objects(request: web.Request, address: S3Address) -> bool:
    return request.method == "POST" and address.key is None and address.has_param("delete")


def _keys_deleted(answer: bytes) -> list[str]:
    """The keys a DeleteObjects answer says it deleted (none if it does not parse)."""
    try:
        return keys_in(answer, "Deleted")
    except MalformedXML:
        return []
