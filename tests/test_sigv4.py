"""SigV4 verification of client requests (:mod:`s3cache.s3.sigv4`), pure and offline,
through the entry point for both signature versions (:mod:`s3cache.s3.signatures`;
SigV2 itself is tested in ``test_sigv2``).

1. AWS's SigV4 test suite (``tests/data/sigv4/aws4-testsuite``, see its README): every
   request verifies with its published signature, and fails once the signature, a
   signed header or the path changes. The suite signs for service "service", which
   normalizes paths; S3 does not, so its ``*-normalized`` signatures must fail here and
   the ``*-unnormalized`` ones verify.
2. The worked examples of the S3 API reference: GET Object with Range, PUT Object, GET
   Bucket lifecycle, List Objects, the presigned URL, the chunked upload and its
   trailer variant.
3. Requests that botocore (through boto3) and the AWS CLI really produce: odd keys, odd
   query values, both addressing styles, http and https, presigned URLs.
4. Every error, with the code and status S3 answers.
5. Hypothesis: random keys, queries and headers signed by botocore verify; a signature
   with any one character changed does not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import given, settings
from hypothesis import strategies as st
from sigv4_streaming import Keys, signed_streaming_put, unsigned_trailer_put

from s3cache.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    IncompleteBody,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
)
from s3cache.s3.chunked import AwsChunkedDecoder
from s3cache.s3.signatures import verify_request
from s3cache.s3.sigv4 import (
    ChunkVerifier,
    Credentials,
    PayloadMode,
    SignatureV2,
    Unsigned,
    VerifiedRequest,
    chunk_verifier,
    secret_lookup,
)

HeaderList = list[tuple[str, str]]

# -- 1. AWS's SigV4 test suite -------------------------------------------------------------

SUITE = Path(__file__).parent / "data" / "sigv4" / "aws4-testsuite"
SUITE_SECRETS = secret_lookup(
    [Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")]
)
SUITE_NOW = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)
# Signed over the dot-segment-free, slash-merged path: valid for other services only.
NORMALIZED = {
    "get-relative-normalized",
    "get-relative-relative-normalized",
    "get-slash-dot-slash-normalized",
    "get-slash-normalized",
    "get-slash-pointless-dot-normalized",
    "get-slashes-normalized",
}
VECTORS = sorted(path.stem for path in SUITE.glob("*.req"))
ACCEPTED = [name for name in VECTORS if name not in NORMALIZED]


def parse_raw(text: str) -> tuple[str, str, HeaderList, bytes]:
    """Method, target, headers (as an HTTP parser gives them) and body of a .req file."""
    head, _, body = text.partition("\n\n")
    request_line, *lines = head.split("\n")
    method, rest = request_line.split(" ", 1)
    target = rest.rsplit(" ", 1)[0]  # the suite writes spaces in targets unencoded
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    return method, target, headers, body.encode()


def suite_request(name: str) -> tuple[str, str, HeaderList]:
    method, target, headers, body = parse_raw((SUITE / f"{name}.req").read_text("utf-8"))
    if not any(n.lower() == "x-amz-content-sha256" for n, _ in headers):
        # S3 takes the payload hash from this header; the suite's service hashes the
        # body itself. Unsigned, it changes nothing but where the hash comes from.
        headers.append(("x-amz-content-sha256", hashlib.sha256(body).hexdigest()))
    return method, target, headers


def verify_suite(method: str, target: str, headers: HeaderList) -> VerifiedRequest:
    return verify_request(
        method, target, headers, SUITE_SECRETS, now=SUITE_NOW, region="us-east-1", service="service"
    )


def test_the_suite_is_all_there() -> None:
    assert len(VECTORS) == 28 and set(VECTORS) >= NORMALIZED


@pytest.mark.parametrize("name", ACCEPTED)
def test_suite_vector_verifies(name: str) -> None:
    verified = verify_suite(*suite_request(name))
    assert verified.access_key == "AKIDEXAMPLE"
    assert verified.scope == "20150830/us-east-1/service/aws4_request"
    assert verified.timestamp == "20150830T123600Z"


@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_suite_normalized_signature_fails_because_s3_does_not_normalize(name: str) -> None:
    with pytest.raises(SignatureDoesNotMatch):
        verify_suite(*suite_request(name))


def replace_header(headers: HeaderList, name: str, change: Callable[[str], str]) -> HeaderList:
    return [(n, change(v) if n.lower() == name else v) for n, v in headers]


def flip_signature(authorization: str) -> str:
    head, signature = authorization.rsplit("=", 1)
    return f"{head}={flip(signature, len(signature) // 2)}"


def flip(text: str, index: int) -> str:
    """Change one hex digit."""
    return text[:index] + ("0" if text[index] != "0" else "1") + text[index + 1 :]


@pytest.mark.parametrize("name", ACCEPTED)
def test_suite_vector_fails_once_anything_signed_changes(name: str) -> None:
    method, target, headers = suite_request(name)
    path, sep, query = target.partition("?")
    tampered = [
        (method, target, replace_header(headers, "authorization", flip_signature)),
        (method, target, replace_header(headers, "host", lambda v: v + "m")),
        (method, target, replace_header(headers, "x-amz-date", lambda v: v[:-2] + "1Z")),
        (method, path + "x" + sep + query, headers),
        (method, path.replace("/", "//", 1) + sep + query, headers),
        ("PUT" if method == "GET" else "GET", target, headers),
    ]
    if query:
        tampered.append((method, f"{path}?{query}&extra=1", headers))
    for tampered_request in tampered:
        with pytest.raises(SignatureDoesNotMatch):
            verify_suite(*tampered_request)


def test_suite_duplicate_header_values_are_signed_in_order() -> None:
    method, target, headers = suite_request("get-header-value-order")
    values = [v for n, v in headers if n == "My-Header1"]
    others = [(n, v) for n, v in headers if n != "My-Header1"]
    reordered = others + [("My-Header1", v) for v in reversed(values)]
    with pytest.raises(SignatureDoesNotMatch):
        verify_suite(method, target, reordered)
    # Header names in any case.
    verify_suite(
        method, target, [(n.upper(), v) for n, v in others] + [("my-header1", v) for v in values]
    )


# -- 2. the S3 API reference's examples ----------------------------------------------------

DOC_KEY = "AKIAIOSFODNN7EXAMPLE"
DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DOC_SECRETS = secret_lookup([Credentials(DOC_KEY, DOC_SECRET)])
DOC_NOW = datetime(2013, 5, 24, tzinfo=UTC)
DOC_HOST = "examplebucket.s3.amazonaws.com"
EMPTY = hashlib.sha256(b"").hexdigest()
STREAMING_HOST = "s3.amazonaws.com"


def doc_authorization(signed_headers: str, signature: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed_headers},Signature={signature}"
    )


# https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
DOC_EXAMPLES = {
    "GET Object": (
        "GET",
        "/test.txt",
        {"Range": "bytes=0-9", "x-amz-content-sha256": EMPTY},
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    "PUT Object": (
        "PUT",
        "/test$file.text",  # sent as is, signed as /test%24file.text
        {
            "Date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(),
        },
        "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "GET Bucket lifecycle": (
        "GET",
        "/?lifecycle",
        {"x-amz-content-sha256": EMPTY},
        "host;x-amz-content-sha256;x-amz-date",
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    "List Objects": (
        "GET",
        "/?max-keys=2&prefix=J",
        {"x-amz-content-sha256": EMPTY},
        "host;x-amz-content-sha256;x-amz-date",
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
}


@pytest.mark.parametrize("example", DOC_EXAMPLES)
def test_s3_documentation_example_verifies(example: str) -> None:
    method, target, extra, signed_headers, signature = DOC_EXAMPLES[example]
    headers = {
        "Host": DOC_HOST,
        "x-amz-date": "20130524T000000Z",
        **extra,
        "Authorization": doc_authorization(signed_headers, signature),
    }
    verified = verify_request(method, target, headers, DOC_SECRETS, now=DOC_NOW, region="us-east-1")
    assert verified.payload_mode is PayloadMode.SIGNED
    assert verified.payload_sha256 == extra["x-amz-content-sha256"]
    with pytest.raises(SignatureDoesNotMatch):
        verify_request(method, target + "x", headers, DOC_SECRETS, now=DOC_NOW)


# https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html
DOC_PRESIGNED = (
    "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
)


def test_s3_documentation_presigned_url_verifies_for_86400_seconds() -> None:
    headers = {"Host": DOC_HOST}
    for now in (DOC_NOW, DOC_NOW + timedelta(seconds=86400)):
        verified = verify_request("GET", DOC_PRESIGNED, headers, DOC_SECRETS, now=now)
        assert verified.presigned and verified.payload_mode is PayloadMode.UNSIGNED
    with pytest.raises(AccessDenied, match="^Request has expired$"):
        verify_request(
            "GET", DOC_PRESIGNED, headers, DOC_SECRETS, now=DOC_NOW + timedelta(days=1, seconds=1)
        )
    with pytest.raises(SignatureDoesNotMatch):
        verify_request(
            "GET", DOC_PRESIGNED.replace("test", "tesT"), headers, DOC_SECRETS, now=DOC_NOW
        )


CHUNK_SIGNATURES = (
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
)
CHUNKS = (b"a" * 65536, b"a" * 1024, b"")


def chunked_body(
    signatures: tuple[str, ...], chunks: tuple[bytes, ...] = CHUNKS, trailer: bytes = b""
) -> bytes:
    body = b"".join(
        b"%x;chunk-signature=%s\r\n%s" % (len(data), sig.encode(), data + b"\r\n" if data else b"")
        for sig, data in zip(signatures, chunks, strict=True)
    )
    return body + trailer + b"\r\n"


def streaming_request(
    payload: str, signed_headers: str, signature: str, **extra: str
) -> VerifiedRequest:
    headers = {
        "Host": STREAMING_HOST,
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": payload,
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
        **extra,
        "Authorization": doc_authorization(signed_headers, signature),
    }
    return verify_request(
        "PUT",
        "/examplebucket/chunkObject.txt",
        headers,
        DOC_SECRETS,
        now=DOC_NOW,
        region="us-east-1",
    )


def doc_streaming_request() -> VerifiedRequest:
    """https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-streaming.html"""
    return streaming_request(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
        "x-amz-decoded-content-length;x-amz-storage-class",
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
        **{"Content-Length": "66824"},
    )


def doc_trailer_request() -> VerifiedRequest:
    """https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-streaming-trailers.html"""
    return streaming_request(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
        "content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
        "x-amz-storage-class;x-amz-trailer",
        "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
        **{"x-amz-trailer": "x-amz-checksum-crc32c"},
    )


TRAILER_CHUNK_SIGNATURES = (
    "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
    "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
    "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
)
TRAILER_SIGNATURE = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"


def decode_verified(verified: VerifiedRequest, body: bytes, step: int = 4099) -> bytes:
    """Decode and verify a whole streaming body fed in pieces of ``step`` bytes."""
    verifier = chunk_verifier(verified)
    decoder = AwsChunkedDecoder(
        chunk_hasher_factory=verifier.new_hasher, on_chunk_end=verifier.on_chunk_end
    )
    out = [piece for i in range(0, len(body), step) for piece in decoder.feed(body[i : i + step])]
    decoder.finish()
    verifier.finish(decoder.trailers)
    return b"".join(out)


def test_s3_documentation_chunked_upload_verifies_chunk_by_chunk() -> None:
    verified = doc_streaming_request()
    assert verified.payload_mode is PayloadMode.STREAMING_SIGNED
    body = chunked_body(CHUNK_SIGNATURES)
    assert len(body) == 66824
    for step in (1 << 20, 8192, 7):
        assert decode_verified(verified, body, step) == b"a" * 66560


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(chunked_body(CHUNK_SIGNATURES).replace(b"\r\naaa", b"\r\naba", 1), id="data"),
        pytest.param(chunked_body((*CHUNK_SIGNATURES[:2], "b" * 64)), id="final-signature"),
        pytest.param(chunked_body(CHUNK_SIGNATURES[1:], CHUNKS[1:]), id="first-chunk-dropped"),
        pytest.param(
            chunked_body(CHUNK_SIGNATURES, (b"a" * 1024, b"a" * 65536, b"")), id="reordered"
        ),
        pytest.param(
            chunked_body(CHUNK_SIGNATURES, trailer=b"x-amz-checksum-crc32:AAAAAA==\r\n"),
            id="unsigned-trailer",
        ),
    ],
)
def test_chunked_upload_tampering_fails(body: bytes) -> None:
    with pytest.raises(SignatureDoesNotMatch):
        decode_verified(doc_streaming_request(), body)


def test_chunked_upload_without_its_final_chunk_is_incomplete() -> None:
    verifier = chunk_verifier(doc_streaming_request())
    decoder = AwsChunkedDecoder(
        chunk_hasher_factory=verifier.new_hasher, on_chunk_end=verifier.on_chunk_end
    )
    decoder.feed(chunked_body(CHUNK_SIGNATURES).split(b"0;chunk-signature")[0])
    with pytest.raises(IncompleteBody):
        verifier.finish({})


def trailer_body(checksum: str = "sOO8/Q==", signature: str | None = TRAILER_SIGNATURE) -> bytes:
    trailer = f"x-amz-checksum-crc32c:{checksum}\r\n"
    if signature is not None:
        trailer += f"x-amz-trailer-signature:{signature}\r\n"
    return chunked_body(TRAILER_CHUNK_SIGNATURES, trailer=trailer.encode())


def test_s3_documentation_trailer_upload_verifies() -> None:
    verified = doc_trailer_request()
    assert verified.payload_mode is PayloadMode.STREAMING_SIGNED_TRAILER
    assert decode_verified(verified, trailer_body()) == b"a" * 66560


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(trailer_body(checksum="AAAAAA=="), id="checksum"),
        pytest.param(trailer_body(signature=None), id="no-trailer-signature"),
        pytest.param(trailer_body(signature="0" * 64), id="trailer-signature"),
        pytest.param(
            trailer_body().replace(b"x-amz-trailer-sig", b"x-amz-meta-x:1\r\nx-amz-trailer-sig"),
            id="extra-trailer",
        ),
    ],
)
def test_trailer_tampering_fails(body: bytes) -> None:
    with pytest.raises(SignatureDoesNotMatch):
        decode_verified(doc_trailer_request(), body)


KEYS = Keys("AKIDSTREAM", "stream/secret+key=", "eu-west-1")
KEY_SECRETS = secret_lookup([Credentials(KEYS.access_key, KEYS.secret_key)])


def verify_signed_headers(method: str, path: str, headers: dict[str, str]) -> VerifiedRequest:
    """Verify headers from tests/sigv4_streaming.py, which sends Host 127.0.0.1:9000."""
    pairs = [("Host", "127.0.0.1:9000"), *headers.items()]
    return verify_request(
        method, path, pairs, KEY_SECRETS, now=datetime.now(UTC), region="eu-west-1"
    )


def test_signed_streaming_put_signed_by_botocore_verifies() -> None:
    payload = bytes(range(256)) * 700
    path = "/bucket/dir/a%20b%2Bc"
    headers, body = signed_streaming_put(
        "http://127.0.0.1:9000", path, payload, KEYS, chunk_size=65536
    )
    verified = verify_signed_headers("PUT", path, headers)
    assert decode_verified(verified, body, 1000) == payload


def test_unsigned_trailer_put_by_botocore_verifies_and_refuses_chunk_signatures() -> None:
    payload = b"hello world" * 10000
    headers, body = unsigned_trailer_put("http://127.0.0.1:9000", "/bucket/k", payload, KEYS)
    verified = verify_signed_headers("PUT", "/bucket/k", headers)
    assert verified.payload_mode is PayloadMode.STREAMING_UNSIGNED_TRAILER
    assert decode_verified(verified, body) == payload
    with pytest.raises(SignatureDoesNotMatch):
        decode_verified(verified, chunked_body(CHUNK_SIGNATURES))


def test_chunk_verifier_is_for_streaming_payloads_only() -> None:
    verified = verify_request("GET", DOC_PRESIGNED, {"Host": DOC_HOST}, DOC_SECRETS, now=DOC_NOW)
    with pytest.raises(ValueError):
        chunk_verifier(verified)


# -- 3. real requests from botocore and the AWS CLI ------------------------------------------

ACCESS_KEY = "AKIDCLIENT"
SECRET_KEY = "client/secret+key=="
SECRETS = secret_lookup([Credentials(ACCESS_KEY, SECRET_KEY)])
REGION = "eu-west-1"
ODD_KEYS = [
    "plain.txt",
    "a b",
    "ü/日本語 ☃.txt",
    "a+b",
    "a=b&c",
    "100%",
    "%2F",
    "a//b",
    "dir/",
    "~tilde/-_.",
    "!$'()*,;:@[]",
    "../x/./y",
    "/leading",
    "q?x#y",
]
ENDPOINTS = [
    ("http://127.0.0.1:9000", "path"),
    ("http://s3cache.test:9000", "virtual"),
    ("https://s3.example.test", "path"),
    ("https://s3.example.test:8443", "virtual"),
]


class Captured(Exception):
    def __init__(self, request: AWSPreparedRequest) -> None:
        super().__init__("captured")
        self.request = request


def capture(request: AWSPreparedRequest, **_: Any) -> None:
    raise Captured(request)


def make_client(endpoint: str, style: str, **config: Any) -> Any:
    """A boto3 client whose requests are caught signed, just before they would be sent."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 0}, **config),
    )
    client.meta.events.register("before-send.s3", capture)
    return client


