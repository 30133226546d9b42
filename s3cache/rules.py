"""Admission after N reads (``admit_after`` of a cache rule), as MinIO's disk cache had
it (``MINIO_CACHE_AFTER``).

A bounded table in memory, LRU-ordered: (bucket, key) -> (reads counted, when the
window began). A read below the rule's threshold is served uncached, straight from
the upstream; the threshold-th read within the window is admitted. The table forgets
its least recently read keys past ``ADMISSION_KEYS`` (a forgotten key starts counting
again: at most N-1 extra upstream transfers each time). O(1) per read; no I/O.

Reads served by secondary workers are hits of cached entries only: an uncached object
always reaches the primary, which counts it here.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from s3cache.config import CacheRule

ADMISSION_KEYS = 65536  # about 10 MiB of table at most


class Admission:
    __slots__ = ("_counts", "_limit")

    def __init__(self, limit: int = ADMISSION_KEYS) -> None:
        self._counts: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._limit = limit

    def admit(self, rule: CacheRule, bucket: str, key: str, now: float | None = None) -> bool:
        """Count one read of bucket/key; True if it is to be cached."""
        if rule.admit_after <= 1:
            return True
        now = time.monotonic() if now is None else now
        name = (bucket, key)
        count, since = self._counts.pop(name, (0, now))
        if now - since > rule.admit_window:
            count, since = 0, now
        count += 1
        if count >= rule.admit_after:
            return True  # admitted: the entry now remembers the object
        self._counts[name] = (count, since)
        if len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._counts)
