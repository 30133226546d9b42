"""Upload caching (issue #16): write-through and write-back of PutObject, through
s3cache and a counting relay in front of a real SeaweedFS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s3cache.sandbox.relay import Fault
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import Cached, get, running_cache


def _wait_drained(cached: Cached, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cached.stats()["writeback"]["pending_objects"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"write-back not drained: {cached.stats()['writeback']}")


def test_write_through_put_is_a_hit_next(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=through") as cached:
        body = os.urandom(700 * 1024)
        answer = cached.client.put_object(Bucket=bucket, Key="ckpt/a.bin", Body=body)
        direct = cached.direct.head_object(Bucket=bucket, Key="ckpt/a.bin")
        assert answer["ETag"] == direct["ETag"]
        cached.relay.reset()
        assert get(cached.client, bucket, "ckpt/a.bin") == body
        head = cached.client.head_object(Bucket=bucket, Key="ckpt/a.bin")
        assert head["ETag"] == direct["ETag"]
        assert head["LastModified"] == direct["LastModified"]
        assert head["ContentType"] == direct["ContentType"]
        assert cached.relay.count("GET") == 0
        assert cached.relay.count("HEAD") == 0


def test_failed_write_through_leaves_no_entry(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=through") as cached:
        cached.relay.fault = Fault(status=500, match_method="PUT")
        with pytest.raises(Exception, match="InternalError"):
            cached.client.put_object(Bucket=bucket, Key="gone.bin", Body=os.urandom(300 * 1024))
        cached.relay.fault = None
        assert cached.stats()["entries"] == 0
        cached.relay.reset()
        with pytest.raises(Exception, match="NoSuchKey|404"):
            cached.client.get_object(Bucket=bucket, Key="gone.bin")
        assert cached.relay.count("GET") == 1


def test_write_back_answers_before_the_upstream_has_it(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import hashlib

    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}/ckpt/=back") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")  # the upstream refuses
        body = os.urandom(900 * 1024)
        answer = cached.client.put_object(
            Bucket=bucket, Key="ckpt/b.bin", Body=body, Metadata={"step": "7"}
        )
        assert answer["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        queue = cached.stats()["writeback"]
        assert queue["pending_objects"] == 1 and queue["pending_bytes"] == len(body)
        assert get(cached.client, bucket, "ckpt/b.bin") == body
        head = cached.client.head_object(Bucket=bucket, Key="ckpt/b.bin")
        assert head["ETag"] == answer["ETag"] and head["Metadata"] == {"step": "7"}
        assert cached.relay.count("GET") == 0
        with pytest.raises(Exception, match="404|Not Found"):
            cached.direct.head_object(Bucket=bucket, Key="ckpt/b.bin")
        cached.relay.fault = None
        _wait_drained(cached)
        stored = cached.direct.get_object(Bucket=bucket, Key="ckpt/b.bin")
        assert stored["Body"].read() == body
        assert stored["ETag"] == answer["ETag"] and stored["Metadata"] == {"step": "7"}
        assert cached.stats()["writeback"]["upload_failures"] >= 1
        cached.relay.reset()
        head = cached.client.head_object(Bucket=bucket, Key="ckpt/b.bin")
        assert head["LastModified"] == stored["LastModified"]
        assert get(cached.client, bucket, "ckpt/b.bin") == body
        assert cached.relay.count("GET") == 0


def test_flush_returns_once_the_prefix_is_upstream(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import subprocess
    import sys
    import threading

    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        bodies = {f"run/{n}.pt": os.urandom(100 * 1024 + n) for n in range(5)}
        for key, body in bodies.items():
            cached.client.put_object(Bucket=bucket, Key=key, Body=body)
        command = [sys.executable, "-m", "s3cache", "flush", f"s3://{bucket}/run/"]
        command += ["--endpoint", cached.proxy.endpoint_url]
        flushing = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        threading.Timer(1.0, lambda: setattr(cached.relay, "fault", None)).start()
        out, _ = flushing.communicate(timeout=60)
        assert flushing.returncode == 0, out
        assert "5 write-back objects" in out
        for key, body in bodies.items():  # all upstream when flush returned
            assert cached.direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        assert cached.stats()["writeback"]["pending_objects"] == 0