@pytest.fixture(scope="module", params=ENDPOINTS, ids=[f"{e}-{s}" for e, s in ENDPOINTS])
def client(request: pytest.FixtureRequest) -> Any:
    endpoint, style = request.param
    return make_client(endpoint, style)


def wire(call: Callable[[], Any]) -> tuple[str, str, HeaderList]:
    """Method, request target and headers of the request a boto3 call sends. Host is the
    one urllib3 adds: the URL's host and port, as botocore signs it."""
    with pytest.raises(Captured) as caught:
        call()
    request = caught.value.request
    url = urlsplit(request.url)
    headers = [
        (name, value.decode() if isinstance(value, bytes) else value)
        for name, value in request.headers.items()
    ]
    target = url.path + (f"?{url.query}" if url.query else "")
    return request.method, target, [("Host", url.netloc), *headers]


def verify(method: str, target: str, headers: HeaderList, **kwargs: Any) -> VerifiedRequest:
    kwargs.setdefault("now", datetime.now(UTC))
    kwargs.setdefault("region", REGION)
    return verify_request(method, target, headers, SECRETS, **kwargs)


def operations(client: Any, key: str, bucket: str = "bucket") -> Iterator[Callable[[], Any]]:
    yield lambda: client.get_object(Bucket=bucket, Key=key, Range="bytes=0-9")
    yield lambda: client.head_object(Bucket=bucket, Key=key, IfNoneMatch='"etag"')
    yield lambda: client.put_object(
        Bucket=bucket, Key=key, Body=b"data", Metadata={"note": "a   b"}, ContentType="text/plain"
    )
    yield lambda: client.upload_part(
        Bucket=bucket, Key=key, UploadId="id+/=", PartNumber=3, Body=b"x"
    )
    yield lambda: client.create_multipart_upload(Bucket=bucket, Key=key)
    yield lambda: client.delete_object(Bucket=bucket, Key=key, VersionId="v 1+")


