"""The durable index: SQLite in WAL mode, beside the data.

One connection, used from one thread only (the store's index executor); every method
here is blocking and is never called on the event loop.

    entries  one row per cached object version: identity, S3 metadata, where its file
             is, how many bytes of it are present, when it was last validated and read
    blocks   one row per present block, with the xxh3-64 of its bytes
    writeback  one row per write-back object acknowledged to its client and not yet
             confirmed by the upstream: the journal (``writes``). Committed with its
             entry and blocks after the file's bytes are fsync'd; deleted with the
             entry (a newer write of the key supersedes it) or once uploaded
    uploads, upload_parts  the write-back multipart uploads not completed yet and
             their acknowledged parts (``multipart``): a part's row is committed
             after its bytes are fsync'd; the rows go with the completion's commit

A block row is inserted only after the block's bytes are in the file; an entry's rows
are deleted (and committed) before its file is unlinked (``store.cache``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a late fill of a dropped
                                           -- entry cannot land in a new one
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_modified TEXT NOT NULL,
    headers TEXT NOT NULL,
    dir INTEGER NOT NULL,
    file TEXT NOT NULL,
    block_size INTEGER NOT NULL,
    present_bytes INTEGER NOT NULL DEFAULT 0,
    validated_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    queue INTEGER NOT NULL DEFAULT 0,  -- S3-FIFO (store.policy): SMALL or MAIN
    freq INTEGER NOT NULL DEFAULT 0,  -- reads since it entered its queue, at most 3
    queued_at REAL NOT NULL DEFAULT 0,  -- when it entered its queue (FIFO order)
    UNIQUE (bucket, key)
);
CREATE INDEX IF NOT EXISTS entries_by_access ON entries (accessed_at);
CREATE INDEX IF NOT EXISTS entries_by_file ON entries (file);
CREATE TABLE IF NOT EXISTS blocks (
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    block INTEGER NOT NULL,
    xxh3 INTEGER NOT NULL,
    PRIMARY KEY (entry_id, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS writeback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- upload order
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    headers TEXT NOT NULL,  -- the upload's request headers
    acknowledged_at REAL NOT NULL,
    parts TEXT  -- a multipart upload's parts, [[size, md5 hex], ...]; NULL: one PUT
);
CREATE INDEX IF NOT EXISTS writeback_by_entry ON writeback (entry_id);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,  -- a write-back multipart upload's UploadId, not completed yet
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,  -- JSON (``multipart``)
    dir INTEGER,  -- its shared file, once it has one
    file TEXT
);
CREATE TABLE IF NOT EXISTS upload_parts (
    upload_id TEXT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    state TEXT NOT NULL,  -- JSON (``multipart``)
    PRIMARY KEY (upload_id, number)
) WITHOUT ROWID;
"""
# Columns added since the first schema: (name, declaration) for ALTER TABLE.
_ADDED_COLUMNS = (
    ("queue", "INTEGER NOT NULL DEFAULT 0"),
    ("freq", "INTEGER NOT NULL DEFAULT 0"),
    ("queued_at", "REAL NOT NULL DEFAULT 0"),
)
_AFTER_COLUMNS = "CREATE INDEX IF NOT EXISTS entries_by_queue ON entries (queue, queued_at);"
_EVICTION_COLUMNS = "id, bucket, key, dir, file, present_bytes"

# S3-FIFO queues (store.policy).
SMALL, MAIN = 0, 1


@dataclass(frozen=True, slots=True)
class EntryRow:
    id: int
    bucket: str
    key: str
    etag: str
    size: int
    last_modified: str
    headers: tuple[tuple[str, str], ...]
    dir: int
    file: str
    block_size: int
    present_bytes: int
    validated_at: float
    accessed_at: float
    blocks: dict[int, int]  # block number -> xxh3-64


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A journal row: an acknowledged write-back object, with its entry's identity."""

    seq: int
    entry_id: int
    bucket: str
    key: str
    size: int
    etag: str
    headers: tuple[tuple[str, str], ...]  # the upload's request headers
    acknowledged_at: float
    parts: tuple[tuple[int, str], ...] | None = None  # multipart: (size, md5 hex) each


@dataclass(frozen=True, slots=True)
class UploadRow:
    """A write-back multipart upload not completed yet, as ``multipart`` saved it."""

    id: str
    bucket: str
    key: str
    state: str  # JSON
    shared: tuple[int, str] | None  # its shared file (dir, name)
    parts: dict[int, str]  # part number -> JSON


_ENTRY_COLUMNS = (
    "id, bucket, key, etag, size, last_modified, headers, dir, file, block_size, "
    "present_bytes, validated_at, accessed_at"
)


