"""Fetch missing blocks from the upstream, once each, into the cache file.

A :class:`BlockFetch` is one ranged GET bringing a run of blocks of an entry. While it
runs, it is listed in ``entry.fetches`` under each of its blocks: any reader that needs
one of those blocks waits on that fetch (single-flight) and streams from the cache
file as ``written`` grows, so the first byte goes out as soon as it lands. A block is
recorded present (with its xxh3-64) only once all of its bytes are in the file.

Every block fetch carries ``If-Match: <etag>``: a 412 means the object changed
upstream; the entry is dropped and the fetch fails with :class:`VersionChanged`, so
one response never mixes two versions.

Opening an object (its first fetch) is single-flight per key too: the first block
GET, sent without If-Match, also brings the object's metadata.

Every upstream answer is checked against what was asked before a byte of it is used
(:func:`s3cache.s3.objectmeta.check_answer`): only an exact answer is cached; a valid
one the cache cannot keep (no ETag, no Last-Modified, size unknown, 200 to a Range)
makes the reader pass the client's request through uncached; one of another version
is VersionChanged; anything else is BrokenAnswer. A body must be exactly as long as
announced (:func:`s3cache.upstream.iter_body`): a block is never recorded from a body
that ends short or runs long.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from dataclasses import dataclass

import aiohttp
import xxhash

from s3cache.config import Settings
from s3cache.errors import ServiceUnavailable
from s3cache.metrics import (
    COALESCED_WAITERS,
    FILLS_IN_FLIGHT,
    PREFETCHED_BYTES,
    REVALIDATIONS,
    UPSTREAM_BLOCK_FETCHES,
    UPSTREAM_FILL_BYTES,
    Revalidation,
    UpstreamKind,
    labelled,
)
from s3cache.s3.objectmeta import Checked, Verdict, check_answer
from s3cache.singleflight import SingleFlight
from s3cache.store.cache import CacheStore, CacheWriteError
from s3cache.store.entry import Entry, ObjectMeta
from s3cache.upstream import OverlongBody, Upstream, UpstreamBroken, iter_body

log = logging.getLogger(__name__)


class FetchFailed(Exception):
    """A block fetch did not complete; the blocks it did complete stay cached."""


class VersionChanged(FetchFailed):
    """The upstream object is no longer the version the entry holds."""


class UpstreamBusy(FetchFailed):
    """The upstream answered 5xx (InternalError, SlowDown…): worth retrying."""


class BrokenAnswer(FetchFailed):
    """The upstream's answer contradicts the request or itself (another range, a body
    longer than announced…): none of its bytes can be trusted, and retrying is no use."""


_DEMAND_ORDER = itertools.count()


class Demand:
    """One client request, as the fetches it starts and joins know it: the request is
    counted once in s3cache_coalesced_waiters_total when it first waits on a fetch an
    earlier request started (so N concurrent readers of a cold object count N-1 at most,
    one reader alone counts 0, however many fetches its read-ahead starts)."""

    __slots__ = ("order", "joined")

    def __init__(self) -> None:
        self.order = next(_DEMAND_ORDER)
        self.joined = False

    def join(self, fetch: BlockFetch) -> None:
        if not self.joined and fetch.demand is not None and fetch.demand.order < self.order:
            self.joined = True
            COALESCED_WAITERS.inc()


class CacheFull(Exception):
    """No room for more blocks (everything cached is in use): serve uncached."""


class BlockFetch:
    """One ranged upstream GET for blocks ``first..last`` of ``entry``."""

    __slots__ = (
        "entry",
        "first",
        "last",
        "start",
        "end",
        "written",
        "error",
        "done",
        "hasher",
        "prefetch",
        "demand",
        "_waiters",
    )

    def __init__(
        self,
        entry: Entry,
        first: int,
        last: int,
        *,
        prefetch: bool = False,
        demand: Demand | None = None,
    ) -> None:
        self.entry = entry
        self.first = first
        self.last = last
        self.start = entry.block_range(first)[0]
        self.end = entry.block_range(last)[1]
        self.written = 0  # bytes in the file, contiguous from ``start``
        self.error: BaseException | None = None
        self.done = False
        self.hasher = xxhash.xxh3_64()  # of the block being written, across retries
        self.prefetch = prefetch
        self.demand = demand  # the request that started it (None: prefetch)
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def filled_to(self) -> int:
        return self.start + self.written

    async def wait_past(self, offset: int) -> None:
        """Wait until the byte at ``offset`` is in the file, or the fetch ended."""
        while self.filled_to <= offset and not self.done:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _progress(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class Cached:
    """Opening gave the object's entry."""

    entry: Entry
    known: bool = False  # it was in the index already (not created for this open)