@pytest.mark.parametrize("key", ODD_KEYS)
def test_boto3_object_requests_verify(client: Any, key: str) -> None:
    for call in operations(client, key):
        method, target, headers = wire(call)
        verified = verify(method, target, headers)
        assert verified.access_key == ACCESS_KEY and not verified.presigned
        assert verified.region == REGION


def test_boto3_list_requests_verify(client: Any) -> None:
    calls = [
        lambda: client.list_objects_v2(
            Bucket="bucket", Prefix="a b/ü+", ContinuationToken="1a+/b==", StartAfter="~x"
        ),
        lambda: client.list_objects(Bucket="bucket", Delimiter="/", Marker="m=1&x", MaxKeys=7),
        lambda: client.list_buckets(),
        lambda: client.get_bucket_lifecycle_configuration(Bucket="bucket"),
        lambda: client.list_object_versions(Bucket="bucket", KeyMarker="k k", VersionIdMarker="+"),
    ]
    for call in calls:
        verify(*wire(call))


def test_https_put_streams_with_an_unsigned_trailer_and_http_signs_the_payload() -> None:
    method, target, headers = wire(
        lambda: make_client("https://s3.example.test", "path").put_object(
            Bucket="b", Key="k", Body=b"data"
        )
    )
    assert verify(method, target, headers).payload_mode is PayloadMode.STREAMING_UNSIGNED_TRAILER
    method, target, headers = wire(
        lambda: make_client("http://127.0.0.1:9000", "path").put_object(
            Bucket="b", Key="k", Body=b"data"
        )
    )
    verified = verify(method, target, headers)
    assert verified.payload_mode is PayloadMode.SIGNED
    assert verified.payload_sha256 == hashlib.sha256(b"data").hexdigest()


