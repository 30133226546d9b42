"""Serve GET and HEAD of an object from the cache, filling it as the bytes stream.

A request is answered from the entry's metadata (conditionals, ranges, headers) and
its blocks: present blocks go out zero-copy from the cache file, missing ones are
fetched (single-flight, several in parallel ahead of the reader) and streamed from the
file as they land. Reads that the cache cannot answer exactly go to the forwarder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Protocol

from aiohttp import web

from s3cache.config import DEFAULT_RULE, CacheRule, LiveSettings
from s3cache.errors import InvalidRange, PreconditionFailed, ServiceUnavailable
from s3cache.fill import (
    BrokenAnswer,
    Bypass,
    CacheFull,
    Demand,
    FetchFailed,
    Filler,
    Relay,
    VersionChanged,
)
from s3cache.forward import abort, forward, relay_response
from s3cache.metrics import (
    CACHE_READS,
    RULE_READS,
    RULE_SERVED_BYTES,
    SERVED_BYTES,
    ByteSource,
    CacheOutcome,
    UpstreamKind,
    labelled,
)
from s3cache.prefetch import Prefetcher
from s3cache.rules import Admission
from s3cache.s3.addressing import S3Address
from s3cache.s3.conditions import (
    PRECONDITION_FAILED_MESSAGE,
    Precondition,
    evaluate,
    parse_http_date,
)
from s3cache.s3.objectmeta import (
    RESPONSE_OVERRIDES,
    Verdict,
    check_answer,
    not_modified_headers,
    object_headers,
)
from s3cache.s3.ranges import ByteRange, RangeHeader, unsatisfied_content_range
from s3cache.sendfile import send_file_range
from s3cache.store.cache import CacheStore, CacheWriteError
from s3cache.store.entry import Entry, ObjectMeta
from s3cache.upstream import OverlongBody, Upstream, UpstreamBroken, iter_body

log = logging.getLogger(__name__)

# How the reader answered a request: read by the server's metrics and access log.
OUTCOME = web.RequestKey("outcome", CacheOutcome)
# The name of the cache rule of the object read (its metrics label).
RULE = web.RequestKey("rule", str)
# The request's Range header, parsed once (``requested_range``).
RANGE = web.RequestKey("range", RangeHeader)

# Query parameters of a plain GetObject/HeadObject: anything else is another operation
# (?tagging, ?acl, ?attributes…) or a read the cache cannot answer (?versionId,
# ?partNumber), and is forwarded.
# SigV2 presigned URLs authenticate with AWSAccessKeyId, Signature and Expires (SigV4
# ones with X-Amz-* parameters): the client's own, never sent upstream.
_SIGV2_QUERY_AUTH = frozenset({"AWSAccessKeyId", "Signature", "Expires"})
_PLAIN_READ_PARAMS = frozenset(RESPONSE_OVERRIDES) | {"x-id"} | _SIGV2_QUERY_AUTH
_SSE_C = "x-amz-server-side-encryption-customer-algorithm"
# A block fetch that fails is retried this many times within one request.
FETCH_ATTEMPTS = 3


class Reader:
    def __init__(
        self,
        settings: LiveSettings,
        store: CacheStore,
        filler: Filler,
        upstream: Upstream,
        prefetcher: Prefetcher,
        *,
        on_read: Callable[[web.Request, Entry], None] | None = None,
    ) -> None:
        self._settings = settings
        self._prefetcher = prefetcher
        self._store = store
        self._filler = filler
        self._upstream = upstream
        self._admission = Admission()
        # Told of every read answered from an entry, before its body goes out (the
        # worker hub: secondaries may serve the entry from then on).
        self.on_read = on_read

    @staticmethod
    def cacheable(request: web.Request, address: S3Address) -> bool:
        return (
            request.method in ("GET", "HEAD")
            and address.bucket is not None
            and address.key is not None
            and all(
                name in _PLAIN_READ_PARAMS or name.lower().startswith("x-amz-")
                for name, _ in address.query
            )
            and _SSE_C not in request.headers
            and not requested_range(request).multi
        )

    async def read(self, request: web.Request, address: S3Address) -> web.StreamResponse:
        assert address.bucket is not None and address.key is not None
        rule = self._settings.current.rule_for(address.bucket, address.key)
        request[RULE] = DEFAULT_RULE if rule is None else rule.name
        if rule is not None and not await self._admitted(request, rule, address):
            response = await self._bypass(request, address)
            if request.method == "GET" and response.status < 300:
                labelled(RULE_SERVED_BYTES, request[RULE], ByteSource.UPSTREAM.value).inc(
                    response.content_length or 0
                )
            return response
        return await self._read(request, address)

    async def _admitted(self, request: web.Request, rule: CacheRule, address: S3Address) -> bool:
        """Is the object to be read through the cache? Not under a ``never`` rule; under
        ``admit_after = N``, once cached or from its Nth GET within the window (a HEAD
        of an object not cached yet neither counts nor caches)."""
        assert address.bucket is not None and address.key is not None
        if rule.never:
            return False
        if rule.admit_after <= 1:
            return True
        entry = self._store.peek(address.bucket, address.key)
        if entry is not None and not entry.dropped:
            return True
        if await self._store.lookup(address.bucket, address.key) is not None:
            return True
        return request.method == "GET" and self._admission.admit(
            rule, address.bucket, address.key
        )

    async def _read(self, request: web.Request, address: S3Address) -> web.StreamResponse:
        assert address.bucket is not None and address.key is not None
        demand = Demand()
        for _ in range(FETCH_ATTEMPTS):
            entry, opened = await self._entry(request, address.bucket, address.key, demand)
            if isinstance(entry, web.StreamResponse):
                count_read(request, CacheOutcome.BYPASS)
                return entry
            if entry is None:
                return await self._bypass(request, address)
            self._store.pin(entry)
            try:
                return await self._answer(request, address, entry, opened, demand)
            except VersionChanged:
                continue  # nothing was sent yet: start over on the new version
            except FetchFailed:
                break  # nothing was sent yet: the client gets the upstream's own answer
            finally:
                self._store.unpin(entry)
        return await self._bypass(request, address)

    async def _bypass(self, request: web.Request, address: S3Address) -> web.StreamResponse:
        count_read(request, CacheOutcome.BYPASS)
        return await forward(request, address, self._upstream)

    async def _entry(
        self, request: web.Request, bucket: str, key: str, demand: Demand
    ) -> tuple[Entry | web.StreamResponse | None, bool]:
        """The current entry of the object, opening or revalidating it as needed; or an
        upstream answer to relay; or None to forward the request uncached. The flag
        tells whether the entry was created for this request."""
        entry = self._store.peek(bucket, key)
        created = False
        if entry is None or entry.dropped:
            wanted = requested_range(request)
            # A HEAD, or a range from the end, opens with a HEAD (the size first).
            first_block = (
                None
                if request.method == "HEAD" or wanted.suffix
                else wanted.first_byte // self._store.block_size
            )
            opened = await self._filler.open(
                bucket, key, first_block, head=request.method == "HEAD", demand=demand
            )
            if isinstance(opened, Relay):
                async with opened.response:
                    return await relay_response(request, opened.response), True
            if isinstance(opened, Bypass):
                return None, True
            entry, created = opened.entry, not opened.known
        if not created and entry.stale(self._settings.current.ttl_for(bucket, key)):
            return await self._filler.revalidate(entry), False
        return entry, created

    async def _answer(
        self, request: web.Request, address: S3Address, entry: Entry, opened: bool, demand: Demand
    ) -> web.StreamResponse:
        self._store.touch(entry)
        return await answer(request, address, entry.meta, _EntryBody(self, entry, demand), opened)

    async def _first_bytes_ready(self, entry: Entry, offset: int, end: int, demand: Demand) -> None:
        """Before the status line goes out, make sure the version still holds: wait for
        the first needed byte (a 412 on its block restarts the request cleanly, an
        answer that failed otherwise passes it through). The fetches of the following
        blocks start then, in parallel."""
        block = entry.block_of(offset)
        try:
            fetch = self._filler.fetch(entry, block, demand=demand)
            if fetch is None:
                self._filler.read_ahead(entry, block, entry.block_of(end - 1), demand)
        except CacheFull:
            return
        if fetch is not None:
            # The first byte before the read-ahead: fetches started together share
            # the link and the upstream, and would delay it.
            await fetch.wait_past(offset)
            if isinstance(fetch.error, FetchFailed):
                raise fetch.error
            with contextlib.suppress(CacheFull):
                self._filler.read_ahead(entry, block, entry.block_of(end - 1), demand)

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        entry: Entry,
        start: int,
        end: int,
        demand: Demand,
        verified: bool = False,
    ) -> bool:
        """Send bytes [start, end) of the entry: from the file where present, waiting
        for fetches where not, straight from the upstream if the cache cannot help.
        ``verified``: all of them were found present and checked (``Entry.survey``).
        False if the response had to be aborted."""
        position = start
        failures = 0
        last_block = entry.block_of(end - 1)
        while position < end:
            present_end = await self._store.verified_until(entry, position, end, verified)
            verified = False
            if present_end > position:
                await self._send(request, response, entry, position, present_end)
                position = present_end
                continue
            block = entry.block_of(position)
            try:
                fetch = self._filler.fetch(entry, block, demand=demand)
                self._filler.read_ahead(entry, block, last_block, demand)
            except CacheFull:
                return await self._stream_uncached(request, response, entry, position, end)
            if fetch is None:
                continue
            await fetch.wait_past(position)
            available = min(fetch.filled_to, end)
            if available > position:
                await self._send(request, response, entry, position, available)
                position = available
            elif fetch.error is not None:
                failures += 1
                # Bytes of another version, or of a broken answer, may be out already.
                if isinstance(fetch.error, VersionChanged | BrokenAnswer) or (
                    failures >= FETCH_ATTEMPTS
                ):
                    log.warning("aborting a response: %s", fetch.error)
                    abort(request)
                    return False
                if isinstance(fetch.error, CacheWriteError):
                    return await self._stream_uncached(request, response, entry, position, end)
        return True

    async def _send(
        self, request: web.Request, response: web.StreamResponse, entry: Entry, start: int, end: int
    ) -> None:
        fd = await self._store.fd(entry)
        try:
            await send_file_range(request, response, fd, start, end - start)
        except EOFError as exc:
            # The file was cut short after its blocks were checked (the connection is
            # aborted already): check them again before they are served next time.
            self._store.suspect(entry)
            raise ConnectionResetError(f"cache file ended early: {exc}") from exc

    async def _stream_uncached(
        self, request: web.Request, response: web.StreamResponse, entry: Entry, start: int, end: int
    ) -> bool:
        """The cache cannot take these bytes: relay them from the upstream, same
        version (If-Match), or abort the response (False)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": entry.meta.etag}
        url = self._upstream.url(entry.bucket, entry.key)
        try:
            upstream_response = await self._upstream.request(
                "GET", url, headers, kind=UpstreamKind.BLOCK
            )
            async with upstream_response:
                status, answer_headers = upstream_response.status, upstream_response.headers
                checked = check_answer("GET", status, answer_headers, (start, end - 1), entry.meta)
                if checked.verdict is not Verdict.CACHEABLE:
                    upstream_response.close()  # its framing is not trusted either
                    raise FetchFailed(f"upstream answered {status} {checked.reason}")
                body = iter_body(upstream_response, kind=UpstreamKind.BLOCK, length=end - start)
                async for chunk in body:
                    await response.write(chunk)
            return True
        except (FetchFailed, UpstreamBroken, OverlongBody, ServiceUnavailable) as exc:
            log.warning("aborting a response: uncached stream failed: %s", exc)
            abort(request)
            return False


