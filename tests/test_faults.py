"""Upstream faults, injected by the relay between s3cache and the real upstream:
s3cache retries, resumes a broken fill where it broke, and never hands a client a
success status with short or wrong bytes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from s3cache.sandbox.relay import Fault
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, Cached, get, put, running_cache

pytestmark = pytest.mark.faults


@pytest.fixture
def cached(tmp_path: Path, upstream: SeaweedS3) -> Iterator[Cached]:
    with running_cache(
        tmp_path, upstream, "--upstream-retry-backoff", "10ms", "--upstream-read-timeout", "1s"
    ) as cached:
        yield cached


def open_entry(cached: Cached, bucket: str, key: str, body: bytes) -> None:
    """Read the first byte: the entry exists, later fetches are block fetches."""
    assert get(cached.client, bucket, key, Range="bytes=0-0") == body[:1]
    cached.settle()
    cached.relay.reset()


def block_fetches(cached: Cached) -> list[Any]:
    return [r for r in cached.relay.records() if "if-match" in r.headers]


def test_reset_mid_body_resumes_where_it_broke(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "reset", 4 * BLOCK)
    open_entry(cached, bucket, "reset", body)
    cached.relay.fault = Fault(reset_after_bytes=BLOCK // 2 + 7, times=2, match_method="GET")
    assert get(cached.client, bucket, "reset") == body
    cached.settle()
    broken = [r for r in block_fetches(cached) if r.fault]
    assert len(broken) == 2 and not any(r.completed for r in broken)
    resumed = [r.headers["range"] for r in block_fetches(cached) if not r.fault]
    # A broken fetch resumes at the first byte s3cache did not get (mid-block), not at
    # the start of its block. (A TCP reset may discard a few bytes the relay had sent,
    # so the exact byte is not known here.)
    starts = [int(spec.removeprefix("bytes=").split("-")[0]) for spec in resumed]
    assert any(start % BLOCK for start in starts), resumed
    wasted_at_most = 2 * (BLOCK // 2 + 7)
    assert len(body) - BLOCK <= cached.relay.bytes_sent() <= len(body) - BLOCK + wasted_at_most
    assert cached.proxy.blocking_calls() == []


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_and_slowdown_bursts_are_retried(cached: Cached, bucket: str, status: int) -> None:
    body = put(cached, bucket, "busy", 3 * BLOCK)
    open_entry(cached, bucket, "busy", body)
    cached.relay.fault = Fault(status=status, times=3, match_method="GET")
    assert get(cached.client, bucket, "busy") == body
    cached.settle()
    assert sum(1 for r in block_fetches(cached) if r.status == status) == 3


def test_a_stall_times_out_and_is_retried(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "stall", 2 * BLOCK)
    open_entry(cached, bucket, "stall", body)
    cached.relay.fault = Fault(stall_seconds=3.0, times=1, match_method="GET")
    assert get(cached.client, bucket, "stall") == body


def test_unrecoverable_fill_aborts_the_client_connection(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "doomed", 6 * BLOCK)
    open_entry(cached, bucket, "doomed", body)
    cached.relay.fault = Fault(reset_after_bytes=1000, match_method="GET")  # every time
    with pytest.raises((BotoCoreError, ClientError)):
        data = get(cached.client, bucket, "doomed")
        assert len(data) == len(body)  # never reached: a short body is not a success
    cached.relay.fault = None
    assert get(cached.client, bucket, "doomed") == body  # and the cache is not damaged


def test_upstream_down_mid_object_then_back(cached: Cached, bucket: str) -> None:
    body = put(cached, bucket, "flap", 3 * BLOCK + 5)
    cached.relay.fault = Fault(status=503, times=2)
    # The first GET meets the 503s itself: the client sees the upstream's answer
    # (boto3 retries it); nothing is cached from an error.
    try:
        assert get(cached.client, bucket, "flap") == body
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    cached.relay.fault = None
    assert get(cached.client, bucket, "flap") == body
    assert get(cached.client, bucket, "flap", Range="bytes=5-") == body[5:]


def test_corrupt_length_from_upstream_is_not_served(cached: Cached, bucket: str) -> None:
    body = os.urandom(2 * BLOCK)
    cached.direct.put_object(Bucket=bucket, Key="short", Body=body)
    cached.relay.reset()
    cached.relay.fault = Fault(reset_after_bytes=BLOCK + 10, times=10, match_method="GET")
    try:
        data = get(cached.client, bucket, "short")
    except (BotoCoreError, ClientError):
        data = None
    assert data in (None, body)