def test_botocore_signing_with_a_date_header_verifies() -> None:
    """botocore signs with the Date header instead of X-Amz-Date when a request has one."""
    request = AWSRequest(
        method="GET", url="http://127.0.0.1:9000/bucket/k", headers={"Date": "now"}
    )
    S3SigV4Auth(BotoCredentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    assert "X-Amz-Date" not in request.headers
    headers = [("Host", "127.0.0.1:9000"), *request.headers.items()]
    verify("GET", "/bucket/k", headers)
    with pytest.raises(RequestTimeTooSkewed):
        verify("GET", "/bucket/k", headers, now=datetime.now(UTC) + timedelta(minutes=16))


@pytest.mark.parametrize(
    "path",
    [
        "/bucket/a%2Fb",  # %2F for a slash: S3's form would sign /bucket/a/b
        "/bucket/a%2bb",  # lower-case hex
        "/bucket/a!b*c",  # sub-delimiters left raw
    ],
)
def test_a_path_signed_as_sent_verifies_too(path: str) -> None:
    """botocore signs a URL it did not encode itself as it is; so do other clients."""
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:9000{path}?a=%7e&b=x+y")
    S3SigV4Auth(BotoCredentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    headers = [("Host", "127.0.0.1:9000"), *request.headers.items()]
    verify("GET", f"{path}?a=%7e&b=x+y", headers)
    with pytest.raises(SignatureDoesNotMatch):
        verify("GET", f"{path}x?a=%7e&b=x+y", headers)


def test_one_signature_does_not_cover_another_key() -> None:
    method, target, headers = wire(
        lambda: make_client("http://127.0.0.1:9000", "path").get_object(Bucket="b", Key="a+b")
    )
    assert target == "/b/a%2Bb"
    for other in ("/b/a%20b", "/b/a b", "/b/a+b/", "/B/a%2Bb", "/b/a%2Bb?versionId=1"):
        with pytest.raises(SignatureDoesNotMatch):
            verify(method, other, headers)


def presign_client(endpoint: str = "http://127.0.0.1:9000", style: str = "path") -> Any:
    return make_client(endpoint, style, signature_version="s3v4")


def presigned_target(url: str) -> tuple[str, HeaderList]:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}", [("Host", parts.netloc)]


@pytest.mark.parametrize("endpoint,style", ENDPOINTS)
@pytest.mark.parametrize("key", ["a b/ü+x=%y//z~", "dir/"])
def test_boto3_presigned_urls_verify(endpoint: str, style: str, key: str) -> None:
    client = presign_client(endpoint, style)
    for method, operation, params in [
        ("GET", "get_object", {"ResponseContentDisposition": 'attachment; filename="a b.txt"'}),
        ("PUT", "put_object", {"ContentType": "text/plain"}),
    ]:
        url = client.generate_presigned_url(
            operation, Params={"Bucket": "bucket", "Key": key, **params}, ExpiresIn=604800
        )
        target, headers = presigned_target(url)
        if method == "PUT":
            headers.append(("Content-Type", "text/plain"))
        verified = verify(method, target, headers)
        assert verified.presigned and verified.payload_mode is PayloadMode.UNSIGNED
        with pytest.raises(SignatureDoesNotMatch):
            verify("DELETE", target, headers)


def test_aws_cli_presigned_url_verifies(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\ns3 =\n    signature_version = s3v4\n")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "awscli",
            "s3",
            "presign",
            "s3://bucket/a b/ü+x=%y//z~",
            "--region",
            REGION,
            "--endpoint-url",
            "http://127.0.0.1:9000",
            "--expires-in",
            "300",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    target, headers = presigned_target(result.stdout.strip())
    assert target.startswith("/bucket/a%20b/%C3%BC%2Bx%3D%25y//z~?")
    assert verify("GET", target, headers).presigned


# -- 4. errors ----------------------------------------------------------------------------


def signed_get(key: str = "k", **client_config: Any) -> tuple[str, str, HeaderList]:
    return wire(
        lambda: make_client("http://127.0.0.1:9000", "path", **client_config).get_object(
            Bucket="bucket", Key=key
        )
    )


def with_header(headers: HeaderList, name: str, value: str | None) -> HeaderList:
    """Replace (or with None drop) a header, or add it."""
    kept = [(n, v) for n, v in headers if n.lower() != name.lower()]
    return kept if value is None else [*kept, (name, value)]


def authorization(headers: HeaderList) -> str:
    return next(v for n, v in headers if n.lower() == "authorization")


def expect(error: type[S3Error], call: Callable[..., Any], *args: Any, **kwargs: Any) -> S3Error:
    """call(*args, **kwargs) raises exactly error, and no secret shows in it."""
    with pytest.raises(error) as caught:
        call(*args, **kwargs)
    assert type(caught.value) is error
    assert SECRET_KEY not in str(caught.value) and SECRET_KEY not in repr(caught.value.args)
    return caught.value


@pytest.mark.parametrize(
    "error,status",
    [
        (AccessDenied, 403),
        (AuthorizationHeaderMalformed, 400),
        (AuthorizationQueryParametersError, 400),
        (IncompleteBody, 400),
        (InvalidAccessKeyId, 403),
        (InvalidArgument, 400),
        (InvalidRequest, 400),
        (RequestTimeTooSkewed, 403),
        (SignatureDoesNotMatch, 403),
    ],
)
def test_errors_carry_s3s_code_and_status(error: type[S3Error], status: int) -> None:
    """https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html"""
    assert (error.code, error.status) == (error.__name__, status)


def test_unknown_access_key() -> None:
    method, target, headers = signed_get()
    expect(
        InvalidAccessKeyId,
        verify_request,
        method,
        target,
        headers,
        secret_lookup([]),
        now=datetime.now(UTC),
    )


def test_wrong_secret_or_signature() -> None:
    method, target, headers = signed_get()
    wrong = secret_lookup([Credentials(ACCESS_KEY, "not the secret")])
    expect(
        SignatureDoesNotMatch, verify_request, method, target, headers, wrong, now=datetime.now(UTC)
    )
    for bad in (
        flip_signature,
        lambda a: a[:-1],
        lambda a: a + "0",
        lambda a: a[:-64] + a[-64:].upper(),
    ):
        tampered = with_header(headers, "Authorization", bad(authorization(headers)))
        expect(SignatureDoesNotMatch, verify, method, target, tampered)


@pytest.mark.parametrize("minutes", [-16, 16])
def test_request_time_skew_both_ways(minutes: int) -> None:
    method, target, headers = signed_get()
    now = datetime.now(UTC)
    verify(method, target, headers, now=now + timedelta(minutes=14 if minutes > 0 else -14))
    expect(
        RequestTimeTooSkewed, verify, method, target, headers, now=now + timedelta(minutes=minutes)
    )
    verify(
        method,
        target,
        headers,
        now=now + timedelta(minutes=minutes),
        max_skew=timedelta(minutes=20),
    )


def test_presigned_url_expiry_and_future_date() -> None:
    url = presign_client().generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
    )
    target, headers = presigned_target(url)
    now = datetime.now(UTC)
    verify("GET", target, headers, now=now + timedelta(seconds=55))
    error = expect(AccessDenied, verify, "GET", target, headers, now=now + timedelta(seconds=70))
    assert error.message == "Request has expired"
    verify("GET", target, headers, now=now - timedelta(minutes=14))
    error = expect(AccessDenied, verify, "GET", target, headers, now=now - timedelta(minutes=16))
    assert error.message == "Request is not yet valid"


@pytest.mark.parametrize(
    "change,message",
    [
        (("X-Amz-Expires=60", "X-Amz-Expires=604801"), "less than a week"),
        (("X-Amz-Expires=60", "X-Amz-Expires=-1"), "non-negative"),
        (("X-Amz-Expires=60", "X-Amz-Expires=1m"), "should be a number"),
        (("X-Amz-Expires=60&", ""), "requires the X-Amz-Algorithm"),
        (("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"), "only supports"),
        (("%2Fs3%2F", "%2Fec2%2F"), 'incorrect service "ec2"'),
        (("%2Faws4_request", "%2Faws5_request"), "incorrect terminal"),
        (
            ("%2Feu-west-1%2F", "%2Fus-east-1%2F"),
            "the region 'us-east-1' is wrong; expecting 'eu-west-1'",
        ),
        (("X-Amz-Date=20", "X-Amz-Date=19"), "Date is not the same as X-Amz-Date"),
        (("X-Amz-Date=", "X-Amz-Date=x"), "ISO8601"),
        (("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=Host"), "X-Amz-SignedHeaders"),
    ],
)
def test_malformed_presigned_parameters(change: tuple[str, str], message: str) -> None:
    url = presign_client().generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
    )
    target, headers = presigned_target(url)
    assert change[0] in target
    error = expect(
        AuthorizationQueryParametersError, verify, "GET", target.replace(*change), headers
    )
    assert message in error.message