class CachedBody(Protocol):
    """Where the bytes of a cached answer come from: the primary's entry (filled as it
    streams, ``_EntryBody``) or a secondary's replica (a complete file)."""

    def announce(self, request: web.Request) -> None:
        """The answer is not a 304: it goes out from now on."""

    async def ready(self, span: ByteRange) -> int:
        """Before the status line: make sure the bytes can be sent (raise if not:
        nothing is sent yet). Returns how many of the span's bytes the cache holds."""

    async def send(
        self, request: web.Request, response: web.StreamResponse, span: ByteRange
    ) -> bool:
        """Send the span's bytes; False if the response had to be aborted."""


async def answer(
    request: web.Request,
    address: S3Address,
    meta: ObjectMeta,
    body: CachedBody,
    opened: bool = False,
) -> web.StreamResponse:
    """The answer to a GET/HEAD of a cached object version, the primary's and the
    secondaries' alike: conditionals, range and headers from the metadata, the bytes
    from ``body``, the read and its bytes counted. ``opened``: the entry was created for
    this request (an answer without a body is then a miss)."""
    response, span = response_for(request, address, meta)
    if response.status == 304:
        count_read(request, CacheOutcome.NOT_MODIFIED)
        return response
    body.announce(request)
    if request.method == "HEAD" or not meta.size:
        await response.prepare(request)
        count_read(request, CacheOutcome.MISS if opened else CacheOutcome.HIT)
        return response
    from_cache = await body.ready(span)
    await response.prepare(request)
    try:
        if await body.send(request, response, span):
            await response.write_eof()
    except ConnectionError:
        abort(request)  # the client went away: nothing more to send
        return response
    rule = request.get(RULE, DEFAULT_RULE)
    for source, count in (
        (ByteSource.CACHE, from_cache),
        (ByteSource.UPSTREAM, span.length - from_cache),
    ):
        labelled(SERVED_BYTES, source.value).inc(count)
        labelled(RULE_SERVED_BYTES, rule, source.value).inc(count)
    count_read(request, _outcome(from_cache, span.length))
    return response


