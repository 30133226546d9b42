"""Upload caching (issue #16): write-through and write-back of PutObject, through
s3cache and a counting relay in front of a real SeaweedFS."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from s3cache.sandbox.relay import Fault
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import Cached, get, running_cache

MIB = 1024 * 1024


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
        metrics = cached.metrics()
        assert "s3cache_writeback_pending_objects 1.0" in metrics
        assert f"s3cache_writeback_pending_bytes {float(len(body))}" in metrics
        assert 's3cache_writes_total{mode="back"} 1.0' in metrics
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
        metrics = cached.metrics()
        assert "s3cache_writeback_uploads_total 1.0" in metrics
        assert "s3cache_writeback_pending_objects 0.0" in metrics
        assert "s3cache_writeback_oldest_pending_seconds 0.0" in metrics
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
    import time

    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        bodies = {f"run/{n}.pt": os.urandom(100 * 1024 + n) for n in range(5)}
        for key, body in bodies.items():
            cached.client.put_object(Bucket=bucket, Key=key, Body=body)
        command = [sys.executable, "-m", "s3cache", "flush", f"s3://{bucket}/run/"]
        command += ["--endpoint", cached.proxy.endpoint_url]
        flushing = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30  # the flush waits before the upstream is back
        while not cached.stats()["writeback"]["flushes_waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        threading.Timer(0.3, lambda: setattr(cached.relay, "fault", None)).start()
        out, _ = flushing.communicate(timeout=60)
        assert flushing.returncode == 0, out
        assert "5 write-back objects" in out
        for key, body in bodies.items():  # all upstream when flush returned
            assert cached.direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        assert cached.stats()["writeback"]["pending_objects"] == 0


def test_write_back_last_write_wins_at_the_upstream_too(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import threading

    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        first, second = os.urandom(200 * 1024), os.urandom(300 * 1024)
        cached.client.put_object(Bucket=bucket, Key="k", Body=first)
        cached.client.put_object(Bucket=bucket, Key="k", Body=second)
        assert get(cached.client, bucket, "k") == second
        assert cached.stats()["writeback"]["superseded"] == 1
        cached.client.put_object(Bucket=bucket, Key="gone", Body=first)
        # A DELETE of a key with a write-back pending goes upstream after it.
        threading.Timer(1.0, lambda: setattr(cached.relay, "fault", None)).start()
        cached.client.delete_object(Bucket=bucket, Key="gone")
        on_gone = [
            (r.method, r.status) for r in cached.relay.records() if r.path.endswith("/gone")
        ]
        assert ("PUT", 200) in on_gone
        assert on_gone.index(("PUT", 200)) < on_gone.index(("DELETE", 204))
        with pytest.raises(Exception, match="404|Not Found"):
            cached.direct.head_object(Bucket=bucket, Key="gone")
        with pytest.raises(Exception, match="NoSuchKey"):
            cached.client.get_object(Bucket=bucket, Key="gone")
        _wait_drained(cached)
        assert cached.direct.get_object(Bucket=bucket, Key="k")["Body"].read() == second
        puts = [r for r in cached.relay.records() if r.method == "PUT" and r.path.endswith("/k")]
        assert puts and all(r.fault for r in puts[:-1])  # first never went through


def test_listings_show_write_back_objects_before_the_upstream_has_them(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    cached_dir = tmp_path
    with running_cache(cached_dir, upstream, "--write-rule", f"{bucket}/run/=back") as cached:
        cached.direct.put_object(Bucket=bucket, Key="run/a.pt", Body=b"old")
        cached.direct.put_object(Bucket=bucket, Key="run/z.pt", Body=b"z")
        before = cached.client.list_objects_v2(Bucket=bucket, Prefix="run/")  # (cached)
        assert [o["Key"] for o in before["Contents"]] == ["run/a.pt", "run/z.pt"]
        cached.relay.fault = Fault(status=503, match_method="PUT")
        cached.client.put_object(Bucket=bucket, Key="run/a.pt", Body=b"new!")
        cached.client.put_object(Bucket=bucket, Key="run/m.pt", Body=b"m" * 10)
        cached.client.put_object(Bucket=bucket, Key="run/sub/x.pt", Body=b"x")
        listed = cached.client.list_objects_v2(Bucket=bucket, Prefix="run/")
        assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [
            ("run/a.pt", 4), ("run/m.pt", 10), ("run/sub/x.pt", 1), ("run/z.pt", 1)
        ]
        assert listed["KeyCount"] == 4
        rolled = cached.client.list_objects_v2(Bucket=bucket, Prefix="run/", Delimiter="/")
        assert [o["Key"] for o in rolled["Contents"]] == ["run/a.pt", "run/m.pt", "run/z.pt"]
        assert [p["Prefix"] for p in rolled["CommonPrefixes"]] == ["run/sub/"]
        v1 = cached.client.list_objects(Bucket=bucket, Prefix="run/", Marker="run/b")
        assert [o["Key"] for o in v1["Contents"]] == ["run/m.pt", "run/sub/x.pt", "run/z.pt"]
        cached.relay.fault = None
        _wait_drained(cached)
        after = cached.client.list_objects_v2(Bucket=bucket, Prefix="run/")
        direct = cached.direct.list_objects_v2(Bucket=bucket, Prefix="run/")
        assert [(o["Key"], o["ETag"]) for o in after["Contents"]] == [
            (o["Key"], o["ETag"]) for o in direct["Contents"]
        ]


def _multipart_upload(client: Any, bucket: str, key: str, body: bytes) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    client.upload_fileobj(io.BytesIO(body), bucket, key, Config=config)


@pytest.mark.parametrize("mode", ["through", "back"])
def test_multipart_upload_is_cached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, mode: str
) -> None:
    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}={mode}") as cached:
        if mode == "back":
            cached.relay.fault = Fault(status=503, match_method="PUT")
        body = os.urandom(12 * MIB + 12345)  # parts of 5, 5 and 2 MiB
        _multipart_upload(cached.client, bucket, "big.pt", body)
        head = cached.client.head_object(Bucket=bucket, Key="big.pt")
        assert head["ETag"].endswith('-3"') and head["ContentLength"] == len(body)
        cached.relay.reset()
        assert get(cached.client, bucket, "big.pt") == body
        assert cached.relay.count("GET") == 0
        cached.relay.fault = None
        if mode == "back":
            _wait_drained(cached)
        stored = cached.direct.get_object(Bucket=bucket, Key="big.pt")
        assert stored["ETag"] == head["ETag"]  # promised (back), or the upstream's (through)
        assert stored["Body"].read() == body
        assert not cached.direct.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_write_back_with_several_workers(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    import urllib.request

    extra = ("--workers", "2", "--write-rule", f"{bucket}=back")
    with running_cache(tmp_path, upstream, *extra) as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        bodies = {f"w/{n}": os.urandom(64 * 1024 + n) for n in range(6)}
        for key, body in bodies.items():  # over connections that either worker accepts
            cached.client.put_object(Bucket=bucket, Key=key, Body=body)
        for key, body in bodies.items():
            assert get(cached.client, bucket, key) == body
        assert cached.stats()["writeback"]["pending_objects"] == 6
        cached.relay.fault = None
        flush = urllib.request.Request(
            f"{cached.proxy.endpoint_url}/_s3cache/flush", data=b"", method="POST"
        )
        with urllib.request.urlopen(flush, timeout=60) as answer:
            assert answer.status == 200
        for key, body in bodies.items():
            assert cached.direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body


def test_verify_during_an_upload_leaves_its_spool_alone(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import http.client
    import time
    import urllib.parse
    import urllib.request

    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        body = os.urandom(600 * 1024)
        url = urllib.parse.urlsplit(
            cached.client.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": "slow.bin"}
            )
        )
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        connection.putrequest("PUT", f"{url.path}?{url.query}", skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        connection.send(body[: len(body) // 2])
        time.sleep(0.5)  # the first half is in the spool file
        verify = urllib.request.Request(
            f"{cached.proxy.endpoint_url}/_s3cache/verify", data=b"", method="POST"
        )
        with urllib.request.urlopen(verify, timeout=30) as answer:
            assert json.load(answer)["orphan_files"] == 0
        connection.send(body[len(body) // 2 :])
        assert connection.getresponse().status == 200
        connection.close()
        cached.relay.reset()
        assert get(cached.client, bucket, "slow.bin") == body
        assert cached.relay.count("GET") == 0
        cached.relay.fault = None
        _wait_drained(cached)
        assert cached.direct.get_object(Bucket=bucket, Key="slow.bin")["Body"].read() == body


def test_copy_waits_for_a_pending_source_and_is_cached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import threading

    rules = ("--write-rule", f"{bucket}/src/=back", "--write-rule", f"{bucket}/dst/=through")
    with running_cache(tmp_path, upstream, *rules) as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")
        body = os.urandom(500 * 1024)
        cached.client.put_object(Bucket=bucket, Key="src/a", Body=body)
        threading.Timer(1.0, lambda: setattr(cached.relay, "fault", None)).start()
        # Its source is not upstream yet: the copy goes after the source's upload.
        copied = cached.client.copy_object(
            Bucket=bucket, Key="dst/a", CopySource={"Bucket": bucket, "Key": "src/a"}
        )
        direct = cached.direct.head_object(Bucket=bucket, Key="dst/a")
        assert copied["CopyObjectResult"]["ETag"].strip('"') == direct["ETag"].strip('"')
        cached.relay.reset()
        assert get(cached.client, bucket, "dst/a") == body
        head = cached.client.head_object(Bucket=bucket, Key="dst/a")
        assert head["ETag"] == direct["ETag"] and head["LastModified"] == direct["LastModified"]
        assert cached.relay.count("GET") == 0


# --- write-back to a bucket the upstream does not have ------------------------------


def _error_of(call: Any) -> tuple[str, int]:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as refused:
        call()
    error = refused.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]


def _bucket_heads(cached: Cached, bucket: str) -> list[Any]:
    records = cached.relay.records()
    return [r for r in records if r.method == "HEAD" and r.path.rstrip("/") == f"/{bucket}"]


def test_write_back_to_a_missing_bucket_is_refused_before_it_is_acknowledged(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    missing = f"{bucket}-missing"
    rules = ("--write-rule", f"{missing}=back", "--write-rule", f"{bucket}=back")
    with running_cache(tmp_path, upstream, *rules) as cached:
        body = os.urandom(300 * 1024)
        put = lambda: cached.client.put_object(Bucket=missing, Key="ckpt/a.pt", Body=body)  # noqa: E731
        assert _error_of(put) == ("NoSuchBucket", 404)
        create = lambda: cached.client.create_multipart_upload(Bucket=missing, Key="big.pt")  # noqa: E731
        assert _error_of(create) == ("NoSuchBucket", 404)
        queue = cached.stats()["writeback"]
        assert queue["pending_objects"] == 0 and queue["missing_buckets"] == 2
        assert cached.stats()["entries"] == 0  # nothing journaled, nothing cached
        read = lambda: cached.client.get_object(Bucket=missing, Key="ckpt/a.pt")  # noqa: E731
        assert _error_of(read)[1] == 404
        # A bucket that exists is asked for once; then it is known.
        cached.relay.reset()
        for key in ("a", "b", "c"):
            cached.client.put_object(Bucket=bucket, Key=key, Body=body)
        assert [r.status for r in _bucket_heads(cached, bucket)] == [200]
        _wait_drained(cached)
        assert cached.direct.get_object(Bucket=bucket, Key="c")["Body"].read() == body


@pytest.mark.parametrize("status", [403, 503])
def test_write_back_is_acknowledged_when_the_bucket_check_cannot_tell(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, status: int
) -> None:
    """403 (credentials without s3:ListBucket) or an upstream in trouble: acknowledged
    (write-back rides out an upstream away); the upload that follows makes the bucket
    known, so the next write-back does not ask."""
    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        cached.relay.fault = Fault(
            status=status, match_method="HEAD", match_path_prefix=f"/{bucket}", times=1
        )
        body = os.urandom(200 * 1024)
        cached.client.put_object(Bucket=bucket, Key="one", Body=body)
        assert [r.status for r in _bucket_heads(cached, bucket)] == [status]
        _wait_drained(cached)
        cached.client.put_object(Bucket=bucket, Key="two", Body=body)
        assert len(_bucket_heads(cached, bucket)) == 1
        _wait_drained(cached)
        for key in ("one", "two"):
            assert cached.direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body


def test_an_upload_refused_after_acknowledgement_is_counted_logged_once_and_kept(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    import time

    missing = f"{bucket}-later"
    extra = ("--write-rule", f"{missing}=back", "--writeback-retry-max", "0.3s")
    with running_cache(tmp_path, upstream, *extra) as cached:
        # The bucket check cannot tell (503): acknowledged; the upstream then refuses
        # every upload attempt with 404 NoSuchBucket.
        cached.relay.fault = Fault(
            status=503, match_method="HEAD", match_path_prefix=f"/{missing}", times=1
        )
        body = os.urandom(150 * 1024)
        cached.client.put_object(Bucket=missing, Key="ckpt/7.pt", Body=body)
        deadline = time.monotonic() + 30
        while cached.stats()["writeback"]["upload_failures_by_reason"].get("no_such_bucket", 0) < 4:
            assert time.monotonic() < deadline, cached.stats()["writeback"]
            time.sleep(0.1)
        queue = cached.stats()["writeback"]
        assert queue["pending_objects"] == 1 and queue["refused_objects"] == 1
        counted = 's3cache_writeback_upload_failures_total{reason="no_such_bucket"}'
        assert counted in cached.metrics()
        log = cached.proxy.log_path.read_text(errors="replace")
        refusals = [line for line in log.splitlines() if "refused by the upstream" in line]
        assert len(refusals) == 1 and f"s3://{missing}/ckpt/7.pt" in refusals[0]
        assert get(cached.client, missing, "ckpt/7.pt") == body  # still served, never dropped
        cached.direct.create_bucket(Bucket=missing)
        try:
            _wait_drained(cached)
            assert cached.direct.get_object(Bucket=missing, Key="ckpt/7.pt")["Body"].read() == body
            assert cached.stats()["writeback"]["refused_objects"] == 0
        finally:
            cached.direct.delete_object(Bucket=missing, Key="ckpt/7.pt")
            cached.direct.delete_bucket(Bucket=missing)


def test_write_backs_resumed_at_start_up_go_up_once_each(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """The journal found at start-up is resumed by one writer: each object pending then
    is uploaded once (two writers were started, and each uploaded every object)."""
    import time

    rule = ("--write-rule", f"{bucket}/ckpt/=back")
    bodies = {f"ckpt/{n}.bin": os.urandom(64 * 1024) for n in range(4)}
    with running_cache(tmp_path, upstream, *rule) as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")  # nothing goes up
        for key, body in bodies.items():
            cached.client.put_object(Bucket=bucket, Key=key, Body=body)
        assert cached.stats()["writeback"]["pending_objects"] == len(bodies)
    with running_cache(tmp_path, upstream, *rule) as cached:
        _wait_drained(cached)
        time.sleep(1.0)  # an upload of another writer would have reached the relay
        assert cached.relay.count("PUT") == len(bodies)
        for key, body in bodies.items():
            assert cached.direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body