@pytest.mark.parametrize(
    "change,message",
    [
        (("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256 Foo=1, "), "authorization header requires three"),
        ((", Signature=", ", Sig="), "authorization header requires three"),
        (("Credential=", "Credential"), 'component "Credential'),
        (("/s3/", "/ec2/"), 'incorrect service "ec2". This endpoint belongs to "s3".'),
        (("/aws4_request", "/aws4"), 'incorrect terminal "aws4"'),
        (("/eu-west-1/", "/"), "the Credential is mal-formed"),
        (("Credential=AKIDCLIENT/", "Credential=AKIDCLIENT/2"), "the Credential is mal-formed"),
        (("/eu-west-1/", "/us-east-1/"), "the region 'us-east-1' is wrong; expecting 'eu-west-1'"),
        (("SignedHeaders=host", "SignedHeaders=Host"), "SignedHeaders"),
        (("SignedHeaders=host;", "SignedHeaders=;host;"), "SignedHeaders"),
    ],
)
def test_malformed_authorization_header(change: tuple[str, str], message: str) -> None:
    method, target, headers = signed_get()
    value = authorization(headers)
    assert change[0] in value, value
    tampered = with_header(headers, "Authorization", value.replace(*change, 1))
    error = expect(AuthorizationHeaderMalformed, verify, method, target, tampered)
    assert message in error.message


