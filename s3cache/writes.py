"""Upload caching: write-through and write-back of PutObject (README, "Write modes").

A write's mode comes from ``write_rules`` (longest bucket/prefix wins; ``around``
elsewhere: the upstream takes the write, the cache forgets the key).

- ``through``: the client's body is spooled into a new cache file as it streams to
  the upstream. Once the upstream took it, a HEAD (If-Match its ETag) gives the
  object's metadata exactly as a GET would; the file becomes the key's entry, every
  block recorded with its xxh3 as a fill records it; then the client hears the
  upstream's answer. A failed upload leaves no entry (the file is removed).
- ``back``: the body is spooled to the cache file only; once its bytes are fsync'd the
  entry and its journal row are committed together (``synchronous=FULL``), and the
  client is answered 200 with the ETag S3 will give it (the body's MD5). The journal
  (``writeback`` table beside the index) is drained in the background: one upload at
  a time per key, in journal order, ``writeback_concurrency`` at once, each retried
  with exponential backoff (capped at ``writeback_retry_max``) until the upstream
  takes it; then the entry takes the upstream's metadata and its journal row goes.
  A process that dies resumes every journal row at start-up. Until it is upstream, a
  pending entry is served from the cache (never revalidated, never evicted).

Ordering, last write wins at the upstream too: a later write-back of a key supersedes
a pending one (its journal row goes with the replaced entry; one being uploaded
finishes first); any other write of the key (through, around, delete, copy,
multipart) waits until the key has nothing pending (``settle``).

The cap: pending bytes (and spools of write-backs in progress) stay within
``writeback_max``; a write-back that does not fit is done write-through instead, as is
one that cannot be promised exactly (conditional or SSE-C headers, a checksum or
Content-MD5 of the client's, a body of unknown length).

Bodies are spooled by ``s3cache.spool`` (aiofiles writes, hashes in a worker thread);
the uploads read them back with aiofiles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import logging
import os
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import aiofiles
import aiofiles.os
import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from s3cache.config import Settings
from s3cache.errors import NoSuchBucket, ServiceUnavailable
from s3cache.fill import Filler
from s3cache.forward import relay_response, response_headers, send_upstream, upstream_request
from s3cache.listing import Listed
from s3cache.metrics import (
    WRITEBACK_FAILURES,
    WRITEBACK_OLDEST,
    WRITEBACK_PENDING_BYTES,
    WRITEBACK_PENDING_OBJECTS,
    WRITEBACK_UPLOADS,
    WRITES,
    UpstreamKind,
    WritebackFailure,
    labelled,
)
from s3cache.s3.addressing import S3Address
from s3cache.s3.objectmeta import Verdict, check_answer
from s3cache.singleflight import SingleFlight
from s3cache.spool import CHECKSUMS, Spool, checksum_headers
from s3cache.store.cache import CacheStore, CacheWriteError
from s3cache.store.entry import ObjectMeta
from s3cache.store.index import PendingRow
from s3cache.upstream import UNSIGNED_PAYLOAD, Upstream

log = logging.getLogger(__name__)

AROUND, THROUGH, BACK = "around", "through", "back"
_READ_PIECE = 1024 * 1024
_FIRST_RETRY = 0.2
# Request headers that say what S3 stores with the object, and that a GET answers
# with: the metadata promised for a pending write-back (PutObject, "Request syntax").
_STORED = ("cache-control", "content-disposition", "content-encoding", "content-language")
_STORED_ALSO = ("expires", "x-amz-website-redirect-location")
# What a write-back cannot promise exactly, or must not store before the upstream
# checked it: conditional writes, customer keys, the client's own integrity checks.
_NOT_BACK = ("if-match", "if-none-match", "x-amz-server-side-encryption-customer-")
_BUFFERED = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"  # aws-chunked as it came: not the object
# A write-back is acknowledged only if its bucket may exist upstream (else it could never
# be uploaded): a bucket not known to exist is asked for with one HeadBucket, answered in
# at most this many seconds. No answer in time is an unreachable upstream: the write is
# acknowledged (write-back is there to ride out an upstream away).
BUCKET_CHECK_TIMEOUT = 5.0

# What the server does once a key has changed (drops it elsewhere, listings).
Changed = Callable[[], Awaitable[None]]
# Makes a complete cache file of an object's bytes: its place (from
# ``CacheStore.new_file``), its path and its block hashes.
Joiner = Callable[[], Awaitable[tuple[tuple[int, str], Path, dict[int, int]]]]
# Bytes to upload: a file, an offset in it, a size, their MD5 (hex).
Source = tuple[Path, int, int, str]


@dataclass(slots=True)
class Pending:
    """A write-back object acknowledged and not yet confirmed upstream."""

    seq: int
    entry_id: int
    bucket: str
    key: str
    size: int
    etag: str
    headers: tuple[tuple[str, str], ...]
    acknowledged_at: float
    attempts: int = 0
    parts: tuple[tuple[int, str], ...] | None = None  # multipart: (size, md5 hex) each
    failure: WritebackFailure | None = None  # why the last attempt failed
    refusal_logged: bool = False  # a permanent refusal is logged once per object

    @classmethod
    def of(cls, row: PendingRow) -> Pending:
        return cls(
            row.seq, row.entry_id, row.bucket, row.key, row.size, row.etag, row.headers,
            row.acknowledged_at, parts=row.parts,
        )


class UploadFailed(ServiceUnavailable):
    """The upstream answered a write-back upload's request with an error."""

    def __init__(self, operation: str, status: int, answer: bytes) -> None:
        self.upstream_status = status
        self.upstream_code = xml_text(answer, "Code") or ""
        super().__init__(f"{operation} answered {status} {self.upstream_code}".rstrip())

    @property
    def reason(self) -> WritebackFailure:
        if self.upstream_status >= 500:
            return WritebackFailure.SERVER_ERROR
        if self.upstream_status == 403:
            return WritebackFailure.ACCESS_DENIED
        if self.upstream_code == "NoSuchBucket":
            return WritebackFailure.NO_SUCH_BUCKET
        return WritebackFailure.REFUSED


