"""The relay between s3cache and the upstream (s3cache.sandbox.relay): transparent to
SigV4 against a real S3 server, byte for byte against a scripted one, exact in what it
counts, and able to slow down and break responses on request."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError

from s3cache.sandbox.proxy import client_of, free_port
from s3cache.sandbox.relay import Fault, Relay, RequestRecord
from s3cache.sandbox.seaweed import SeaweedS3

MiB = 1024 * 1024


@pytest.fixture
def relay(upstream: SeaweedS3) -> Iterator[Relay]:
    with Relay(upstream.endpoint_url) as running:
        yield running


def relay_client(relay: Relay, upstream: SeaweedS3, attempts: int = 1, pool: int = 10) -> Any:
    """A boto3 client of the relay, signing with the upstream's keys, path-style."""
    return client_of(
        relay.endpoint_url,
        upstream,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        read_timeout=10,
        connect_timeout=5,
        max_pool_connections=pool,
    )


@pytest.fixture
def s3(relay: Relay, upstream: SeaweedS3) -> Iterator[Any]:
    client = relay_client(relay, upstream)
    yield client
    client.close()


# -- against the real upstream: signatures survive -----------------------------------


KEYS = [
    "plain.bin",
    "dir with spaces/a b.txt",
    "ünïcødé/名前 ✓.bin",
    "plus+sign=&.bin",
    "tilde~(paren)!*'.bin",
]


def test_signed_operations_through_the_relay(relay: Relay, s3: Any, bucket: str) -> None:
    bodies = {key: os.urandom(1000 + 37 * i) for i, key in enumerate(KEYS)}
    for key, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    for key, body in bodies.items():
        got = s3.get_object(Bucket=bucket, Key=key)
        assert got["Body"].read() == body
        assert got["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

        part = s3.get_object(Bucket=bucket, Key=key, Range="bytes=10-19")
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert part["ContentRange"] == f"bytes 10-19/{len(body)}"
        assert part["Body"].read() == body[10:20]

        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ContentLength"] == len(body)
        assert head["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="dir with spaces/")
    assert [item["Key"] for item in listed["Contents"]] == ["dir with spaces/a b.txt"]
    seen: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, PaginationConfig={"PageSize": 2}
    ):
        seen += [item["Key"] for item in page.get("Contents", [])]
    assert sorted(seen) == sorted(KEYS)

    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket=bucket, Key="no such key")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"

    records = relay.records()
    assert all(r.completed and r.fault is None for r in records)
    assert all(r.status is not None and r.status < 300 for r in records[:-1])
    assert records[-1].status == 404
    assert relay.count("PUT") == len(KEYS)
    assert relay.count("HEAD") == len(KEYS)
    assert relay.count("GET", path_prefix=f"/{bucket}/plus%2Bsign%3D%26.bin") == 2
    assert relay.count("GET", path_prefix=f"/{bucket}/dir%20with%20spaces/a%20b.txt") == 2
    assert relay.count("GET", path_prefix=f"/{bucket}/%C3%BC") == 2
    assert relay.count("GET", path_prefix=f"/{bucket}?list-type=2") == 1 + 3
    # The Host the client signed is the Host the upstream received.
    assert {r.headers["host"] for r in records} == {f"127.0.0.1:{relay.port}"}
    assert all(r.headers["authorization"].startswith("AWS4-HMAC-SHA256 ") for r in records)


def test_multipart_upload_with_expect_continue(relay: Relay, s3: Any, bucket: str) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(12345)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="multi part+.bin")
    etags = []
    for number, data in enumerate(parts, start=1):
        # A file-like body: botocore sends `Expect: 100-continue` and waits for the 100.
        answer = s3.upload_part(
            Bucket=bucket,
            Key="multi part+.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=io.BytesIO(data),
        )
        etags.append(answer["ETag"])
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="multi part+.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
    )
    assert s3.get_object(Bucket=bucket, Key="multi part+.bin")["Body"].read() == b"".join(parts)

    puts = [r for r in relay.records() if r.method == "PUT"]
    assert len(puts) == 2
    assert all(r.headers.get("expect") == "100-continue" for r in puts)
    assert [r.request_body_bytes for r in puts] == [len(p) for p in parts]
    assert relay.count("POST", path_prefix=f"/{bucket}/multi%20part%2B.bin?upload") == 2
    assert relay.bytes_sent() == sum(r.response_body_bytes for r in relay.records())