def test_wrong_region_names_the_right_one_for_botocores_redirector() -> None:
    method, target, headers = signed_get()
    error = expect(
        AuthorizationHeaderMalformed, verify, method, target, headers, region="us-east-1"
    )
    assert error.headers == {"x-amz-bucket-region": "us-east-1"}
    assert verify(method, target, headers, region=None).region == REGION


def test_credential_date_must_be_the_request_date() -> None:
    method, target, headers = signed_get()
    today = next(v for n, v in headers if n == "X-Amz-Date")[:8]
    tampered = with_header(
        headers, "Authorization", authorization(headers).replace(f"/{today}/", "/20000101/")
    )
    error = expect(AuthorizationHeaderMalformed, verify, method, target, tampered)
    assert "Date is not the same as X-Amz-Date" in error.message


def test_missing_or_invalid_date() -> None:
    method, target, headers = signed_get()
    for value in (None, "yesterday", "20130524T000000", "20131324T000000Z"):
        tampered = with_header(headers, "X-Amz-Date", value)
        error = expect(AccessDenied, verify, method, target, tampered)
        assert error.message == "AWS authentication requires a valid Date or x-amz-date header"


def test_missing_or_invalid_content_sha256() -> None:
    """S3 answers InvalidRequest for the missing header (not MissingSecurityHeader)."""
    method, target, headers = signed_get()
    error = expect(
        InvalidRequest, verify, method, target, with_header(headers, "X-Amz-Content-SHA256", None)
    )
    assert error.message == "Missing required header for this request: x-amz-content-sha256"
    for value in ("abc", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", EMPTY + "0"):
        tampered = with_header(headers, "X-Amz-Content-SHA256", value)
        expect(InvalidArgument, verify, method, target, tampered)


class _ContentSha256Unsigned(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 signer, leaving x-amz-content-sha256 out of SignedHeaders."""

    def headers_to_sign(self, request: AWSRequest) -> Any:
        headers = super().headers_to_sign(request)
        del headers["x-amz-content-sha256"]
        return headers


def test_content_sha256_may_be_unsigned_because_the_payload_line_signs_it() -> None:
    request = AWSRequest(method="GET", url="http://127.0.0.1:9000/bucket/k")
    _ContentSha256Unsigned(BotoCredentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    headers = [("Host", "127.0.0.1:9000"), *request.headers.items()]
    assert "x-amz-content-sha256" not in authorization(headers)
    assert verify("GET", "/bucket/k", headers).payload_sha256 == EMPTY
    for value in ("UNSIGNED-PAYLOAD", hashlib.sha256(b"x").hexdigest()):
        with pytest.raises(SignatureDoesNotMatch):
            verify("GET", "/bucket/k", with_header(headers, "X-Amz-Content-SHA256", value))


def test_unsigned_amz_headers_and_unsigned_host_are_refused() -> None:
    method, target, headers = signed_get()
    tampered = [*headers, ("x-amz-meta-injected", "1")]
    error = expect(AccessDenied, verify, method, target, tampered)
    assert error.message == "There were headers present in the request which were not signed"
    no_host = with_header(headers, "Authorization", authorization(headers).replace("host;", ""))
    expect(AccessDenied, verify, method, target, no_host)
    url = presign_client().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    target, headers = presigned_target(url)
    headers.append(("x-amz-acl", "public-read"))
    expect(AccessDenied, verify, "GET", target, headers)


def test_anonymous_requests_are_the_callers_choice() -> None:
    headers = [("Host", "127.0.0.1:9000")]
    error = expect(Unsigned, verify, "GET", "/bucket/k?versionId=1", headers)
    assert error.code == "AccessDenied" and error.message == "Access Denied"
    # A signature of any kind, good or bad, is not "unsigned" (expect checks the exact type).
    method, target, signed = signed_get()
    good = authorization(signed)
    # The last hex digit changed (to "0", or to "1" where it already was "0").
    wrong = with_header(signed, "Authorization", good[:-1] + ("1" if good[-1] == "0" else "0"))
    expect(SignatureDoesNotMatch, verify, method, target, wrong)
    url = presign_client().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    late = datetime.now(UTC) + timedelta(days=8)  # long expired
    expect(AccessDenied, verify, "GET", presigned_target(url)[0], headers, now=late)
    sigv2 = make_client("http://127.0.0.1:9000", "path").generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}
    )  # botocore presigns with SigV2 unless told otherwise
    assert "AWSAccessKeyId=" in sigv2
    assert verify("GET", presigned_target(sigv2)[0], headers).version == 2
    expect(SignatureV2, verify, "GET", presigned_target(sigv2)[0], headers, allow_sigv2=False)
    expect(AccessDenied, verify, "GET", "/bucket/k?X-Amz-Signature=00", headers)


def test_other_signature_mechanisms() -> None:
    """SigV2 verifies unless refused, then it gets S3's answer where SigV2 is not
    supported; SigV4a is not supported at all."""
    method, target, headers = signed_get()
    sigv2 = make_client("http://127.0.0.1:9000", "path").generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}
    )
    sigv2_target, sigv2_headers = presigned_target(sigv2)
    bad_sigv2 = with_header(headers, "Authorization", f"AWS {ACCESS_KEY}:c2lnbmF0dXJl")
    assert verify(method, sigv2_target, sigv2_headers).version == 2
    expect(SignatureDoesNotMatch, verify, method, target, bad_sigv2)
    sigv4a = authorization(headers).replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")
    for tampered_target, tampered, allow_sigv2, refusal in [
        (sigv2_target, sigv2_headers, False, SignatureV2),  # an InvalidRequest
        (target, bad_sigv2, False, SignatureV2),
        (target, with_header(headers, "Authorization", sigv4a), True, InvalidRequest),
    ]:
        error = expect(refusal, verify, method, tampered_target, tampered, allow_sigv2=allow_sigv2)
        assert (error.code, error.status) == ("InvalidRequest", 400)
        assert "Please use AWS4-HMAC-SHA256" in error.message
    bearer = with_header(headers, "Authorization", "Bearer token")
    expect(InvalidArgument, verify, method, target, bearer)
    url = presign_client().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    both_target, both = presigned_target(url)
    both.append(("Authorization", authorization(headers)))
    error = expect(InvalidArgument, verify, "GET", both_target, both)
    assert error.message.startswith("Only one auth mechanism allowed")
    twice = [*headers, ("Authorization", authorization(headers))]
    expect(AuthorizationHeaderMalformed, verify, method, target, twice)


def test_secrets_stay_out_of_reprs() -> None:
    credentials = Credentials(ACCESS_KEY, SECRET_KEY)
    assert SECRET_KEY not in repr(credentials) and ACCESS_KEY in repr(credentials)
    verified = doc_streaming_request()
    assert verified.signing_key.hex() not in repr(verified)
    assert repr(verified.signing_key) not in repr(verified)
    assert DOC_SECRET not in repr(verified) and DOC_SECRET not in repr(chunk_verifier(verified))
    assert isinstance(chunk_verifier(verified), ChunkVerifier)


def test_verify_request_needs_an_aware_now() -> None:
    method, target, headers = signed_get()
    with pytest.raises(ValueError):
        verify(method, target, headers, now=datetime.now())


def test_verified_request_is_frozen() -> None:
    verified = verify(*signed_get())
    with pytest.raises(AttributeError):
        verified.access_key = "other"  # type: ignore[misc]
    assert replace(verified, access_key="x").access_key == "x"


# -- 5. random requests signed by botocore ---------------------------------------------------


@functools.cache
def cached_client(style: str) -> Any:
    """One client per addressing style for all examples, made once the AWS environment
    is isolated (conftest), not at import."""
    return make_client("http://127.0.0.1:9000", style)


key_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
query_text = st.text(st.characters(codec="utf-8"), max_size=30)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    style=st.sampled_from(["path", "virtual"]),
    key=key_text,
    prefix=query_text,
    token=query_text,
    metadata=st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10),
        header_text,
        max_size=3,
    ),
    position=st.integers(min_value=0, max_value=63),
)
def test_random_requests_signed_by_botocore_verify(
    style: str, key: str, prefix: str, token: str, metadata: dict[str, str], position: int
) -> None:
    client = cached_client(style)
    requests = [
        wire(lambda: client.put_object(Bucket="bucket", Key=key, Body=b"x", Metadata=metadata)),
        wire(lambda: client.get_object(Bucket="bucket", Key=key, VersionId=token or "v")),
        wire(
            lambda: client.list_objects_v2(
                Bucket="bucket", Prefix=prefix, ContinuationToken=token or "t"
            )
        ),
    ]
    for method, target, headers in requests:
        verify(method, target, headers)
        value = authorization(headers)
        head, signature = value.rsplit("=", 1)
        for replacement in {"0", "f", "g", "x"} - {signature[position]}:
            mutated = f"{head}={signature[:position]}{replacement}{signature[position + 1 :]}"
            with pytest.raises(SignatureDoesNotMatch):
                verify(method, target, with_header(headers, "Authorization", mutated))


@settings(max_examples=50, deadline=None)
@given(key=key_text, disposition=query_text, position=st.integers(min_value=0, max_value=63))
def test_random_presigned_urls_verify(key: str, disposition: str, position: int) -> None:
    url = presign_client().generate_presigned_url(
        "get_object",
        Params={"Bucket": "bucket", "Key": key, "ResponseContentDisposition": disposition or "x"},
    )
    target, headers = presigned_target(url)
    verify("GET", target, headers)
    head, signature = target.rsplit("X-Amz-Signature=", 1)
    mutated = f"{head}X-Amz-Signature={flip(signature, position)}"
    with pytest.raises(SignatureDoesNotMatch):
        verify("GET", mutated, headers)


@settings(max_examples=300, deadline=None)
@given(
    target=st.text(max_size=60).map(lambda t: "/" + t),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                ["Authorization", "X-Amz-Date", "Date", "Host", "x-amz-content-sha256", "x-amz-a"]
            ),
            st.text(max_size=60),
        ),
        max_size=6,
    ),
    prefix=st.sampled_from(["", "AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256 Credential="]),
)
def test_garbage_gets_an_s3_error_and_nothing_else(
    target: str, headers: HeaderList, prefix: str
) -> None:
    headers = [(n, prefix + v if n == "Authorization" else v) for n, v in headers]
    with contextlib.suppress(S3Error):
        verify("GET", target, headers)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(
            [
                "X-Amz-Algorithm=AWS4-HMAC-SHA256",
                f"X-Amz-Credential={ACCESS_KEY}%2F20990101%2F{REGION}%2Fs3%2Faws4_request",
                "X-Amz-Date=20990101T000000Z",
                "X-Amz-Date=%FF",
                "X-Amz-Expires=10",
                "X-Amz-Expires=%",
                "X-Amz-SignedHeaders=host",
                "X-Amz-Signature=00",
                "X-Amz-Content-Sha256=%ZZ",
                "AWSAccessKeyId=x",
                "%",
                "=",
                "&",
            ]
        ),
        max_size=9,
    )
)
def test_garbage_query_authentication_gets_an_s3_error(parts: list[str]) -> None:
    with contextlib.suppress(S3Error):
        verify("GET", "/b/k?" + "&".join(parts), [("Host", "h")])
