"""Crash safety: s3cache is killed with SIGKILL at random moments while readers make it
fill and evict (a cache much smaller than the data), and restarted on the same cache
dir, again and again. What s3cache promises (README, "On disk"; ``store.cache``):

- a block is recorded in the index, with its xxh3-64, only once its bytes are in the
  file: after any crash, every recorded block's bytes are the object's bytes (checked
  here against the object itself, and against the recorded hash);
- an entry's row is committed before its file is created and deleted before its file
  is unlinked: a crash may leave a row without a file (then it has no block) or a file
  without a row (an orphan): orphans are removed by the background sweep after start;
- usage counts recorded blocks only and never passes ``cache_size``;
- after a restart s3cache is healthy and serves every object byte for byte.

Kill timing, reader choices and object contents come from one seed, printed (and in
every failure message): ``S3CACHE_CRASH_SEED=N`` reruns with it. Thread interleavings
are not reproducible, the seed only makes a rerun as similar as it can be.
``S3CACHE_CRASH_KILLS`` sets the number of kills (default 50).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import xxhash
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.store import files
from s3cache.store.cache import INDEX_FILE
from s3cache.store.index import unsigned64
from tests.cached_proxy import BLOCK, Cached, running_cache

pytestmark = pytest.mark.faults

CACHE_SIZE = 2 * 1024 * 1024
KILLS = int(os.environ.get("S3CACHE_CRASH_KILLS", "50"))
READERS = 4
# Per-connection bandwidth of the upstream link while readers run: slow enough that a
# block takes tens of milliseconds to land, so kills often catch one half written.
CHAOS_BANDWIDTH = 24 * 1024 * 1024
KILL_AFTER = (0.02, 0.4)  # seconds of reader traffic before a kill
SWEEP_WAIT = 10.0  # seconds allowed for the orphan sweep after a restart

# Sizes: empty, under one block, exactly one block, one byte over, several blocks,
# several blocks and a bit, just under a block multiple. About 5 MiB in all: more than
# twice the cache, so that readers keep evicting.
SIZES = {
    "empty": 0,
    "one-byte": 1,
    "small": 1000,
    "sub-block": 100_000,
    "one-block": BLOCK,
    "block-and-one": BLOCK + 1,
    "three-blocks": 3 * BLOCK,
    "three-and-a-bit": 3 * BLOCK + 4321,
    "almost-five": 5 * BLOCK - 1,
    "six-and-change": 6 * BLOCK + 777,
    "dir/nested key": 2 * BLOCK + 99,
}


@dataclass
class Obj:
    key: str
    body: bytes
    etag: str = ""
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.body).hexdigest()


@dataclass
class CrashState:
    """What the index and the files held after one kill."""

    entries: int = 0
    recorded_blocks: int = 0
    recorded_bytes: int = 0
    rows_without_file: int = 0
    files_missing: set[str] = field(default_factory=set)  # names of those rows' files
    unrecorded_written_blocks: int = 0  # bytes written, block not (yet) recorded
    partial_blocks: int = 0  # of those, visibly cut off mid-block
    orphans: dict[Path, tuple[int, int]] = field(default_factory=dict)  # -> (ino, mtime_ns)


@dataclass
class Tally:
    reads: Counter[str] = field(default_factory=Counter)
    interrupted: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, counter: Counter[str], name: str) -> None:
        with self.lock:
            counter[name] += 1


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("S3CACHE_CRASH_SEED", str(random.SystemRandom().randrange(10**9))))
    print(f"test_crash seed: S3CACHE_CRASH_SEED={value}")
    return value


@pytest.fixture
def client(cached: Cached, upstream: SeaweedS3) -> Iterator[Any]:
    """A client of s3cache that never retries (a retry would hide a failure)."""
    client = boto3.session.Session(
        aws_access_key_id=upstream.access_key,
        aws_secret_access_key=upstream.secret_key,
        region_name=upstream.region,
    ).client(
        "s3",
        endpoint_url=cached.proxy.endpoint_url,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            max_pool_connections=2 * READERS,
            connect_timeout=5,
            read_timeout=20,
        ),
    )
    yield client
    client.close()


@pytest.fixture
def cached(tmp_path: Path, upstream: SeaweedS3) -> Iterator[Cached]:
    with running_cache(
        tmp_path,
        upstream,
        "--upstream-retry-backoff",
        "10ms",
        "--log-level",
        "warning",
        "--access-log",
        "off",
        # Evicting in batches of a tenth of the cache (not the default's 1%) keeps fills
        # going all through the run: the kills must land mid-fill.
        "--cache-high-watermark",
        "0.9",
        "--cache-low-watermark",
        "0.8",
        cache_size=str(CACHE_SIZE),
    ) as cached:
        yield cached


def test_sigkill_during_fills_and_evictions(
    cached: Cached, client: Any, bucket: str, seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    started = time.monotonic()
    objects = {}
    for key, size in SIZES.items():
        obj = Obj(key, rng.randbytes(size))
        obj.etag = cached.direct.put_object(Bucket=bucket, Key=key, Body=obj.body)["ETag"]
        objects[key] = obj
    cache_dir = tmp_path / "cache"
    proxy = cached.proxy
    tally = Tally()
    states: list[CrashState] = []
    orphans: dict[Path, tuple[int, int]] = {}
    phases: dict[str, float] = defaultdict(float)

    def timed(name: str) -> contextlib.AbstractContextManager[None]:
        return phase(phases, name)

    for kill in range(KILLS):
        where = f"seed {seed}, after kill {kill}"
        with timed("verify"):
            check_healthy(cached, where)
            verify_all(cached, client, bucket, objects, where)
        with timed("usage"):
            check_usage_matches_index(cached, cache_dir, where)
        with timed("sweep"):
            check_orphans_swept(orphans, where)
        with timed("readers"):
            run_readers_then_kill(cached, client, bucket, objects, rng, tally, where)
        with timed("crash-state"):
            state = check_crash_state(
                cache_dir, bucket, objects, orphans, f"seed {seed}, kill {kill + 1}"
            )
        states.append(state)
        orphans = state.orphans
        with timed("restart"):
            proxy.start()
        check_restart_counts(cached, state, where)
    where = f"seed {seed}, after kill {KILLS}"
    check_healthy(cached, where)
    verify_all(cached, client, bucket, objects, where)
    check_usage_matches_index(cached, cache_dir, where)
    check_orphans_swept(orphans, where)

    assert not tally.wrong, f"seed {seed}: wrong bytes served: {tally.wrong[:5]}"
    log = proxy.log_path.read_text(errors="replace").splitlines()
    damaged = [line for line in log if "does not match its hash" in line or "is damaged" in line]
    # Only crashes here, no disk damage: no recorded block may ever fail its hash.
    assert damaged == [], f"seed {seed}: blocks found damaged: {damaged[:5]}"
    # A row a crash left without its file (and without blocks) is filled again, not
    # left unable to cache its object.
    missing = set().union(*(s.files_missing for s in states))
    unfillable = [
        line
        for line in log
        if "cannot open cache file" in line and any(name in line for name in missing)
    ]
    assert unfillable == [], f"seed {seed}: fills failing after a crash: {unfillable[:5]}"
    unexpected = [line for line in log if "Traceback" in line or "exception" in line.lower()]
    assert unexpected == [], f"seed {seed}: {unexpected[:5]}"
    print(
        f"seed {seed}: {KILLS} kills in {time.monotonic() - started:.1f}s; "
        f"reads {dict(tally.reads)}, interrupted by the kill {dict(tally.interrupted)}; "
        f"crash states: {summary(states)}; seconds by phase: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
    )
    # The kills did land where they should: mid-fill (blocks written, not recorded,
    # some cut mid-block), and the cache was evicting.
    assert sum(s.unrecorded_written_blocks for s in states) > 0, f"seed {seed}"
    assert cached.stats()["evictions"] > 0 or any(s.orphans for s in states), f"seed {seed}"


# --- the phases of a round ---------------------------------------------------------------


def check_healthy(cached: Cached, where: str) -> None:
    base = cached.proxy.endpoint_url
    with urllib.request.urlopen(f"{base}/_s3cache/healthz", timeout=5) as answer:
        assert answer.status == 200, where
    try:
        with urllib.request.urlopen(f"{base}/_s3cache/readyz", timeout=10) as answer:
            assert answer.status == 200, where
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{where}: not ready: {exc.read()!r}") from exc


def verify_all(
    cached: Cached, client: Any, bucket: str, objects: dict[str, Obj], where: str
) -> None:
    """Every object through s3cache, byte for byte (sha256), and its HEAD. (The
    readers also read ranges.)"""
    cached.relay.bandwidth = None

    def verify(obj: Obj) -> None:
        data = client.get_object(Bucket=bucket, Key=obj.key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == obj.sha256, f"{where}: {obj.key} differs"
        head = client.head_object(Bucket=bucket, Key=obj.key)
        assert head["ContentLength"] == len(obj.body), f"{where}: HEAD {obj.key}"
        assert head["ETag"] == obj.etag, f"{where}: HEAD {obj.key}"

    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(verify, objects.values()))
    cached.settle()


def check_usage_matches_index(cached: Cached, cache_dir: Path, where: str) -> None:
    """Once quiet, the usage s3cache counts is what the index records, within capacity."""
    deadline = time.monotonic() + 5
    while True:
        stats = cached.stats()
        with read_only_index(cache_dir) as db:
            (recorded,) = db.execute(
                "SELECT COALESCE(SUM(present_bytes), 0) FROM entries"
            ).fetchone()
        if stats["used_bytes"] == recorded or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["used_bytes"] == recorded, (
        f"{where}: s3cache counts {stats['used_bytes']} bytes used, the index records {recorded}"
    )
    assert 0 <= recorded <= CACHE_SIZE, f"{where}: {recorded} bytes recorded"


def check_orphans_swept(orphans: dict[Path, tuple[int, int]], where: str) -> None:
    """Files a crash left without a row are gone soon after the restart (or were
    re-created by a new entry of the same object version: then they changed)."""
    deadline = time.monotonic() + SWEEP_WAIT
    while True:
        left = [path for path, identity in orphans.items() if file_identity(path) == identity]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"{where}: orphan files not swept after the restart: {left}"


def run_readers_then_kill(
    cached: Cached,
    client: Any,
    bucket: str,
    objects: dict[str, Obj],
    rng: random.Random,
    tally: Tally,
    where: str,
) -> None:
    """Readers in threads (cold reads fill, fills evict); SIGKILL at a random moment,
    while they run. Their errors after the kill are expected; a wrong byte never is."""
    cached.relay.bandwidth = CHAOS_BANDWIDTH
    stop = threading.Event()
    alive = threading.Event()
    alive.set()
    seeds = [rng.randrange(2**32) for _ in range(READERS)]

    def reader(reader_seed: int) -> None:
        mine = random.Random(reader_seed)
        keys = sorted(objects)
        for _ in range(10_000):  # bounded; the kill ends it much sooner
            if stop.is_set():
                return
            obj = objects[mine.choice(keys)]
            kind = mine.choice(["get", "get", "range" if obj.body else "get", "head"])
            try:
                read_one(client, bucket, obj, kind, mine, tally, where)
            except ClientError as exc:
                # A whole S3 error answer comes from a live process: never expected.
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                with tally.lock:
                    tally.wrong.append(f"{where}: {kind} {obj.key}: error {status}: {exc}")
            except (BotoCoreError, OSError) as exc:
                if alive.is_set():
                    with tally.lock:
                        tally.wrong.append(
                            f"{where}: {kind} {obj.key} failed before the kill: {exc!r}"
                        )
                    return
                tally.add(tally.interrupted, type(exc).__name__)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in seeds]
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(*KILL_AFTER))
    alive.clear()  # errors from now on may be the kill's
    cached.proxy.send_signal(signal.SIGKILL)
    assert cached.proxy.wait(10) == -signal.SIGKILL, where
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), f"{where}: a reader hangs after the kill"


def read_one(
    client: Any,
    bucket: str,
    obj: Obj,
    kind: str,
    rng: random.Random,
    tally: Tally,
    where: str,
) -> None:
    if kind == "head":
        head = client.head_object(Bucket=bucket, Key=obj.key)
        ok = head["ContentLength"] == len(obj.body) and head["ETag"] == obj.etag
    elif kind == "range":
        first = rng.randrange(len(obj.body))
        last = rng.randrange(first, len(obj.body))
        data = client.get_object(Bucket=bucket, Key=obj.key, Range=f"bytes={first}-{last}")[
            "Body"
        ].read()
        ok = data == obj.body[first : last + 1]
    else:
        data = client.get_object(Bucket=bucket, Key=obj.key)["Body"].read()
        ok = hashlib.sha256(data).hexdigest() == obj.sha256
    tally.add(tally.reads, kind)
    if not ok:
        with tally.lock:
            tally.wrong.append(f"{where}: {kind} of {obj.key} returned wrong bytes")


def check_crash_state(
    cache_dir: Path,
    bucket: str,
    objects: dict[str, Obj],
    earlier_orphans: dict[Path, tuple[int, int]],
    where: str,
) -> CrashState:
    """The index and the files as the kill left them (the process is dead).
    ``earlier_orphans``: those the previous kill left, for the diagnosis."""
    state = CrashState()
    with read_only_index(cache_dir) as db:
        entries = db.execute(
            "SELECT id, bucket, key, etag, size, dir, file, block_size, present_bytes FROM entries"
        ).fetchall()
        blocks: dict[int, dict[int, int]] = {}
        for entry_id, block, xxh3 in db.execute("SELECT entry_id, block, xxh3 FROM blocks"):
            blocks.setdefault(entry_id, {})[block] = unsigned64(xxh3)
    ids = {row[0] for row in entries}
    assert set(blocks) <= ids, f"{where}: block rows of no entry: {set(blocks) - ids}"
    claimed = set()
    for entry_id, row_bucket, key, etag, size, directory, name, block_size, present in entries:
        state.entries += 1
        label = f"{where}: entry {entry_id} ({key!r})"
        assert row_bucket == bucket and key in objects, label
        obj = objects[key]
        assert (etag, size) == (obj.etag, len(obj.body)), f"{label}: wrong version recorded"
        assert (directory, block_size) == (0, BLOCK), label
        assert re.fullmatch("[0-9a-f]{32}", name), f"{label}: file {name!r}"  # a hash
        claimed.add(name)
        mine = blocks.get(entry_id, {})
        lengths = {b: min(BLOCK, size - b * BLOCK) for b in mine}
        assert all(b >= 0 and lengths[b] > 0 for b in mine), f"{label}: blocks {sorted(mine)}"
        assert present == sum(lengths.values()), f"{label}: present_bytes {present} != blocks"
        state.recorded_blocks += len(mine)
        state.recorded_bytes += present
        path = files.file_path(cache_dir, name)
        if not path.exists():
            # A crash between the row's commit and the file's creation: allowed, as
            # long as no block is recorded.
            assert not mine, f"{label}: {len(mine)} blocks recorded, no file" + (
                " (an orphan of the same name was left by the previous kill)"
            ) * (path in earlier_orphans)
            state.rows_without_file += 1
            state.files_missing.add(name)
            continue
        content = path.read_bytes()
        for block in range(-(-size // BLOCK)):
            start = block * BLOCK
            expected = obj.body[start : start + BLOCK]
            stored = content[start : start + len(expected)]
            if block in mine:
                # Never a partially written (or otherwise wrong) block recorded.
                assert stored == expected, f"{label}: recorded block {block} is not the object's"
                assert xxhash.xxh3_64_intdigest(stored) == mine[block], (
                    f"{label}: block {block} does not match its recorded hash"
                )
            elif stored.strip(b"\0"):
                state.unrecorded_written_blocks += 1
                if not stored[-64:].strip(b"\0"):
                    state.partial_blocks += 1
    assert state.recorded_bytes <= CACHE_SIZE, f"{where}: {state.recorded_bytes} bytes recorded"
    data = cache_dir / files.DATA_DIR
    for sub in data.iterdir():
        if not sub.is_dir():
            continue
        for path in sub.iterdir():
            if path.name not in claimed:
                identity = file_identity(path)
                if identity is not None:
                    state.orphans[path] = identity
    return state


def check_restart_counts(cached: Cached, state: CrashState, where: str) -> None:
    """Start-up takes its usage and entry count from the index."""
    stats = cached.stats()
    if state.recorded_bytes <= 0.9 * CACHE_SIZE:  # else eviction may already run
        assert stats["used_bytes"] == state.recorded_bytes, f"{where}: {stats}"
        assert stats["entries"] == state.entries, f"{where}: {stats}"


# --- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_index(cache_dir: Path) -> Iterator[sqlite3.Connection]:
    """The index, opened read-only (path and tables: ``store.cache``, ``store.index``)."""
    db = sqlite3.connect(f"file:{cache_dir / INDEX_FILE}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def phase(phases: dict[str, float], name: str) -> Iterator[None]:
    began = time.monotonic()
    try:
        yield
    finally:
        phases[name] += time.monotonic() - began


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def summary(states: list[CrashState]) -> str:
    return (
        f"entries {sum(s.entries for s in states)}, "
        f"recorded blocks {sum(s.recorded_blocks for s in states)}, "
        f"written-not-recorded blocks {sum(s.unrecorded_written_blocks for s in states)} "
        f"(cut mid-block {sum(s.partial_blocks for s in states)}), "
        f"rows without file {sum(s.rows_without_file for s in states)}, "
        f"orphan files {sum(len(s.orphans) for s in states)} "
        f"(kills leaving some {sum(1 for s in states if s.orphans)})"
    )
