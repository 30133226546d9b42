"""Every metric of s3cache, defined once. Labels are small fixed sets (the enums
below): never a bucket name or a key.

Names follow Prometheus conventions: ``_total`` for counters, ``_bytes`` and
``_seconds`` units.

With several worker processes (``workers``), ``s3cache serve`` points every worker at
one directory in ``PROMETHEUS_MULTIPROC_DIR`` before they start: prometheus-client then
keeps each process's values in a file there, and the exposition and :func:`snapshot`
add them up across the workers (counters and histograms of workers that exited
included; gauges of live workers only, summed). One scrape sees the whole node.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Final, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Gauges with several workers: the sum over the live ones (only the primary sets them).
_LIVE_SUM: Final = "livesum"


class CacheOutcome(enum.Enum):
    """How a request was answered, for latency and cacheable-read metrics."""

    HIT = "hit"  # every byte from the cache
    MISS = "miss"  # every byte fetched from the upstream for this request
    PARTIAL = "partial"  # some bytes from the cache, some fetched
    BYPASS = "bypass"  # a cacheable read served uncached
    NOT_MODIFIED = "not_modified"  # a conditional answered 304/412 from metadata
    FORWARD = "forward"  # not a cacheable read: passed through
    PEER = "peer"  # served by the cluster node that owns the object


class ByteSource(enum.Enum):
    CACHE = "cache"
    UPSTREAM = "upstream"
    PEER = "peer"


class UpstreamKind(enum.Enum):
    BLOCK = "block"  # a block fetch (or an object's first fetch, or its HEAD)
    REVALIDATE = "revalidate"  # a conditional HEAD of a stale entry
    FORWARD = "forward"  # a client's request passed through
    PROBE = "probe"  # readiness check
    WRITEBACK = "writeback"  # a write-back upload, or the HEAD after a cached upload


class WritebackFailure(enum.Enum):
    """Why a write-back upload attempt failed (``s3cache_writeback_upload_failures_total``).
    The first two pass; the others are refusals the upstream repeats until someone acts
    (the object stays pending, retried at the backoff cap, logged once)."""

    UNREACHABLE = "unreachable"  # no HTTP answer: connection refused, reset, timeout
    SERVER_ERROR = "server_error"  # 5xx (SlowDown, InternalError…)
    NO_SUCH_BUCKET = "no_such_bucket"  # 404 NoSuchBucket: the bucket is gone
    ACCESS_DENIED = "access_denied"  # 403: s3cache's credentials may not write there
    REFUSED = "refused"  # any other 4xx (NoSuchUpload, InvalidRequest, BadDigest…)


class DegradedReason(enum.Enum):
    """Why a cache dir cannot take blocks (``s3cache_cache_degraded_dirs``)."""

    NO_SPACE = "no_space"  # ENOSPC/EDQUOT, or less than a block free
    IO_ERROR = "io_error"  # EIO and any other refusal (read-only, permissions…)


class Revalidation(enum.Enum):
    UNCHANGED = "unchanged"
    CHANGED = "changed"
    GONE = "gone"
    ERROR = "error"


def status_class(status: int | None) -> str:
    """``2xx``…``5xx``, or ``error`` when there was no HTTP answer."""
    return f"{status // 100}xx" if status else "error"


_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

REQUESTS = Counter(
    "s3cache_requests_total",
    "Requests by S3 operation and status class",
    ["operation", "status_class"],
)
REQUEST_DURATION = Histogram(
    "s3cache_request_duration_seconds",
    "Time to answer a request completely, by outcome",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_BYTE = Histogram(
    "s3cache_time_to_first_byte_seconds",
    "Time until the response head was sent, by outcome",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
CACHE_READS = Counter(
    "s3cache_cache_reads_total", "Cacheable GET/HEAD requests by outcome", ["outcome"]
)
SERVED_BYTES = Counter(
    "s3cache_served_bytes_total", "Object body bytes sent to clients, by source", ["source"]
)
UPSTREAM_REQUESTS = Counter(
    "s3cache_upstream_requests_total",
    "Requests to the upstream by kind and status class",
    ["kind", "status_class"],
)
UPSTREAM_ERRORS = Counter(
    "s3cache_upstream_errors_total",
    "Upstream requests that failed without an answer, or whose body broke off",
    ["kind"],
)
UPSTREAM_BYTES = Counter(
    "s3cache_upstream_bytes_total", "Response body bytes received from the upstream", ["kind"]
)
UPSTREAM_DURATION = Histogram(
    "s3cache_upstream_request_duration_seconds",
    "Time until the upstream's response head",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_BLOCK_FETCHES = Counter(
    "s3cache_upstream_block_fetches_total", "Ranged upstream GETs that fill the cache"
)
UPSTREAM_FILL_BYTES = Counter(
    "s3cache_upstream_fill_bytes_total", "Bytes received from the upstream into the cache"
)
CACHE_CAPACITY = Gauge(
    "s3cache_cache_capacity_bytes",
    "Cache size in effect: cache_size, or less where the cache dirs cannot hold that much",
    multiprocess_mode=_LIVE_SUM,
)
CACHE_USED = Gauge(
    "s3cache_cache_used_bytes", "Bytes of blocks held in the cache", multiprocess_mode=_LIVE_SUM
)
CACHE_ENTRIES = Gauge(
    "s3cache_cache_entries", "Objects held in the cache", multiprocess_mode=_LIVE_SUM
)
CACHE_DEGRADED = Gauge(
    "s3cache_cache_degraded",
    "1 while the cache cannot write to one of its directories",
    multiprocess_mode=_LIVE_SUM,
)
CACHE_DEGRADED_DIRS = Gauge(
    "s3cache_cache_degraded_dirs",
    "Cache dirs that cannot take blocks now, by reason (no_space, io_error)",
    ["reason"],
    multiprocess_mode=_LIVE_SUM,
)
CACHE_WRITE_ERRORS = Counter(
    "s3cache_cache_write_errors_total", "Failed writes to the cache directories"
)
CORRUPT_BLOCKS = Counter(
    "s3cache_corrupt_blocks_total", "Cached blocks whose bytes did not match their hash"
)
SCRUBBED_BYTES = Counter("s3cache_scrubbed_bytes_total", "Bytes checked by the scrubber")
CACHE_EVICTIONS = Counter("s3cache_cache_evictions_total", "Entries evicted")
CACHE_EVICTED_BYTES = Counter("s3cache_cache_evicted_bytes_total", "Bytes evicted")
# Per cache rule (README, "Cache rules"): the label is a rule's configured name, or
# "default" for objects no rule matches; never a bucket or key.
RULE_READS = Counter(
    "s3cache_rule_reads_total",
    "Cacheable GET/HEAD requests by cache rule and outcome",
    ["rule", "outcome"],
)
RULE_SERVED_BYTES = Counter(
    "s3cache_rule_served_bytes_total",
    "Object body bytes sent to clients, by cache rule and source",
    ["rule", "source"],
)
RULE_EVICTIONS = Counter(
    "s3cache_rule_evictions_total", "Entries evicted, by cache rule", ["rule"]
)
RULE_EVICTED_BYTES = Counter(
    "s3cache_rule_evicted_bytes_total", "Bytes evicted, by cache rule", ["rule"]
)
RULE_USED = Gauge(
    "s3cache_rule_used_bytes",
    "Bytes of blocks held in the cache, by cache rule",
    ["rule"],
    multiprocess_mode=_LIVE_SUM,
)
FILLS_IN_FLIGHT = Gauge(
    "s3cache_fills_in_flight", "Block fetches in flight", multiprocess_mode=_LIVE_SUM
)
COALESCED_WAITERS = Counter(
    "s3cache_coalesced_waiters_total",
    "Requests that joined a block fetch an earlier request started (single-flight), "
    "each counted once",
)
REVALIDATIONS = Counter(
    "s3cache_revalidations_total", "Revalidations of stale entries by result", ["result"]
)


WRITES = Counter(
    "s3cache_writes_total",
    "PutObject requests cached on the way to the upstream, by mode (through, back)",
    ["mode"],
)
WRITEBACK_PENDING_OBJECTS = Gauge(
    "s3cache_writeback_pending_objects",
    "Write-back objects acknowledged to their clients and not yet upstream",
    multiprocess_mode=_LIVE_SUM,
)
WRITEBACK_PENDING_BYTES = Gauge(
    "s3cache_writeback_pending_bytes",
    "Bytes of write-back objects not yet upstream",
    multiprocess_mode=_LIVE_SUM,
)
WRITEBACK_OLDEST = Gauge(
    "s3cache_writeback_oldest_pending_seconds",
    "Age of the oldest write-back object not yet upstream (0: none pending)",
    multiprocess_mode="livemax",
)
WRITEBACK_UPLOADS = Counter(
    "s3cache_writeback_uploads_total", "Write-back objects uploaded to the upstream"
)
WRITEBACK_FAILURES = Counter(
    "s3cache_writeback_upload_failures_total",
    "Failed write-back upload attempts by reason (each is retried with backoff)",
    ["reason"],
)


PREFETCH_QUEUE_DEPTH = Gauge(
    "s3cache_prefetch_queue_depth", "Prefetch items waiting", multiprocess_mode=_LIVE_SUM
)
PREFETCHED_BYTES = Counter("s3cache_prefetched_bytes_total", "Bytes brought in by prefetch")
PREFETCH_USEFUL_BYTES = Counter(
    "s3cache_prefetch_useful_bytes_total", "Prefetched bytes later read by a client"
)
PREFETCH_WASTED_BYTES = Counter(
    "s3cache_prefetch_wasted_bytes_total", "Prefetched bytes evicted or dropped unread"
)
PREFETCH_LEAD = Histogram(
    "s3cache_prefetch_lead_seconds",
    "Time from a prefetched block landing to its first read",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


def sample(metric: Counter | Gauge, **labels: str) -> float:
    """The current value of one of the metrics above in this process (0 if never set).
    Reads only that metric: no collector of the registry (some read /proc) runs."""
    for family in metric.collect():
        for point in family.samples:
            if point.name.endswith("_created"):
                continue
            if point.labels == labels:
                return float(point.value)
    return 0.0


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR_ENV))


def _registry() -> CollectorRegistry:
    if not multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class Snapshot:
    """Values of the metrics above, across every worker process (blocking in
    multi-process mode: it reads the workers' files). Take it off the event loop."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] | None = None
        if multiprocess():
            self._values = {
                (point.name, frozenset(point.labels.items())): float(point.value)
                for family in _registry().collect()
                for point in family.samples
            }

    def value(self, metric: Counter | Gauge, **labels: str) -> float:
        if self._values is None:
            return sample(metric, **labels)
        family = next(iter(metric.describe()))
        name = family.name + "_total" if family.type == "counter" else family.name
        return self._values.get((name, frozenset(labels.items())), 0.0)


def exposition() -> bytes:
    """The Prometheus text format of every metric, of every worker process (blocking:
    /proc or the workers' files are read)."""
    return generate_latest(_registry())


_Metric = TypeVar("_Metric", bound=MetricWrapperBase)
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: _Metric, *values: str) -> _Metric:
    """``metric.labels(*values)``, remembered: ``labels()`` checks and locks on every
    call, and the hot path counts several metrics per request. (Label values come from
    the small enums above, so this stays small.)"""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child