def test_chunked_request_body_reaches_upstream(
    relay: Relay, upstream: SeaweedS3, s3: Any, bucket: str
) -> None:
    """A Transfer-Encoding: chunked body is streamed through with its framing."""
    payload = os.urandom(300_000)
    path = f"/{bucket}/chunked.bin"
    request = AWSRequest(
        method="PUT",
        url=relay.endpoint_url + path,
        headers={"X-Amz-Content-SHA256": hashlib.sha256(payload).hexdigest()},
    )
    S3SigV4Auth(
        Credentials(upstream.access_key, upstream.secret_key), "s3", upstream.region
    ).add_auth(request)
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        chunks = (payload[i : i + 70_000] for i in range(0, len(payload), 70_000))
        connection.request(
            "PUT", path, body=chunks, headers=dict(request.headers.items()), encode_chunked=True
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        connection.close()
    assert s3.get_object(Bucket=bucket, Key="chunked.bin")["Body"].read() == payload
    put = relay.records()[0]
    assert put.headers["transfer-encoding"] == "chunked"
    assert put.request_body_bytes == len(payload)


def test_counts_bytes_and_keep_alive_are_exact(
    relay: Relay, upstream: SeaweedS3, s3: Any, bucket: str
) -> None:
    sizes = {"a/1": 1, "a/2": 100_000, "b/3": 3 * MiB + 7}
    direct = upstream.client()
    for key, size in sizes.items():
        direct.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
    relay.reset()
    assert relay.records() == [] and relay.count() == 0 and relay.bytes_sent() == 0

    for key in sizes:
        s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.get_object(Bucket=bucket, Key="b/3", Range="bytes=0-9")["Body"].read()

    assert relay.count() == 4
    assert relay.count("GET") == 4 and relay.count("get") == 4 and relay.count("PUT") == 0
    assert relay.count(path_prefix=f"/{bucket}/a/") == 2
    assert relay.count("GET", path_prefix=f"/{bucket}/b/3") == 2
    assert relay.bytes_sent() == sum(sizes.values()) + 10
    records = relay.records()
    assert [r.response_body_bytes for r in records] == [*sizes.values(), 10]
    assert [r.status for r in records] == [200, 200, 200, 206]
    assert all(isinstance(r, RequestRecord) and r.completed for r in records)
    assert all(r.started <= r.finished for r in records)
    assert records[3].headers["range"] == "bytes=0-9"
    # One boto3 connection, kept alive, on one upstream connection.
    assert len({r.connection for r in records}) == 1
    assert relay.upstream_connections == 1
    records.clear()  # a copy
    assert relay.count() == 4


def test_concurrent_requests_are_each_counted(
    relay: Relay, upstream: SeaweedS3, bucket: str
) -> None:
    body = os.urandom(200_000)
    upstream.client().put_object(Bucket=bucket, Key="hot", Body=body)
    s3 = relay_client(relay, upstream, pool=32)
    with ThreadPoolExecutor(32) as pool:
        got = list(
            pool.map(lambda _: s3.get_object(Bucket=bucket, Key="hot")["Body"].read(), range(64))
        )
    assert got == [body] * 64
    assert relay.count("GET", path_prefix=f"/{bucket}/hot") == 64
    assert relay.bytes_sent() == 64 * len(body)
    assert all(r.completed and r.status == 200 for r in relay.records())
    s3.close()


def test_delay_adds_to_each_response(relay: Relay, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    relay.delay = 0.3
    began = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 1000
    assert time.monotonic() - began >= 0.3
    assert relay.records()[-1].duration >= 0.3


def test_bandwidth_caps_response_bodies(
    relay: Relay, upstream: SeaweedS3, s3: Any, bucket: str
) -> None:
    body = os.urandom(4 * MiB)
    upstream.client().put_object(Bucket=bucket, Key="big", Body=body)
    cap = 16 * MiB
    relay.bandwidth = cap
    began = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == body
    elapsed = time.monotonic() - began
    assert elapsed >= 0.8 * len(body) / cap, elapsed
    relay.bandwidth = None
    assert relay.bytes_sent() == len(body)


# -- faults -----------------------------------------------------------------------------


def test_status_fault_answers_an_s3_error(relay: Relay, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    relay.reset()
    relay.fault = Fault(status=503, match_method="GET")

    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket=bucket, Key="k")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert failed.value.response["Error"]["Code"] == "SlowDown"
    assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == 7  # not matched

    # The raw answer: an S3 error document.
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{relay.endpoint_url}/{bucket}/k", timeout=5)
    assert raw.value.code == 503
    document = raw.value.read()
    assert b"<Error><Code>SlowDown</Code>" in document
    assert f"<Resource>/{bucket}/k</Resource>".encode() in document
    assert raw.value.headers["Content-Type"] == "application/xml"

    relay.fault = Fault(status=500, match_method="HEAD", times=1)
    with pytest.raises(ClientError) as head_failed:
        s3.head_object(Bucket=bucket, Key="k")
    assert head_failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert relay.fault is None
    assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == 7

    records = relay.records()
    assert [(r.method, r.status, r.fault) for r in records] == [
        ("GET", 503, "status=503"),
        ("HEAD", 200, None),
        ("GET", 503, "status=503"),
        ("HEAD", 500, "status=500"),
        ("HEAD", 200, None),
    ]
    # The faulty answers kept the connections alive: boto3's, and its upstream one.
    assert [r.connection - records[0].connection for r in records] == [0, 0, 1, 0, 0]
    assert relay.upstream_connections == 0  # none opened since reset()


def test_status_fault_times_once_then_retry_succeeds(
    relay: Relay, upstream: SeaweedS3, bucket: str
) -> None:
    """With retries, a PUT answered 500 once succeeds. botocore sends bodies with
    `Expect: 100-continue`: the fault answers without reading the body, and closes."""
    s3 = relay_client(relay, upstream, attempts=3)
    relay.fault = Fault(status=500, times=1, match_method="PUT", error_code="InternalError")
    s3.put_object(Bucket=bucket, Key="retried", Body=b"z" * 100_000)
    assert relay.fault is None
    assert [(r.method, r.status, r.fault) for r in relay.records()] == [
        ("PUT", 500, "status=500"),
        ("PUT", 200, None),
    ]
    failed, succeeded = relay.records()
    assert failed.headers["expect"] == "100-continue"
    assert (failed.request_body_bytes, succeeded.request_body_bytes) == (0, 100_000)
    assert failed.connection != succeeded.connection
    assert s3.get_object(Bucket=bucket, Key="retried")["Body"].read() == b"z" * 100_000
    s3.close()


def test_reset_fault_breaks_the_body(relay: Relay, s3: Any, bucket: str) -> None:
    body = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    relay.reset()
    relay.fault = Fault(reset_after_bytes=1000, times=1, match_path_prefix=f"/{bucket}/k")
    with pytest.raises((BotoCoreError, ConnectionError)):
        s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    [record] = relay.records()
    assert record.completed is False
    assert record.status == 200
    assert record.response_body_bytes == 1000
    assert record.fault == "reset_after_bytes=1000"

    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == body  # once only
    assert relay.records()[-1].completed


def test_stall_fault_holds_the_body(relay: Relay, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"y" * 5000)
    relay.fault = Fault(stall_seconds=0.4, times=1)
    began = time.monotonic()
    answer = s3.get_object(Bucket=bucket, Key="k")
    assert answer["Body"].read() == b"y" * 5000
    assert time.monotonic() - began >= 0.4
    record = relay.records()[-1]
    assert (record.fault, record.completed, record.response_body_bytes) == (
        "stall_seconds=0.4",
        True,
        5000,
    )


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault()
    with pytest.raises(ValueError):
        Fault(status=503, times=0)
    with pytest.raises(ValueError):
        Fault(reset_after_bytes=-1)
    assert Fault(status=503).matches("get", "/b/k")
    assert not Fault(status=503, match_method="PUT").matches("GET", "/b/k")
    assert not Fault(status=503, match_path_prefix="/b/x").matches("GET", "/b/k")
    assert Fault(status=503, stall_seconds=0.5).describe() == "status=503 stall_seconds=0.5"


# -- against a scripted upstream: byte for byte -------------------------------------------


class ScriptedUpstream:
    """A loopback HTTP server that records each request's raw bytes and answers with
    ``answer(head, body)``; answers ``100 Continue`` to ``Expect: 100-continue``."""

    def __init__(self, answer: Callable[[bytes, bytes], bytes]) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # A reset from the relay (its fault tests do that) just ends the exchange.
        with contextlib.suppress(ConnectionError):
            self._exchange(conn)

    def _exchange(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                head += b"\r\n\r\n"
                lower = head.lower()
                if b"expect: 100-continue" in lower:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if b"transfer-encoding: chunked" in lower:
                    # Chunks, then the last chunk, trailers and an empty line.
                    end = 0
                    while True:
                        while b"\r\n" not in buffer[end:]:
                            buffer += conn.recv(65536)
                        line_end = buffer.index(b"\r\n", end) + 2
                        size = int(buffer[end:line_end].split(b";")[0], 16)
                        if size == 0:
                            while b"\r\n\r\n" not in buffer[line_end - 2 :]:
                                buffer += conn.recv(65536)
                            end = buffer.index(b"\r\n\r\n", line_end - 2) + 4
                            break
                        while len(buffer) < line_end + size + 2:
                            buffer += conn.recv(65536)
                        end = line_end + size + 2
                    body, buffer = buffer[:end], buffer[end:]
                else:
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    while len(buffer) < length:
                        buffer += conn.recv(65536)
                    body, buffer = buffer[:length], buffer[length:]
                self.requests.append((head, body))
                conn.sendall(self.answer(head, body))


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_requests_and_responses_are_relayed_byte_for_byte() -> None:
    answers = [
        b'HTTP/1.1 200 OK\r\nETag: "abc"\r\ncontent-length: 5\r\nX-Odd:  spaced \r\n\r\nhello',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nworld\r\n3\r\n!!!\r\n0\r\nX-Trailer: t\r\n\r\n",
        b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: "h"\r\n\r\n',  # to a HEAD
        b'HTTP/1.1 304 Not Modified\r\nETag: "h"\r\nContent-Length: 1000\r\n\r\n',
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/9\r\n"
        b"Content-Length: 2\r\n\r\nab",
    ]
    script = iter(answers)
    fake = ScriptedUpstream(lambda head, body: next(script))
    requests = [
        b"GET //a/./b/../c%2F%20d?x=%20&y=+&z&list-type=2 HTTP/1.1\r\nHost: bucket.example:1234"
        b"\r\nX-Amz-Date: 20260101T000000Z\r\nx-dup: 1\r\nX-Dup: 2\r\n"
        b"Authorization:   AWS4-HMAC-SHA256 odd  \r\n\r\n",
        b"PUT /b/k%2B HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n"
        b"Content-Encoding: aws-chunked\r\n\r\n0123456789\n",
        b"HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n",
        b'GET /b/k HTTP/1.1\r\nHost: h\r\nIf-None-Match: "h"\r\n\r\n',
        b"POST /b?delete HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;a=b\r\nabcd\r\n0\r\nX-T: 1\r\n\r\n",
        b"GET /b/k HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n",
    ]
    try:
        with (
            Relay(f"http://127.0.0.1:{fake.port}") as relay,
            socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock,
        ):
            for request, answer in zip(requests, answers, strict=True):
                sock.sendall(request)
                assert receive(sock, len(answer)) == answer
            records = relay.records()
    finally:
        fake.close()

    assert [head + body for head, body in fake.requests] == requests
    assert fake.connections == 1  # kept alive
    assert [r.method for r in records] == ["GET", "PUT", "HEAD", "GET", "POST", "GET"]
    assert records[0].target == "//a/./b/../c%2F%20d?x=%20&y=+&z&list-type=2"
    assert records[0].headers["x-dup"] == "1, 2"
    assert records[0].headers["host"] == "bucket.example:1234"
    assert [r.status for r in records] == [200, 200, 200, 304, 204, 206]
    assert [r.response_body_bytes for r in records] == [5, 8, 0, 0, 0, 2]
    assert [r.request_body_bytes for r in records] == [0, 11, 0, 0, 4, 0]
    assert len({r.connection for r in records}) == 1


def test_expect_continue_is_relayed() -> None:
    fake = ScriptedUpstream(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    try:
        with (
            Relay(f"http://127.0.0.1:{fake.port}") as relay,
            socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock,
        ):
            sock.sendall(
                b"PUT /b/k HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            assert receive(sock, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            assert receive(sock, len(final)) == final

            # A fault on a request without Expect reads and drops its body, and the
            # connection stays usable.
            relay.fault = Fault(status=500, times=1)
            sock.sendall(b"PUT /b/k HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
            error = receive(sock, 1)
            while b"</Error>" not in error:
                error += sock.recv(65536)
            assert error.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
            assert b"<Code>InternalError</Code>" in error
            assert b"Connection: close" not in error
            sock.sendall(b"GET /b/k HTTP/1.1\r\nHost: h\r\n\r\n")
            assert receive(sock, len(final)) == final

            # With Expect, a fault answers at once, without the body, and closes.
            relay.fault = Fault(status=503, times=1)
            sock.sendall(
                b"PUT /b/k HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"\r\nConnection: close\r\n" in answer
            assert answer.endswith(b"</Error>")
            records = relay.records()
    finally:
        fake.close()
    assert [(r.status, r.request_body_bytes) for r in records] == [
        (200, 5),
        (500, 5),
        (200, 0),
        (503, 0),
    ]
    assert [body for _head, body in fake.requests] == [b"hello", b""]


def test_unreachable_upstream_is_502_and_lifecycle() -> None:
    relay = Relay(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError):
        relay.port  # noqa: B018
    relay.start()
    try:
        assert relay.endpoint_url == f"http://127.0.0.1:{relay.port}"
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"{relay.endpoint_url}/b/k", timeout=5)
        assert failed.value.code == 502
        assert b"<Code>BadGateway</Code>" in failed.value.read()
        assert relay.records()[0].status == 502
    finally:
        relay.stop()
    relay.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    with pytest.raises(ValueError):
        Relay("https://example.com")
    with pytest.raises(ValueError):
        Relay("http://127.0.0.1:1", bandwidth=0)


def test_reset_fault_sends_rst_after_exactly_n_bytes() -> None:
    body = os.urandom(100_000)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    fake = ScriptedUpstream(lambda _head, _body: head + body)
    try:
        with (
            Relay(f"http://127.0.0.1:{fake.port}") as relay,
            socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock,
        ):
            relay.fault = Fault(reset_after_bytes=4321)
            sock.sendall(b"GET /b/k HTTP/1.1\r\nHost: h\r\n\r\n")
            received = b""
            with pytest.raises(ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
            [record] = relay.records()
    finally:
        fake.close()
    assert received == head + body[:4321]
    assert (record.completed, record.response_body_bytes) == (False, 4321)
