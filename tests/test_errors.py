"""Errors: the upstream's pass through unchanged; s3cache's own are S3 error documents
with the status S3 would use; no request brings the process down."""

from __future__ import annotations

import http.client
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3cache.sandbox.proxy import S3CacheProcess, free_port
from s3cache.sandbox.seaweed import SeaweedS3


def raw_request(
    port: int, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_fields(body: bytes) -> dict[str, str]:
    root = ET.fromstring(body)
    assert root.tag == "Error"
    return {child.tag: child.text or "" for child in root}


def test_upstream_errors_pass_through(client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=bucket, Key="missing")
    assert excinfo.value.response["Error"]["Code"] == "NoSuchKey"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as excinfo:
        client.list_objects_v2(Bucket="no-such-bucket-here")
    assert excinfo.value.response["Error"]["Code"] == "NoSuchBucket"


def test_upstream_error_body_is_unchanged(make_client: Any, upstream: SeaweedS3) -> None:
    """The same request, direct and through s3cache, gives the same error document."""
    proxied, direct = make_client("path"), upstream.client()
    answers = []
    for client in (proxied, direct):
        with pytest.raises(ClientError) as excinfo:
            client.get_object(Bucket="no-such-bucket-here", Key="key")
        error = excinfo.value.response
        answers.append(
            (
                error["ResponseMetadata"]["HTTPStatusCode"],
                error["Error"]["Code"],
                error["Error"]["Message"],
            )
        )
    assert answers[0] == answers[1]
    assert answers[0][:2] == (404, "NoSuchBucket")
    proxied.close()
    direct.close()


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/Bad_Bucket!/key", 400, "InvalidBucketName"),
        ("/ab/key", 400, "InvalidBucketName"),
        ("/bucket/%ff%fe", 400, "InvalidRequest"),
        ("/bucket/" + "k" * 1025, 400, "KeyTooLongError"),
        ("/_s3cache/no-such-thing", 404, "NoSuchKey"),
    ],
)
def test_own_errors_are_s3_error_documents(
    s3cache: S3CacheProcess, target: str, status: int, code: str
) -> None:
    got_status, headers, body = raw_request(s3cache.port, "GET", target)
    assert got_status == status
    assert headers["Content-Type"].startswith("application/xml")
    fields = error_fields(body)
    assert fields["Code"] == code
    assert fields["Message"]
    assert fields["RequestId"] == headers["x-amz-request-id"]
    assert "Resource" in fields


@pytest.fixture
def proxy_of_dead_upstream(tmp_path: Path, upstream: SeaweedS3) -> Iterator[S3CacheProcess]:
    dead = f"http://127.0.0.1:{free_port()}"
    with S3CacheProcess(
        tmp_path, upstream, upstream_endpoint=dead, extra_args=["--allow-anonymous", "true"]
    ) as proxy:
        yield proxy


def test_unreachable_upstream_is_503(proxy_of_dead_upstream: S3CacheProcess) -> None:
    status, _, body = raw_request(proxy_of_dead_upstream.port, "GET", "/some-bucket/key")
    assert status == 503
    fields = error_fields(body)
    assert fields["Code"] == "ServiceUnavailable"
    assert fields["Resource"] == "/some-bucket/key"


def test_garbage_does_not_crash_the_process(s3cache: S3CacheProcess, client: Any) -> None:
    garbage = [
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b"GET /bucket/key HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET " + b"/a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=oops\r\n\r\n",
    ]
    for payload in garbage:
        with socket.create_connection(("127.0.0.1", s3cache.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.")
    # Still alive and serving.
    assert client.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
