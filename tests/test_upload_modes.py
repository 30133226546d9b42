"""Uploads through s3cache in every payload mode a client may use, each read back
directly from the upstream byte for byte.

Modes, by ``x-amz-content-sha256``
(https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-auth-using-authorization-header.html):

- a SHA-256 hex digest: what boto3 sends over plain http, with or without a CRC32
  header checksum;
- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``: what boto3 sends over https (aws-chunked,
  checksum in a trailer), here forced over http the way botocore decides it;
- ``UNSIGNED-PAYLOAD``;
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``: aws-chunked with chained chunk signatures,
  built by hand (:mod:`sigv4_streaming`).

Requests built by hand are signed with the upstream's keys: s3cache does not check
client signatures, it re-signs for the upstream.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError
from sigv4_streaming import (
    STREAMING_SIGNED,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    Keys,
    encode_signed_chunks,
    send,
    send_truncated,
    sign,
    signed_streaming_length,
    signed_streaming_put,
    signing_key,
    unsigned_trailer_put,
)

from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.seaweed import SeaweedS3

ClientFactory = Callable[..., Any]
Headers = dict[str, str]


def payload_of(length: int) -> bytes:
    """Deterministic bytes without a short period (a shifted chunk never matches)."""
    return bytes((i * 7 + i // 251) % 256 for i in range(length))


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def keys_of(upstream: SeaweedS3) -> Keys:
    return Keys(upstream.access_key, upstream.secret_key, upstream.region)


def object_path(bucket: str, key: str) -> str:
    return f"/{bucket}/{quote(key, safe='/~')}"


def stored(upstream: SeaweedS3, bucket: str, key: str) -> bytes:
    """The object as the upstream itself serves it."""
    body: bytes = upstream.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def upstream_has(upstream: SeaweedS3, bucket: str, key: str) -> bool:
    try:
        upstream.client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return False
        raise
    return True


def wire_headers(client: Any) -> list[Headers]:
    """Collect the headers of every PutObject that ``client`` sends, as sent."""
    sent: list[Headers] = []

    def capture(request: Any, **kwargs: Any) -> None:
        sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else str(value)
                for name, value in request.headers.items()
            }
        )

    client.meta.events.register("before-send.s3.PutObject", capture)
    return sent


def checksum_in_trailer(params: dict[str, Any], **kwargs: Any) -> None:
    """Have botocore put the request checksum in a trailer, as it does over https
    (``botocore.httpchecksum.resolve_request_checksum_algorithm``): it then sends the
    body aws-chunked with STREAMING-UNSIGNED-PAYLOAD-TRAILER."""
    algorithm = params["context"]["checksum"]["request_algorithm"]
    algorithm["in"] = "trailer"


def explain(s3cache: S3CacheProcess, status: int, body: bytes) -> str:
    return f"HTTP {status}: {body[:600]!r}\n--- s3cache log ---\n{s3cache.log_tail()}"


# --- upload in each mode ----------------------------------------------------------------

Upload = Callable[[S3CacheProcess, SeaweedS3, ClientFactory, str, str, bytes], Headers]


def upload_boto3_default(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    make_client: ClientFactory,
    bucket: str,
    key: str,
    payload: bytes,
) -> Headers:
    client = make_client()
    sent = wire_headers(client)
    client.put_object(Bucket=bucket, Key=key, Body=io.BytesIO(payload))
    assert len(sent) == 1
    return sent[0]


def upload_boto3_trailer(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    make_client: ClientFactory,
    bucket: str,
    key: str,
    payload: bytes,
) -> Headers:
    client = make_client()
    client.meta.events.register("before-call.s3.PutObject", checksum_in_trailer)
    sent = wire_headers(client)
    client.put_object(Bucket=bucket, Key=key, Body=io.BytesIO(payload))
    assert len(sent) == 1
    return sent[0]


def upload_signed_payload(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    make_client: ClientFactory,
    bucket: str,
    key: str,
    payload: bytes,
) -> Headers:
    client = make_client(request_checksum_calculation="when_required")
    sent = wire_headers(client)
    client.put_object(Bucket=bucket, Key=key, Body=payload)
    assert len(sent) == 1
    return sent[0]


def upload_hand_signed(
    content_sha256: str,
) -> Upload:
    def upload(
        s3cache: S3CacheProcess,
        upstream: SeaweedS3,
        make_client: ClientFactory,
        bucket: str,
        key: str,
        payload: bytes,
    ) -> Headers:
        path = object_path(bucket, key)
        if content_sha256 == STREAMING_SIGNED:
            headers, body = signed_streaming_put(
                s3cache.endpoint_url, path, payload, keys_of(upstream)
            )
        elif content_sha256 == STREAMING_UNSIGNED_TRAILER:
            headers, body = unsigned_trailer_put(
                s3cache.endpoint_url, path, payload, keys_of(upstream)
            )
        else:
            headers = {"Content-Length": str(len(payload))}
            headers = sign(
                "PUT", s3cache.endpoint_url, path, headers, content_sha256, keys_of(upstream)
            )
            body = payload
        response = send(s3cache.port, "PUT", path, headers, body)
        assert response.status == 200, explain(s3cache, response.status, response.body)
        return {name.lower(): value for name, value in headers.items()}

    return upload


UPLOADS: dict[str, Upload] = {
    "boto3-default": upload_boto3_default,
    "boto3-trailer": upload_boto3_trailer,
    "signed-payload": upload_signed_payload,
    "unsigned-payload": upload_hand_signed(UNSIGNED_PAYLOAD),
    "hand-unsigned-trailer": upload_hand_signed(STREAMING_UNSIGNED_TRAILER),
    "streaming-signed": upload_hand_signed(STREAMING_SIGNED),
}


# --- each mode: what goes on the wire, and the object on the upstream -------------------


def test_boto3_default_over_http_signs_the_payload_and_sends_crc32_header(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    """Over plain http botocore does not use the trailer: it signs the payload hash and
    sends the CRC32 as a header (resolve_request_checksum_algorithm)."""
    payload = payload_of(300_000)
    sent = upload_boto3_default(s3cache, upstream, make_client, bucket, "default", payload)
    assert sent["x-amz-content-sha256"] == hashlib.sha256(payload).hexdigest()
    assert sent["x-amz-checksum-crc32"] == crc32_b64(payload)
    assert "content-encoding" not in sent
    assert stored(upstream, bucket, "default") == payload


def test_boto3_unsigned_payload_trailer(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    """boto3's https default: aws-chunked body with the CRC32 in a trailer, sent with
    Transfer-Encoding: chunked (the encoded length is not known up front)."""
    payload = payload_of(3 * 1024 * 1024 + 12_345)  # several of botocore's 1 MiB chunks
    sent = upload_boto3_trailer(s3cache, upstream, make_client, bucket, "trailer", payload)
    assert sent["x-amz-content-sha256"] == STREAMING_UNSIGNED_TRAILER
    assert sent["content-encoding"] == "aws-chunked"
    assert sent["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert sent["x-amz-decoded-content-length"] == str(len(payload))
    assert sent["transfer-encoding"] == "chunked"
    assert "content-length" not in sent
    assert stored(upstream, bucket, "trailer") == payload
    head = upstream.client().head_object(Bucket=bucket, Key="trailer")
    assert head["ContentLength"] == len(payload)
    # No check of the stored Content-Encoding: s3cache passes this mode through as it
    # came, and SeaweedFS keeps "aws-chunked" as the object's encoding even when sent
    # the body directly (S3 drops it).


def test_signed_payload(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    payload = payload_of(200_000)
    sent = upload_signed_payload(s3cache, upstream, make_client, bucket, "signed", payload)
    assert sent["x-amz-content-sha256"] == hashlib.sha256(payload).hexdigest()
    assert not any(name.startswith("x-amz-checksum-") for name in sent)
    assert "content-encoding" not in sent
    assert stored(upstream, bucket, "signed") == payload


def test_unsigned_payload(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    payload = payload_of(200_000)
    sent = UPLOADS["unsigned-payload"](s3cache, upstream, make_client, bucket, "u", payload)
    assert sent["x-amz-content-sha256"] == UNSIGNED_PAYLOAD
    assert stored(upstream, bucket, "u") == payload


def test_hand_built_unsigned_trailer_with_content_length(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    """The trailer mode again, with a Content-Length instead of HTTP chunking."""
    payload = payload_of(200_000)
    sent = UPLOADS["hand-unsigned-trailer"](s3cache, upstream, make_client, bucket, "t", payload)
    assert sent["x-amz-content-sha256"] == STREAMING_UNSIGNED_TRAILER
    assert stored(upstream, bucket, "t") == payload


def test_streaming_signed_payload(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    payload = payload_of(200 * 1024 + 17)  # three full 64 KiB chunks and a short one
    sent = UPLOADS["streaming-signed"](s3cache, upstream, make_client, bucket, "s", payload)
    assert sent["x-amz-content-sha256"] == STREAMING_SIGNED
    assert sent["content-encoding"] == "aws-chunked"
    assert sent["x-amz-decoded-content-length"] == str(len(payload))
    assert int(sent["content-length"]) == signed_streaming_length(len(payload), 64 * 1024)
    assert stored(upstream, bucket, "s") == payload
    head = upstream.client().head_object(Bucket=bucket, Key="s")
    assert head["ContentLength"] == len(payload)
    assert "ContentEncoding" not in head


def test_streaming_signed_payload_keeps_other_headers(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str
) -> None:
    payload = payload_of(70_000)
    path = object_path(bucket, "meta")
    headers, body = signed_streaming_put(
        s3cache.endpoint_url,
        path,
        payload,
        keys_of(upstream),
        extra_headers={"Content-Type": "text/x-test", "x-amz-meta-origin": "chunked"},
    )
    response = send(s3cache.port, "PUT", path, headers, body)
    assert response.status == 200, explain(s3cache, response.status, response.body)
    got = upstream.client().get_object(Bucket=bucket, Key="meta")
    assert got["Body"].read() == payload
    assert got["ContentType"] == "text/x-test"
    assert got["Metadata"] == {"origin": "chunked"}


def test_streaming_signed_body_is_accepted_by_the_upstream_itself(
    upstream: SeaweedS3, bucket: str
) -> None:
    """Control for the hand-built encoding: the upstream takes it as it is."""
    payload = payload_of(150_000)
    path = object_path(bucket, "direct")
    headers, body = signed_streaming_put(upstream.endpoint_url, path, payload, keys_of(upstream))
    response = send(upstream.port, "PUT", path, headers, body)
    assert response.status == 200, response.body[:600]
    assert stored(upstream, bucket, "direct") == payload


def test_chunk_signatures_match_the_aws_documentation_example() -> None:
    """sigv4-streaming "Example: PUT Object": 66,560 bytes of 'a' in 64 KiB chunks."""
    key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524", "us-east-1")
    body = encode_signed_chunks(
        b"a" * 66560,
        65536,
        key,
        "20130524T000000Z",
        "20130524/us-east-1/s3/aws4_request",
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    )
    assert len(body) == 66824 == signed_streaming_length(66560, 65536)
    assert body.startswith(
        b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
    )
    assert (
        b"\r\n400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
        in body
    )
    assert body.endswith(
        b"\r\n0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"
        b"\r\n\r\n"
    )


# --- every mode: empty and odd sizes ------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 65536])
@pytest.mark.parametrize("mode", list(UPLOADS))
def test_sizes_in_every_mode(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    make_client: ClientFactory,
    bucket: str,
    mode: str,
    length: int,
) -> None:
    payload = payload_of(length)
    key = f"{mode}/{length}"
    UPLOADS[mode](s3cache, upstream, make_client, bucket, key, payload)
    assert stored(upstream, bucket, key) == payload
    assert upstream.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == length
    # And read back through s3cache as well.
    assert make_client().get_object(Bucket=bucket, Key=key)["Body"].read() == payload


# --- a client that goes away mid-body ---------------------------------------------------


def truncated_request(mode: str, endpoint_url: str, path: str, keys: Keys) -> tuple[Headers, bytes]:
    """Headers and the first half of a 300 KB body, in ``mode``."""
    payload = payload_of(300_000)
    if mode == "unsigned-payload":
        headers = sign(
            "PUT", endpoint_url, path, {"Content-Length": str(len(payload))}, UNSIGNED_PAYLOAD, keys
        )
        body = payload
    elif mode == "signed-payload":
        digest = hashlib.sha256(payload).hexdigest()
        headers = sign(
            "PUT", endpoint_url, path, {"Content-Length": str(len(payload))}, digest, keys
        )
        body = payload
    elif mode == "unsigned-trailer":
        headers, body = unsigned_trailer_put(endpoint_url, path, payload, keys)
    else:
        headers, body = signed_streaming_put(endpoint_url, path, payload, keys)
    return headers, body[: len(body) // 2]


@pytest.mark.parametrize(
    "mode", ["unsigned-payload", "signed-payload", "unsigned-trailer", "streaming-signed"]
)
def test_truncated_body_creates_nothing(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    make_client: ClientFactory,
    bucket: str,
    mode: str,
) -> None:
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key="other", Body=b"still served")
    path = object_path(bucket, "truncated")
    headers, partial = truncated_request(mode, s3cache.endpoint_url, path, keys_of(upstream))
    send_truncated(s3cache.port, "PUT", path, headers, partial)
    # s3cache still serves, on a new connection.
    client = make_client()
    assert client.get_object(Bucket=bucket, Key="other")["Body"].read() == b"still served"
    # Give s3cache and the upstream time to finish with the broken request.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert not upstream_has(upstream, bucket, "truncated"), s3cache.log_tail()
        time.sleep(0.2)
    keys = [item["Key"] for item in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["other"]


def test_many_truncated_bodies_do_not_wear_s3cache_down(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    """Aborted uploads must not leak upstream connections or stall the server."""
    keys = keys_of(upstream)
    for i in range(20):
        path = object_path(bucket, f"cut-{i}")
        mode = ["unsigned-payload", "streaming-signed"][i % 2]
        headers, partial = truncated_request(mode, s3cache.endpoint_url, path, keys)
        send_truncated(s3cache.port, "PUT", path, headers, partial)
    client = make_client()
    key = f"after-{uuid.uuid4().hex[:6]}"
    client.put_object(Bucket=bucket, Key=key, Body=b"fine")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"fine"
    time.sleep(1.0)
    listed = upstream.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [item["Key"] for item in listed] == [key]


# --- malformed aws-chunked bodies -------------------------------------------------------


def _streaming_headers_for(
    path: str, endpoint_url: str, keys: Keys, decoded: int, encoded: int
) -> Headers:
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(decoded),
        "Content-Length": str(encoded),
    }
    return sign("PUT", endpoint_url, path, headers, STREAMING_SIGNED, keys)


SIG = "f" * 64
SIGNED_HELLO = f"5;chunk-signature={SIG}\r\nhello\r\n0;chunk-signature={SIG}\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("body", "decoded"),
    [
        pytest.param(b"this is not aws-chunked at all\r\n\r\n", 10, id="garbage"),
        pytest.param(SIGNED_HELLO, 10, id="shorter-than-decoded-length"),
        pytest.param(SIGNED_HELLO, 3, id="longer-than-decoded-length"),
        pytest.param(SIGNED_HELLO[: SIGNED_HELLO.index(b"0;")], 5, id="no-final-chunk"),
        pytest.param(SIGNED_HELLO + b"junk", 5, id="data-after-the-end"),
    ],
)
def test_malformed_signed_streaming_body_is_a_400_and_creates_nothing(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    bucket: str,
    body: bytes,
    decoded: int,
) -> None:
    """The upstream must never get a whole body out of a broken aws-chunked one."""
    path = object_path(bucket, "malformed")
    headers = _streaming_headers_for(
        path, s3cache.endpoint_url, keys_of(upstream), decoded, len(body)
    )
    response = send(s3cache.port, "PUT", path, headers, body)
    time.sleep(0.3)
    created = upstream_has(upstream, bucket, "malformed")
    # 400 for a malformed body; 403 SignatureDoesNotMatch when the chunk signatures no
    # longer chain from the request's (as S3 answers). Never an object.
    assert response.status in (400, 403) and not created, explain(
        s3cache, response.status, response.body
    )
    assert response.body.startswith(b"<?xml"), response.body[:300]


def test_bad_chunk_signature_is_rejected(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str
) -> None:
    """SeaweedFS answers a bad chunk signature with an error and stores nothing; S3
    answers 403 SignatureDoesNotMatch. Through s3cache it is stored."""
    payload = payload_of(100_000)
    path = object_path(bucket, "forged")
    headers, body = signed_streaming_put(s3cache.endpoint_url, path, payload, keys_of(upstream))
    at = body.index(b"chunk-signature=") + len(b"chunk-signature=")
    forged = body[:at] + b"0" * 64 + body[at + 64 :]
    response = send(s3cache.port, "PUT", path, headers, forged)
    assert response.status == 403
    assert not upstream_has(upstream, bucket, "forged")
