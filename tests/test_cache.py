"""The read-through cache, tested against the real upstream with a counting relay in
between: what s3cache asks of the upstream is counted on the upstream's side."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.store.entry import Entry, ObjectMeta, stale
from tests.cached_proxy import BLOCK, Cached, get, put, running_cache


@pytest.fixture
def cached(tmp_path: Path, upstream: SeaweedS3) -> Iterator[Cached]:
    with running_cache(tmp_path, upstream) as cached:
        yield cached


def test_miss_then_hit_without_upstream_requests(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "obj", 5 * BLOCK + 123)
    assert get(cached.client, bucket, "obj") == body
    assert cached.relay.count("GET") > 0
    cached.relay.reset()
    for _ in range(3):
        assert get(cached.client, bucket, "obj") == body
        head = cached.client.head_object(Bucket=bucket, Key="obj")
        assert head["ContentLength"] == len(body)
    assert cached.relay.records() == []
    reads = cached.stats()["reads"]
    assert reads["hit"] >= 6
    assert reads["miss"] >= 1


def test_each_block_fetched_once_and_in_parallel(cached: Cached, bucket: str) -> None:
    size = 10 * BLOCK + 7
    body = put(cached, bucket, "big", size)
    assert get(cached.client, bucket, "big") == body
    ranges = cached.fetched_ranges()
    # Aligned blocks, each exactly once, covering the object.
    assert ranges == [(b * BLOCK, min((b + 1) * BLOCK, size) - 1) for b in range(11)]
    assert cached.relay.bytes_sent() == size
    for record in cached.gets()[1:]:
        assert (
            record.headers["if-match"]
            == cached.direct.head_object(Bucket=bucket, Key="big")["ETag"]
        )
    # Fetches overlapped in time: several upstream GETs were in flight at once.
    records = cached.gets()
    overlaps = max(
        sum(1 for other in records if other.started < r.finished and other.finished > r.started)
        for r in records
    )
    assert overlaps >= 2


def test_range_fetches_only_the_blocks_it_touches(cached: Cached, bucket: str) -> None:
    size = 8 * BLOCK
    body = put(cached, bucket, "ranged", size)
    start, end = BLOCK + 1000, 2 * BLOCK + 10  # touches blocks 1 and 2
    part = get(cached.client, bucket, "ranged", Range=f"bytes={start}-{end}")
    assert part == body[start : end + 1]
    assert cached.fetched_ranges() == [(BLOCK, 2 * BLOCK - 1), (2 * BLOCK, 3 * BLOCK - 1)]
    cached.relay.reset()
    # Overlapping range, backwards (no read-ahead): block 1 is present, 0 is fetched.
    part = get(cached.client, bucket, "ranged", Range=f"bytes={BLOCK // 2}-{BLOCK + 100}")
    assert part == body[BLOCK // 2 : BLOCK + 101]
    assert cached.fetched_ranges() == [(0, BLOCK - 1)]
    cached.relay.reset()
    assert get(cached.client, bucket, "ranged") == body
    fetched = cached.fetched_ranges()
    assert [r[0] // BLOCK for r in fetched] == [3, 4, 5, 6, 7]
    cached.relay.reset()
    suffix = get(cached.client, bucket, "ranged", Range="bytes=-100")
    assert suffix == body[-100:]
    assert cached.relay.records() == []


def test_concurrent_readers_of_a_cold_object_cost_one_fetch_per_block(
    cached: Cached, bucket: str
) -> None:
    size = 12 * BLOCK + 99
    body = put(cached, bucket, "hot", size)
    cached.relay.bandwidth = 8 * 1024 * 1024  # slow enough that the readers overlap
    barrier = threading.Barrier(24)

    def read(index: int) -> bytes:
        barrier.wait()
        if index % 3 == 0:
            return get(cached.client, bucket, "hot", Range=f"bytes={index * 1000}-{size - 1}")
        return get(cached.client, bucket, "hot")

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(read, range(24)))
    for index, data in enumerate(results):
        assert data == (body[index * 1000 :] if index % 3 == 0 else body)
    ranges = cached.fetched_ranges()
    blocks = [first // BLOCK for first, _ in ranges]
    assert sorted(blocks) == list(range(13)), ranges  # one fetch per block, no more
    assert cached.relay.bytes_sent() == size


def test_headers_match_the_upstream(cached: Cached, bucket: str) -> None:
    extra = {
        "ContentType": "application/x-tar",
        "CacheControl": "max-age=3600",
        "ContentDisposition": 'attachment; filename="shard.tar"',
        "ContentEncoding": "identity",
        "ContentLanguage": "en",
        "Metadata": {"split": "train", "index": "7"},
    }
    put(cached, bucket, "hdr", 3 * BLOCK, **extra)
    for request in ({}, {"Range": "bytes=10-99"}, {"Range": f"bytes={BLOCK}-"}):
        direct = cached.direct.get_object(Bucket=bucket, Key="hdr", **request)
        direct_body = direct["Body"].read()
        for attempt in range(2):  # miss, then hit
            proxied = cached.client.get_object(Bucket=bucket, Key="hdr", **request)
            assert proxied["Body"].read() == direct_body
            for field in (
                "ETag",
                "ContentLength",
                "ContentType",
                "LastModified",
                "ContentRange",
                "CacheControl",
                "ContentDisposition",
                "ContentEncoding",
                "ContentLanguage",
                "Metadata",
                "AcceptRanges",
            ):
                assert proxied.get(field) == direct.get(field), (field, request, attempt)
            status = proxied["ResponseMetadata"]["HTTPStatusCode"]
            assert status == direct["ResponseMetadata"]["HTTPStatusCode"]
    head = cached.client.head_object(Bucket=bucket, Key="hdr")
    direct_head = cached.direct.head_object(Bucket=bucket, Key="hdr")
    for field in ("ETag", "ContentLength", "ContentType", "LastModified", "Metadata"):
        assert head.get(field) == direct_head.get(field)


def test_ranges_and_overrides_from_the_cache(cached: Cached, bucket: str) -> None:
    size = 2 * BLOCK + 10
    body = put(cached, bucket, "r", size)
    get(cached.client, bucket, "r")
    cached.relay.reset()
    cases = {
        "bytes=0-0": body[:1],
        "bytes=5-": body[5:],
        "bytes=-7": body[-7:],
        f"bytes=100-{size + 1000}": body[100:],
    }
    for spec, expected in cases.items():
        assert get(cached.client, bucket, "r", Range=spec) == expected
    with pytest.raises(ClientError) as excinfo:
        get(cached.client, bucket, "r", Range=f"bytes={size}-")
    error = excinfo.value.response
    assert error["Error"]["Code"] == "InvalidRange"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 416
    assert error["ResponseMetadata"]["HTTPHeaders"]["content-range"] == f"bytes */{size}"
    overridden = cached.client.get_object(
        Bucket=bucket,
        Key="r",
        ResponseContentType="text/x-override",
        ResponseContentDisposition="inline",
    )
    overridden["Body"].read()
    assert overridden["ContentType"] == "text/x-override"
    assert overridden["ContentDisposition"] == "inline"
    assert cached.relay.records() == []


def test_conditionals_answered_from_the_cache(cached: Cached, bucket: str) -> None:
    put(cached, bucket, "c", 1000)
    etag = cached.client.head_object(Bucket=bucket, Key="c")["ETag"]
    modified = cached.client.head_object(Bucket=bucket, Key="c")["LastModified"]
    get(cached.client, bucket, "c")
    cached.relay.reset()
    import datetime

    before = modified - datetime.timedelta(days=1)
    # A date in the future is ignored (RFC 9110 §13.1.3), as S3 does: compare with the
    # object's own Last-Modified instead.
    after = modified

    def status(**conditions: Any) -> int:
        try:
            response = cached.client.get_object(Bucket=bucket, Key="c", **conditions)
            response["Body"].read()
            return int(response["ResponseMetadata"]["HTTPStatusCode"])
        except ClientError as exc:
            return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])

    assert status(IfMatch=etag) == 200
    assert status(IfMatch='"nope"') == 412
    assert status(IfNoneMatch=etag) == 304
    assert status(IfNoneMatch='"nope"') == 200
    assert status(IfModifiedSince=after) == 304
    assert status(IfModifiedSince=before) == 200
    assert status(IfUnmodifiedSince=before) == 412
    assert status(IfUnmodifiedSince=after) == 200
    # S3 precedence: If-Match true wins over If-Unmodified-Since false ...
    assert status(IfMatch=etag, IfUnmodifiedSince=before) == 200
    # ... and If-None-Match false (no match) wins over If-Modified-Since false.
    assert status(IfNoneMatch='"nope"', IfModifiedSince=after) == 200
    assert cached.relay.records() == []


def test_reads_the_cache_cannot_answer_are_forwarded(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "fwd", 1000)
    get(cached.client, bucket, "fwd")
    cached.relay.reset()
    assert get(cached.client, bucket, "fwd", PartNumber=1) == body
    assert cached.relay.count("GET") == 1
    assert "partNumber=1" in cached.relay.records()[0].target
    tags = cached.client.get_object_tagging(Bucket=bucket, Key="fwd")
    assert "TagSet" in tags
    assert cached.relay.count("GET") == 2


def test_writes_through_s3cache_invalidate_at_once(cached: Cached, bucket: str) -> None:
    client = cached.client
    client.put_object(Bucket=bucket, Key="w", Body=b"version one")
    assert get(client, bucket, "w") == b"version one"
    client.put_object(Bucket=bucket, Key="w", Body=b"version two")
    assert get(client, bucket, "w") == b"version two"
    client.put_object(Bucket=bucket, Key="other", Body=b"copied over")
    client.copy_object(Bucket=bucket, Key="w", CopySource={"Bucket": bucket, "Key": "other"})
    assert get(client, bucket, "w") == b"copied over"
    upload = client.create_multipart_upload(Bucket=bucket, Key="w")["UploadId"]
    part = client.upload_part(Bucket=bucket, Key="w", UploadId=upload, PartNumber=1, Body=b"mp")
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="w",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert get(client, bucket, "w") == b"mp"
    client.delete_object(Bucket=bucket, Key="w")
    with pytest.raises(ClientError) as excinfo:
        get(client, bucket, "w")
    assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"
    for key in ("a", "b"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert get(client, bucket, key) == key.encode()
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}, {"Key": "b"}]})
    for key in ("a", "b"):
        with pytest.raises(ClientError):
            get(client, bucket, key)


def test_quiet_delete_objects_invalidates(cached: Cached, bucket: str) -> None:
    """A quiet DeleteObjects answer lists no key: the keys come from the request."""
    client = cached.client
    for key in ("q1", "q 2+"):
        client.put_object(Bucket=bucket, Key=key, Body=b"cached")
        assert get(client, bucket, key) == b"cached"
    client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "q1"}, {"Key": "q 2+"}], "Quiet": True}
    )
    for key in ("q1", "q 2+"):
        with pytest.raises(ClientError) as excinfo:
            get(client, bucket, key)
        assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"


def test_overwrite_at_upstream_is_seen_after_ttl(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--cache-ttl", "0s") as cached:
        relay = cached.relay
        put(cached, bucket, "o", 3 * BLOCK)
        get(cached.client, bucket, "o")
        new = os.urandom(2 * BLOCK)
        cached.direct.put_object(Bucket=bucket, Key="o", Body=new)
        assert get(cached.client, bucket, "o") == new
        relay.reset()
        assert get(cached.client, bucket, "o") == new
        # Revalidation is a conditional HEAD answered 304: no body refetched.
        assert [r.method for r in relay.records()] == ["HEAD"]
        assert relay.records()[0].status == 304
        cached.direct.delete_object(Bucket=bucket, Key="o")
        with pytest.raises(ClientError) as excinfo:
            get(cached.client, bucket, "o")
        assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"


def test_overwrite_during_a_read_never_mixes_versions(cached: Cached, bucket: str) -> None:
    size = 16 * BLOCK
    old = put(cached, bucket, "mix", size)
    new = os.urandom(size)
    # Slow enough that the second wave of block fetches starts after the overwrite.
    cached.relay.bandwidth = 256 * 1024
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            outcome["body"] = get(cached.client, bucket, "mix")
        except Exception as exc:  # an aborted response is an acceptable outcome
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    while not cached.stats()["fills_in_flight"]:
        time.sleep(0.01)
    cached.direct.put_object(Bucket=bucket, Key="mix", Body=new)
    reader.join(60)
    if "body" in outcome:
        assert outcome["body"] in (old, new)  # whole, one version
    cached.relay.bandwidth = None
    with ThreadPoolExecutor(2) as pool:
        later = list(pool.map(lambda _: get(cached.client, bucket, "mix"), range(2)))
    # The old entry was dropped at the 412: later reads see the new version.
    assert later == [new, new]


def test_restart_serves_every_complete_block_without_upstream(cached: Cached, bucket: str) -> None:
    bodies = {f"k{i}": put(cached, bucket, f"k{i}", (i + 1) * BLOCK + i) for i in range(4)}
    for key, body in bodies.items():
        assert get(cached.client, bucket, key) == body
    assert cached.proxy.stop() == 0  # SIGTERM: drained and stopped cleanly
    cached.relay.reset()
    cached.proxy.start()
    for key, body in bodies.items():
        assert get(cached.client, bucket, key) == body
        cached.client.head_object(Bucket=bucket, Key=key)
    assert cached.relay.records() == []


def test_eviction_keeps_usage_under_the_size(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, cache_size="2MiB") as cached:
        relay = cached.relay
        bodies = {f"e{i}": put(cached, bucket, f"e{i}", 2 * BLOCK) for i in range(12)}
        for key, body in bodies.items():
            assert get(cached.client, bucket, key) == body
            assert cached.stats()["used_bytes"] <= 2 * 1024 * 1024
        disk = sum(
            p.stat().st_blocks * 512
            for p in (tmp_path / "cache" / "data").rglob("*")
            if p.is_file()
        )
        assert disk <= 2 * 1024 * 1024 + BLOCK
        assert cached.stats()["evictions"] > 0
        relay.reset()
        assert get(cached.client, bucket, "e11") == bodies["e11"]  # recent: still cached
        assert relay.records() == []
        assert get(cached.client, bucket, "e0") == bodies["e0"]  # oldest: evicted
        assert relay.count("GET") > 0


def test_object_larger_than_the_cache_is_served_uncached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, cache_size="1MiB") as cached:
        body = put(cached, bucket, "huge", 6 * BLOCK)
        for _ in range(2):
            assert hashlib.sha256(get(cached.client, bucket, "huge")).digest() == (
                hashlib.sha256(body).digest()
            )
        assert cached.stats()["used_bytes"] == 0
        assert cached.stats()["reads"]["bypass"] >= 2


def test_object_the_disk_refuses_is_served_uncached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """The kernel refuses files over 8 MiB (RLIMIT_FSIZE): a 12 MiB object cannot be
    cached, and is served anyway; smaller objects are still cached."""
    with running_cache(tmp_path, upstream, max_file_size=8 * 1024 * 1024) as cached:
        big = put(cached, bucket, "too-big-for-disk", 12 * 1024 * 1024)
        small = put(cached, bucket, "small", 3 * BLOCK)
        for _ in range(2):
            assert get(cached.client, bucket, "too-big-for-disk") == big
            assert get(cached.client, bucket, "small") == small
        assert cached.stats()["used_bytes"] == 3 * BLOCK
        assert "cannot create cache file" in cached.proxy.log_tail(200)


def test_empty_object(cached: Cached, bucket: str) -> None:
    put(cached, bucket, "empty", 0)
    assert get(cached.client, bucket, "empty") == b""
    assert get(cached.client, bucket, "empty") == b""
    assert cached.client.head_object(Bucket=bucket, Key="empty")["ContentLength"] == 0


def test_missing_object_is_404_and_not_cached(cached: Cached, bucket: str) -> None:
    for _ in range(2):
        with pytest.raises(ClientError) as excinfo:
            get(cached.client, bucket, f"missing-{uuid.uuid4().hex}")
        assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"


def test_listings_are_cached_briefly_and_invalidated_by_writes(cached: Cached, bucket: str) -> None:
    client = cached.client
    client.put_object(Bucket=bucket, Key="a", Body=b"a")
    cached.relay.reset()
    first = client.list_objects_v2(Bucket=bucket)
    again = client.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in first["Contents"]] == [o["Key"] for o in again["Contents"]] == ["a"]
    assert cached.relay.count("GET") == 1  # the second listing came from memory
    client.list_objects(Bucket=bucket)  # v1 is another query: its own entry
    assert cached.relay.count("GET") == 2
    client.put_object(Bucket=bucket, Key="b", Body=b"b")  # a write drops the bucket's listings
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["a", "b"]


def test_listing_cache_can_be_turned_off(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream, "--list-cache-ttl", "0") as cached:
        for _ in range(3):
            cached.client.list_objects_v2(Bucket=bucket)
        assert cached.relay.count("GET") == 3


def test_staleness_is_one_rule_for_entries_and_for_what_workers_were_told() -> None:
    """``stale`` decides for the primary's entries and a secondary's announced objects
    alike: past the TTL since last validated; never under an infinite TTL (immutable),
    never for a version the upstream has not got yet (validated_at infinite)."""
    now = 1_000_000.0
    assert not stale(now - 10, 10, now)
    assert stale(now - 10.5, 10, now)
    assert stale(now - 0.001, 0, now)
    assert not stale(0, math.inf, now)
    assert not stale(math.inf, 0, now)


def test_one_survey_tells_a_read_what_the_cache_holds_of_its_span() -> None:
    """The one walk over a span's blocks a read makes: the bytes held, the first block
    missing, whether every block held was checked (then the span is sent whole)."""
    meta = ObjectMeta(etag='"e"', size=10 * BLOCK + 5, last_modified="", headers=())
    entry = Entry(
        id=1,
        bucket="b",
        key="k",
        meta=meta,
        dir=0,
        path=Path("unused"),
        block_size=BLOCK,
        blocks={0: 0, 1: 0, 3: 0, 10: 0},
        validated_at=0.0,
        accessed_at=0.0,
    )
    entry.verified = {0, 1, 10}
    whole = entry.survey(0, entry.size)
    assert (whole.present, whole.missing, whole.checked) == (3 * BLOCK + 5, 2, False)
    assert not whole.verified
    first = entry.survey(5, 2 * BLOCK)
    assert (first.present, first.missing, first.verified) == (2 * BLOCK - 5, -1, True)
    tail = entry.survey(10 * BLOCK + 1, 10 * BLOCK + 3)
    assert (tail.present, tail.verified) == (2, True)
    unchecked = entry.survey(3 * BLOCK, 3 * BLOCK + 1)
    assert (unchecked.missing, unchecked.checked, unchecked.verified) == (-1, False, False)
    gap = entry.survey(BLOCK, 3 * BLOCK)
    assert (gap.present, gap.missing) == (BLOCK, 2)
