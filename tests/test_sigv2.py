"""SigV2 end to end (first draft, before the change)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from conftest import ClientFactory


def fetch(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_presigned_get_and_put(make_client: ClientFactory, bucket: str) -> None:
    client: Any = make_client("path", signature_version="s3")
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "a b", "ContentType": "text/plain"}
    )
    assert "AWSAccessKeyId=" in url
    status, body = fetch(url, "PUT", b"hello", {"Content-Type": "text/plain"})
    assert status == 200, body
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "a b"})
    assert fetch(url) == (200, b"hello")


def test_header_signed_client(make_client: ClientFactory, bucket: str) -> None:
    client: Any = make_client("path", signature_version="s3")
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
