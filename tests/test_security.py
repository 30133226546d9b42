"""Client authentication (SigV4 as S3 does it), grants, the admin surface, TLS and
hardening against slow or hostile clients."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
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
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

READER = ("reader-key", "reader-secret-0123456789")
WRITER = ("writer-key", "writer-secret-0123456789")


def client(endpoint: str, key: tuple[str, str], **config: Any) -> Any:
    return boto3.session.Session(
        aws_access_key_id=key[0], aws_secret_access_key=key[1], region_name="us-east-1"
    ).client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            signature_version="s3v4",  # presigned URLs too: s3cache speaks SigV4 only
            **config,
        ),
    )


def code_of(call: Any) -> tuple[int, str]:
    with pytest.raises(ClientError) as excinfo:
        call()
    error = excinfo.value.response
    return error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]


@pytest.fixture
def secured(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> Iterator[tuple[S3CacheProcess, Relay]]:
    """s3cache with two client keys (a reader limited to one prefix, a writer) and an
    admin key, behind a relay that shows what reaches the upstream."""
    keys = tmp_path / "client-keys.toml"
    keys.write_text(
        f'[[client_keys]]\naccess_key = "{READER[0]}"\nsecret_key = "{READER[1]}"\n'
        f'allow = ["{bucket}/public/*"]\naccess = "read-only"\n\n'
        f'[[client_keys]]\naccess_key = "{WRITER[0]}"\nsecret_key = "{WRITER[1]}"\n'
        f'allow = ["{bucket}"]\naccess = "read-write"\n'
    )
    with Relay(upstream.endpoint_url) as relay:
        proxy = S3CacheProcess(
            tmp_path,
            upstream,
            upstream_endpoint=relay.endpoint_url,
            extra_args=[
                "--client-keys-file",
                str(keys),
                "--admin-key",
                "admin-secret-xyz",
                "--admin-open-metrics",
                "false",
            ],
        )
        with proxy:
            yield proxy, relay
        log = proxy.log_path.read_text()
        for secret in (READER[1], WRITER[1], "admin-secret-xyz", upstream.secret_key):
            assert secret not in log


def test_keys_and_grants(secured: tuple[S3CacheProcess, Relay], bucket: str) -> None:
    proxy, relay = secured
    writer, reader = client(proxy.endpoint_url, WRITER), client(proxy.endpoint_url, READER)
    writer.put_object(Bucket=bucket, Key="public/a", Body=b"public data")
    writer.put_object(Bucket=bucket, Key="private/b", Body=b"private data")
    assert reader.get_object(Bucket=bucket, Key="public/a")["Body"].read() == b"public data"
    assert reader.list_objects_v2(Bucket=bucket, Prefix="public/")["KeyCount"] == 1
    relay.reset()
    assert code_of(lambda: reader.get_object(Bucket=bucket, Key="private/b")) == (
        403,
        "AccessDenied",
    )
    assert code_of(lambda: reader.put_object(Bucket=bucket, Key="public/c", Body=b"x")) == (
        403,
        "AccessDenied",
    )
    assert code_of(lambda: reader.list_objects_v2(Bucket=bucket)) == (403, "AccessDenied")
    assert relay.records() == []  # denied requests never reach the upstream
    stranger = client(proxy.endpoint_url, ("nobody", "nothing"))
    assert code_of(lambda: stranger.get_object(Bucket=bucket, Key="public/a")) == (
        403,
        "InvalidAccessKeyId",
    )
    forger = client(proxy.endpoint_url, (READER[0], "not-the-secret"))
    assert code_of(lambda: forger.get_object(Bucket=bucket, Key="public/a")) == (
        403,
        "SignatureDoesNotMatch",
    )
    status, _ = fetch(f"{proxy.endpoint_url}/{bucket}/public/a")  # unsigned
    assert status == 403
    for c in (writer, reader, stranger, forger):
        c.close()


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_presigned_urls(secured: tuple[S3CacheProcess, Relay], bucket: str) -> None:
    proxy, _ = secured
    writer = client(proxy.endpoint_url, WRITER)
    writer.put_object(Bucket=bucket, Key="public/p", Body=b"presigned")
    url = writer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "public/p"}, ExpiresIn=60
    )
    got = fetch(url)
    assert got == (200, b"presigned"), got
    expired = writer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "public/p"}, ExpiresIn=1
    )
    time.sleep(2)
    status, body = fetch(expired)
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    writer.close()


def test_signed_payload_must_match(
    secured: tuple[S3CacheProcess, Relay], bucket: str, upstream: SeaweedS3
) -> None:
    """A body that does not hash to its signed x-amz-content-sha256 is refused and
    never stored."""
    proxy, _ = secured
    writer = client(proxy.endpoint_url, WRITER, request_checksum_calculation="when_required")

    def tamper(request: Any, **_: Any) -> None:
        request.body = b"tampered!"  # same length as what was signed

    writer.meta.events.register("before-send.s3.PutObject", tamper)
    status, code = code_of(lambda: writer.put_object(Bucket=bucket, Key="t", Body=b"original!"))
    assert (status, code) == (400, "XAmzContentSHA256Mismatch")
    direct = upstream.client()
    assert code_of(lambda: direct.head_object(Bucket=bucket, Key="t"))[0] == 404
    writer.close()
    direct.close()


def test_admin_needs_the_admin_key(secured: tuple[S3CacheProcess, Relay]) -> None:
    proxy, _ = secured
    assert fetch(f"{proxy.endpoint_url}/_s3cache/healthz")[0] == 200
    assert fetch(f"{proxy.endpoint_url}/_s3cache/stats")[0] == 403  # admin_open_metrics off
    assert fetch(f"{proxy.endpoint_url}/_s3cache/verify", "POST")[0] == 403
    wrong = {"Authorization": "Bearer guess"}
    assert fetch(f"{proxy.endpoint_url}/_s3cache/verify", "POST", wrong)[0] == 403
    right = {"Authorization": "Bearer admin-secret-xyz"}
    status, body = fetch(f"{proxy.endpoint_url}/_s3cache/verify", "POST", right)
    assert status == 200 and json.loads(body)["corrupt_blocks"] == 0
    assert fetch(f"{proxy.endpoint_url}/_s3cache/stats", headers=right)[0] == 200


def test_anonymous_reads_only_when_allowed(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key="open", Body=b"anyone")
    with S3CacheProcess(tmp_path, upstream, extra_args=["--allow-anonymous", "true"]) as proxy:
        assert fetch(f"{proxy.endpoint_url}/{bucket}/open") == (200, b"anyone")
        assert fetch(f"{proxy.endpoint_url}/{bucket}/open", "PUT")[0] == 403
    direct.close()


def test_separate_admin_listener(tmp_path: Path, upstream: SeaweedS3) -> None:
    admin_port = free_port()
    with S3CacheProcess(
        tmp_path, upstream, extra_args=["--admin-listen", f"127.0.0.1:{admin_port}"]
    ) as proxy:
        assert fetch(f"{proxy.endpoint_url}/_s3cache/verify", "POST")[0] == 404
        assert fetch(f"{proxy.endpoint_url}/_s3cache/healthz")[0] == 200  # probes stay
        assert fetch(f"http://127.0.0.1:{admin_port}/_s3cache/verify", "POST")[0] == 200


def test_tls_listener(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    upstream.client().put_object(Bucket=bucket, Key="tls", Body=b"over tls")
    proxy = S3CacheProcess(
        tmp_path, upstream, tls_ca=cert, extra_args=["--tls-cert", str(cert), "--tls-key", str(key)]
    )
    with proxy:
        tls_client = boto3.session.Session(
            aws_access_key_id=upstream.access_key,
            aws_secret_access_key=upstream.secret_key,
            region_name="us-east-1",
        ).client(
            "s3",
            endpoint_url=proxy.endpoint_url,
            verify=str(cert),
            config=Config(s3={"addressing_style": "path"}),
        )
        assert tls_client.get_object(Bucket=bucket, Key="tls")["Body"].read() == b"over tls"
        tls_client.close()


def test_slow_clients_are_cut_off(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with S3CacheProcess(
        tmp_path, upstream, extra_args=["--idle-timeout", "1s", "--body-timeout", "1s"]
    ) as proxy:
        # A slowloris: a request head dribbled one header a second.
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /b/k HTTP/1.1\r\n")
            started = time.monotonic()
            with pytest.raises(OSError):
                for _ in range(10):
                    time.sleep(0.5)
                    sock.sendall(b"X-Slow: yes\r\n")
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        raise ConnectionResetError("closed")
            assert time.monotonic() - started < 5
        # An upload whose body stalls.
        writer = client(proxy.endpoint_url, (upstream.access_key, upstream.secret_key))
        url = writer.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "slow"})
        parts = url.split("/", 3)
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
        connection.putrequest("PUT", "/" + parts[3])
        connection.putheader("Content-Length", "1000")
        connection.endheaders()
        connection.send(b"x" * 10)
        answer = connection.getresponse()
        assert answer.status == 400
        assert b"<Code>RequestTimeout</Code>" in answer.read()
        connection.close()
        writer.close()
        # The process is still serving:
        assert fetch(f"{proxy.endpoint_url}/_s3cache/healthz")[0] == 200
