"""Every metric of s3cache, defined once. Labels are small fixed sets: never a bucket
name or a key.

Names follow Prometheus conventions: ``_total`` for counters, ``_bytes`` and
``_seconds`` units.
"""

from __future__ import annotations

import enum

from prometheus_client import REGISTRY, Counter, Gauge, generate_latest


class CacheOutcome(enum.Enum):
    """How a cacheable read was answered."""

    HIT = "hit"  # every byte from the cache
    MISS = "miss"  # every byte fetched from the upstream for this request
    PARTIAL = "partial"  # some bytes from the cache, some fetched
    BYPASS = "bypass"  # not cacheable: straight from the upstream
    NOT_MODIFIED = "not_modified"  # a conditional answered 304/412 from metadata


class ByteSource(enum.Enum):
    CACHE = "cache"
    UPSTREAM = "upstream"


CACHE_READS = Counter(
    "s3cache_cache_reads_total", "Cacheable GET/HEAD requests by outcome", ["outcome"]
)
SERVED_BYTES = Counter(
    "s3cache_served_bytes_total", "Object body bytes sent to clients, by source", ["source"]
)
UPSTREAM_BLOCK_FETCHES = Counter(
    "s3cache_upstream_block_fetches_total", "Ranged upstream GETs that fill the cache"
)
UPSTREAM_FILL_BYTES = Counter(
    "s3cache_upstream_fill_bytes_total", "Bytes received from the upstream into the cache"
)
CACHE_CAPACITY = Gauge("s3cache_cache_capacity_bytes", "Configured cache size")
CACHE_USED = Gauge("s3cache_cache_used_bytes", "Bytes of blocks held in the cache")
CACHE_EVICTIONS = Counter("s3cache_cache_evictions_total", "Entries evicted")
CACHE_EVICTED_BYTES = Counter("s3cache_cache_evicted_bytes_total", "Bytes evicted")
FILLS_IN_FLIGHT = Gauge("s3cache_fills_in_flight", "Block fetches in flight")


def sample(metric: Counter | Gauge, **labels: str) -> float:
    """The current value of one of the metrics above (0 if never set). Reads only
    that metric: no collector of the registry (some read /proc) runs."""
    for family in metric.collect():
        for point in family.samples:
            if point.name.endswith("_created"):
                continue
            if point.labels == labels:
                return float(point.value)
    return 0.0


def exposition() -> bytes:
    """The Prometheus text format of every metric (blocking: /proc is read)."""
    return generate_latest(REGISTRY)
