"""Prefetch: sequential read-ahead, warm jobs, epoch manifests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from s3cache.epoch import submit_epoch
from s3cache.prefetch import Manifest
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, Cached, get, put, running_cache


def s3cache_cli(cached: Cached, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3cache", *args, "--endpoint", cached.proxy.endpoint_url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sequential_ranged_reads_earn_read_ahead(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream) as cached:
        body = put(cached, bucket, "seq", 24 * BLOCK)
        for block in range(24):  # one block per request, in order, like a streaming reader
            start = block * BLOCK
            part = get(cached.client, bucket, "seq", Range=f"bytes={start}-{start + BLOCK - 1}")
            assert part == body[start : start + BLOCK]
            time.sleep(0.02)
        cached.settle()
        stats = cached.stats()
        assert stats["prefetch"]["bytes"] > 0
        assert stats["prefetch"]["useful_bytes"] > 8 * BLOCK
        assert stats["reads"]["hit"] >= 8  # blocks were there before the reader asked
        blocks = [first // BLOCK for first, _ in cached.fetched_ranges()]
        assert sorted(blocks) == list(range(24))  # each block fetched once


def test_random_reads_get_no_read_ahead(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream) as cached:
        body = put(cached, bucket, "rnd", 24 * BLOCK)
        order = [17, 3, 11, 20, 6, 0, 14, 9]
        for block in order:
            start = block * BLOCK
            assert (
                get(cached.client, bucket, "rnd", Range=f"bytes={start}-{start + 99}")
                == (body[start : start + 100])
            )
        blocks = [first // BLOCK for first, _ in cached.fetched_ranges()]
        assert sorted(blocks) == sorted(order)
        assert cached.stats()["prefetch"]["bytes"] == 0


def test_warm_job_then_reads_are_hits(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream) as cached:
        bodies = {
            f"train/{i:02d}": put(cached, bucket, f"train/{i:02d}", i * 50_000 + BLOCK)
            for i in range(8)
        }
        put(cached, bucket, "other/x", 1000)
        result = s3cache_cli(cached, "warm", f"s3://{bucket}/train/")
        assert result.returncode == 0, result.stderr
        assert "done: 8/8 objects" in result.stdout
        assert "ETA" in result.stderr  # the progress line
        cached.settle()
        cached.relay.reset()
        for key, body in bodies.items():
            assert get(cached.client, bucket, key) == body
        assert cached.relay.records() == []  # all in the cache already
        listed = s3cache_cli(cached, "jobs")
        assert f"s3://{bucket}/train/" in listed.stdout
        assert "done" in listed.stdout


def test_warm_from_file(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream) as cached:
        keys = [f"k{i}" for i in range(3)]
        for key in keys:
            put(cached, bucket, key, BLOCK + 5)
        listing = tmp_path / "keys.txt"
        listing.write_text("\n".join(keys) + "\n")
        result = s3cache_cli(cached, "warm", "--from-file", str(listing), "--bucket", bucket)
        assert result.returncode == 0, result.stderr
        assert "done: 3/3 objects" in result.stdout


def test_warm_job_larger_than_the_cache_stops_and_says_so(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, cache_size="2MiB") as cached:
        for i in range(10):
            put(cached, bucket, f"big/{i}", 2 * BLOCK)  # 5 MiB in all
        result = s3cache_cli(cached, "warm", f"s3://{bucket}/big/")
        assert result.returncode == 1
        assert "stopped" in result.stdout
        assert "more than the cache can hold" in result.stdout
        cached.settle()
        assert cached.stats()["evictions"] == 0  # it never evicted its own data


def test_cancel_a_warm_job(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream) as cached:
        for i in range(6):
            put(cached, bucket, f"slow/{i}", 4 * BLOCK)
        cached.relay.bandwidth = 200_000
        started = s3cache_cli(cached, "warm", f"s3://{bucket}/slow/", "--no-wait")
        job_id = started.stdout.strip()
        cancelled = s3cache_cli(cached, "jobs", "--cancel", job_id)
        assert cancelled.returncode == 0
        assert "cancelled" in cancelled.stdout
        cached.relay.bandwidth = None


def test_epoch_manifest_beats_lru_when_the_dataset_is_twice_the_cache(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """12 objects of 512 KiB, a 3 MiB cache: reading them in the same order every epoch,
    LRU always evicts the object needed next (no hits); with the epoch's order given,
    s3cache prefetches ahead and keeps what is needed soonest."""
    keys = [f"ds/{i:02d}" for i in range(12)]

    def epoch(cached: Cached) -> float:
        before = cached.stats()["reads"]
        for key in keys:
            get(cached.client, bucket, key)
            time.sleep(0.05)  # the training step
        after = cached.stats()["reads"]
        hits = after["hit"] - before["hit"]
        total = sum(after.values()) - sum(before.values())
        return float(hits / total)

    with running_cache(tmp_path / "lru", upstream, cache_size="3MiB") as cached:
        for key in keys:
            put(cached, bucket, key, 2 * BLOCK)
        epoch(cached)
        lru = epoch(cached)
    with running_cache(
        tmp_path / "manifest",
        upstream,
        cache_size="3MiB",
    ) as cached:
        submit_epoch(cached.proxy.endpoint_url, bucket, keys)
        submit_epoch(cached.proxy.endpoint_url, bucket, keys, append=True)  # the next one
        epoch(cached)
        with_manifest = epoch(cached)
        stats = cached.stats()
    assert lru < 0.2
    assert with_manifest >= 0.6, (
        with_manifest,
        json.dumps(stats["reads"]),
        json.dumps(stats["prefetch"]),
    )


def test_a_late_read_does_not_move_the_manifest_into_the_next_epoch() -> None:
    """Readers in parallel deliver reads slightly out of order: a late read of item i
    belongs to this epoch, not to the same key in the appended next epoch."""
    this = [f"k{i}" for i in range(10)]
    following = ["k7", "k2", "k9", "k0", "k5", "k1", "k8", "k3", "k6", "k4"]
    manifest = Manifest("b", [(k, None) for k in this])
    manifest.extend([(k, None) for k in following])
    for key in ("k0", "k2", "k1"):
        manifest.observe(key)
    assert manifest.position == 2
    assert [manifest.next_use(k) for k in ("k3", "k4", "k5")] == [1, 2, 3]
    assert manifest.next_use("k1") == 13
    for key in ("k3", "k4", "k5", "k6", "k7", "k8", "k9", "k7"):
        manifest.observe(key)
    assert manifest.position == 10


def _other_bucket(cached: Cached, bucket: str, suffix: str) -> str:
    name = f"{bucket}-{suffix}"
    cached.direct.create_bucket(Bucket=name)
    return name


def _drop_bucket(cached: Cached, name: str) -> None:
    for page in cached.direct.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            cached.direct.delete_object(Bucket=name, Key=item["Key"])
    cached.direct.delete_bucket(Bucket=name)


def test_manifests_share_one_lead(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    """Two epoch manifests, nothing read yet: they share one lead (by default twice the
    fetches prefetch_concurrency holds: 4 objects of one block here), not a lead each.
    The first, alone when it came, takes all of it; the second half of it."""
    with running_cache(tmp_path, upstream, "--prefetch-concurrency", "2") as cached:
        other = _other_bucket(cached, bucket, "second")
        try:
            keys = [f"k{n:02d}" for n in range(20)]
            for name in (bucket, other):
                for key in keys:
                    put(cached, name, key, BLOCK)
            for name in (bucket, other):
                submit_epoch(cached.proxy.endpoint_url, name, keys)
            time.sleep(1.0)
            cached.settle()
            fetched = {(r.path.split("/")[1], r.path.split("/")[2]) for r in cached.gets()}
            per_bucket = {name: {k for b, k in fetched if b == name} for name in (bucket, other)}
        finally:
            _drop_bucket(cached, other)
    assert per_bucket[bucket] | per_bucket[other], fetched  # prefetch ran
    assert per_bucket[bucket] <= {"k00", "k01", "k02", "k03"}, sorted(fetched)  # alone: all
    assert per_bucket[other] <= {"k00", "k01"}, sorted(fetched)  # then half each


def _wait_for_eviction(cached: Cached, below: int) -> None:
    cached.settle()
    deadline = time.monotonic() + 10
    while cached.stats()["used_bytes"] > below and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the round that started also finishes


def test_with_a_manifest_what_nobody_needs_is_evicted_first(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """A 64-block cache (watermarks 0.9 / 0.8: 58 blocks start an eviction down to 51),
    a manifest of 48 objects (the next epoch the same, so all stay needed) and objects
    of another bucket in no manifest. When eviction must take more than the main FIFO
    holds that nobody needs (scan objects read again, from S3-FIFO's ghost), the scan
    objects in the small FIFO go too, even within its 10% share, before anything the
    manifest needs: the next epoch is all hits."""
    watermarks = ("--cache-high-watermark", "0.9", "--cache-low-watermark", "0.8")
    with running_cache(tmp_path, upstream, *watermarks, cache_size=f"{64 * BLOCK}") as cached:
        scan = _other_bucket(cached, bucket, "scan")
        try:
            keys = [f"m{n:02d}" for n in range(48)]
            for key in keys:
                put(cached, bucket, key, BLOCK)
            for n in range(16):
                put(cached, scan, f"s{n:02d}", BLOCK)
            submit_epoch(cached.proxy.endpoint_url, bucket, keys)
            submit_epoch(cached.proxy.endpoint_url, bucket, keys, append=True)
            for key in keys:
                get(cached.client, bucket, key)
            for n in range(10):  # the 58th block: s0..s6 go (to the ghost), s7..s9 stay
                get(cached.client, scan, f"s{n:02d}")
            _wait_for_eviction(cached, 52 * BLOCK)
            assert cached.stats()["evictions"] == 7
            get(cached.client, scan, "s00")  # back from the ghost: to the main FIFO
            for n in range(10, 13):  # 6 scan objects in the small FIFO: within its share
                get(cached.client, scan, f"s{n:02d}")
            for n in (1, 2, 3):  # 58 blocks again, the main FIFO holds 4 nobody needs
                get(cached.client, scan, f"s{n:02d}")
            _wait_for_eviction(cached, 52 * BLOCK)
            assert cached.stats()["evictions"] == 14
            cached.relay.reset()
            for key in keys:  # the next epoch
                get(cached.client, bucket, key)
            cached.settle()
            missed = sorted(r.path for r in cached.gets())
        finally:
            _drop_bucket(cached, scan)
    assert missed == []


def test_the_manifest_read_slower_loses_its_entries_first_at_equal_items_ahead(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """Belady in time, not in items: two manifests of 28 objects (the next epoch the
    same, so all stay needed), both read up to item 12, one in a burst, the other over
    6 s. A 64-block cache (watermarks 0.9 / 0.8) holding both, two objects in no
    manifest start an eviction down to 51 blocks: they go, then 5 entries the manifests
    need. The items ahead are the same in both (the same positions), so the slow one's
    are needed later: its 5 furthest go, none of the fast one's (the fast one's entries
    are the older, the ones a tie would take)."""
    watermarks = ("--cache-high-watermark", "0.9", "--cache-low-watermark", "0.8")
    with running_cache(tmp_path, upstream, *watermarks, cache_size=f"{64 * BLOCK}") as cached:
        fast = _other_bucket(cached, bucket, "fast")
        slow = _other_bucket(cached, bucket, "slow")
        other = _other_bucket(cached, bucket, "other")
        try:
            keys = [f"k{n:02d}" for n in range(28)]
            for name in (fast, slow):
                for key in keys:
                    put(cached, name, key, BLOCK)
            for key in ("x0", "x1"):
                put(cached, other, key, BLOCK)
            for name in (fast, slow):  # 56 blocks, no eviction; the fast one's first
                for key in keys:
                    get(cached.client, name, key)
            for name in (fast, slow):
                submit_epoch(cached.proxy.endpoint_url, name, keys)
                submit_epoch(cached.proxy.endpoint_url, name, keys, append=True)
            for key in keys[:12]:  # 2 items a second
                get(cached.client, slow, key)
                time.sleep(0.5)
            for key in keys[:12]:  # at once
                get(cached.client, fast, key)
            for key in ("x0", "x1"):  # 58 blocks: evict down to 51
                get(cached.client, other, key)
            _wait_for_eviction(cached, 52 * BLOCK)
            evictions = cached.stats()["evictions"]
            cached.relay.reset()
            for key in keys:
                get(cached.client, fast, key)
            cached.settle()
            missed = sorted(r.path for r in cached.gets())
        finally:
            for name in (fast, slow, other):
                _drop_bucket(cached, name)
    assert evictions == 7
    assert missed == []  # the 5 needed entries evicted were the slow manifest's