@dataclass(slots=True)
class _Totals:
    uploads: int = 0
    failures: int = 0
    superseded: int = 0
    fallbacks: int = 0  # write-backs done write-through: over writeback_max, or unpromisable
    by_mode: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)  # failed attempts
    missing_buckets: int = 0  # write-backs answered NoSuchBucket


class Writer:
    """Write-through and write-back of PutObject, and the write-back uploader."""

    def __init__(
        self,
        settings: Settings,
        store: CacheStore,
        upstream: Upstream,
        filler: Filler,
        *,
        on_uploaded: Callable[[str, str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._upstream = upstream
        self._filler = filler
        self._max = settings.writeback_max
        self._retry_max = settings.writeback_retry_max
        self._slots = asyncio.Semaphore(settings.writeback_concurrency)
        self._part_concurrency = settings.writeback_concurrency
        self._pending: dict[int, Pending] = {}  # by journal seq, in journal order
        self._spooling = 0  # bytes of write-backs being spooled (counted against the cap)
        self._uploading: dict[tuple[str, str], asyncio.Task[None]] = {}  # one per key
        self._changed = asyncio.Condition()
        self._totals = _Totals()
        self._closing = False
        self._flushes = 0  # flush calls waiting now
        self._buckets: set[str] = set()  # known to exist upstream
        self._bucket_checks: SingleFlight[str, int | None] = SingleFlight()
        # Called with (bucket, key) once a write-back object is upstream (the listing
        # cache forgets the bucket's listings: they did not have it).
        self._on_uploaded = on_uploaded

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Resume the journal as the store found it at start-up."""
        WRITEBACK_PENDING_OBJECTS.set_function(lambda: len(self._pending))
        WRITEBACK_PENDING_BYTES.set_function(lambda: self.pending_bytes)
        WRITEBACK_OLDEST.set_function(self.oldest_age)
        for row in self._store.pending_at_open:
            self._pending[row.seq] = Pending.of(row)
        if self._pending:
            log.info("write-back: resuming %d pending uploads", len(self._pending))
        for pending in list(self._pending.values()):
            self._drain(pending.bucket, pending.key)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._uploading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def mode(self, bucket: str, key: str) -> str:
        return self._settings.write_mode_for(bucket, key)

    # --- what operators see ------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return sum(pending.size for pending in self._pending.values())

    def oldest_age(self) -> float:
        if not self._pending:
            return 0.0
        return max(0.0, time.time() - min(p.acknowledged_at for p in self._pending.values()))

    def stats(self) -> dict[str, object]:
        totals = self._totals
        return {
            "pending_objects": len(self._pending),
            "pending_bytes": self.pending_bytes,
            "oldest_pending_seconds": round(self.oldest_age(), 3),
            "uploading": len(self._uploading),
            "flushes_waiting": self._flushes,
            "max_bytes": self._max,
            "uploads": totals.uploads,
            "upload_failures": totals.failures,
            "upload_failures_by_reason": dict(totals.by_reason),
            "refused_objects": sum(
                1 for p in self._pending.values() if p.failure in _PERMANENT
            ),
            "missing_buckets": totals.missing_buckets,
            "superseded": totals.superseded,
            "fallbacks_to_through": totals.fallbacks,
            "writes": dict(totals.by_mode),
        }

    def pending_keys(self, bucket: str, prefix: str) -> list[Listed]:
        """What listings of bucket/prefix merge: the newest pending write of each key."""
        newest: dict[str, Pending] = {}
        for pending in self._pending.values():
            if pending.bucket == bucket and pending.key.startswith(prefix):
                newest[pending.key] = pending
        return [
            Listed(key, newest[key].size, newest[key].etag, newest[key].acknowledged_at)
            for key in sorted(newest)
        ]

    async def flush(self, bucket: str | None = None, prefix: str = "") -> int:
        """Wait until nothing pending under bucket/prefix (everything if no bucket) is
        left; how many were pending when called."""

        def under(pending: Pending) -> bool:
            return bucket is None or (pending.bucket == bucket and pending.key.startswith(prefix))

        waiting = sum(1 for pending in self._pending.values() if under(pending))
        self._flushes += 1
        try:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: not any(under(pending) for pending in self._pending.values())
                )
        finally:
            self._flushes -= 1
        return waiting

    def pending(self, bucket: str, key: str) -> bool:
        """Whether a write-back of the key is not upstream yet."""
        return any(p.bucket == bucket and p.key == key for p in self._pending.values())

    async def settle(self, bucket: str, key: str) -> None:
        """Wait until the key has no write-back pending: a write of it other than a
        write-back goes to the upstream after those (last write wins there too)."""
        if not any(p.bucket == bucket and p.key == key for p in self._pending.values()):
            return
        async with self._changed:
            await self._changed.wait_for(
                lambda: not any(p.bucket == bucket and p.key == key for p in self._pending.values())
            )

    # --- the bucket of a write-back ----------------------------------------------

    def bucket_exists(self, bucket: str) -> None:
        """The upstream showed the bucket exists (it took a write, answered a HEAD)."""
        self._buckets.add(bucket)

    async def check_bucket(self, bucket: str) -> None:
        """Before a write-back is acknowledged: NoSuchBucket if the upstream says it has
        no such bucket (the object could never be uploaded; nothing is journaled). A
        bucket known to exist is not asked for again; one HeadBucket (with s3cache's
        credentials, one at a time per bucket) otherwise. An upstream that cannot be
        asked (unreachable, 5xx) or cannot tell (403: credentials without
        s3:ListBucket) lets the write be acknowledged."""
        if bucket in self._buckets:
            return
        if await self._bucket_checks.shared(bucket, lambda: self._head_bucket(bucket)) == 404:
            self._totals.missing_buckets += 1
            raise NoSuchBucket("The specified bucket does not exist", resource=f"/{bucket}")

    async def _head_bucket(self, bucket: str) -> int | None:
        """The upstream's status for a HeadBucket; None if it did not answer in time."""
        try:
            response = await asyncio.wait_for(
                self._upstream.request(
                    "HEAD", self._upstream.url(bucket, None), {}, kind=UpstreamKind.WRITEBACK
                ),
                BUCKET_CHECK_TIMEOUT,
            )
        except (ServiceUnavailable, TimeoutError) as exc:
            log.warning("write-back to s3://%s: bucket not checked (%s)", bucket, exc)
            return None
        response.release()
        if response.status == 200:
            self._buckets.add(bucket)
        elif response.status != 404:
            log.info("write-back to s3://%s: HeadBucket answered %d", bucket, response.status)
        return response.status

    # --- PutObject ---------------------------------------------------------------

    async def put(
        self,
        request: web.Request,
        address: S3Address,
        mode: str,
        changed: Callable[[], Awaitable[None]],
    ) -> web.StreamResponse:
        """A PutObject in mode ``through`` or ``back``; ``changed``: what the server
        does once the key has changed (invalidation elsewhere, listings)."""
        assert address.bucket is not None and address.key is not None
        if mode == BACK:
            length = body_length(request)
            if self._promisable(request, length):
                assert length is not None
                await self.check_bucket(address.bucket)
                return await self._put_back(request, address, length, changed)
            self._totals.fallbacks += 1
            mode = THROUGH
        await self.settle(address.bucket, address.key)
        return await self._put_through(request, address, changed)

    def _count(self, mode: str) -> None:
        self._totals.by_mode[mode] = self._totals.by_mode.get(mode, 0) + 1
        labelled(WRITES, mode).inc()

    def _promisable(self, request: web.Request, length: int | None) -> bool:
        if length is None or request.headers.get("x-amz-content-sha256") == _BUFFERED:
            return False
        if length > self._store.capacity:
            return False
        for name in request.headers:
            lower = name.lower()
            if lower.startswith(_NOT_BACK):
                return False
            if lower.startswith("x-amz-checksum-") and lower not in CHECKSUMS:
                return False
        return self.pending_bytes + self._spooling + length <= self._max

    async def _discard(self, spool: Spool) -> None:
        await spool.discard()
        if spool.place is not None:
            self._store.release_file(spool.place[1])

    async def _new_spool(
        self, bucket: str, key: str, length: int | None, checks: list[str] | None = None
    ) -> Spool | None:
        if request_too_big(length, self._store.capacity):
            return None
        checks = checks or []
        try:
            directory, name, path = self._store.new_file(bucket, key)
            spool = Spool(path, self._store.block_size, place=(directory, name), checks=checks)
            await spool.open()
        except (CacheWriteError, OSError) as exc:
            log.warning("not caching the upload of s3://%s/%s: %s", bucket, key, exc)
            return None
        return spool

    async def _put_through(
        self, request: web.Request, address: S3Address, changed: Callable[[], Awaitable[None]]
    ) -> web.StreamResponse:
        assert address.bucket is not None and address.key is not None
        bucket, key = address.bucket, address.key
        self._count(THROUGH)
        headers, body = upstream_request(request)
        buffered = request.headers.get("x-amz-content-sha256") == _BUFFERED
        spool = None if buffered else await self._new_spool(bucket, key, body_length(request))
        stream = spool.tee(body) if spool is not None and body is not None else body
        url = self._upstream.url(bucket, key, address.query)
        try:
            response = await self._upstream.request(
                "PUT", url, headers, stream, kind=UpstreamKind.FORWARD
            )
        except BaseException:
            if spool is not None:
                await self._discard(spool)
            raise
        async with response:
            if response.status >= 300:
                if spool is not None:
                    await self._discard(spool)
                return await relay_response(request, response)
            await changed()
            if spool is not None:
                await self._keep_through(bucket, key, spool, response)
            return await relay_response(request, response)

    async def _keep_through(
        self, bucket: str, key: str, spool: Spool, response: aiohttp.ClientResponse
    ) -> None:
        """The upstream took the spooled body: make it the key's entry, with the
        metadata a GET would answer with (a HEAD, If-Match the ETag it gave)."""
        etag = response.headers.get("ETag")
        complete = await spool.finish(durable=False)
        meta = await self._head(bucket, key, etag) if complete and etag else None
        if meta is None or meta.size != spool.size:
            await self._discard(spool)
            return
        try:
            await self._filler.invalidate(bucket, key)
            assert spool.place is not None
            await self._store.adopt(bucket, key, meta, spool.place, spool.blocks)
        except CacheWriteError as exc:
            log.warning("not caching the upload of s3://%s/%s: %s", bucket, key, exc)
            await self._discard(spool)

    async def _head(self, bucket: str, key: str, etag: str | None) -> ObjectMeta | None:
        """The object's metadata as the upstream describes it now (None if it is not
        the version ``etag``, or cannot be asked)."""
        try:
            response = await self._upstream.request(
                "HEAD",
                self._upstream.url(bucket, key),
                {"If-Match": etag} if etag else {},
                kind=UpstreamKind.WRITEBACK,
            )
        except ServiceUnavailable as exc:
            log.warning("HEAD s3://%s/%s after its upload: %s", bucket, key, exc)
            return None
        response.release()
        if response.status != 200:
            return None
        self._buckets.add(bucket)
        checked = check_answer("HEAD", 200, response.headers, None)
        if checked.verdict is not Verdict.CACHEABLE or checked.meta is None:
            return None
        return checked.meta

    async def _put_back(
        self,
        request: web.Request,
        address: S3Address,
        length: int,
        changed: Callable[[], Awaitable[None]],
    ) -> web.StreamResponse:
        assert address.bucket is not None and address.key is not None
        bucket, key = address.bucket, address.key
        spool = await self._new_spool(bucket, key, length, checksum_headers(request.headers))
        if spool is None:
            self._totals.fallbacks += 1
            await self.settle(bucket, key)
            return await self._put_through(request, address, changed)
        self._count(BACK)
        headers, body = upstream_request(request)
        self._spooling += length
        try:
            if body is not None:
                async for piece in body:
                    await spool.write(piece)
            if not await spool.finish(durable=True):
                raise ServiceUnavailable("The cache could not store the object; retry.")
            spool.check_digests(request)
            meta = _promised(request, spool, time.time())
            await changed()  # (drops the key's entry here too: before the new one is made)
            await self._filler.invalidate(bucket, key)
            assert spool.place is not None
            entry, seq = await self._store.adopt(
                bucket, key, meta, spool.place, spool.blocks, replayed(headers)
            )
        except BaseException:
            await self._discard(spool)
            raise
        finally:
            self._spooling -= length
        assert seq is not None
        self._add(Pending(seq, entry.id, bucket, key, meta.size, meta.etag,
                          replayed(headers), entry.accessed_at))
        answer = CIMultiDict({"ETag": meta.etag})
        for name in spool.checks:
            answer[name] = request.headers[name]
        return web.Response(status=200, headers=answer)

    # --- CopyObject --------------------------------------------------------------

    async def copy(
        self,
        request: web.Request,
        address: S3Address,
        source: tuple[str, str],
        changed: Changed,
    ) -> web.StreamResponse:
        """A CopyObject, write-through (the upstream copies; in ``back`` mode too): if
        the source is cached whole here, its bytes and block hashes become the new
        object's entry, with the metadata of a HEAD of the copy."""
        assert address.bucket is not None and address.key is not None
        bucket, key = address.bucket, address.key
        await self.settle(bucket, key)
        self._count(THROUGH)
        response = await send_upstream(request, address, self._upstream)
        async with response:
            if response.status != 200:
                return await relay_response(request, response)
            answer = await response.read()
            headers = response_headers(response)
        # A 200 can carry an error (CopyObject, "Response elements").
        if b"<Error>" not in answer:
            await changed()
            etag = xml_text(answer, "ETag")
            if etag and not etag.startswith('"'):
                etag = f'"{etag}"'  # (some servers leave the XML's ETag unquoted)
            await self._keep_copy(bucket, key, source, etag)
        return web.Response(status=200, headers=headers, body=answer)

    async def _keep_copy(
        self, bucket: str, key: str, source: tuple[str, str], etag: str | None
    ) -> None:
        entry = await self._store.lookup(*source)
        if entry is None or entry.dropped or len(entry.blocks) != entry.block_count:
            return
        meta = await self._head(bucket, key, etag)
        if meta is None or meta.size != entry.size:
            return
        try:
            directory, name, path = self._store.new_file(bucket, key)
        except CacheWriteError:
            return
        blocks = dict(entry.blocks)
        self._store.pin(entry)  # its file stays open while it is copied
        try:
            fd = await self._store.fd(entry)
            await asyncio.get_running_loop().run_in_executor(None, _copy_fd, fd, path, entry.size)
            await self._filler.invalidate(bucket, key)
            await self._store.adopt(bucket, key, meta, (directory, name), blocks)
            return
        except (OSError, CacheWriteError) as exc:
            log.warning("not caching the copy s3://%s/%s: %s", bucket, key, exc)
        finally:
            self._store.unpin(entry)
        with contextlib.suppress(OSError):
            await aiofiles.os.remove(path)
        self._store.release_file(name)

    # --- the uploader ------------------------------------------------------------

    def _add(self, pending: Pending) -> None:
        superseded = [
            seq
            for seq, other in self._pending.items()
            if other.bucket == pending.bucket and other.key == pending.key
        ]
        # Their journal rows went with the entry this write replaced; one being uploaded
        # finishes first (the key's uploads are one task, in journal order).
        for seq in superseded:
            del self._pending[seq]
            self._totals.superseded += 1
        self._pending[pending.seq] = pending
        self._drain(pending.bucket, pending.key)

    def _drain(self, bucket: str, key: str) -> None:
        if (bucket, key) in self._uploading or self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._drain_key(bucket, key))
        self._uploading[(bucket, key)] = task

    async def _drain_key(self, bucket: str, key: str) -> None:
        """Upload the key's pending writes one after the other, oldest first."""
        try:
            while True:
                pending = next(
                    (p for p in self._pending.values() if p.bucket == bucket and p.key == key),
                    None,
                )
                if pending is None:
                    return
                await self._upload_until_done(pending)
        finally:
            del self._uploading[(bucket, key)]
            if any(p.bucket == bucket and p.key == key for p in self._pending.values()):
                self._drain(bucket, key)  # a write came in as the task ended

    async def _upload_until_done(self, pending: Pending) -> None:
        while pending.seq in self._pending:
            async with self._slots:
                done = await self._upload(pending)
            if done:
                await self._forget(pending)
                return
            pending.attempts += 1
            self._totals.failures += 1
            reason = (pending.failure or WritebackFailure.UNREACHABLE).value
            self._totals.by_reason[reason] = self._totals.by_reason.get(reason, 0) + 1
            labelled(WRITEBACK_FAILURES, reason).inc()
            delay = min(self._retry_max, _FIRST_RETRY * 2 ** min(pending.attempts - 1, 30))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _forget(self, pending: Pending) -> None:
        self._pending.pop(pending.seq, None)
        async with self._changed:
            self._changed.notify_all()

    async def _upload(self, pending: Pending) -> bool:
        """One attempt; True once the journal row is settled (uploaded, superseded, or
        its entry lost)."""
        entry = await self._store.lookup(pending.bucket, pending.key)
        if entry is None or entry.id != pending.entry_id:
            return True  # superseded: a newer write of the key replaced the entry
        if not await aiofiles.os.path.isfile(entry.path):
            if pending.seq not in self._pending:
                return True  # superseded meanwhile: its file went with its entry
            log.error(
                "write-back of s3://%s/%s: its cache file is lost; the object cannot be "
                "uploaded",
                pending.bucket,
                pending.key,
            )
            await self._store.uploaded(pending.seq, pending.entry_id, None)
            return True
        if pending.parts is None:
            sources = [(entry.path, 0, pending.size, pending.etag.strip('"'))]
        else:
            sources, offset = [], 0
            for size, md5 in pending.parts:
                sources.append((entry.path, offset, size, md5))
                offset += size
        try:
            etag = await self._send(
                pending.bucket, pending.key, pending.headers, sources,
                multipart=pending.parts is not None,  # one part is a multipart upload too
            )
        except (ServiceUnavailable, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(pending, exc)
            return False
        await self._confirm(pending, etag)
        return True

    def _failed(self, pending: Pending, exc: BaseException) -> None:
        """Note why an attempt failed. A refusal the upstream will repeat (403, 404…) is
        logged once per object, as an error: the object stays pending (acknowledged, only
        in the cache) and is retried at the backoff cap until someone acts."""
        where = f"s3://{pending.bucket}/{pending.key}"
        if isinstance(exc, UploadFailed):
            pending.failure = exc.reason
        else:
            pending.failure = WritebackFailure.UNREACHABLE
        if pending.failure is WritebackFailure.NO_SUCH_BUCKET:
            self._buckets.discard(pending.bucket)
        if pending.failure not in _PERMANENT:
            log.warning("write-back of %s failed: %s", where, exc)
        elif not pending.refusal_logged:
            pending.refusal_logged = True
            log.error(
                "write-back of %s refused by the upstream (%s): the acknowledged object is "
                "only in the cache, retried every %gs at most until the upstream takes it",
                where,
                exc,
                self._retry_max,
            )
        else:
            log.debug("write-back of %s refused again: %s", where, exc)

    async def _send(
        self,
        bucket: str,
        key: str,
        headers: tuple[tuple[str, str], ...],
        sources: list[Source],
        *,
        multipart: bool | None = None,
    ) -> str | None:
        """Upload the bytes of ``sources`` (file, offset, size, MD5 hex): one PUT for one
        source, else a multipart upload with one part per source (the client's part
        boundaries, so that the ETag is the one promised). The upstream's ETag;
        ServiceUnavailable if it refused."""
        if not (len(sources) > 1 if multipart is None else multipart):
            return await self._put_part(bucket, key, headers, sources[0], ())
        url = self._upstream.url(bucket, key, (("uploads", ""),))
        response = await self._upstream.request(
            "POST", url, CIMultiDict(headers), b"", kind=UpstreamKind.WRITEBACK
        )
        async with response:
            answer = await response.read()
        upload_id = xml_text(answer, "UploadId") if response.status == 200 else None
        if upload_id is None:
            raise UploadFailed("CreateMultipartUpload", response.status, answer)
        try:
            # Parts go up in parallel: one connection over a WAN is far slower than
            # the disk (as boto3's own transfers do; bounded by writeback_concurrency).
            parts = asyncio.Semaphore(self._part_concurrency)

            async def put(number: int, source: Source) -> str | None:
                query = (("partNumber", str(number)), ("uploadId", upload_id))
                async with parts:
                    return await self._put_part(bucket, key, (), source, query)

            etags = await asyncio.gather(
                *(put(number, source) for number, source in enumerate(sources, 1))
            )
            return await self._finish_upload(bucket, key, upload_id, list(etags))
        except BaseException:
            await self._abort_upload(bucket, key, upload_id)
            raise

    async def _put_part(
        self,
        bucket: str,
        key: str,
        headers: tuple[tuple[str, str], ...],
        source: Source,
        query: tuple[tuple[str, str], ...],
    ) -> str | None:
        path, offset, size, md5 = source
        sent = CIMultiDict(headers)
        sent["Content-Length"] = str(size)
        sent["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
        # The upstream checks the bytes it stores against the MD5 the client was given.
        sent["Content-MD5"] = base64.b64encode(bytes.fromhex(md5)).decode()
        file = await aiofiles.open(path, "rb")
        try:
            await file.seek(offset)
            response = await self._upstream.request(
                "PUT",
                self._upstream.url(bucket, key, query),
                sent,
                _pieces(file, size),
                kind=UpstreamKind.WRITEBACK,
            )
            async with response:
                answer = await response.read()
        finally:
            await file.close()
        if response.status != 200:
            raise UploadFailed("UploadPart" if query else "PutObject", response.status, answer)
        self._buckets.add(bucket)
        return response.headers.get("ETag")

    async def _finish_upload(
        self, bucket: str, key: str, upload_id: str, etags: list[str | None]
    ) -> str | None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag or '')}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        headers = CIMultiDict({"Content-Type": "application/xml"})
        headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        url = self._upstream.url(bucket, key, (("uploadId", upload_id),))
        response = await self._upstream.request(
            "POST", url, headers, body, kind=UpstreamKind.WRITEBACK
        )
        async with response:
            answer = await response.read()
        # A 200 can carry an error (CompleteMultipartUpload, "Response elements").
        if response.status != 200 or b"<Error>" in answer:
            # (an error in a 200 is a server's fault: S3 asks to retry it)
            status = 500 if response.status == 200 else response.status
            raise UploadFailed("CompleteMultipartUpload", status, answer)
        return xml_text(answer, "ETag")

    async def _abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        url = self._upstream.url(bucket, key, (("uploadId", upload_id),))
        with contextlib.suppress(ServiceUnavailable, aiohttp.ClientError, OSError):
            response = await self._upstream.request(
                "DELETE", url, {}, None, kind=UpstreamKind.WRITEBACK
            )
            response.release()

    # --- hooks of the multipart module -------------------------------------------

    def room_for(self, size: int) -> bool:
        """Whether a write-back of ``size`` bytes fits under writeback_max now."""
        fits = size <= self._store.capacity and (
            self.pending_bytes + self._spooling + size <= self._max
        )
        if not fits:
            self._totals.fallbacks += 1
        return fits

    async def upload_now(
        self, bucket: str, key: str, headers: tuple[tuple[str, str], ...], sources: list[Source]
    ) -> None:
        """A write-back over the cap, done there and then (the client waits)."""
        await self.settle(bucket, key)
        self._count(THROUGH)
        await self._send(bucket, key, headers, sources, multipart=True)
        await self._filler.invalidate(bucket, key)

    async def keep_back(
        self,
        bucket: str,
        key: str,
        meta: ObjectMeta,
        headers: tuple[tuple[str, str], ...],
        parts: tuple[tuple[int, str], ...],
        join: Joiner,
        changed: Changed,
        *,
        completed_upload: str,
    ) -> None:
        """A completed write-back multipart upload: its file made (fsync'd by ``join``),
        then its entry and journal row committed (and the upload's saved rows gone)."""
        await self.check_bucket(bucket)
        self._count(BACK)
        self._spooling += meta.size
        try:
            place, path, blocks = await join()
            try:
                await changed()
                await self._filler.invalidate(bucket, key)
                entry, seq = await self._store.adopt(
                    bucket, key, meta, place, blocks, headers, parts, completed_upload
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    await aiofiles.os.remove(path)
                self._store.release_file(place[1])
                raise
        finally:
            self._spooling -= meta.size
        assert seq is not None
        self._add(
            Pending(seq, entry.id, bucket, key, meta.size, meta.etag, headers,
                    entry.accessed_at, parts=parts)
        )

    async def keep_through(
        self, bucket: str, key: str, etag: str, size: int, join: Joiner
    ) -> None:
        """A completed write-through multipart upload: its parts become the entry."""
        self._count(THROUGH)
        meta = await self._head(bucket, key, etag)
        if meta is None or meta.size != size or size > self._store.capacity:
            return
        try:
            place, path, blocks = await join()
        except (OSError, CacheWriteError) as exc:
            log.warning("not caching the upload of s3://%s/%s: %s", bucket, key, exc)
            return
        try:
            await self._filler.invalidate(bucket, key)
            await self._store.adopt(bucket, key, meta, place, blocks)
            return
        except (OSError, CacheWriteError) as exc:
            log.warning("not caching the upload of s3://%s/%s: %s", bucket, key, exc)
        with contextlib.suppress(OSError):
            await aiofiles.os.remove(path)
        self._store.release_file(place[1])

    async def _confirm(self, pending: Pending, etag: str | None) -> None:
        if etag != pending.etag:
            log.error(
                "write-back of s3://%s/%s: the upstream gave ETag %s, %s was promised: "
                "the cached copy is dropped",
                pending.bucket,
                pending.key,
                etag,
                pending.etag,
            )
            meta = None
        else:
            meta = await self._head(pending.bucket, pending.key, etag)
            if meta is None:
                entry = await self._store.lookup(pending.bucket, pending.key)
                meta = entry.meta if entry is not None else None
        await self._store.uploaded(pending.seq, pending.entry_id, meta)
        if self._on_uploaded is not None:
            self._on_uploaded(pending.bucket, pending.key)
        self._totals.uploads += 1
        WRITEBACK_UPLOADS.inc()


# Failures the upstream repeats until someone acts (the bucket, a policy, the key…).
_PERMANENT = frozenset(
    {WritebackFailure.NO_SUCH_BUCKET, WritebackFailure.ACCESS_DENIED, WritebackFailure.REFUSED}
)


def request_too_big(length: int | None, capacity: int) -> bool:
    return length is not None and length > capacity


def body_length(request: web.Request) -> int | None:
    decoded = request.headers.get("x-amz-decoded-content-length")
    if decoded is not None and decoded.isdigit():
        return int(decoded)
    return request.content_length if request.body_exists else 0


def _promised(request: web.Request, spool: Spool, now: float) -> ObjectMeta:
    return promised_meta(request, spool.etag, spool.size, now, tuple(spool.checks))


def promised_meta(
    request: web.Request, etag: str, size: int, now: float, checksums: tuple[str, ...]
) -> ObjectMeta:
    """The metadata S3 will answer a GET of the object with, once it has it: the ETag
    promised, Last-Modified the acknowledgement, what the request stored (Content-Type,
    user metadata…, the checksums in ``checksums``)."""
    headers: list[tuple[str, str]] = [
        ("Content-Type", request.headers.get("Content-Type", "binary/octet-stream"))
    ]
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in _STORED or lower in _STORED_ALSO or lower.startswith("x-amz-meta-") or (
            lower in checksums
        ):
            headers.append((lower if lower.startswith("x-amz-") else name, value))
    return ObjectMeta(
        etag=etag,
        size=size,
        last_modified=email.utils.formatdate(now, usegmt=True),
        headers=tuple(headers),
    )


def replayed(headers: CIMultiDict[str]) -> tuple[tuple[str, str], ...]:
    """The upload's headers, as the forwarder would send them (length and payload
    hash are set per attempt)."""
    return tuple(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in ("content-length", "x-amz-content-sha256")
    )


async def _pieces(
    file: aiofiles.threadpool.binary.AsyncBufferedReader, size: int
) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        piece = await file.read(min(_READ_PIECE, left))
        if not piece:
            raise OSError(f"cache file ended {left} bytes early")
        left -= len(piece)
        yield piece


def _copy_fd(source: int, target: Path, size: int) -> None:
    """Copy ``size`` bytes of an open file into a new one (copy_file_range: in the
    kernel, or a reflink where the file system has them)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < size:
            copied = os.copy_file_range(source, out, size - done, done, done)
            if copied == 0:
                raise OSError(f"the source file ended at byte {done} of {size}")
            done += copied
    finally:
        os.close(out)


def xml_text(document: bytes, tag: str) -> str | None:
    """The text of the first element named ``tag`` in an S3 answer (None if none)."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == tag:
            return element.text
    return None

