"""Prefetch: bring blocks in before a client asks for them.

Three sources feed one priority queue, served by a fixed number of workers (the
prefetch concurrency budget, separate from the demand fills: a demand read never
waits behind prefetch):

1. sequential read-ahead: a client reading an object in order (ranged GETs that start
   where the previous one ended) earns a read-ahead window that doubles with each
   sequential read up to ``readahead_max``; a jump elsewhere resets it;
2. warm jobs: ``POST /_s3cache/prefetch`` with a prefix or a list of keys;
3. epoch manifests: the ordered list of keys a data loader will read this epoch; they
   are prefetched in that order, ahead of the position the client is observed at (one
   lead shared by all manifests: by default twice the fetches the workers hold in
   flight, or ``manifest_lead`` bytes), and eviction keeps what is needed soonest.

Metrics: bytes prefetched, prefetched bytes later read (useful) or dropped unread
(wasted), and the lead time between a prefetched block landing and its first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from s3cache.config import Settings
from s3cache.fill import Cached, CacheFull, Filler, Relay
from s3cache.metrics import PREFETCH_LEAD, PREFETCH_QUEUE_DEPTH, PREFETCH_USEFUL_BYTES
from s3cache.store.cache import CacheStore
from s3cache.store.entry import Entry
from s3cache.upstream import Upstream

log = logging.getLogger(__name__)


# How far behind the furthest read a late read of a manifest item may arrive (items).
REORDER_SLACK = 1024
# Time constant of a manifest's read rate (seconds): its reads are weighted by
# exp(-age / RATE_WINDOW), so the rate follows what its client reads now, and falls
# while it reads nothing (a job that finished its epoch and waits).
# bench/shared_cache.py, case 2 (medians of 3 runs): 0.5 s 1.08 x the minimum, 1 s 1.09 x,
# 2 s 1.09 x, 10 s 1.11 x; longer windows average a job's wait into its rate while it reads.
RATE_WINDOW = 0.5
# Reads over less time than this count as read over this long (one read is no rate).
RATE_MIN_SPAN = RATE_WINDOW / 10
# A manifest idle for long has no rate left (exp underflows): what it needs stays needed.
RATE_FLOOR = 1e-12


class Priority(enum.IntEnum):
    READ_AHEAD = 0
    MANIFEST = 1
    WARM = 2


class JobState(enum.Enum):
    LISTING = "listing"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # the prefix is larger than the cache can hold
    FAILED = "failed"


@dataclass(slots=True)
class Job:
    """A warm job: objects to bring into the cache, with its progress."""

    id: str
    bucket: str
    description: str
    state: JobState = JobState.LISTING
    objects_total: int = 0
    bytes_total: int = 0
    objects_done: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    message: str = ""
    pending: int = 0  # items queued and not finished
    stop_after_queued: str = ""  # why the job stops once its queued items are done

    def as_dict(self) -> dict[str, object]:
        elapsed = (self.finished or time.time()) - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        remaining = self.bytes_total - self.bytes_done
        return {
            "id": self.id,
            "bucket": self.bucket,
            "what": self.description,
            "state": self.state.value,
            "objects_total": self.objects_total,
            "objects_done": self.objects_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "bytes_per_second": rate,
            "eta_seconds": remaining / rate if rate and self.state is JobState.RUNNING else None,
            "message": self.message,
        }

    def finish(self, state: JobState, message: str = "") -> None:
        if self.finished is None:
            self.state, self.message, self.finished = state, message, time.time()


@dataclass(frozen=True, slots=True)
class ObjectItem:
    """Bring blocks of one object (all of it, or a byte range)."""

    bucket: str
    key: str
    size: int | None = None
    byte_range: tuple[int, int] | None = None  # [start, end)
    job: Job | None = None
    entry: Entry | None = None  # read-ahead: the entry is known


class Manifest:
    """The ordered reads of the coming epoch, and where the client is in it."""

    __slots__ = (
        "bucket",
        "items",
        "positions",
        "position",
        "queued",
        "rate",
        "read",
        "sizes",
        "sizes_total",
    )

    def __init__(self, bucket: str, items: list[tuple[str, tuple[int, int] | None]]) -> None:
        self.bucket = bucket
        self.items: list[tuple[str, tuple[int, int] | None]] = []
        self.positions: dict[str, list[int]] = {}
        self.position = -1  # the furthest item the client was seen reading
        self.queued = 0  # items handed to the queue so far
        self.read: set[int] = set()  # items read, near the position
        self.sizes: dict[str, int] = {}  # object sizes seen, kept after eviction
        self.sizes_total = 0
        self.rate = ReadRate()  # items per second, of the bucket's client
        self.extend(items)

    def extend(self, items: list[tuple[str, tuple[int, int] | None]]) -> None:
        for key, byte_range in items:
            self.positions.setdefault(key, []).append(len(self.items))
            self.items.append((key, byte_range))

    def observe(self, key: str, now: float | None = None) -> None:
        """The client read ``key``: the first unread occurrence of it that is not far
        behind the position. A loader with several workers reads a little out of
        order: a read that arrives late is this epoch's, not the same key further
        on (in the next epoch, appended), which would move the position past
        everything in between."""
        for index in self.positions.get(key, ()):
            if index > self.position - REORDER_SLACK and index not in self.read:
                self.read.add(index)
                self.rate.add(time.monotonic() if now is None else now)
                if index > self.position:
                    self.position = index
                    if len(self.read) > 2 * REORDER_SLACK:
                        floor = self.position - REORDER_SLACK
                        self.read = {i for i in self.read if i > floor}
                return

    def ahead(self) -> bool:
        """Items are left to read."""
        return self.position < len(self.items) - 1

    def next_use(self, key: str) -> int | None:
        """How many items ahead the key is needed next (None: not again)."""
        for index in self.positions.get(key, ()):
            if index > self.position and index not in self.read:
                return index - self.position
        return None

    def saw(self, key: str, size: int) -> None:
        self.sizes_total += size - self.sizes.get(key, 0)
        self.sizes[key] = size

    def size_of(self, key: str, default: int) -> int:
        """The object's size if seen, else the mean of those seen, else ``default``
        (the lead is counted in bytes: an evicted or unopened object must not count
        as a whole block when objects are much smaller than one)."""
        if key in self.sizes:
            return self.sizes[key]
        return self.sizes_total // len(self.sizes) if self.sizes else default


class ReadRate:
    """Items read per second, an exponentially weighted mean over the last
    ``RATE_WINDOW`` seconds or so; O(1) per read and per estimate. Reads weigh
    exp(-age / RATE_WINDOW); their sum over the weight of the time observed (the
    window, or the time since the first read if shorter) is the rate, so a client
    that stops reading has a rate that falls toward 0."""

    __slots__ = ("_first", "_last", "_weight")

    def __init__(self) -> None:
        self._first: float | None = None  # the first read
        self._last = 0.0  # the last read
        self._weight = 0.0  # of the reads, as of the last one

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._weight = self._weight * math.exp(-max(0.0, now - self._last) / RATE_WINDOW) + 1.0
        self._last = now

    def per_second(self, now: float) -> float | None:
        """None before the first read."""
        if self._first is None:
            return None
        weight = self._weight * math.exp(-max(0.0, now - self._last) / RATE_WINDOW)
        span = max(RATE_MIN_SPAN, now - self._first)
        return weight / (RATE_WINDOW * -math.expm1(-span / RATE_WINDOW))


class Prefetcher:
    def __init__(
        self, settings: Settings, store: CacheStore, filler: Filler, upstream: Upstream
    ) -> None:
        self._store = store
        self._filler = filler
        self._upstream = upstream
        self._block_size = settings.block_size
        self._readahead_max = max(1, settings.readahead_max // settings.block_size)
        # One lead for all manifests together (they share the workers), counted in bytes
        # and, by default, in fetches (a block, or a whole object smaller than one):
        # twice what the workers hold in flight. When prefetch can keep up with the
        # readers at all, an item that many fetches ahead lands before it is read (it has
        # at least two fetch times), and a longer lead fetches no faster: it only holds
        # cache that the entries needed soonest could use. A manifest_lead in bytes
        # replaces it. Never more than half of what the cache holds.
        fetches = 2 * settings.prefetch_concurrency
        self._lead_fetches: int | None = fetches if settings.manifest_lead is None else None
        self._lead = min(
            fetches * settings.block_size
            if settings.manifest_lead is None
            else settings.manifest_lead,
            int(settings.cache_size * settings.cache_low_watermark / 2),
        )
        self._workers_count = settings.prefetch_concurrency
        self._queue: asyncio.PriorityQueue[tuple[int, int, ObjectItem]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.jobs: dict[str, Job] = {}
        self.manifests: dict[str, Manifest] = {}
        self._last_rate = 1.0  # items/s of the manifest read last: for one not read yet
        # Usable room for warm jobs: a job stops before it would evict its own data.
        self._warm_room = int(settings.cache_size * settings.cache_low_watermark)
        store.eviction_rank = self._eviction_rank
        store.manifests_active = self._manifests_active

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._workers_count)]

    async def close(self) -> None:
        for task in [*self._workers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._tasks, return_exceptions=True)

    # --- what clients read -------------------------------------------------------

    def observe_read(self, entry: Entry, start: int, end: int) -> None:
        """A client read bytes [start, end) of an entry: account prefetched blocks it
        uses, grow or reset its read-ahead window, advance a manifest."""
        if entry.prefetched:  # else no walk over the blocks: the reader made one
            now = time.monotonic()
            for block in range(entry.block_of(start), entry.block_of(end - 1) + 1):
                landed = entry.prefetched.pop(block, None)
                if landed is not None:
                    PREFETCH_USEFUL_BYTES.inc(entry.block_length(block))
                    PREFETCH_LEAD.observe(now - landed)
        self._read_ahead(entry, start, end)
        manifest = self.manifests.get(entry.bucket)
        if manifest is not None:
            manifest.saw(entry.key, entry.size)
            now = time.monotonic()
            manifest.observe(entry.key, now)
            rate = manifest.rate.per_second(now)
            if rate is not None:
                self._last_rate = rate
            self._feed_manifest(manifest)

    def _read_ahead(self, entry: Entry, start: int, end: int) -> None:
        sequential = entry.next_offset >= 0 and abs(start - entry.next_offset) < self._block_size
        if sequential:
            entry.window = min(max(2, entry.window * 2), self._readahead_max)
        else:
            entry.window = 0
        entry.next_offset = end
        if not entry.window or end >= entry.size:
            return
        first = entry.block_of(end)
        last = min(entry.block_count - 1, first + entry.window - 1)
        wanted = [b for b in range(first, last + 1) if b not in entry.blocks]
        wanted = [b for b in wanted if b not in entry.fetches]
        if wanted:
            span = (entry.block_range(wanted[0])[0], entry.block_range(wanted[-1])[1])
            self._put(
                Priority.READ_AHEAD,
                ObjectItem(entry.bucket, entry.key, entry.size, span, entry=entry),
            )

    # --- warm jobs ---------------------------------------------------------------

    def warm(self, bucket: str, prefix: str | None, keys: list[str] | None) -> Job:
        what = f"s3://{bucket}/{prefix}" if prefix is not None else f"{len(keys or [])} keys"
        job = Job(id=uuid.uuid4().hex[:12], bucket=bucket, description=what)
        self.jobs[job.id] = job
        self._spawn(self._run_warm(job, prefix, keys))
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.finish(JobState.CANCELLED, "cancelled")
        return job

    async def _run_warm(self, job: Job, prefix: str | None, keys: list[str] | None) -> None:
        try:
            listed = (
                await self._upstream.list_objects(job.bucket, prefix)
                if prefix is not None
                else [(key, None) for key in keys or []]
            )
        except Exception as exc:
            job.finish(JobState.FAILED, f"cannot list: {exc}")
            return
        if job.finished:
            return
        job.objects_total = len(listed)
        job.bytes_total = sum(size or 0 for _, size in listed)
        job.state = JobState.RUNNING
        room = self._warm_room
        for key, size in listed:
            if (size or 0) > room:
                job.stop_after_queued = (
                    f"the objects ({job.bytes_total:,} bytes) are more than the cache can hold "
                    f"({self._warm_room:,} bytes): stopped after the first {job.pending} objects"
                )
                break
            room -= size or 0
            job.pending += 1
            self._put(Priority.WARM, ObjectItem(job.bucket, key, size, job=job))
        if job.pending == 0:
            job.finish(
                JobState.STOPPED if job.stop_after_queued else JobState.DONE,
                job.stop_after_queued or "nothing to fetch",
            )

    # --- manifests ---------------------------------------------------------------

    def submit_manifest(
        self, bucket: str, items: list[tuple[str, tuple[int, int] | None]], *, append: bool
    ) -> Manifest:
        """Replace the bucket's manifest with a new epoch's order, or append the next
        epoch's order to it (so that the end of this epoch prefetches the next one's
        start)."""
        current = self.manifests.get(bucket)
        if append and current is not None:
            manifest = current
            manifest.extend(items)
        else:
            manifest = Manifest(bucket, items)
            if current is not None:
                manifest.rate = current.rate  # the same client, reading on
            self.manifests[bucket] = manifest
        self._feed_manifest(manifest)
        return manifest

    def _feed_manifest(self, manifest: Manifest) -> None:
        """Queue manifest items up to the manifest's share of the lead ahead of its
        client: the manifests with items ahead share it equally."""
        sharing = max(1, sum(1 for other in self.manifests.values() if other.ahead()))
        lead = self._lead // sharing
        fetches = None if self._lead_fetches is None else max(1, self._lead_fetches // sharing)
        ahead = count = 0
        index = manifest.position + 1
        while index < len(manifest.items) and ahead < lead and (fetches is None or count < fetches):
            key, byte_range = manifest.items[index]
            entry = self._store.peek(manifest.bucket, key)
            size = entry.size if entry is not None else manifest.size_of(key, self._block_size)
            if byte_range is not None:
                size = byte_range[1] - byte_range[0]
            ahead += size
            count += max(1, -(-size // self._block_size))  # blocks, or one small object
            if index >= manifest.queued:
                self._put(Priority.MANIFEST, ObjectItem(manifest.bucket, key, None, byte_range))
                manifest.queued = index + 1
            index += 1

    def _eviction_rank(self, bucket: str, key: str) -> float | None:
        """Eviction order hint: lower goes first. None in no manifest with items ahead
        (the policy decides alone); with one, 0 for objects not needed again, else
        1 / the seconds until they are read (Belady: furthest first): the items ahead
        of them over the manifest's read rate, so that the manifests compare in time,
        not in items (jobs read at different rates; one that finished its epoch and
        waits reads its next one later than its items ahead tell)."""
        manifest = self.manifests.get(bucket)
        if manifest is None or not manifest.ahead():
            return None
        distance = manifest.next_use(key)
        if distance is None:
            return 0.0
        rate = manifest.rate.per_second(time.monotonic())
        return max(self._last_rate if rate is None else rate, RATE_FLOOR) / distance

    def _manifests_active(self) -> bool:
        return any(manifest.ahead() for manifest in self.manifests.values())

    # --- the queue ---------------------------------------------------------------

    def _put(self, priority: Priority, item: ObjectItem) -> None:
        self._queue.put_nowait((priority, next(self._order), item))
        PREFETCH_QUEUE_DEPTH.set(self._queue.qsize())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        while True:
            _, _, item = await self._queue.get()
            PREFETCH_QUEUE_DEPTH.set(self._queue.qsize())
            try:
                fetched = await self._bring(item)
            except Exception:
                log.exception("prefetch of s3://%s/%s failed", item.bucket, item.key)
                fetched = 0
            if item.job is not None:
                self._job_item_done(item.job, fetched)

    def _job_item_done(self, job: Job, fetched: int) -> None:
        job.pending -= 1
        job.objects_done += 1
        job.bytes_done += fetched
        if job.pending == 0 and job.state is JobState.RUNNING:
            if job.stop_after_queued:
                job.finish(JobState.STOPPED, job.stop_after_queued)
            else:
                job.finish(JobState.DONE)

    async def _bring(self, item: ObjectItem) -> int:
        """Fetch the item's missing blocks, one after the other; returns the bytes the
        object's blocks in range hold once done."""
        if item.job is not None and item.job.finished:
            return 0
        if item.entry is not None and item.entry.dropped:
            return 0  # evicted or replaced since the read that asked for read-ahead
        entry = item.entry or await self._entry(item)
        if entry is None:
            return 0
        manifest = self.manifests.get(entry.bucket)
        if manifest is not None:
            manifest.saw(entry.key, entry.size)
        start, end = item.byte_range or (0, entry.size)
        end = min(end, entry.size)  # a range past the end must not walk endless blocks
        if end <= start:
            return 0
        self._store.pin(entry)
        try:
            for block in range(entry.block_of(start), entry.block_of(end - 1) + 1):
                if item.job is not None and item.job.finished:
                    break
                with contextlib.suppress(CacheFull):
                    fetch = self._filler.fetch(entry, block, prefetch=True)
                    if fetch is not None:
                        await fetch.wait_past(fetch.end - 1)
            return sum(
                entry.block_length(b) for b in _blocks(entry, start, end) if b in entry.blocks
            )
        finally:
            self._store.unpin(entry)

    async def _entry(self, item: ObjectItem) -> Entry | None:
        entry = self._store.peek(item.bucket, item.key)
        if entry is not None and not entry.dropped:
            return entry
        first = (item.byte_range[0] if item.byte_range else 0) // self._block_size
        opened = await self._filler.open(item.bucket, item.key, first, prefetch=True)
        if isinstance(opened, Relay):
            opened.response.release()
        return opened.entry if isinstance(opened, Cached) else None


def _blocks(entry: Entry, start: int, end: int) -> Iterable[int]:
    return range(entry.block_of(start), entry.block_of(end - 1) + 1)