@dataclass(frozen=True, slots=True)
class Relay:
    """The upstream's answer to the client's own request (an error: 404, 403…), to
    be sent to the client as it is (and released)."""

    response: aiohttp.ClientResponse


@dataclass(frozen=True, slots=True)
class Bypass:
    """Nothing to cache (the object cannot be, or the open this one joined failed): the
    client's request goes upstream, and gets the upstream's own answer."""

    reason: str


#: What ``Filler.open`` gives: exactly one of an entry, a relay or a bypass.
Opened = Cached | Relay | Bypass


class Filler:
    def __init__(self, settings: Settings, store: CacheStore, upstream: Upstream) -> None:
        self._store = store
        self._upstream = upstream
        self._slots = asyncio.Semaphore(settings.fill_concurrency)
        self._per_object = settings.fill_object_concurrency
        self._retries = settings.upstream_retries
        self._backoff = settings.upstream_retry_backoff
        # Opens under way: their entry, shared with who asks meanwhile (single-flight).
        self._opening: SingleFlight[tuple[str, str], Entry | None] = SingleFlight()
        self._revalidating: SingleFlight[int, None] = SingleFlight()  # by entry id
        self._overtaken: set[tuple[str, str]] = set()  # opens that a write overtook
        self._tasks: set[asyncio.Task[None]] = set()

    # --- opening -----------------------------------------------------------------

    async def open(
        self,
        bucket: str,
        key: str,
        first_block: int | None,
        *,
        head: bool = False,
        prefetch: bool = False,
        demand: Demand | None = None,
    ) -> Opened:
        """The entry of an object that is not in the in-memory view: from the index, or
        created with its first block fetch (``first_block``), or from a HEAD (None). An
        error answer is a Relay if it answers the client's request (a GET's; a HEAD's
        when the client's is a HEAD too, ``head``), a Bypass otherwise.

        Single-flight per key: concurrent openers share one index lookup and one
        upstream request; the others get the first one's entry (a Bypass if it got
        none: they then pass their own request through)."""
        joined = self._opening.joined((bucket, key))
        if joined is not None:
            shared = await joined
            return Bypass("the open it joined got no entry") if shared is None else Cached(shared)
        try:
            with self._opening.lead((bucket, key), None) as publish:
                indexed = await self._store.lookup(bucket, key)
                opened: Opened
                if indexed is not None and not indexed.dropped:
                    opened = Cached(indexed, known=True)
                elif first_block is None:
                    opened = await self._open_from_head(bucket, key, head)
                else:
                    opened = await self._open(bucket, key, first_block, prefetch, demand)
                entry = opened.entry if isinstance(opened, Cached) else None
                if (bucket, key) in self._overtaken and entry is not None:
                    # A write finished while this open was in flight: this reader (and
                    # those waiting with it) began before it and may see the old
                    # version, but nobody after it may.
                    await self._store.drop(entry)
                publish(entry)
                return opened
        finally:
            self._overtaken.discard((bucket, key))

    async def invalidate(self, bucket: str, key: str) -> None:
        """Forget the cached object: a write through s3cache changed it."""
        if (bucket, key) in self._opening:
            self._overtaken.add((bucket, key))
        await self._store.invalidate(bucket, key)

    async def _open(
        self, bucket: str, key: str, first_block: int, prefetch: bool, demand: Demand | None
    ) -> Opened:
        block_size = self._store.block_size
        start = first_block * block_size
        asked = (start, start + block_size - 1)
        UPSTREAM_BLOCK_FETCHES.inc()
        response = await self._upstream.request(
            "GET",
            self._upstream.url(bucket, key),
            {"Range": f"bytes={asked[0]}-{asked[1]}"},
            kind=UpstreamKind.BLOCK,
        )
        if response.status == 416:  # empty object, or starting past its end
            response.release()
            return await self._open_from_head(bucket, key, False)
        if response.status not in (200, 206):
            return Relay(response)  # an error answer: the client gets it as it is
        checked = check_answer("GET", response.status, response.headers, asked)
        entry = await self._keep(bucket, key, checked)
        if entry is None or not entry.size:
            _discard(response, checked)
            return Bypass(checked.reason) if entry is None else Cached(entry)
        first = entry.block_of(start)
        # With no room, readers find the blocks missing and serve them uncached.
        with contextlib.suppress(CacheFull):
            self._start(entry, first, first, response, prefetch=prefetch, demand=demand)
        return Cached(entry)

    async def _open_from_head(self, bucket: str, key: str, head: bool) -> Opened:
        """Create an entry from a HEAD (no blocks yet). An error answer is relayed to
        a client's HEAD (``head``); a client's GET goes upstream itself (the error body
        included)."""
        response = await self._upstream.request(
            "HEAD", self._upstream.url(bucket, key), {}, kind=UpstreamKind.BLOCK
        )
        if response.status != 200:
            if head:
                return Relay(response)
            response.release()
            return Bypass(f"HEAD answered {response.status}")
        response.release()
        checked = check_answer("HEAD", 200, response.headers, None)
        entry = await self._keep(bucket, key, checked)
        return Bypass(checked.reason) if entry is None else Cached(entry)

    async def _keep(self, bucket: str, key: str, checked: Checked) -> Entry | None:
        """The entry of a checked answer's version; None if it is not to be cached (the
        client's own request then goes upstream, and gets the upstream's answer)."""
        if checked.verdict is not Verdict.CACHEABLE or checked.meta is None:
            log.info("not caching s3://%s/%s: %s", bucket, key, checked.reason)
            return None
        return await self._create(bucket, key, checked.meta)

    async def _create(self, bucket: str, key: str, meta: ObjectMeta) -> Entry | None:
        if meta.size > self._store.capacity:
            return None
        try:
            return await self._store.create(bucket, key, meta)
        except CacheWriteError as exc:
            log.warning("not caching s3://%s/%s: %s", bucket, key, exc)
            return None

    # --- block fetches -----------------------------------------------------------

    def fetch(
        self,
        entry: Entry,
        block: int,
        *,
        prefetch: bool = False,
        demand: Demand | None = None,
    ) -> BlockFetch | None:
        """The fetch bringing ``block``: an existing one (which ``demand`` joins), or a
        new one. None if the block is present. Raises CacheFull if the cache cannot take
        it.

        A prefetch fetch does not take one of the demand slots: the prefetcher's own
        workers are its concurrency budget, so demand reads never queue behind it."""
        if block in entry.blocks:
            return None
        existing = entry.fetches.get(block)
        if existing is not None:
            if demand is not None:
                demand.join(existing)
            return existing  # type: ignore[no-any-return]
        return self._start(entry, block, block, None, prefetch=prefetch, demand=demand)

    def read_ahead(
        self, entry: Entry, block: int, last_block: int, demand: Demand | None = None
    ) -> None:
        """Start fetches for the missing blocks after ``block``, up to ``last_block``,
        keeping at most the per-object number of fetches in flight."""
        for ahead in range(block + 1, last_block + 1):
            if len(entry.fetches) >= self._per_object:
                return
            if ahead not in entry.blocks and ahead not in entry.fetches:
                try:
                    self._start(entry, ahead, ahead, None, demand=demand)
                except CacheFull:
                    return

    def _start(
        self,
        entry: Entry,
        first: int,
        last: int,
        response: aiohttp.ClientResponse | None,
        *,
        prefetch: bool = False,
        demand: Demand | None = None,
    ) -> BlockFetch:
        fetch = BlockFetch(entry, first, last, prefetch=prefetch, demand=demand)
        if not self._store.reserve(fetch.end - fetch.start, entry.dir):
            if response is not None:
                response.release()
            raise CacheFull()
        for block in range(first, last + 1):
            entry.fetches[block] = fetch
        self._store.pin(entry)
        FILLS_IN_FLIGHT.inc()
        task = asyncio.create_task(self._run(fetch, response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch

    async def _run(self, fetch: BlockFetch, response: aiohttp.ClientResponse | None) -> None:
        """Bring the fetch's bytes in. A broken transfer or a 5xx/SlowDown answer is
        retried with backoff, resuming at the first byte not yet written, same version
        (If-Match); a 412 drops the entry."""
        entry = fetch.entry
        failures = 0
        try:
            while True:
                try:
                    await self._transfer(fetch, response)
                    return
                except (UpstreamBroken, ServiceUnavailable, UpstreamBusy) as exc:
                    response = None
                    failures += 1
                    if failures > self._retries:
                        raise
                    delay = self._backoff * 2 ** (failures - 1) * (0.5 + random.random())
                    log.info(
                        "retrying fill of s3://%s/%s at byte %d in %.2fs: %s",
                        entry.bucket,
                        entry.key,
                        fetch.filled_to,
                        delay,
                        exc,
                    )
                    await asyncio.sleep(delay)
        except VersionChanged as exc:
            fetch.error = exc
            await self._store.drop(entry)
        except (FetchFailed, UpstreamBroken, CacheWriteError, ServiceUnavailable) as exc:
            fetch.error = exc
            log.warning(
                "fill of s3://%s/%s blocks %d-%d failed: %s",
                entry.bucket,
                entry.key,
                fetch.first,
                fetch.last,
                exc,
            )
        except BaseException as exc:
            fetch.error = exc
            raise
        finally:
            fetch.done = True
            for block in range(fetch.first, fetch.last + 1):
                if entry.fetches.get(block) is fetch:
                    del entry.fetches[block]
            self._store.release(fetch.end - fetch.start)
            self._store.unpin(entry)
            FILLS_IN_FLIGHT.dec()
            fetch._progress()

    async def _transfer(self, fetch: BlockFetch, response: aiohttp.ClientResponse | None) -> None:
        """One upstream exchange: the given (already open) response, or a new ranged GET
        for what is still missing."""
        if response is not None:
            async with response:
                await self._receive(fetch, response)
            return
        async with contextlib.AsyncExitStack() as slot:
            if not fetch.prefetch:
                await slot.enter_async_context(self._slots)
            response = await self._request(fetch)
            async with response:
                await self._receive(fetch, response)

    async def _request(self, fetch: BlockFetch) -> aiohttp.ClientResponse:
        entry = fetch.entry
        asked = (fetch.filled_to, fetch.end - 1)
        headers = {"Range": f"bytes={asked[0]}-{asked[1]}", "If-Match": entry.meta.etag}
        UPSTREAM_BLOCK_FETCHES.inc()
        response = await self._upstream.request(
            "GET", self._upstream.url(entry.bucket, entry.key), headers, kind=UpstreamKind.BLOCK
        )
        if response.status in (200, 206):
            checked = check_answer("GET", response.status, response.headers, asked, entry.meta)
            if checked.verdict is Verdict.CACHEABLE:
                return response
            _discard(response, checked)
            if checked.verdict is Verdict.CHANGED:
                raise VersionChanged(f"s3://{entry.bucket}/{entry.key} is {checked.reason}")
            raise BrokenAnswer(f"block fetch answer not usable: {checked.reason}")
        response.release()
        if response.status == 412:
            raise VersionChanged(f"s3://{entry.bucket}/{entry.key} changed upstream")
        if response.status >= 500:
            raise UpstreamBusy(f"upstream answered {response.status} to a block fetch")
        raise FetchFailed(f"upstream answered {response.status} to a block fetch")

    async def _receive(self, fetch: BlockFetch, response: aiohttp.ClientResponse) -> None:
        """Write the body into the file from the first byte still missing, recording
        each block once it is complete. The answer was checked to carry exactly the
        bytes asked; a body that ends short is UpstreamBroken (resumed), one that runs
        long is BrokenAnswer, its last block never recorded."""
        entry = fetch.entry
        position = fetch.filled_to
        body = iter_body(response, kind=UpstreamKind.BLOCK, length=fetch.end - position)
        try:
            async for chunk in body:
                await self._store.write(entry, position, chunk)
                UPSTREAM_FILL_BYTES.inc(len(chunk))
                position = await self._account(fetch, position, chunk)
        except OverlongBody as exc:
            response.close()
            raise BrokenAnswer(str(exc)) from exc

    async def _account(self, fetch: BlockFetch, position: int, chunk: bytes) -> int:
        """Hash the written chunk, record the blocks it completes, wake readers."""
        entry = fetch.entry
        view = memoryview(chunk)
        while view:
            block = entry.block_of(position)
            block_end = entry.block_range(block)[1]
            piece = view[: block_end - position]
            fetch.hasher.update(piece)
            position += len(piece)
            view = view[len(piece) :]
            if position == block_end:
                await self._store.add_block(entry, block, fetch.hasher.intdigest())
                fetch.hasher.reset()
                if fetch.prefetch:
                    entry.prefetched[block] = time.monotonic()
                    PREFETCHED_BYTES.inc(entry.block_length(block))
        fetch.written = position - fetch.start
        fetch._progress()
        return position

    # --- revalidation ------------------------------------------------------------

    async def revalidate(self, entry: Entry) -> Entry | None:
        """Ask the upstream whether the entry is still current (HEAD If-None-Match).

        Returns the entry (unchanged), a new entry (changed), or None (gone, or cannot
        be cached): then the request goes upstream. If the upstream cannot be asked,
        the entry is served as it is ("stale-if-error")."""
        joined = self._revalidating.joined(entry.id)
        if joined is not None:
            await joined
            return await self._store.lookup(entry.bucket, entry.key)
        with self._revalidating.lead(entry.id, None):
            return await self._revalidate(entry)

    async def _revalidate(self, entry: Entry) -> Entry | None:
        url = self._upstream.url(entry.bucket, entry.key)
        try:
            response = await self._upstream.request(
                "HEAD", url, {"If-None-Match": entry.meta.etag}, kind=UpstreamKind.REVALIDATE
            )
        except ServiceUnavailable as exc:
            log.warning("serving s3://%s/%s unrevalidated: %s", entry.bucket, entry.key, exc)
            labelled(REVALIDATIONS, Revalidation.ERROR.value).inc()
            return entry
        response.release()
        if response.status == 304:
            labelled(REVALIDATIONS, Revalidation.UNCHANGED.value).inc()
            await self._store.mark_validated(entry)
            return entry
        if response.status >= 500:
            labelled(REVALIDATIONS, Revalidation.ERROR.value).inc()
            return entry
        await self._store.drop(entry)
        if response.status != 200:
            labelled(REVALIDATIONS, Revalidation.GONE.value).inc()
            return None
        labelled(REVALIDATIONS, Revalidation.CHANGED.value).inc()
        checked = check_answer("HEAD", 200, response.headers, None)
        return await self._keep(entry.bucket, entry.key, checked)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _discard(response: aiohttp.ClientResponse, checked: Checked) -> None:
    """Leave an answer unread: its connection goes back to the pool if the answer was
    sound, and is closed if not, since its framing is not to be trusted (bytes past a
    wrong Content-Length would be read as the next answer on that connection)."""
    if checked.verdict is Verdict.BROKEN:
        response.close()
    else:
        response.release()