class _EntryBody:
    """The primary's entry as a CachedBody: missing blocks are fetched as it streams."""

    __slots__ = ("_demand", "_entry", "_reader", "_survey")

    def __init__(self, reader: Reader, entry: Entry, demand: Demand) -> None:
        self._reader = reader
        self._entry = entry
        self._demand = demand

    def announce(self, request: web.Request) -> None:
        if self._reader.on_read is not None:
            self._reader.on_read(request, self._entry)

    async def ready(self, span: ByteRange) -> int:
        entry, start, end = self._entry, span.start, span.end + 1
        self._survey = survey = entry.survey(start, end)
        self._reader._prefetcher.observe_read(entry, start, end)
        if survey.missing >= 0:
            await self._reader._first_bytes_ready(entry, start, end, self._demand)
        return survey.present

    async def send(
        self, request: web.Request, response: web.StreamResponse, span: ByteRange
    ) -> bool:
        return await self._reader._stream(
            request,
            response,
            self._entry,
            span.start,
            span.end + 1,
            self._demand,
            self._survey.verified,
        )


def response_for(
    request: web.Request, address: S3Address, meta: ObjectMeta
) -> tuple[web.StreamResponse, ByteRange]:
    """The answer to a GET/HEAD of a cached object version, not yet prepared: a 304, or
    a 200/206 with its headers and the bytes its body needs. Raises PreconditionFailed
    (counted as answered from metadata) and InvalidRange."""
    modified = _last_modified(meta.last_modified)
    precondition = evaluate(request.headers, meta.etag, modified)
    if precondition is Precondition.FAILED:
        count_read(request, CacheOutcome.NOT_MODIFIED)
        raise PreconditionFailed(PRECONDITION_FAILED_MESSAGE)
    if precondition is Precondition.NOT_MODIFIED:
        return web.Response(status=304, headers=not_modified_headers(meta)), ByteRange(0, -1)
    try:
        byte_range = requested_range(request).resolve(meta.size)
    except InvalidRange as exc:
        exc.headers["Content-Range"] = unsatisfied_content_range(meta.size)
        raise
    headers = object_headers(
        meta,
        byte_range,
        dict(address.query),
        checksum_mode=request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED",
    )
    response = _CoalescedResponse(status=206 if byte_range else 200, headers=headers)
    span = byte_range or ByteRange(0, meta.size - 1)
    response.content_length = span.length if meta.size else 0
    return response, span


