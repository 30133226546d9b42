"""The cache store: the async face of the index and the block files.

Hot path: lookups hit an in-memory view of recently used entries; only a miss in the
view costs one hop to the index thread. All SQLite work runs on one dedicated thread
(the connection is single-threaded); file work runs on the loop's default executor.
Nothing here blocks the event loop.

Crash-safe ordering: an entry's row is committed before its file is created; a block
is recorded only after its bytes are written; rows are deleted (committed) before the
file is unlinked. Files left without a row by a crash are removed by a background
sweep after start-up (start-up itself reads one aggregate, not the data files).

Damage from outside (a file deleted, truncated, overwritten or replaced while s3cache
runs or is stopped) is never served: a block is hashed before it is first served, an
open file whose fstat changed behind s3cache's back (``files.Stamp``) has its blocks
hashed again, a file that cannot be opened has its blocks cleared and is created anew,
and one deleted while open has its entry dropped. ``verify_all`` checks everything and
repairs the index as diskcache's ``check(fix=True)`` does.

Disk trouble: a write that fails marks its cache dir degraded (no space, or I/O error)
and the read goes on uncached; no new entry goes to a degraded dir. A background check
(statvfs and a probe write) clears the mark when the dir takes writes again, and caps
the capacity in effect at what the cache dirs' filesystems can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from s3cache.config import DEFAULT_RULE, CacheRule, LiveSettings, Settings
from s3cache.metrics import (
    CACHE_CAPACITY,
    CACHE_DEGRADED,
    CACHE_DEGRADED_DIRS,
    CACHE_ENTRIES,
    CACHE_EVICTED_BYTES,
    CACHE_EVICTIONS,
    CACHE_USED,
    CACHE_WRITE_ERRORS,
    CORRUPT_BLOCKS,
    PREFETCH_WASTED_BYTES,
    RULE_EVICTED_BYTES,
    RULE_EVICTIONS,
    RULE_USED,
    SCRUBBED_BYTES,
    DegradedReason,
    labelled,
)
from s3cache.singleflight import SingleFlight
from s3cache.store import files, policy
from s3cache.store.entry import Entry, ObjectMeta
from s3cache.store.index import MAIN, SMALL, EntryRow, Index, PendingRow, UploadRow

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEX_FILE = "index.sqlite3"
ACCESS_FLUSH_SECONDS = 2.0
EVICTION_BATCH = 256
S3FIFO_HEADS = 512  # entries of a queue's head looked at per eviction round (Belady among them)
ORPHAN_BATCH = 500
DISK_CHECK_SECONDS = 2.0  # free space and degraded dirs are looked at this often
VERIFY_LISTED = 100  # damaged entries named one by one in a verify report
# Errors that say the disk is full. (EFBIG, a file over a size limit, is about one
# object, not the dir: that object is not cached, the dir stays in use.)
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class CacheWriteError(Exception):
    """The cache could not store bytes (disk full, I/O error): serve without caching."""


@dataclass(frozen=True, slots=True)
class DirFault:
    """Why a cache dir takes no blocks now."""

    reason: DegradedReason
    message: str  # for readyz: "cache dir /x: no space left (ENOSPC)"


@dataclass(slots=True)
class VerifyReport:
    """What ``verify_all`` found and repaired (README, "Verifying the cache")."""

    entries: int = 0
    bytes_checked: int = 0
    corrupt_blocks: int = 0  # blocks whose bytes did not match their hash: dropped
    missing_files: int = 0  # deleted, or not a readable file: entry dropped
    truncated_files: int = 0  # shorter than the object: the blocks past the end dropped
    entries_dropped: int = 0
    orphan_files: int = 0  # files no entry claims: removed
    errors: int = 0  # entries that could not be checked (an error reading them)
    damaged: list[dict[str, object]] = field(default_factory=list)
    damaged_not_listed: int = 0

    def add(self, row: EntryRow, found: files.Inspection) -> None:
        if found.problem is None:
            return
        if found.problem == "missing":
            self.missing_files += 1
            self.entries_dropped += 1
        else:
            self.corrupt_blocks += len(found.bad)
            self.truncated_files += found.problem == "truncated"
        if len(self.damaged) >= VERIFY_LISTED:
            self.damaged_not_listed += 1
            return
        item: dict[str, object] = {"bucket": row.bucket, "key": row.key, "problem": found.problem}
        item["blocks"] = sorted(found.bad)
        if found.detail:
            item["detail"] = found.detail
        self.damaged.append(item)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


class CacheStore:
    def __init__(
        self, settings: Settings, *, view_size: int = 4096, live: LiveSettings | None = None
    ) -> None:
        # The settings in force (SIGHUP may change the cache rules).
        self._now: Callable[[], Settings] = (lambda: live.current) if live else lambda: settings
        self._policy = settings.eviction_policy
        self._hits: dict[int, int] = {}  # reads since the last flush, by entry id (S3-FIFO)
        self._ghost = policy.Ghost()
        self.rule_used: dict[str, int] = {}  # bytes held, by cache rule name
        self._rules_counted: tuple[CacheRule, ...] | None = None
        self._dirs = settings.cache_dirs
        self._configured = settings.cache_size
        self._high_fraction = settings.cache_high_watermark
        self._low_fraction = settings.cache_low_watermark
        self._capacity = self._high = self._low = 0
        self._set_capacity(settings.cache_size)
        self.block_size = settings.block_size
        self._scrub_rate = settings.scrub_rate
        self._scrub_pause = settings.scrub_pause  # after a full pass
        self._view: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._expired_before = 0.0  # (expire_validated_before)
        self._view_size = view_size
        self._index_thread = ThreadPoolExecutor(1, thread_name_prefix="s3cache-index")
        self._index: Index | None = None
        self._accessed: dict[int, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._evict_needed = asyncio.Event()
        self._evicting: set[int] = set()  # ids of rows being evicted (not in the view)
        self.used = 0
        self.reserved = 0
        self.entries = 0
        # Eviction order hint from the prefetcher (lower is evicted first; ties in LRU
        # order; None: in no epoch manifest): objects a manifest needs soon stay.
        self.eviction_rank: Callable[[str, str], float | None] = lambda bucket, key: None
        self.manifests_active: Callable[[], bool] = lambda: False
        self.faults: dict[int, DirFault] = {}  # cache dirs that take no blocks now
        self._opening: SingleFlight[int, int | None] = SingleFlight()  # fds being opened
        self._verifying: SingleFlight[tuple[int, int], None] = SingleFlight()  # blocks
        # Called with an entry's id when it can no longer be served whole: dropped,
        # evicted, or a block found damaged (the worker hub tells the secondaries).
        self.on_gone: list[Callable[[int], None]] = []
        # Entries of write-back objects not yet upstream: never evicted (``writes``).
        self.keep: set[int] = set()
        self.keep_keys: dict[tuple[str, str], int] = {}
        self.pending_at_open: list[PendingRow] = []  # the journal as found at start-up
        self.uploads_at_open: list[UploadRow] = []  # write-back multipart uploads, likewise
        self.spooling: set[str] = set()  # files uploads are writing: not orphans yet

    # --- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        def open_index() -> tuple[Index, int, int]:
            for directory in self._dirs:
                (directory / files.DATA_DIR).mkdir(parents=True, exist_ok=True)
            index = Index(self._dirs[0] / INDEX_FILE)
            self.pending_at_open = index.pending()
            self.keep = {row.entry_id for row in self.pending_at_open}
            self.keep_keys = {(row.bucket, row.key): row.entry_id for row in self.pending_at_open}
            self.uploads_at_open = index.uploads()
            self.spooling.update(row.shared[1] for row in self.uploads_at_open if row.shared)
            return index, index.used_bytes(), index.entry_count()

        self._index, self.used, self.entries = await self._in_index_thread(open_index)
        await self._count_rules()
        CACHE_USED.set_function(lambda: self.used)
        CACHE_ENTRIES.set_function(lambda: self.entries)
        self._publish_faults()
        await self._check_disks()
        self._tasks = [
            asyncio.create_task(self._flush_access_times_forever()),
            asyncio.create_task(self._evict_forever()),
            asyncio.create_task(self._sweep_orphans()),
            asyncio.create_task(self._check_disks_forever()),
        ]
        if self._scrub_rate:
            self._tasks.append(asyncio.create_task(self._scrub_forever()))
        self._evict_needed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush_access_times()
        entries = list(self._view.values())
        self._view.clear()
        await _run(_close_fds, entries)
        if self._index is not None:
            await self._in_index_thread(self._index.close)
        self._index_thread.shutdown(wait=False)  # idle: the index was closed above

    async def _in_index_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._index_thread, function, *args)

    @property
    def index(self) -> Index:
        if self._index is None:
            raise RuntimeError("CacheStore.open() was not awaited")
        return self._index

    @property
    def capacity(self) -> int:
        """The capacity in effect: ``cache_size``, or less if the disks hold less."""
        return self._capacity

    @property
    def configured_capacity(self) -> int:
        return self._configured

    @property
    def degraded(self) -> bool:
        """A cache dir takes no blocks now (full, or failing)."""
        return bool(self.faults)

    def _set_capacity(self, capacity: int) -> None:
        self._capacity = capacity
        self._high = int(capacity * self._high_fraction)
        self._low = int(capacity * self._low_fraction)
        CACHE_CAPACITY.set(capacity)

    def entries_in_view(self) -> int:
        return len(self._view)

    # --- entries -----------------------------------------------------------------

    def peek(self, bucket: str, key: str) -> Entry | None:
        """The entry if it is in the in-memory view (no I/O)."""
        return self._view.get((bucket, key))

    async def lookup(self, bucket: str, key: str) -> Entry | None:
        entry = self._view.get((bucket, key))
        if entry is not None:
            self._view.move_to_end((bucket, key))
            return entry
        row = await self._in_index_thread(self.index.get, bucket, key)
        if row is None or row.id in self._evicting:
            return None  # (an entry being evicted is not brought back to life)
        entry = self._view.get((bucket, key))  # another request may have loaded it
        if entry is None:
            entry = self._entry_from_row(row)
            self._remember(entry)
        return entry

    async def create(self, bucket: str, key: str, meta: ObjectMeta) -> Entry:
        """A new entry for an object version, replacing any entry of the key (not one
        of a write-back object not yet upstream: a fill that raced with its write must
        not replace it; CacheWriteError)."""
        if (bucket, key) in self.keep_keys:
            raise CacheWriteError("a newer write of the object is not upstream yet")
        old = self._view.get((bucket, key))
        if old is not None:
            await self.drop(old)
        now = time.time()
        directory = files.choose_dir(bucket, key, len(self._dirs))
        fault = self.faults.get(directory)
        if fault is not None:
            raise CacheWriteError(fault.message)
        rule = self._rule(bucket, key)
        if rule is not None and rule.quota is not None and (
            meta.size > rule.quota or not await self._room_in_rule(rule, meta.size)
        ):
            raise CacheWriteError(f"cache rule {rule.name}: its quota is full of pinned data")
        queue = MAIN if self._policy == "s3fifo" and self._ghost.take(bucket, key) else SMALL
        name = files.file_name(bucket, key, meta.etag, secrets.token_hex(8))
        row = EntryRow(
            id=0,
            bucket=bucket,
            key=key,
            etag=meta.etag,
            size=meta.size,
            last_modified=meta.last_modified,
            headers=meta.headers,
            dir=directory,
            file=name,
            block_size=self.block_size,
            present_bytes=0,
            validated_at=now,
            accessed_at=now,
            blocks={},
        )
        entry_id = await self._index_write(self.index.insert, row, queue)
        self.entries += 1
        entry = self._entry_from_row(row, entry_id=entry_id)
        entry.fresh = True  # the read that creates it is not a read again (S3-FIFO)
        try:
            entry.fd, entry.stamp = await _run(files.recreate_sparse, entry.path, meta.size)
        except OSError as exc:
            self._write_failed(directory, exc)
            await self.drop(entry)
            raise CacheWriteError(f"cannot create cache file: {exc}") from exc
        self._remember(entry)
        return entry

    def new_file(self, bucket: str, key: str) -> tuple[int, str, Path]:
        """Where a new entry's file goes (dir number, name, path): a spooled upload is
        written there before its entry exists (``adopt``). Raises CacheWriteError if
        that dir takes no writes now."""
        directory = files.choose_dir(bucket, key, len(self._dirs))
        fault = self.faults.get(directory)
        if fault is not None:
            raise CacheWriteError(fault.message)
        name = files.file_name(bucket, key, "", secrets.token_hex(8))
        self.spooling.add(name)  # until ``adopt`` or ``release_file``
        return directory, name, files.file_path(self._dirs[directory], name)

    def file_at(self, place: tuple[int, str]) -> Path:
        """The path of the file at ``place`` (cache dir number, name)."""
        return files.file_path(self._dirs[place[0]], place[1])

    def expire_validated_before(self, when: float) -> None:
        """Entries the upstream confirmed before ``when`` are stale from now on, whatever
        their TTL (``cluster.Ownership.gained_at``): those in memory at once, the
        index's in the index thread before any later load. Called again with the same
        time, it does nothing."""
        if when <= self._expired_before:
            return
        self._expired_before = when
        for entry in self._view.values():
            if entry.validated_at < when:
                entry.validated_at = 0.0
        done = asyncio.get_running_loop().run_in_executor(
            self._index_thread, self.index.expire_validated_before, when
        )
        done.add_done_callback(_log_failure)

    def release_file(self, name: str) -> None:
        """A file from ``new_file`` that will not be adopted (removed by its writer)."""
        self.spooling.discard(name)

    async def adopt(
        self,
        bucket: str,
        key: str,
        meta: ObjectMeta,
        place: tuple[int, str],
        blocks: dict[int, int],
        upload_headers: tuple[tuple[str, str], ...] | None = None,
        parts: tuple[tuple[int, str], ...] | None = None,
        completed_upload: str | None = None,
    ) -> tuple[Entry, int | None]:
        """Make a complete file already written (and, for write-back, fsync'd) at
        ``place`` (from ``new_file``) the entry of bucket/key, replacing any entry of the
        key: data first, then its rows. With ``upload_headers`` it is a write-back
        object: its journal row is committed with the entry, the entry is kept from
        eviction and never revalidated until it is upstream (``uploaded``);
        ``completed_upload``: the saved multipart upload it completes (its rows go in the
        same commit). Returns the entry and the journal seq."""
        old = await self.lookup(bucket, key)
        if old is not None:
            await self.drop(old)
        now = time.time()
        row = EntryRow(
            id=0,
            bucket=bucket,
            key=key,
            etag=meta.etag,
            size=meta.size,
            last_modified=meta.last_modified,
            headers=meta.headers,
            dir=place[0],
            file=place[1],
            block_size=self.block_size,
            present_bytes=meta.size,
            validated_at=now if upload_headers is None else math.inf,
            accessed_at=now,
            blocks=blocks,
        )
        try:
            entry_id, seq = await self._index_write(
                self.index.insert_whole, row, upload_headers, parts, completed_upload
            )
        finally:
            self.spooling.discard(place[1])  # claimed by its row now, or to be removed
        self.entries += 1
        self._account(bucket, key, meta.size)
        if seq is not None:
            self.keep.add(entry_id)
            self.keep_keys[(bucket, key)] = entry_id
        entry = self._entry_from_row(row, entry_id=entry_id)
        entry.verified.update(blocks)
        self._remember(entry)
        self._evict_needed.set()
        return entry, seq

    async def save_upload(self, upload_id: str, bucket: str, key: str, state: str) -> None:
        """A write-back multipart upload, durable before its UploadId is answered."""
        await self._index_write(self.index.save_upload, upload_id, bucket, key, state)

    async def save_part(
        self,
        upload_id: str,
        number: int,
        state: str,
        upload_state: str,
        shared: tuple[int, str] | None,
    ) -> bool:
        """An upload's part, durable before it is answered (its bytes fsync'd first);
        False if the upload is gone."""
        saved: bool = await self._index_write(
            self.index.save_part, upload_id, number, state, upload_state, shared
        )
        return saved

    async def forget_upload(self, upload_id: str) -> None:
        await self._index_write(self.index.delete_upload, upload_id)

    async def uploaded(self, seq: int, entry_id: int, meta: ObjectMeta | None) -> None:
        """A write-back object is upstream (``meta``: as the upstream describes it now;
        None: it does not match what was promised, drop the entry)."""
        now = time.time()
        values = None if meta is None else (meta.etag, meta.last_modified, meta.headers)
        current = await self._in_index_thread(self.index.uploaded, seq, entry_id, values, now)
        self._unkeep(entry_id)
        entry = next((e for e in self._view.values() if e.id == entry_id), None)
        if entry is None or not current:
            return
        if meta is None:
            await self.drop(entry)
            return
        entry.meta = meta
        entry.validated_at = now

    def _unkeep(self, entry_id: int) -> None:
        self.keep.discard(entry_id)
        for where, kept in list(self.keep_keys.items()):
            if kept == entry_id:
                del self.keep_keys[where]

    async def drop(self, entry: Entry) -> None:
        """Forget an entry: rows first, then the file."""
        if entry.dropped:
            return
        entry.dropped = True
        if entry.id in self.keep:
            self._unkeep(entry.id)  # its journal row goes with it (superseded, or lost)
        self._gone(entry.id)
        unread = sum(entry.block_length(block) for block in entry.prefetched)
        if unread:
            PREFETCH_WASTED_BYTES.inc(unread)
            entry.prefetched.clear()
        if self._view.get((entry.bucket, entry.key)) is entry:
            del self._view[(entry.bucket, entry.key)]
        self._accessed.pop(entry.id, None)
        self._account(entry.bucket, entry.key, -sum(map(entry.block_length, entry.blocks)))
        self.entries -= 1
        try:
            await self._in_index_thread(self.index.delete, [entry.id])
        except sqlite3.Error as exc:
            # The row stays, so the file stays too (a row must never claim a file
            # that is gone); ``s3cache verify`` or a later drop removes both.
            self._index_failed(exc)
            log.error("cannot delete the index row of s3://%s/%s: %s", entry.bucket, entry.key, exc)
            return
        if entry.pins == 0:
            _close_fd(entry)
        await _run(files.remove_any, entry.path)

    async def invalidate(self, bucket: str, key: str) -> None:
        entry = await self.lookup(bucket, key)
        if entry is not None:
            await self.drop(entry)

    def _gone(self, entry_id: int) -> None:
        for listener in self.on_gone:
            listener(entry_id)

    def _entry_from_row(self, row: EntryRow, *, entry_id: int | None = None) -> Entry:
        meta = ObjectMeta(
            etag=row.etag, size=row.size, last_modified=row.last_modified, headers=row.headers
        )
        return Entry(
            id=row.id if entry_id is None else entry_id,
            bucket=row.bucket,
            key=row.key,
            meta=meta,
            dir=row.dir,
            path=files.file_path(self._dirs[row.dir], row.file),
            block_size=row.block_size,
            blocks=dict(row.blocks),
            validated_at=row.validated_at,
            accessed_at=row.accessed_at,
        )

    def _remember(self, entry: Entry) -> None:
        self._view[(entry.bucket, entry.key)] = entry
        while len(self._view) > self._view_size:
            _, oldest = self._view.popitem(last=False)
            if oldest.pins:
                self._view[(oldest.bucket, oldest.key)] = oldest  # in use: keep it
                break
            _close_fd(oldest)

    # --- use of an entry ---------------------------------------------------------

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry.dropped:
            _close_fd(entry)

    def touch(self, entry: Entry) -> None:
        entry.accessed_at = time.time()
        self._accessed[entry.id] = entry.accessed_at
        if entry.fresh:
            entry.fresh = False
        else:
            self._hits[entry.id] = self._hits.get(entry.id, 0) + 1

    async def mark_validated(self, entry: Entry) -> None:
        entry.validated_at = time.time()
        await self._in_index_thread(self.index.set_validated, entry.id, entry.validated_at)

    async def fd(self, entry: Entry) -> int:
        """The entry's open file (opened once, whatever the number of callers)."""
        if entry.fd is not None:
            return entry.fd
        joined = self._opening.joined(entry.id)
        if joined is None:
            with self._opening.lead(entry.id, None) as publish:
                opened = await self._open_file(entry)
                publish(opened)
            return opened
        fd = await joined
        if fd is None or entry.fd is None:
            raise CacheWriteError(f"cannot open cache file {entry.path}")
        return fd

    async def _open_file(self, entry: Entry) -> int:
        try:
            fd, entry.stamp = await _run(files.open_stamped, entry.path)
            entry.fd = fd
            return fd
        except OSError as exc:
            if entry.dropped:
                raise CacheWriteError(f"cannot open cache file: {exc}") from exc
            if entry.blocks:
                # Deleted, or replaced by something that is not our file, while s3cache
                # was stopped (or before it first opened it): its blocks are lost.
                log.error(
                    "s3://%s/%s: cache file unusable (%s): its blocks are dropped and will "
                    "be fetched again",
                    entry.bucket,
                    entry.key,
                    exc,
                )
                await self._clear_blocks(entry)
            # (Without blocks: a crash between the row's commit and the file's creation
            # left a row without a file.) A new, empty file.
        try:
            fd, entry.stamp = await _run(files.recreate_sparse, entry.path, entry.size)
        except OSError as exc:
            self._write_failed(entry.dir, exc)
            raise CacheWriteError(f"cannot create cache file: {exc}") from exc
        entry.fd = fd
        return fd

    async def _clear_blocks(self, entry: Entry) -> None:
        """Forget every block of an entry whose file is lost."""
        self._gone(entry.id)
        entry.blocks.clear()
        entry.verified.clear()
        cleared = await self._in_index_thread(self.index.clear_blocks, entry.id)
        if not entry.dropped:
            self._account(entry.bucket, entry.key, -cleared)

    def suspect(self, entry: Entry) -> None:
        """The entry's file did not read as expected (it ended early): hash every block
        again before it is served."""
        entry.verified.clear()

    # --- filling -----------------------------------------------------------------

    def reserve(self, nbytes: int, directory: int | None = None) -> bool:
        """Claim room for a block about to be fetched (into cache dir ``directory``);
        False if the cache is full of pinned data and cannot take it, or that dir is
        degraded (the block would only fail to be written: serve it uncached)."""
        if directory in self.faults:
            return False
        if self.used + self.reserved + nbytes > self._capacity:
            self._evict_needed.set()
            return False
        self.reserved += nbytes
        if self.used + self.reserved > self._high:
            self._evict_needed.set()
        return True

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes

    async def write(self, entry: Entry, offset: int, data: bytes) -> None:
        try:
            stamp = await _run(files.write_at, await self.fd(entry), offset, data)
        except OSError as exc:
            self._write_failed(entry.dir, exc)
            raise CacheWriteError(f"cannot write cache file: {exc}") from exc
        # Writes of parallel fetches may come back out of order: keep the latest.
        if entry.stamp is None or stamp.ctime_ns >= entry.stamp.ctime_ns:
            entry.stamp = stamp
        fault = self.faults.get(entry.dir)
        if fault is not None and fault.reason is DegradedReason.IO_ERROR:
            del self.faults[entry.dir]  # it takes writes again (space: see _check_disks)
            self._publish_faults()

    def _write_failed(self, directory: int, exc: OSError) -> None:
        CACHE_WRITE_ERRORS.inc()
        if exc.errno == errno.EFBIG:
            return  # this object is too large for the filesystem; the dir is fine
        self._fault(directory, exc)

    def _fault(self, directory: int, exc: OSError) -> None:
        where = f"cache dir {self._dirs[directory]}"
        name = errno.errorcode.get(exc.errno or 0, "?")
        if exc.errno in _NO_SPACE:
            fault = DirFault(DegradedReason.NO_SPACE, f"{where}: no space left ({name})")
        else:
            message = f"{where}: I/O error ({name}: {exc.strerror})"
            fault = DirFault(DegradedReason.IO_ERROR, message)
        if self.faults.get(directory) != fault:
            log.warning("%s: fills stop there, reads go on uncached", fault.message)
        self.faults[directory] = fault
        self._publish_faults()

    def _index_failed(self, exc: sqlite3.Error) -> None:
        """The index (on the first cache dir) refused a write: that dir is degraded."""
        full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
        self._fault(0, OSError(errno.ENOSPC if full else errno.EIO, str(exc)))

    async def _index_write(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await self._in_index_thread(function, *args)
        except sqlite3.Error as exc:
            CACHE_WRITE_ERRORS.inc()
            self._index_failed(exc)
            raise CacheWriteError(f"index write failed: {exc}") from exc

    def _publish_faults(self) -> None:
        CACHE_DEGRADED.set(float(bool(self.faults)))
        for reason in DegradedReason:
            count = sum(1 for fault in self.faults.values() if fault.reason is reason)
            labelled(CACHE_DEGRADED_DIRS, reason.value).set(count)

    async def check(self) -> dict[str, str]:
        """Problems that make the cache unfit to serve, by check name (empty: ready)."""
        problems: dict[str, str] = {}
        try:
            await self._in_index_thread(self.index.entry_count)
        except Exception as exc:
            problems["index"] = f"index not usable: {exc}"
        for number, directory in enumerate(self._dirs):
            if number not in self.faults:
                try:
                    await _run(files.probe_writable, directory)
                except OSError as exc:
                    self._fault(number, exc)
            fault = self.faults.get(number)
            if fault is not None:
                problems[f"cache_dir_{number}"] = fault.message
        return problems

    async def _check_disks(self) -> None:
        """Cap the capacity at what the filesystems can hold; mark dirs with less than a
        block free as out of space, and clear the marks of dirs that take writes again."""
        spaces = [await _run(files.disk_space, directory) for directory in self._dirs]
        free_by_device = {space.device: space for space in spaces}
        room = sum(space.free - self._reserve(space) for space in free_by_device.values())
        capacity = max(0, min(self._configured, self.used + room))
        if capacity != self._capacity:
            if capacity < self._configured and abs(capacity - self._capacity) > capacity // 10:
                log.warning(
                    "cache_size is %d bytes but the cache dirs can hold only %d more than "
                    "the cache holds now: capacity capped at %d bytes",
                    self._configured,
                    max(room, 0),
                    capacity,
                )
            self._set_capacity(capacity)
            if self.used + self.reserved > self._high:
                self._evict_needed.set()
        for number, space in enumerate(spaces):
            fault = self.faults.get(number)
            if fault is None and space.free < self.block_size:
                self._fault(number, OSError(errno.ENOSPC, "less than a block free"))
            elif fault is not None and await self._recovered(number, fault, space):
                del self.faults[number]
                self._publish_faults()
                log.warning("cache dir %s takes writes again", self._dirs[number])

    def _reserve(self, space: files.DiskSpace) -> int:
        """Room left free on a filesystem for the index and its journal."""
        return max(self.block_size, space.total // 100)

    async def _recovered(self, number: int, fault: DirFault, space: files.DiskSpace) -> bool:
        if fault.reason is DegradedReason.NO_SPACE and space.free < self._reserve(space) + (
            self.block_size
        ):
            return False
        try:
            await _run(files.probe_writable, self._dirs[number])
        except OSError:
            return False
        return True

    async def _check_disks_forever(self) -> None:
        while True:
            await asyncio.sleep(DISK_CHECK_SECONDS)
            try:
                await self._check_disks()
            except OSError as exc:
                log.warning("cannot check the cache dirs' free space: %s", exc)

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        return await _run(files.read_at, await self.fd(entry), offset, length)

    async def add_block(self, entry: Entry, block: int, xxh3: int) -> None:
        """Record a block whose bytes are written. Its reservation becomes usage.

        A dropped entry's file is already unlinked: readers that still hold it may
        read the block, but the index and the usage no longer count it."""
        nbytes = entry.block_length(block)
        if not entry.dropped:
            rule = self._rule(entry.bucket, entry.key)
            if (
                rule is not None
                and rule.quota is not None
                and not await self._room_in_rule(rule, nbytes)
            ):
                return  # served, not kept: the rule's quota is full of pinned data
            # Counted before the index hop: a parallel fill of the rule sees it.
            self._account(entry.bucket, entry.key, nbytes)
            recorded = await self._in_index_thread(
                self.index.add_block, entry.id, block, nbytes, xxh3
            )
            if not recorded or entry.dropped:
                self._account(entry.bucket, entry.key, -nbytes)
                if not entry.dropped:
                    return
        entry.blocks[block] = xxh3
        entry.verified.add(block)

    async def verified_until(
        self, entry: Entry, start: int, end: int, verified: bool = False
    ) -> int:
        """End (exclusive) of the run of present blocks from ``start``, at most ``end``,
        over blocks whose hash this process has checked (or which it wrote): the first
        present block not yet checked is checked now — once, whatever the number of
        readers waiting for it — and a damaged block is dropped (and fetched again),
        never served. Verification thus advances block by block with the readers instead
        of holding them until a whole range is done. ``verified``: the caller found all
        of [start, end) present and checked (``Entry.survey``), which holds unless the
        file changed since."""
        stamp = entry.stamp
        if entry.fd is not None and entry.verified and not entry.fetches:
            await self._check_stamp(entry, entry.fd)
        if verified and entry.stamp is stamp:
            return end
        position = start
        while position < end:
            block = entry.block_of(position)
            if block not in entry.blocks:
                break
            if block not in entry.verified:
                if position > start:
                    break  # send what is verified first
                await self._verify_block(entry, block)
                if block not in entry.verified:
                    break  # it was damaged: dropped
            position = min(entry.block_range(block)[1], end)
        return position

    async def _check_stamp(self, entry: Entry, fd: int) -> None:
        """Before verified blocks are served again: has anyone but s3cache changed the
        open file? One fstat on the loop (an open file's inode is in memory; no disk
        I/O). Skipped while fetches write to the entry, whose own writes move the
        stamp: the file is looked at again once they are done."""
        now = files.stamp(fd)
        if now == entry.stamp:
            return
        if now.links == 0 and not entry.dropped:
            # Deleted: this process still reads the right bytes through its fd, but the
            # index must not claim the file any longer.
            log.error(
                "s3://%s/%s: cache file deleted behind s3cache's back: entry dropped",
                entry.bucket,
                entry.key,
            )
            await self.drop(entry)
            return
        log.warning(
            "s3://%s/%s: cache file changed behind s3cache's back: its blocks are checked "
            "again",
            entry.bucket,
            entry.key,
        )
        entry.stamp = now
        entry.verified.clear()

    async def _verify_block(self, entry: Entry, block: int) -> None:
        """Check one block (once, whatever the number of readers asking)."""
        await self._verifying.run((entry.id, block), lambda: self._check_block(entry, block), None)

    async def _check_block(self, entry: Entry, block: int) -> None:
        check = (
            block,
            entry.block_range(block)[0],
            entry.block_length(block),
            entry.blocks[block],
        )
        try:
            fd = await self.fd(entry)
        except CacheWriteError:
            # A dropped entry whose file is gone: nothing of it can be served.
            entry.blocks.clear()
            entry.verified.clear()
            return
        if block not in entry.blocks:
            return  # the file was lost and its blocks cleared while opening it
        bad = await _run(files.corrupt_blocks, fd, [check])
        if bad:
            await self.drop_block(entry, block)
        elif block in entry.blocks:
            entry.verified.add(block)

    async def drop_block(self, entry: Entry, block: int) -> None:
        """Forget one block whose bytes are damaged."""
        if entry.blocks.pop(block, None) is None:
            return
        self._gone(entry.id)
        entry.verified.discard(block)
        CORRUPT_BLOCKS.inc()
        log.error(
            "s3://%s/%s block %d does not match its hash: dropped, will be refetched",
            entry.bucket,
            entry.key,
            block,
        )
        if not entry.dropped:
            self._account(entry.bucket, entry.key, -entry.block_length(block))
            await self._in_index_thread(
                self.index.remove_block, entry.id, block, entry.block_length(block)
            )

    # --- background work ---------------------------------------------------------

    async def _flush_access_times(self) -> None:
        if self._accessed and self._index is not None:
            hits = self._hits
            batch = [(at, hits.get(number, 0), number) for number, at in self._accessed.items()]
            self._accessed, self._hits = {}, {}
            await self._in_index_thread(self.index.touch, batch)

    async def _flush_access_times_forever(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_SECONDS)
            try:
                if self._now().cache_rules != self._rules_counted:
                    await self._count_rules()  # SIGHUP changed them
                await self._flush_access_times()
            except sqlite3.Error as exc:  # a full disk: this batch of times is lost (LRU hints)
                self._index_failed(exc)

    async def _evict_forever(self) -> None:
        while True:
            await self._evict_needed.wait()
            self._evict_needed.clear()
            try:
                await self.evict_to(self._low, only_above=self._high)
            except Exception:
                log.exception("eviction failed")

    async def evict_to(self, target: int, *, only_above: int = 0) -> None:
        """Evict least recently used, unpinned entries until usage is at most
        ``target`` (if it is above ``only_above`` to begin with)."""
        if self.used + self.reserved <= only_above:
            return
        await self._flush_access_times()
        if self._policy == "s3fifo":
            await self._evict_s3fifo(target)
            return
        skipped: set[int] = set()
        while self.used + self.reserved > target:
            coldest = await self._in_index_thread(
                self.index.least_recently_used, EVICTION_BATCH + len(skipped)
            )
            victims = [row for row in coldest if row[0] not in skipped]
            if not victims:
                return
            # A stable sort keeps LRU order among equals.
            victims.sort(key=lambda row: self.eviction_rank(row[1], row[2]) or 0.0)
            for entry_id, bucket, key, _dir, _file, present in victims:
                if self.used + self.reserved <= target:
                    return
                entry = self._view.get((bucket, key))
                if entry_id in self.keep or (
                    entry is not None and (entry.pins or entry.id != entry_id)
                ):
                    skipped.add(entry_id)
                    continue
                await self._evict_row(entry, entry_id, bucket, key, _dir, _file, present)

    async def _evict_row(
        self,
        entry: Entry | None,
        entry_id: int,
        bucket: str,
        key: str,
        directory: int,
        name: str,
        present: int,
    ) -> None:
        if entry is not None:
            await self.drop(entry)
        else:
            # A lookup of the row may be in flight: it must not load the entry whose
            # rows and file are going away.
            self._evicting.add(entry_id)
            self._gone(entry_id)
            try:
                if not await self._in_index_thread(self.index.delete_entry, entry_id):
                    return  # evicted meanwhile (a quota and the watermark at once)
                self._account(bucket, key, -present)
                self.entries -= 1
                await _run(files.remove_any, files.file_path(self._dirs[directory], name))
            finally:
                self._evicting.discard(entry_id)
        CACHE_EVICTIONS.inc()
        CACHE_EVICTED_BYTES.inc(present)
        rule = self._rule_name(bucket, key)
        labelled(RULE_EVICTIONS, rule).inc()
        labelled(RULE_EVICTED_BYTES, rule).inc(present)

    async def _evict_s3fifo(self, target: int) -> None:
        """S3-FIFO (``store.policy``) until usage is at most ``target``: the heads of the
        queues, a batch at a time, are promoted, reinserted or evicted; while epoch
        manifests are read, the heads of both, what nobody needs first (see
        ``policy.sort_with_manifests``). Pinned and kept (write-back) entries are never
        evicted: they go to the tail of the main FIFO."""
        share = int(self._capacity * policy.SMALL_SHARE)
        small = await self._in_index_thread(self.index.queue_bytes, SMALL)
        look_all = False  # S3-FIFO decides for as many heads as the bytes to free need
        while self.used + self.reserved > target:
            if self.manifests_active():
                sorting, full = await self._manifest_sort()
            else:
                need = math.inf if look_all else self.used + self.reserved - target
                sorting, full = await self._s3fifo_sort(small > share, need), False
            small -= sorting.promoted
            now = time.time()
            moves, evicted = list(sorting.moves), 0
            first_needed = len(sorting.victims) - sorting.needed
            for number, c in enumerate(sorting.victims):
                if self.used + self.reserved <= target:
                    if full and number > first_needed:
                        # Needed heads were evicted: those left go to the tail, so that
                        # the next round chooses among the entries behind them.
                        moves.extend((MAIN, h.freq, now, h.id) for h in sorting.victims[number:])
                    break  # the rest stay where they are
                entry = self._view.get((c.bucket, c.key))
                if c.id in self.keep or (entry is not None and (entry.pins or entry.id != c.id)):
                    moves.append((MAIN, c.freq, now, c.id))  # in use: kept
                    continue
                if c.queue == SMALL:
                    self._ghost.add(c.bucket, c.key, self.entries)
                    small -= c.present
                await self._evict_row(entry, c.id, c.bucket, c.key, c.dir, c.file, c.present)
                evicted += 1
            if moves:
                await self._in_index_thread(self.index.requeue, moves)
            if not evicted and not sorting.moves:
                if not look_all:
                    look_all = True  # those heads were in use: decide for all of them
                    continue
                return  # nothing at the heads can go now (pinned, kept, or none)

    async def _s3fifo_sort(self, from_small: bool, need: float) -> policy.Sorting:
        queue, rows = await self._in_index_thread(self._s3fifo_heads, from_small)
        heads = [policy.Candidate(*row, queue) for row in rows]
        return policy.sort_heads(heads, time.time(), need)

    async def _manifest_sort(self) -> tuple[policy.Sorting, bool]:
        """Both queues' heads sorted with the manifests' ranks; and whether the main
        FIFO has more entries than its heads."""

        def heads() -> tuple[list[policy.Candidate], bool]:
            small = self.index.oldest_in_queue(SMALL, S3FIFO_HEADS)
            main = self.index.oldest_in_queue(MAIN, S3FIFO_HEADS)
            return [policy.Candidate(*row, SMALL) for row in small] + [
                policy.Candidate(*row, MAIN) for row in main
            ], len(main) == S3FIFO_HEADS

        candidates, full = await self._in_index_thread(heads)
        ranks = [self.eviction_rank(head.bucket, head.key) for head in candidates]
        return policy.sort_with_manifests(candidates, ranks, time.time()), full

    def _s3fifo_heads(
        self, from_small: bool
    ) -> tuple[int, list[tuple[int, str, str, int, str, int, int]]]:
        """(Index thread.) The heads of the small FIFO if it holds more than its share
        (or the main one is empty), else of the main one (or the small one if empty)."""
        first, second = (SMALL, MAIN) if from_small else (MAIN, SMALL)
        rows = self.index.oldest_in_queue(first, S3FIFO_HEADS)
        if rows:
            return first, rows
        return second, self.index.oldest_in_queue(second, S3FIFO_HEADS)

    # --- cache rules -------------------------------------------------------------

    def _rule(self, bucket: str, key: str) -> CacheRule | None:
        return self._now().rule_for(bucket, key)

    def _rule_name(self, bucket: str, key: str) -> str:
        rule = self._rule(bucket, key)
        return DEFAULT_RULE if rule is None else rule.name

    def _account(self, bucket: str, key: str, delta: int) -> None:
        """Usage of the cache, and of the rule of bucket/key, changes by ``delta``."""
        self.used += delta
        name = self._rule_name(bucket, key)
        used = self.rule_used[name] = self.rule_used.get(name, 0) + delta
        labelled(RULE_USED, name).set(used)

    async def _count_rules(self) -> None:
        """Bytes held by each cache rule, from the index: at start-up, and when SIGHUP
        changed the rules (one range sum of the (bucket, key) index per rule)."""
        rules = self._rules_counted = self._now().cache_rules

        def count() -> dict[str, int]:
            sums = {}
            for rule in rules:
                bucket, _, prefix = rule.prefix.partition("/")
                sums[rule.prefix] = self.index.prefix_bytes(bucket, prefix)
            return sums

        sums = await self._in_index_thread(count)
        for name in self.rule_used:
            labelled(RULE_USED, name).set(0)
        self.rule_used = policy.rule_usage(rules, self.used, sums)
        for name, used in self.rule_used.items():
            labelled(RULE_USED, name).set(used)

    async def _room_in_rule(self, rule: CacheRule, nbytes: int) -> bool:
        """Evict entries of ``rule`` (its own first, in the policy's order; never pinned
        or kept ones) until ``nbytes`` more fit in its quota. False if they cannot."""
        assert rule.quota is not None
        target = rule.quota - nbytes
        if self.rule_used.get(rule.name, 0) <= target:
            return True
        bucket, _, prefix = rule.prefix.partition("/")
        order = policy.QUOTA_ORDER[self._policy]
        skipped: set[int] = set()
        while self.rule_used.get(rule.name, 0) > target:
            rows = await self._in_index_thread(
                self.index.in_prefix, bucket, prefix, order, EVICTION_BATCH + len(skipped)
            )
            victims = [row for row in rows if row[0] not in skipped]
            if not victims:
                return False
            for entry_id, row_bucket, key, directory, name, present in victims:
                if self.rule_used.get(rule.name, 0) <= target:
                    return True
                entry = self._view.get((row_bucket, key))
                if (
                    entry_id in self.keep
                    or self._rule_name(row_bucket, key) != rule.name
                    or (entry is not None and (entry.pins or entry.id != entry_id))
                ):
                    skipped.add(entry_id)
                    continue
                await self._evict_row(entry, entry_id, row_bucket, key, directory, name, present)
        return True

    async def _scrub_forever(self) -> None:
        """Re-check every block's hash in the background, at most ``scrub_rate`` bytes
        a second, so that bit rot is found before a reader meets it."""
        cursor = 0
        while True:
            rows = await self._in_index_thread(self.index.entries_after, cursor, 32)
            if not rows:
                cursor = 0
                await asyncio.sleep(self._scrub_pause)
                continue
            for row in rows:
                cursor = row.id
                try:
                    checked = await self.scrub(row)
                except (OSError, sqlite3.Error, CacheWriteError) as exc:
                    log.warning("scrub: cannot check s3://%s/%s: %s", row.bucket, row.key, exc)
                    continue
                SCRUBBED_BYTES.inc(checked)
                await asyncio.sleep(checked / self._scrub_rate)

    async def verify_all(self) -> dict[str, object]:
        """Check every entry's file and blocks now, repair the index, remove orphan
        files (``s3cache verify``): diskcache's ``check(fix=True)``. Never raises for
        damage; an entry that cannot be checked is counted in ``errors``."""
        report = VerifyReport()
        cursor = 0
        while rows := await self._verify_batch(cursor, report):
            for row in rows:
                cursor = row.id
                report.entries += 1
                try:
                    checked, found = await self._check_entry(row)
                except (OSError, sqlite3.Error, CacheWriteError) as exc:
                    log.warning("verify: cannot check s3://%s/%s: %s", row.bucket, row.key, exc)
                    report.errors += 1
                    continue
                report.bytes_checked += checked
                report.add(row, found)
        report.orphan_files = await self._remove_orphans(before=None)
        return report.as_dict()

    async def _verify_batch(self, cursor: int, report: VerifyReport) -> list[EntryRow]:
        """The next entries to verify; none (the pass ends) if the index cannot say."""
        try:
            return await self._in_index_thread(self.index.entries_after, cursor, 64)
        except sqlite3.Error as exc:
            log.error("verify: cannot read the index: %s", exc)
            report.errors += 1
            return []

    async def scrub(self, row: EntryRow) -> int:
        """Check an entry's file and every present block; repair what is damaged.
        Returns the bytes read."""
        checked, _ = await self._check_entry(row)
        return checked

    async def _check_entry(self, row: EntryRow) -> tuple[int, files.Inspection]:
        """Check an entry (through its open file if it is in the view, else through its
        row): a missing file drops the entry; damaged or truncated blocks are dropped."""
        entry = self._view.get((row.bucket, row.key))
        if entry is not None and entry.id == row.id and not entry.dropped:
            checks = [
                (b, entry.block_range(b)[0], entry.block_length(b), h)
                for b, h in list(entry.blocks.items())
            ]
            self.pin(entry)  # eviction must not close the fd while it is read
            try:
                if entry.fd is not None:
                    found = await _run(files.inspect, entry.fd, entry.size, checks)
                else:
                    found = await _run(files.inspect_path, entry.path, entry.size, checks)
                if found.problem == "missing":
                    log.error("s3://%s/%s: cache file missing: entry dropped", row.bucket, row.key)
                    await self.drop(entry)
                else:
                    for block in found.bad:
                        await self.drop_block(entry, block)
                    if found.problem == "truncated":
                        await _run(files.restore_size, entry.path, entry.size)
            finally:
                self.unpin(entry)
            return sum(length for _, _, length, _ in checks), found
        path = files.file_path(self._dirs[row.dir], row.file)
        checks = []
        for block, xxh3 in row.blocks.items():
            start = block * row.block_size
            checks.append((block, start, min(row.block_size, row.size - start), xxh3))
        found = await _run(files.inspect_path, path, row.size, checks)
        if found.problem == "missing":
            if not await self._drop_lost_row(row):
                found = files.Inspection(None, [])  # evicted or replaced meanwhile
        else:
            if found.bad:
                await self._drop_scrubbed(row, found.bad)
            if found.problem == "truncated":
                await _run(files.restore_size, path, row.size)
        return sum(length for _, _, length, _ in checks), found

    async def _drop_lost_row(self, row: EntryRow) -> bool:
        """Drop an entry whose file is missing, checked through its row; False if the
        row is no longer current (then its file is gone for that reason)."""
        current = await self._in_index_thread(self.index.get, row.bucket, row.key)
        if current is None or current.id != row.id:
            return False
        entry = self._view.get((row.bucket, row.key))
        if entry is not None and entry.id == row.id:
            if not entry.dropped:
                await self.drop(entry)  # loaded meanwhile
            return True
        log.error("s3://%s/%s: cache file missing: entry dropped", row.bucket, row.key)
        self._evicting.add(row.id)  # a lookup in flight must not load it
        self._gone(row.id)
        try:
            await self._in_index_thread(self.index.delete, [row.id])
            self._account(row.bucket, row.key, -current.present_bytes)
            self.entries -= 1
            await _run(files.remove_any, files.file_path(self._dirs[row.dir], row.file))
        finally:
            self._evicting.discard(row.id)
        return True

    async def _drop_scrubbed(self, row: EntryRow, bad: list[int]) -> None:
        """Drop the damaged blocks of an entry checked through its row. The row was read
        before the file: if the entry was evicted or replaced meanwhile (its rows are
        deleted before its file is unlinked), the file is gone or is another entry's,
        and nothing is damaged."""
        current = await self._in_index_thread(self.index.get, row.bucket, row.key)
        if current is None or current.id != row.id:
            return
        entry = self._view.get((row.bucket, row.key))
        for block in bad:
            if current.blocks.get(block) != row.blocks[block]:
                continue
            if entry is not None and entry.id == row.id and not entry.dropped:
                await self.drop_block(entry, block)  # loaded meanwhile: drop it there too
                continue
            length = min(row.block_size, row.size - block * row.block_size)
            if await self._in_index_thread(self.index.remove_block, row.id, block, length):
                CORRUPT_BLOCKS.inc()
                log.error("s3://%s/%s block %d is damaged: dropped", row.bucket, row.key, block)
                self._account(row.bucket, row.key, -length)

    async def _sweep_orphans(self) -> None:
        """Remove block files that no index row claims (left by a crash), a batch at a
        time, after start-up."""
        await self._remove_orphans(before=time.time())

    async def _remove_orphans(self, *, before: float | None) -> int:
        """Remove the files (or anything else) in the data dirs that no row claims,
        last changed before ``before`` if given; how many. A listed file's row, if it
        has one, was committed before the file was created, so a file without a row
        is never one being created."""
        removed = 0
        for number, directory in enumerate(self._dirs):
            names = await _run(files.list_files, directory)
            for first in range(0, len(names), ORPHAN_BATCH):
                batch = names[first : first + ORPHAN_BATCH]
                unknown = await self._in_index_thread(self.index.unknown_files, number, batch)
                for name in unknown:
                    if name in self.spooling:
                        continue  # an upload is writing it; its row comes after
                    path = files.file_path(directory, name)
                    if before is None or await _run(files.older_than, path, before):
                        await _run(files.remove_any, path)
                        removed += 1
        return removed


def _close_fds(entries: list[Entry]) -> None:
    for entry in entries:
        _close_fd(entry)


def _close_fd(entry: Entry) -> None:
    if entry.fd is not None:
        os.close(entry.fd)
        entry.fd = None


async def _run(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("expiring validated entries in the index failed: %s", done.exception())
