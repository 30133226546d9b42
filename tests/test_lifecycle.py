"""SIGTERM drains in-flight requests; SIGHUP reloads what can be reloaded."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.proxy import client_of as sandbox_client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3


def client_of(endpoint_url: str, upstream: SeaweedS3) -> Any:
    return sandbox_client_of(endpoint_url, upstream, retries={"total_max_attempts": 1})


def test_sigterm_drains_in_flight_requests(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    body = os.urandom(4 * 1024 * 1024)
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key="slow", Body=body)
    # 1 MB/s: the download takes seconds, SIGTERM arrives in the middle of it.
    with Relay(upstream.endpoint_url, bandwidth=1_000_000) as relay:
        proxy = S3CacheProcess(tmp_path, upstream, upstream_endpoint=relay.endpoint_url)
        with proxy:
            client = client_of(proxy.endpoint_url, upstream)
            result: dict[str, Any] = {}

            def download() -> None:
                result["body"] = client.get_object(Bucket=bucket, Key="slow")["Body"].read()

            reader = threading.Thread(target=download)
            reader.start()
            while relay.count() == 0 and not relay.records():
                time.sleep(0.01)
            time.sleep(0.3)
            proxy.send_signal(signal.SIGTERM)
            reader.join(60)
            assert result["body"] == body  # finished, whole, after SIGTERM
            assert proxy.wait(60) == 0
            client.close()
    direct.close()


def test_sighup_reloads_ttl(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    config = tmp_path / "s3cache.toml"
    config.write_text('cache_ttl = "1h"\n')
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key="k", Body=b"first")
    proxy = S3CacheProcess(tmp_path, upstream, extra_args=["--config", str(config)])
    with proxy:
        client = client_of(proxy.endpoint_url, upstream)
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"
        direct.put_object(Bucket=bucket, Key="k", Body=b"second")
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"  # 1h TTL
        config.write_text('cache_ttl = "0s"\nblock_size = "1MiB"\n')
        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: reloaded" not in proxy.log_tail(100) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"second"
        assert "block_size take effect at the next restart" in proxy.log_tail(100)
        config.write_text("cache_ttl = 'forever'\n")  # a bad file keeps what is in force
        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "settings not reloaded" not in proxy.log_tail(100) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "settings not reloaded" in proxy.log_tail(100)
        assert client.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
        client.close()
    direct.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stops_cleanly(tmp_path: Path, upstream: SeaweedS3, signum: int) -> None:
    proxy = S3CacheProcess(tmp_path, upstream)
    proxy.start()
    proxy.send_signal(signum)
    assert proxy.wait(60) == 0