class _CoalescedResponse(web.StreamResponse):
    """A response whose head leaves with the first body bytes, in one write, as
    aiohttp's own ``web.Response`` does: a small hit is then one system call and one
    segment instead of two. (The body is ready when the reader prepares the response,
    so holding the head back delays nothing.)"""

    _send_headers_immediately = False


def requested_range(request: web.Request) -> RangeHeader:
    """The request's Range header, parsed on first use and kept on the request."""
    parsed = request.get(RANGE)
    if parsed is None:
        parsed = request[RANGE] = RangeHeader.parse(request.headers.get("Range"))
    return parsed


@lru_cache(maxsize=4096)
def _last_modified(text: str) -> datetime:
    """An entry's Last-Modified as a datetime (the epoch if it cannot be read)."""
    return parse_http_date(text) or datetime.fromtimestamp(0).astimezone()


def count_read(request: web.Request, outcome: CacheOutcome) -> None:
    """How a cacheable read was answered (once per request): its metrics, overall and
    by cache rule, and its access log line."""
    request[OUTCOME] = outcome
    labelled(CACHE_READS, outcome.value).inc()
    labelled(RULE_READS, request.get(RULE, DEFAULT_RULE), outcome.value).inc()


def _outcome(from_cache: int, total: int) -> CacheOutcome:
    if from_cache == total:
        return CacheOutcome.HIT
    return CacheOutcome.PARTIAL if from_cache else CacheOutcome.MISS
