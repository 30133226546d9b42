"""The cache store: the async face of the index and the block files.

Hot path: lookups hit an in-memory view of recently used entries; only a miss in the
view costs one hop to the index thread. All SQLite work runs on one dedicated thread
(the connection is single-threaded); file work runs on the loop's default executor.
Nothing here blocks the event loop.

Crash-safe ordering: an entry's row is committed before its file is created; a block
is recorded only after its bytes are written; rows are deleted (committed) before the
file is unlinked. Files left without a row by a crash are removed by a background
sweep after start-up (start-up itself reads one aggregate, not the data files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from s3cache.config import Settings
from s3cache.metrics import (
    CACHE_CAPACITY,
    CACHE_DEGRADED,
    CACHE_ENTRIES,
    CACHE_EVICTED_BYTES,
    CACHE_EVICTIONS,
    CACHE_USED,
    CACHE_WRITE_ERRORS,
    CORRUPT_BLOCKS,
    PREFETCH_WASTED_BYTES,
    SCRUBBED_BYTES,
    sample,
)
from s3cache.store import files
from s3cache.store.entry import Entry, ObjectMeta
from s3cache.store.index import EntryRow, Index

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEX_FILE = "index.sqlite3"
ACCESS_FLUSH_SECONDS = 2.0
EVICTION_BATCH = 256
ORPHAN_BATCH = 500
SCRUB_PAUSE_SECONDS = 60.0  # after a full pass


class CacheWriteError(Exception):
    """The cache could not store bytes (disk full, I/O error): serve without caching."""


class CacheStore:
    def __init__(self, settings: Settings, *, view_size: int = 4096) -> None:
        self._dirs = settings.cache_dirs
        self._capacity = settings.cache_size
        self._high = int(settings.cache_size * settings.cache_high_watermark)
        self._low = int(settings.cache_size * settings.cache_low_watermark)
        self.block_size = settings.block_size
        self._scrub_rate = settings.scrub_rate
        self._view: OrderedDict[tuple[str, str], Entry] = OrderedDict()
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
        # order): objects an epoch manifest needs soon stay.
        self.eviction_rank: Callable[[str, str], float] = lambda bucket, key: 0.0
        self.degraded = False  # a write to a cache dir failed since the last success
        # Called with an entry's id when it can no longer be served whole: dropped,
        # evicted, or a block found damaged (the worker hub tells the secondaries).
        self.on_gone: list[Callable[[int], None]] = []

    # --- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        def open_index() -> tuple[Index, int, int]:
            for directory in self._dirs:
                (directory / files.DATA_DIR).mkdir(parents=True, exist_ok=True)
            index = Index(self._dirs[0] / INDEX_FILE)
            return index, index.used_bytes(), index.entry_count()

        self._index, self.used, self.entries = await self._in_index_thread(open_index)
        CACHE_CAPACITY.set(self._capacity)
        CACHE_USED.set_function(lambda: self.used)
        CACHE_ENTRIES.set_function(lambda: self.entries)
        CACHE_DEGRADED.set_function(lambda: float(self.degraded))
        self._tasks = [
            asyncio.create_task(self._flush_access_times_forever()),
            asyncio.create_task(self._evict_forever()),
            asyncio.create_task(self._sweep_orphans()),
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
        return self._capacity

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
        """A new entry for an object version, replacing any entry of the key."""
        old = self._view.get((bucket, key))
        if old is not None:
            await self.drop(old)
        now = time.time()
        directory = files.choose_dir(bucket, key, len(self._dirs))
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
        entry_id = await self._in_index_thread(self.index.insert, row)
        self.entries += 1
        entry = self._entry_from_row(row, entry_id=entry_id)
        try:
            entry.fd = await _run(files.create_sparse, entry.path, meta.size)
        except OSError as exc:
            self._write_failed()
            await self.drop(entry)
            raise CacheWriteError(f"cannot create cache file: {exc}") from exc
        self.degraded = False
        self._remember(entry)
        return entry

    async def drop(self, entry: Entry) -> None:
        """Forget an entry: rows first, then the file."""
        if entry.dropped:
            return
        entry.dropped = True
        self._gone(entry.id)
        unread = sum(entry.block_length(block) for block in entry.prefetched)
        if unread:
            PREFETCH_WASTED_BYTES.inc(unread)
            entry.prefetched.clear()
        if self._view.get((entry.bucket, entry.key)) is entry:
            del self._view[(entry.bucket, entry.key)]
        self._accessed.pop(entry.id, None)
        self.used -= sum(entry.block_length(block) for block in entry.blocks)
        self.entries -= 1
        await self._in_index_thread(self.index.delete, [entry.id])
        if entry.pins == 0:
            _close_fd(entry)
        await _run(files.unlink, entry.path)

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

    async def mark_validated(self, entry: Entry) -> None:
        entry.validated_at = time.time()
        await self._in_index_thread(self.index.set_validated, entry.id, entry.validated_at)

    async def fd(self, entry: Entry) -> int:
        if entry.fd is None:
            try:
                entry.fd = await _run(files.open_existing, entry.path)
            except FileNotFoundError as exc:
                if entry.blocks or entry.dropped:
                    raise CacheWriteError(f"cannot open cache file: {exc}") from exc
                # A crash between the row's commit and the file's creation left a row
                # without a file (and without blocks): create the file now.
                try:
                    entry.fd = await _run(files.open_or_create, entry.path, entry.size)
                except OSError as exc:
                    self._write_failed()
                    raise CacheWriteError(f"cannot create cache file: {exc}") from exc
            except OSError as exc:
                raise CacheWriteError(f"cannot open cache file: {exc}") from exc
        return entry.fd

    # --- filling -----------------------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Claim room for a block about to be fetched; False if the cache is full of
        pinned data and cannot take it."""
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
            await _run(files.write_at, await self.fd(entry), offset, data)
        except OSError as exc:
            self._write_failed()
            raise CacheWriteError(f"cannot write cache file: {exc}") from exc
        self.degraded = False

    def _write_failed(self) -> None:
        self.degraded = True
        CACHE_WRITE_ERRORS.inc()

    async def check(self) -> dict[str, str]:
        """Problems that make the cache unfit to serve, by check name (empty: ready)."""
        problems: dict[str, str] = {}
        try:
            await self._in_index_thread(self.index.entry_count)
        except Exception as exc:
            problems["index"] = f"index not usable: {exc}"
        for number, directory in enumerate(self._dirs):
            try:
                await _run(files.probe_writable, directory)
            except OSError as exc:
                problems[f"cache_dir_{number}"] = f"{directory} not writable: {exc.strerror}"
        return problems

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        return await _run(files.read_at, await self.fd(entry), offset, length)

    async def add_block(self, entry: Entry, block: int, xxh3: int) -> None:
        """Record a block whose bytes are written. Its reservation becomes usage.

        A dropped entry's file is already unlinked: readers that still hold it may
        read the block, but the index and the usage no longer count it."""
        nbytes = entry.block_length(block)
        if not entry.dropped:
            recorded = await self._in_index_thread(
                self.index.add_block, entry.id, block, nbytes, xxh3
            )
            if recorded and not entry.dropped:
                self.used += nbytes
            elif not entry.dropped:
                return
        entry.blocks[block] = xxh3
        entry.verified.add(block)

    async def verified_until(self, entry: Entry, start: int, end: int) -> int:
        """Like ``entry.present_until``, but only over blocks whose hash this process has
        checked (or which it wrote): the first present block not yet checked is checked
        now — once, whatever the number of readers waiting for it — and a damaged block
        is dropped (and fetched again), never served. Verification thus advances block
        by block with the readers instead of holding them until a whole range is done."""
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

    async def _verify_block(self, entry: Entry, block: int) -> None:
        pending = entry.verifying.get(block)
        if pending is not None:
            await asyncio.shield(pending)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.verifying[block] = done
        try:
            check = (
                block,
                entry.block_range(block)[0],
                entry.block_length(block),
                entry.blocks[block],
            )
            bad = await _run(files.corrupt_blocks, await self.fd(entry), [check])
            if bad:
                await self.drop_block(entry, block)
            elif block in entry.blocks:
                entry.verified.add(block)
        finally:
            del entry.verifying[block]
            done.set_result(None)

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
            self.used -= entry.block_length(block)
            await self._in_index_thread(
                self.index.remove_block, entry.id, block, entry.block_length(block)
            )

    # --- background work ---------------------------------------------------------

    async def _flush_access_times(self) -> None:
        if self._accessed and self._index is not None:
            batch = [(accessed, entry_id) for entry_id, accessed in self._accessed.items()]
            self._accessed = {}
            await self._in_index_thread(self.index.touch, batch)

    async def _flush_access_times_forever(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_SECONDS)
            await self._flush_access_times()

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
        skipped: set[int] = set()
        while self.used + self.reserved > target:
            coldest = await self._in_index_thread(
                self.index.least_recently_used, EVICTION_BATCH + len(skipped)
            )
            victims = [row for row in coldest if row[0] not in skipped]
            if not victims:
                return
            # A stable sort keeps LRU order among equals.
            victims.sort(key=lambda row: self.eviction_rank(row[1], row[2]))
            for entry_id, bucket, key, _dir, _file, present in victims:
                if self.used + self.reserved <= target:
                    return
                entry = self._view.get((bucket, key))
                if entry is not None and (entry.pins or entry.id != entry_id):
                    skipped.add(entry_id)
                    continue
                await self._evict_row(entry, entry_id, _dir, _file, present)

    async def _evict_row(
        self, entry: Entry | None, entry_id: int, directory: int, name: str, present: int
    ) -> None:
        if entry is not None:
            await self.drop(entry)
        else:
            # A lookup of the row may be in flight: it must not load the entry whose
            # rows and file are going away.
            self._evicting.add(entry_id)
            self._gone(entry_id)
            try:
                await self._in_index_thread(self.index.delete, [entry_id])
                self.used -= present
                self.entries -= 1
                await _run(files.unlink, files.file_path(self._dirs[directory], name))
            finally:
                self._evicting.discard(entry_id)
        CACHE_EVICTIONS.inc()
        CACHE_EVICTED_BYTES.inc(present)

    async def _scrub_forever(self) -> None:
        """Re-check every block's hash in the background, at most ``scrub_rate`` bytes
        a second, so that bit rot is found before a reader meets it."""
        cursor = 0
        while True:
            rows = await self._in_index_thread(self.index.entries_after, cursor, 32)
            if not rows:
                cursor = 0
                await asyncio.sleep(SCRUB_PAUSE_SECONDS)
                continue
            for row in rows:
                cursor = row.id
                checked = await self.scrub(row)
                SCRUBBED_BYTES.inc(checked)
                await asyncio.sleep(checked / self._scrub_rate)

    async def verify_all(self) -> dict[str, int]:
        """Check every block of every entry now (``s3cache verify``)."""
        cursor = entries = checked = 0
        before = sample(CORRUPT_BLOCKS)
        while rows := await self._in_index_thread(self.index.entries_after, cursor, 64):
            for row in rows:
                cursor = row.id
                entries += 1
                checked += await self.scrub(row)
        corrupt = int(sample(CORRUPT_BLOCKS) - before)
        return {"entries": entries, "bytes_checked": checked, "corrupt_blocks": corrupt}

    async def scrub(self, row: EntryRow) -> int:
        """Check every present block of an entry; drop the damaged ones. Returns the
        bytes read."""
        entry = self._view.get((row.bucket, row.key))
        if entry is not None and entry.id == row.id and not entry.dropped:
            checks = [
                (b, entry.block_range(b)[0], entry.block_length(b), h)
                for b, h in list(entry.blocks.items())
            ]
            self.pin(entry)  # eviction must not close the fd while it is read
            try:
                bad = await _run(files.corrupt_blocks, await self.fd(entry), checks)
                for block in bad:
                    await self.drop_block(entry, block)
            finally:
                self.unpin(entry)
            return sum(length for _, _, length, _ in checks)
        path = files.file_path(self._dirs[row.dir], row.file)
        checks = []
        for block, xxh3 in row.blocks.items():
            start = block * row.block_size
            checks.append((block, start, min(row.block_size, row.size - start), xxh3))
        try:
            bad = await _run(files.corrupt_blocks_in, path, checks)
        except OSError:
            bad = [block for block, _, _, _ in checks]  # the file is gone or unreadable
        if bad:
            await self._drop_scrubbed(row, bad)
        return sum(length for _, _, length, _ in checks)

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
                self.used -= length

    async def _sweep_orphans(self) -> None:
        """Remove block files that no index row claims (left by a crash), a batch at a
        time, after start-up."""
        started = time.time()
        for number, directory in enumerate(self._dirs):
            names = await _run(files.list_files, directory)
            for first in range(0, len(names), ORPHAN_BATCH):
                batch = names[first : first + ORPHAN_BATCH]
                unknown = await self._in_index_thread(self.index.unknown_files, number, batch)
                for name in unknown:
                    path = files.file_path(directory, name)
                    if await _run(files.older_than, path, started):
                        await _run(files.unlink, path)


def _close_fds(entries: list[Entry]) -> None:
    for entry in entries:
        _close_fd(entry)


def _close_fd(entry: Entry) -> None:
    if entry.fd is not None:
        os.close(entry.fd)
        entry.fd = None


async def _run(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)