class Index:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash; an OS crash may lose the
        # last commits, never consistency. Block hashes catch what the disk lost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        journal = {row[1] for row in self._db.execute("PRAGMA table_info(writeback)")}
        if "parts" not in journal:  # a journal written before multipart write-back
            self._db.execute("ALTER TABLE writeback ADD COLUMN parts TEXT")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:  # an index written by an older s3cache
                self._db.execute(f"ALTER TABLE entries ADD COLUMN {name} {declaration}")
        self._db.executescript(_AFTER_COLUMNS)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic commit. (The connection is in autocommit mode, where ``with
        self._db:`` begins no transaction: each statement would commit on its own, and
        a crash between two of them would leave e.g. present_bytes counting a block
        that has no row.)"""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def used_bytes(self) -> int:
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(present_bytes), 0) FROM entries"
        ).fetchone()
        return int(total)

    def entry_count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(count)

    def get(self, bucket: str, key: str) -> EntryRow | None:
        row = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE bucket = ? AND key = ?", (bucket, key)
        ).fetchone()
        return None if row is None else self._row(row)

    def _row(self, row: tuple[Any, ...]) -> EntryRow:
        blocks = {
            block: unsigned64(xxh3)
            for block, xxh3 in self._db.execute(
                "SELECT block, xxh3 FROM blocks WHERE entry_id = ?", (row[0],)
            )
        }
        entry_id, bucket, key, etag, size, modified, headers, *rest = row
        directory, file, block_size, present, validated, accessed = rest
        return EntryRow(
            id=entry_id,
            bucket=bucket,
            key=key,
            etag=etag,
            size=size,
            last_modified=modified,
            headers=_decode_headers(headers),
            dir=directory,
            file=file,
            block_size=block_size,
            present_bytes=present,
            validated_at=validated,
            accessed_at=accessed,
            blocks=blocks,
        )

    def entries_after(self, entry_id: int, limit: int) -> list[EntryRow]:
        """Entries with an id above ``entry_id``, in id order (the scrubber's walk)."""
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id > ? ORDER BY id LIMIT ?",
            (entry_id, limit),
        ).fetchall()
        return [self._row(row) for row in rows]

    def insert(self, row: EntryRow, queue: int = SMALL) -> int:
        """Insert a new entry (replacing any row of the same key) and return its id."""
        with self._transaction():
            return self._insert(row, 0, queue)

    def insert_whole(
        self,
        row: EntryRow,
        upload_headers: tuple[tuple[str, str], ...] | None = None,
        parts: tuple[tuple[int, str], ...] | None = None,
        completed_upload: str | None = None,
    ) -> tuple[int, int | None]:
        """Insert an entry with all its blocks (``row.blocks``: its file is complete and
        written), replacing any entry of the key, in one commit; with
        ``upload_headers``, its write-back journal row too, committed with
        ``synchronous=FULL`` (durable against an OS crash, not only a process crash).
        ``completed_upload``: the multipart upload it completes, whose rows go in the
        same commit. Returns the entry id and the journal seq (None without one)."""
        if upload_headers is not None:
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction():
                entry_id = self._insert(row, row.present_bytes)
                self._db.executemany(
                    "INSERT INTO blocks (entry_id, block, xxh3) VALUES (?, ?, ?)",
                    [(entry_id, block, _signed64(xxh3)) for block, xxh3 in row.blocks.items()],
                )
                seq = None
                if upload_headers is not None:
                    cursor = self._db.execute(
                        "INSERT INTO writeback (entry_id, headers, acknowledged_at, parts)"
                        " VALUES (?, ?, ?, ?)",
                        (
                            entry_id,
                            json.dumps(upload_headers),
                            row.accessed_at,
                            None if parts is None else json.dumps(parts),
                        ),
                    )
                    seq = cursor.lastrowid
                if completed_upload is not None:
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (completed_upload,))
        finally:
            if upload_headers is not None:
                self._db.execute("PRAGMA synchronous=NORMAL")
        return entry_id, seq

    def _insert(self, row: EntryRow, present: int, queue: int = SMALL) -> int:
        """The one INSERT of an entry row (any row of the key goes first); it enters
        ``queue`` at its access time."""
        self._db.execute("DELETE FROM entries WHERE bucket = ? AND key = ?", (row.bucket, row.key))
        cursor = self._db.execute(
            "INSERT INTO entries (bucket, key, etag, size, last_modified, headers, dir, file,"
            " block_size, present_bytes, validated_at, accessed_at, queue, queued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.bucket,
                row.key,
                row.etag,
                row.size,
                row.last_modified,
                json.dumps(row.headers),
                row.dir,
                row.file,
                row.block_size,
                present,
                row.validated_at,
                row.accessed_at,
                queue,
                row.accessed_at,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def pending(self) -> list[PendingRow]:
        """Every journal row, oldest first."""
        rows = self._db.execute(
            "SELECT w.seq, w.entry_id, e.bucket, e.key, e.size, e.etag, w.headers,"
            " w.acknowledged_at, w.parts FROM writeback w JOIN entries e ON e.id = w.entry_id"
            " ORDER BY w.seq"
        ).fetchall()
        return [
            PendingRow(
                seq,
                entry_id,
                bucket,
                key,
                size,
                etag,
                _decode_headers(headers),
                acked,
                None if parts is None else tuple((n, md5) for n, md5 in json.loads(parts)),
            )
            for seq, entry_id, bucket, key, size, etag, headers, acked, parts in rows
        ]

    def uploaded(
        self,
        seq: int,
        entry_id: int,
        meta: tuple[str, str, tuple[tuple[str, str], ...]] | None,
        validated_at: float,
    ) -> bool:
        """A write-back object is upstream: its journal row goes and its entry takes the
        upstream's ``meta`` (ETag, Last-Modified, headers; None: the entry is dropped).
        False if the row was gone already (superseded)."""
        with self._transaction():
            if not self._db.execute("DELETE FROM writeback WHERE seq = ?", (seq,)).rowcount:
                return False
            if meta is None:
                self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            else:
                etag, modified, headers = meta
                self._db.execute(
                    "UPDATE entries SET etag = ?, last_modified = ?, headers = ?,"
                    " validated_at = ? WHERE id = ?",
                    (etag, modified, json.dumps(headers), validated_at, entry_id),
                )
        return True

    def add_block(self, entry_id: int, block: int, nbytes: int, xxh3: int) -> bool:
        """Record a block as present; False if the entry is gone meanwhile."""
        with self._transaction():
            updated = self._db.execute(
                "UPDATE entries SET present_bytes = present_bytes + ? WHERE id = ?",
                (nbytes, entry_id),
            ).rowcount
            if not updated:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO blocks (entry_id, block, xxh3) VALUES (?, ?, ?)",
                (entry_id, block, _signed64(xxh3)),
            )
        return True

    def remove_block(self, entry_id: int, block: int, nbytes: int) -> bool:
        """Forget a block; False if it was not recorded (or its entry is gone)."""
        with self._transaction():
            if not self._db.execute(
                "DELETE FROM blocks WHERE entry_id = ? AND block = ?", (entry_id, block)
            ).rowcount:
                return False
            self._db.execute(
                "UPDATE entries SET present_bytes = present_bytes - ? WHERE id = ?",
                (nbytes, entry_id),
            )
        return True

    def clear_blocks(self, entry_id: int) -> int:
        """Forget every block of an entry (its file is lost); the bytes they counted."""
        with self._transaction():
            row = self._db.execute(
                "SELECT present_bytes FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                return 0
            self._db.execute("DELETE FROM blocks WHERE entry_id = ?", (entry_id,))
            self._db.execute("UPDATE entries SET present_bytes = 0 WHERE id = ?", (entry_id,))
        return int(row[0])

    def delete(self, entry_ids: Iterable[int]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in entry_ids])

    def delete_entry(self, entry_id: int) -> bool:
        """Delete one entry's rows; False if it was gone already."""
        with self._transaction():
            return bool(
                self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount
            )

    def touch(self, accessed: Iterable[tuple[float, int, int]]) -> None:
        """Batched access updates: (accessed_at, reads counted, entry id)."""
        with self._transaction():
            self._db.executemany(
                "UPDATE entries SET accessed_at = ?, freq = MIN(3, freq + ?) WHERE id = ?",
                accessed,
            )

    def set_validated(self, entry_id: int, validated_at: float) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE entries SET validated_at = ? WHERE id = ?", (validated_at, entry_id)
            )

    def expire_validated_before(self, when: float) -> None:
        """Every entry the upstream confirmed before ``when`` is asked for again before
        it is served (a write-back not uploaded yet is never: its ``validated_at`` is
        infinite)."""
        with self._transaction():
            self._db.execute(
                "UPDATE entries SET validated_at = 0 WHERE validated_at < ?", (when,)
            )

    def least_recently_used(self, limit: int) -> list[tuple[int, str, str, int, str, int]]:
        """(id, bucket, key, dir, file, present_bytes) of the coldest entries first."""
        return self._db.execute(
            "SELECT id, bucket, key, dir, file, present_bytes FROM entries"
            " ORDER BY accessed_at LIMIT ?",
            (limit,),
        ).fetchall()

    def oldest_in_queue(
        self, queue: int, limit: int
    ) -> list[tuple[int, str, str, int, str, int, int]]:
        """(id, bucket, key, dir, file, present_bytes, freq) of a queue, oldest first."""
        return self._db.execute(
            f"SELECT {_EVICTION_COLUMNS}, freq FROM entries WHERE queue = ?"
            " ORDER BY queued_at LIMIT ?",
            (queue, limit),
        ).fetchall()

    def queue_bytes(self, queue: int) -> int:
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(present_bytes), 0) FROM entries WHERE queue = ?", (queue,)
        ).fetchone()
        return int(total)

    def requeue(self, moves: Iterable[tuple[int, int, float | None, int]]) -> None:
        """(queue, freq, queued_at or None to keep it, entry id): one commit."""
        with self._transaction():
            self._db.executemany(
                "UPDATE entries SET queue = ?, freq = ?, queued_at = COALESCE(?, queued_at)"
                " WHERE id = ?",
                moves,
            )

    def prefix_bytes(self, bucket: str, prefix: str) -> int:
        """Bytes present of the entries of bucket whose key starts with ``prefix``."""
        where, args = _prefix_where(bucket, prefix)
        (total,) = self._db.execute(
            f"SELECT COALESCE(SUM(present_bytes), 0) FROM entries WHERE {where}", args
        ).fetchone()
        return int(total)

    def in_prefix(
        self, bucket: str, prefix: str, order: str, limit: int
    ) -> list[tuple[int, str, str, int, str, int]]:
        """(id, bucket, key, dir, file, present_bytes) under a prefix, in eviction
        ``order`` (an ORDER BY clause of store.policy, never user input)."""
        where, args = _prefix_where(bucket, prefix)
        return self._db.execute(
            f"SELECT {_EVICTION_COLUMNS} FROM entries WHERE {where} AND present_bytes > 0"
            f" ORDER BY {order} LIMIT ?",
            (*args, limit),
        ).fetchall()

    # --- write-back multipart uploads (durable: synchronous=FULL) -----------------

    def save_upload(self, upload_id: str, bucket: str, key: str, state: str) -> None:
        with self._durably():
            self._db.execute(
                "INSERT INTO uploads (id, bucket, key, state) VALUES (?, ?, ?, ?)",
                (upload_id, bucket, key, state),
            )

    def save_part(
        self,
        upload_id: str,
        number: int,
        state: str,
        upload_state: str,
        shared: tuple[int, str] | None,
    ) -> bool:
        """A part's row (replacing one of the same number), with the upload's state now
        and where its shared file is; False if the upload is gone."""
        directory, name = shared if shared is not None else (None, None)
        with self._durably():
            if not self._db.execute(
                "UPDATE uploads SET state = ?, dir = ?, file = ? WHERE id = ?",
                (upload_state, directory, name, upload_id),
            ).rowcount:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO upload_parts (upload_id, number, state) VALUES (?, ?, ?)",
                (upload_id, number, state),
            )
        return True

    def delete_upload(self, upload_id: str) -> None:
        with self._durably():
            self._db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))

    def uploads(self) -> list[UploadRow]:
        """Every write-back multipart upload not completed, with its parts' rows."""
        parts: dict[str, dict[int, str]] = {}
        for upload_id, number, state in self._db.execute(
            "SELECT upload_id, number, state FROM upload_parts"
        ):
            parts.setdefault(upload_id, {})[number] = state
        return [
            UploadRow(upload_id, bucket, key, state, None if file is None else (dir, file),
                      parts.get(upload_id, {}))
            for upload_id, bucket, key, state, dir, file in self._db.execute(
                "SELECT id, bucket, key, state, dir, file FROM uploads"
            )
        ]

    @contextlib.contextmanager
    def _durably(self) -> Iterator[None]:
        """One commit with ``synchronous=FULL``."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction():
                yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def unknown_files(self, directory: int, names: list[str]) -> list[str]:
        """Those of ``names`` (files found in a cache dir) that no entry claims."""
        marks = ",".join("?" * len(names))
        known = {
            name
            for table in ("entries", "uploads")
            for (name,) in self._db.execute(
                f"SELECT file FROM {table} WHERE dir = ? AND file IN ({marks})",
                (directory, *names),
            )
        }
        return [name for name in names if name not in known]


def _prefix_where(bucket: str, prefix: str) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause for the keys of bucket under prefix, as a range of the
    (bucket, key) index."""
    if not prefix:
        return "bucket = ?", (bucket,)
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return "bucket = ? AND key >= ? AND key < ?", (bucket, prefix, upper)


def _decode_headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in json.loads(text))


def _signed64(value: int) -> int:
    """SQLite integers are signed 64-bit."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
