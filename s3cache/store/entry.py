"""What the cache knows of one object version, in memory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3cache.store.files import Stamp


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """An object version as the upstream described it."""

    etag: str
    size: int
    last_modified: str  # as the upstream sent it (an HTTP date)
    headers: tuple[tuple[str, str], ...]  # the other headers a GET/HEAD answers with


def stale(validated_at: float, ttl: float, now: float | None = None) -> bool:
    """Whether a version the upstream confirmed at ``validated_at`` (``time.time()``;
    infinite: a write-back not uploaded yet, the cache's own version) has outlived its
    TTL: it is then asked for again before it is served. The one test of freshness, for
    entries (``Entry.stale``) and for what a secondary worker was told of them."""
    if ttl == math.inf:
        return False
    return (time.time() if now is None else now) - validated_at > ttl


class Entry:
    """A cached object version: metadata, which blocks are in its file, who uses it.

    ``fetches`` maps a missing block to the fill that is bringing it (see ``fill``);
    ``pins`` counts readers and fills using the entry, which eviction must not touch.
    """

    __slots__ = (
        "id",
        "bucket",
        "key",
        "meta",
        "dir",
        "path",
        "block_size",
        "blocks",
        "validated_at",
        "accessed_at",
        "pins",
        "fetches",
        "dropped",
        "fd",
        "stamp",
        "verified",
        "prefetched",
        "next_offset",
        "window",
        "fresh",
    )

    def __init__(
        self,
        *,
        id: int,
        bucket: str,
        key: str,
        meta: ObjectMeta,
        dir: int,
        path: Path,
        block_size: int,
        blocks: dict[int, int],
        validated_at: float,
        accessed_at: float,
    ) -> None:
        self.id = id
        self.bucket = bucket
        self.key = key
        self.meta = meta
        self.dir = dir
        self.path = path
        self.block_size = block_size
        self.blocks = blocks  # present block -> xxh3-64 of its bytes
        self.validated_at = validated_at
        self.accessed_at = accessed_at
        self.pins = 0
        self.fetches: dict[int, Any] = {}
        self.dropped = False
        self.fd: int | None = None
        # fstat of ``fd`` as s3cache last left the file (see ``store.cache``): another
        # value means someone else deleted, truncated or wrote it.
        self.stamp: Stamp | None = None
        # Blocks whose bytes were checked against their hash (or written) by this
        # process: the others are checked once before they are first served.
        self.verified: set[int] = set()
        # Blocks brought by prefetch and not read yet -> when they landed (monotonic).
        self.prefetched: dict[int, float] = {}
        # Sequential read detection: where the next read would start if sequential,
        # and the read-ahead window (blocks) it has earned.
        self.next_offset = -1
        self.window = 0
        # Created and not read yet by this process: the read that created it is not
        # counted as a read again (``store.policy``).
        self.fresh = False

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def block_count(self) -> int:
        return -(-self.meta.size // self.block_size)

    def stale(self, ttl: float) -> bool:
        """Past its TTL since the upstream last confirmed it (``stale``)."""
        return stale(self.validated_at, ttl)

    def block_of(self, offset: int) -> int:
        return offset // self.block_size

    def block_range(self, block: int) -> tuple[int, int]:
        """Byte offsets [start, end) of a block."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.meta.size)

    def block_length(self, block: int) -> int:
        start, end = self.block_range(block)
        return end - start

    def survey(self, start: int, end: int) -> Survey:
        """What the cache holds of bytes [start, end): the one walk over their blocks a
        read makes before it answers (``reader``)."""
        blocks, verified, size = self.blocks, self.verified, self.block_size
        present = 0
        missing = -1
        checked = True
        for block in range(start // size, (end - 1) // size + 1):
            if block in blocks:
                checked = checked and block in verified
                present += min((block + 1) * size, end) - max(block * size, start)
            elif missing < 0:
                missing = block
        return Survey(present, missing, checked)


@dataclass(frozen=True, slots=True)
class Survey:
    """What ``Entry.survey`` found of a byte span."""

    present: int  # bytes in blocks the cache holds
    missing: int  # the first block not held; -1 if every block is
    checked: bool  # every block held was checked by this process (or written by it)

    @property
    def verified(self) -> bool:
        """Every block is there and checked: unless the file changed, the whole span
        can be sent as it is."""
        return self.missing < 0 and self.checked
