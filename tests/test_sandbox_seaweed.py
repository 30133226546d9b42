"""The embedded SeaweedFS S3 server: starts, answers like S3, and is gone after stop()."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from s3cache.sandbox.seaweed import SeaweedS3


@pytest.mark.slow
def test_seaweed_serves_s3_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)

    server = SeaweedS3(tmp_path / "seaweed")
    server.start()
    pid = server.pid
    assert pid is not None
    assert server.running
    assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
    try:
        client = server.client()
        try:
            client.create_bucket(Bucket="sandbox-test")
            key = "dir with spaces/naïve ünïcødé 名前 ✓.bin"
            body = bytes(range(256)) * 8
            client.put_object(Bucket="sandbox-test", Key=key, Body=body)
            client.put_object(Bucket="sandbox-test", Key="elsewhere/other.bin", Body=b"other")

            got = client.get_object(Bucket="sandbox-test", Key=key)
            assert got["Body"].read() == body

            part = client.get_object(Bucket="sandbox-test", Key=key, Range="bytes=2-5")
            assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
            assert part["ContentRange"] == f"bytes 2-5/{len(body)}"
            assert part["Body"].read() == body[2:6]

            head = client.head_object(Bucket="sandbox-test", Key=key)
            assert head["ContentLength"] == len(body)
            assert head["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

            listed = client.list_objects_v2(Bucket="sandbox-test", Prefix="dir with spaces/")
            assert [item["Key"] for item in listed["Contents"]] == [key]
            assert listed["KeyCount"] == 1
        finally:
            client.close()
    finally:
        server.stop()

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.stop()  # idempotent
