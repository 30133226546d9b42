"""Admin endpoints, metrics, the access log and ``s3cache stats``."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from s3cache.sandbox.proxy import S3CacheProcess, free_port
from s3cache.sandbox.seaweed import SeaweedS3


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_and_readyz(s3cache: S3CacheProcess) -> None:
    assert fetch(f"{s3cache.endpoint_url}/_s3cache/healthz") == (200, b"ok\n")
    status, body = fetch(f"{s3cache.endpoint_url}/_s3cache/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "problems": {}}


@pytest.fixture
def proxy_of_dead_upstream(tmp_path: Path, upstream: SeaweedS3) -> Iterator[S3CacheProcess]:
    dead = f"http://127.0.0.1:{free_port()}"
    with S3CacheProcess(tmp_path, upstream, upstream_endpoint=dead) as proxy:
        yield proxy


def test_readyz_reports_a_dead_upstream(proxy_of_dead_upstream: S3CacheProcess) -> None:
    status, body = fetch(f"{proxy_of_dead_upstream.endpoint_url}/_s3cache/readyz")
    assert status == 503
    report = json.loads(body)
    assert report["ready"] is False
    assert "upstream" in report["problems"]
    assert fetch(f"{proxy_of_dead_upstream.endpoint_url}/_s3cache/healthz")[0] == 200


def test_metrics_exposition(s3cache: S3CacheProcess, make_client: Any, bucket: str) -> None:
    client = make_client("path")
    client.put_object(Bucket=bucket, Key="m", Body=b"metrics")
    assert client.get_object(Bucket=bucket, Key="m")["Body"].read() == b"metrics"
    assert client.get_object(Bucket=bucket, Key="m")["Body"].read() == b"metrics"
    status, body = fetch(f"{s3cache.endpoint_url}/_s3cache/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        's3cache_requests_total{operation="get_object",status_class="2xx"}',
        's3cache_cache_reads_total{outcome="hit"}',
        's3cache_served_bytes_total{source="cache"}',
        's3cache_request_duration_seconds_bucket{le="0.001",outcome="hit"}',
        's3cache_time_to_first_byte_seconds_count{outcome="miss"}',
        's3cache_upstream_requests_total{kind="block",status_class="2xx"}',
        's3cache_upstream_request_duration_seconds_count{kind="forward"}',
        "s3cache_cache_capacity_bytes",
        "s3cache_cache_used_bytes",
        "s3cache_cache_entries",
        "s3cache_cache_degraded 0.0",
        "s3cache_fills_in_flight",
    ):
        assert name in text, name
    assert bucket not in text  # never a bucket or key as a label
    client.close()


def test_stats_json_and_cli(s3cache: S3CacheProcess) -> None:
    status, body = fetch(f"{s3cache.endpoint_url}/_s3cache/stats")
    assert status == 200
    stats = json.loads(body)
    for field in (
        "capacity_bytes",
        "used_bytes",
        "entries",
        "reads",
        "served_bytes",
        "byte_hit_ratio",
        "upstream_block_fetches",
        "evictions",
        "degraded",
    ):
        assert field in stats
    result = subprocess.run(
        [sys.executable, "-m", "s3cache", "stats", "--endpoint", s3cache.endpoint_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert any(line.startswith("capacity_bytes") for line in lines)
    assert any(line.startswith("reads.hit") for line in lines)


def test_access_log_json(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with S3CacheProcess(tmp_path, upstream, extra_args=["--access-log", "json"]) as proxy:
        client = boto3.session.Session(
            aws_access_key_id=upstream.access_key,
            aws_secret_access_key=upstream.secret_key,
            region_name=upstream.region,
        ).client(
            "s3", endpoint_url=proxy.endpoint_url, config=Config(s3={"addressing_style": "path"})
        )
        with pytest.raises(ClientError):
            client.get_object(Bucket=bucket, Key="no-such-key")
        client.close()
    lines = [
        line.split("s3cache.access ", 1)[1]
        for line in proxy.log_path.read_text().splitlines()
        if " s3cache.access " in line
    ]
    records = [json.loads(line) for line in lines]
    mine = [r for r in records if r["bucket"] == bucket]
    assert len(mine) == 1
    record = mine[0]
    assert record["operation"] == "get_object"
    assert record["status"] == 404
    assert record["key_id"] == upstream.access_key
    assert set(record) >= {"request_id", "bytes", "duration_ms", "ttfb_ms", "outcome"}
    assert upstream.secret_key not in proxy.log_path.read_text()
