"""AWS Signature Version 2 (:mod:`s3cache.s3.sigv2`, through the entry point
:mod:`s3cache.s3.signatures`).

1. The examples of the S3 user guide, "Signing and authenticating REST requests".
2. What botocore's ``HmacV1Auth`` and ``HmacV1QueryAuth`` really sign (boto3 with
   ``signature_version="s3"``, and ``generate_presigned_url`` of a default client with an
   ``endpoint_url``): our StringToSign is exactly the one botocore logs, the request
   verifies, and a changed signature does not. Odd keys, sub-resources, response
   overrides, metadata, Content-MD5, both addressing styles; Hypothesis for the rest.
3. Every refusal, with S3's code and status.
4. End to end through a running s3cache in front of the real SeaweedFS upstream: presigned
   GET and PUT fetched with urllib, a header-signed SigV2 boto3 client doing everything,
   the refusals as a client sees them, ``allow_sigv2 = false`` (also by SIGHUP), and
   client-key grants.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import http.client
import json
import logging
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import boto3
import pytest
from botocore.auth import HmacV1Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError
from conftest import VIRTUAL_HOST_DOMAIN, ClientFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
)
from s3cache.s3.signatures import verify_request
from s3cache.s3.sigv2 import string_to_sign
from s3cache.s3.sigv4 import (
    Credentials,
    PayloadMode,
    SecretLookup,
    SignatureV2,
    VerifiedRequest,
    secret_lookup,
)
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

HeaderList = list[tuple[str, str]]

ACCESS_KEY = "AKIDCLIENT"
SECRET_KEY = "client/secret+key=="
SECRETS = secret_lookup([Credentials(ACCESS_KEY, SECRET_KEY)])


def verify(
    method: str,
    target: str,
    headers: HeaderList,
    *,
    secrets: SecretLookup = SECRETS,
    bucket: str | None = None,
    **kwargs: Any,
) -> VerifiedRequest:
    kwargs.setdefault("now", datetime.now(UTC))
    return verify_request(method, target, headers, secrets, virtual_host_bucket=bucket, **kwargs)


def expect(error: type[S3Error], call: Callable[..., Any], *args: Any, **kwargs: Any) -> S3Error:
    """call(*args, **kwargs) raises exactly ``error``, and no secret shows in it."""
    with pytest.raises(error) as caught:
        call(*args, **kwargs)
    assert type(caught.value) is error
    assert SECRET_KEY not in str(caught.value)
    return caught.value


def hmac_v1(secret: str, string: str) -> str:
    """The signature of a StringToSign, computed here from the guide's formula."""
    return base64.b64encode(hmac.digest(secret.encode(), string.encode(), "sha1")).decode()


def with_header(headers: HeaderList, name: str, value: str | None) -> HeaderList:
    kept = [(n, v) for n, v in headers if n.lower() != name.lower()]
    return kept if value is None else [*kept, (name, value)]


def flip(signature: str) -> str:
    """The same signature with one base64 character changed."""
    middle = len(signature) // 2
    return signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]


# -- 1. the S3 user guide's examples --------------------------------------------------------

# https://docs.aws.amazon.com/AmazonS3/latest/API/RESTAuthentication.html. The guide's
# signatures were computed for the bucket "johnsmith" (its text now says
# "awsexamplebucket1", the signatures were not redone), so that is the bucket here.
DOC_KEY = "AKIAIOSFODNN7EXAMPLE"
DOC_SECRETS = secret_lookup([Credentials(DOC_KEY, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")])
DOC_EXAMPLES: dict[str, tuple[str, str, HeaderList, str | None, str, str | None]] = {
    # name: method, target, headers, virtual-host bucket, StringToSign, signature
    "Object GET": (
        "GET",
        "/photos/puppy.jpg",
        [("Host", "johnsmith.s3.amazonaws.com"), ("Date", "Tue, 27 Mar 2007 19:36:42 +0000")],
        "johnsmith",
        "GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/johnsmith/photos/puppy.jpg",
        "bWq2s1WEIj+Ydj0vQ697zp+IXMU=",
    ),
    "Object PUT": (
        "PUT",
        "/photos/puppy.jpg",
        [
            ("Content-Type", "image/jpeg"),
            ("Content-Length", "94328"),
            ("Host", "johnsmith.s3.amazonaws.com"),
            ("Date", "Tue, 27 Mar 2007 21:15:45 +0000"),
        ],
        "johnsmith",
        "PUT\n\nimage/jpeg\nTue, 27 Mar 2007 21:15:45 +0000\n/johnsmith/photos/puppy.jpg",
        "MyyxeRY7whkBe+bq8fHCL/2kKUg=",
    ),
    "List": (
        "GET",
        "/?prefix=photos&max-keys=50&marker=puppy",
        [
            ("User-Agent", "Mozilla/5.0"),
            ("Host", "johnsmith.s3.amazonaws.com"),
            ("Date", "Tue, 27 Mar 2007 19:42:41 +0000"),
        ],
        "johnsmith",
        "GET\n\n\nTue, 27 Mar 2007 19:42:41 +0000\n/johnsmith/",
        "htDYFYduRNen8P9ZfE/s9SuKy0U=",
    ),
    "Fetch": (
        "GET",
        "/?acl",
        [("Host", "johnsmith.s3.amazonaws.com"), ("Date", "Tue, 27 Mar 2007 19:44:46 +0000")],
        "johnsmith",
        "GET\n\n\nTue, 27 Mar 2007 19:44:46 +0000\n/johnsmith/?acl",
        "c2WLPFtWHVgbEmeEG93a4cG37dM=",
    ),
    # The guide's Delete example puts x-amz-date on the Date line, against its own rule
    # ("if you include the x-amz-date header, use the empty string for the Date"); the
    # rule is what the SDKs sign, so the string follows it and the guide's signature of
    # the other string is not checked.
    "Delete": (
        "DELETE",
        "/johnsmith/photos/puppy.jpg",
        [
            ("User-Agent", "dotnet"),
            ("Host", "s3.amazonaws.com"),
            ("Date", "Tue, 27 Mar 2007 21:20:27 +0000"),
            ("x-amz-date", "Tue, 27 Mar 2007 21:20:26 +0000"),
        ],
        None,
        "DELETE\n\n\n\nx-amz-date:Tue, 27 Mar 2007 21:20:26 +0000\n/johnsmith/photos/puppy.jpg",
        None,
    ),
    "Upload": (  # a CNAME bucket: the whole Host is the bucket
        "PUT",
        "/db-backup.dat.gz",
        [
            ("User-Agent", "curl/7.15.5"),
            ("Host", "static.johnsmith.net:8080"),
            ("Date", "Tue, 27 Mar 2007 21:06:08 +0000"),
            ("x-amz-acl", "public-read"),
            ("content-type", "application/x-download"),
            ("Content-MD5", "4gJE4saaMU4BqNR0kLY+lw=="),
            ("X-Amz-Meta-ReviewedBy", "joe@johnsmith.net"),
            ("X-Amz-Meta-ReviewedBy", "jane@johnsmith.net"),
            ("X-Amz-Meta-FileChecksum", "0x02661779"),
            ("X-Amz-Meta-ChecksumAlgorithm", "crc32"),
            ("Content-Disposition", "attachment; filename=database.dat"),
            ("Content-Encoding", "gzip"),
            ("Content-Length", "5913339"),
        ],
        "static.johnsmith.net",
        "PUT\n4gJE4saaMU4BqNR0kLY+lw==\napplication/x-download\nTue, 27 Mar 2007 21:06:08 +0000\n"
        "x-amz-acl:public-read\nx-amz-meta-checksumalgorithm:crc32\n"
        "x-amz-meta-filechecksum:0x02661779\n"
        "x-amz-meta-reviewedby:joe@johnsmith.net,jane@johnsmith.net\n"
        "/static.johnsmith.net/db-backup.dat.gz",
        "ilyl83RwaSoYIEdixDQcA4OnAnc=",
    ),
    "List all my buckets": (
        "GET",
        "/",
        [("Host", "s3.amazonaws.com"), ("Date", "Wed, 28 Mar 2007 01:29:59 +0000")],
        None,
        "GET\n\n\nWed, 28 Mar 2007 01:29:59 +0000\n/",
        "qGdzdERIC03wnaRNKh6OqZehG9s=",
    ),
    "Unicode keys": (  # signed literally: encoding and its capitalization as sent
        "GET",
        "/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re",
        [("Host", "s3.amazonaws.com"), ("Date", "Wed, 28 Mar 2007 01:49:49 +0000")],
        None,
        "GET\n\n\nWed, 28 Mar 2007 01:49:49 +0000\n/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re",
        "DNEZGsoieTZ92F3bUfSPQcbGmlM=",
    ),
    "Query string request authentication": (
        "GET",
        "/photos/puppy.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&"
        "Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D&Expires=1175139620",
        [("Host", "johnsmith.s3.amazonaws.com")],
        "johnsmith",
        "GET\n\n\n1175139620\n/johnsmith/photos/puppy.jpg",
        None,  # in the query
    ),
}


@pytest.mark.parametrize("name", sorted(DOC_EXAMPLES))
def test_guide_example(name: str) -> None:
    method, target, headers, bucket, expected, signature = DOC_EXAMPLES[name]
    assert string_to_sign(method, target, headers, virtual_host_bucket=bucket) == expected
    if signature is not None:
        headers = [*headers, ("Authorization", f"AWS {DOC_KEY}:{signature}")]
        sent = next(v for n, v in headers if n == "Date")
        now = datetime.strptime(sent, "%a, %d %b %Y %H:%M:%S %z").astimezone(UTC)
    elif "Signature=" in target:
        now = datetime(2007, 3, 28, tzinfo=UTC)  # before Expires (2007-03-29T03:40:20Z)
    else:
        return
    verified = verify(method, target, headers, secrets=DOC_SECRETS, bucket=bucket, now=now)
    assert (verified.access_key, verified.version) == (DOC_KEY, 2)
    assert verified.presigned == ("Signature=" in target)
    with pytest.raises(SignatureDoesNotMatch):  # the same request elsewhere
        verify(method, target, headers, secrets=DOC_SECRETS, bucket="other", now=now)


# -- 2. what botocore signs -------------------------------------------------------------------

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
    "q?x#y",
]
STYLES = ["path", "virtual"]
ENDPOINT = f"http://{VIRTUAL_HOST_DOMAIN}:9000"


class Captured(Exception):
    def __init__(self, request: AWSPreparedRequest) -> None:
        super().__init__("captured")
        self.request = request


def _capture(request: AWSPreparedRequest, **_: Any) -> None:
    raise Captured(request)


class _StringsToSign(logging.Handler):
    """Collects the StringToSign botocore's HmacV1Auth logs before it signs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.strings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "StringToSign:\n%s":
            self.strings.append(str(record.args[0]) if record.args else "")


@contextlib.contextmanager
def botocore_strings() -> Iterator[list[str]]:
    handler = _StringsToSign()
    logger = logging.getLogger("botocore.auth")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.strings
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def sigv2_client(style: str, signature_version: str | None = "s3") -> Any:
    """A boto3 client whose requests are caught signed, just before they would be sent."""
    options: dict[str, Any] = {"s3": {"addressing_style": style}, "retries": {"max_attempts": 0}}
    if signature_version is not None:
        options["signature_version"] = signature_version
    client = boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name="eu-west-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(**options),
    )
    client.meta.events.register("before-send.s3", _capture)
    return client


@functools.cache
def cached_client(style: str) -> Any:
    """One client per addressing style for all examples, made once the AWS environment
    is isolated (conftest), not at import."""
    return sigv2_client(style)


def bucket_of(netloc: str) -> str | None:
    """The virtual-host bucket of a captured request's Host."""
    host = netloc.rsplit(":", 1)[0]
    return host.removesuffix("." + VIRTUAL_HOST_DOMAIN) if host != VIRTUAL_HOST_DOMAIN else None


def wire(call: Callable[[], Any]) -> tuple[str, str, HeaderList, str]:
    """Method, target and headers of the request a boto3 call sends, and the
    StringToSign botocore signed for it."""
    with botocore_strings() as strings, pytest.raises(Captured) as caught:
        call()
    request = caught.value.request
    url = urlsplit(request.url)
    headers = [
        (name, value.decode() if isinstance(value, bytes) else value)
        for name, value in request.headers.items()
    ]
    target = url.path + (f"?{url.query}" if url.query else "")
    (signed,) = strings
    return request.method, target, [("Host", url.netloc), *headers], signed


def presigned(url: str) -> tuple[str, HeaderList]:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}", [("Host", parts.netloc)]


def presign(client: Any, method: str, params: dict[str, Any]) -> tuple[str, HeaderList, str]:
    with botocore_strings() as strings:
        url = client.generate_presigned_url(method, Params=params)
    target, headers = presigned(url)
    (signed,) = strings
    return target, headers, signed


def operations(client: Any, key: str, bucket: str = "bucket") -> Iterator[Callable[[], Any]]:
    yield lambda: client.get_object(Bucket=bucket, Key=key, Range="bytes=0-9")
    yield lambda: client.get_object(
        Bucket=bucket,
        Key=key,
        VersionId="v 1+/=",
        ResponseContentDisposition='attachment; filename="a&b=c.txt"',
        ResponseContentType="text/plain; charset=utf-8",
        ResponseCacheControl="no-cache",
    )
    yield lambda: client.head_object(Bucket=bucket, Key=key, IfNoneMatch='"etag"')
    yield lambda: client.put_object(
        Bucket=bucket,
        Key=key,
        Body=b"data",
        Metadata={"note": "a   b", "Mixed-Case": " padded "},
        ContentType="text/plain",
        ContentMD5=base64.b64encode(hashlib.md5(b"data").digest()).decode(),
        ACL="private",
    )
    yield lambda: client.create_multipart_upload(Bucket=bucket, Key=key)
    yield lambda: client.upload_part(
        Bucket=bucket, Key=key, UploadId="id+/=", PartNumber=3, Body=b"x"
    )
    yield lambda: client.list_parts(Bucket=bucket, Key=key, UploadId="id 2")
    yield lambda: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId="id")
    yield lambda: client.copy_object(
        Bucket=bucket, Key=key, CopySource={"Bucket": "src", "Key": "k y"}
    )
    yield lambda: client.get_object_acl(Bucket=bucket, Key=key)
    yield lambda: client.get_object_tagging(Bucket=bucket, Key=key, VersionId="7")
    yield lambda: client.delete_object(Bucket=bucket, Key=key, VersionId="v 1+")


def bucket_operations(client: Any, bucket: str = "bucket") -> Iterator[Callable[[], Any]]:
    yield lambda: client.list_buckets()
    yield lambda: client.list_objects(Bucket=bucket, Prefix="a b/", Delimiter="/")
    yield lambda: client.list_objects_v2(Bucket=bucket, Prefix="ü", ContinuationToken="t+")
    yield lambda: client.list_object_versions(Bucket=bucket, Prefix="p")
    yield lambda: client.list_multipart_uploads(Bucket=bucket)
    yield lambda: client.get_bucket_location(Bucket=bucket)
    yield lambda: client.get_bucket_acl(Bucket=bucket)
    yield lambda: client.get_bucket_versioning(Bucket=bucket)
    yield lambda: client.get_bucket_lifecycle_configuration(Bucket=bucket)
    yield lambda: client.head_bucket(Bucket=bucket)
    yield lambda: client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a b"}]})


def check_signed(method: str, target: str, headers: HeaderList, signed: str) -> None:
    """Our StringToSign is botocore's, the request verifies, a changed signature not."""
    host = next(v for n, v in headers if n == "Host")
    bucket = bucket_of(host)
    assert string_to_sign(method, target, headers, virtual_host_bucket=bucket) == signed
    verified = verify(method, target, headers, bucket=bucket)
    assert (verified.access_key, verified.version) == (ACCESS_KEY, 2)
    authorization = next((v for n, v in headers if n == "Authorization"), None)
    if authorization is not None:
        tampered = with_header(headers, "Authorization", flip(authorization))
        expect(SignatureDoesNotMatch, verify, method, target, tampered, bucket=bucket)
    else:
        head, value = target.split("Signature=", 1)
        signature, _, rest = value.partition("&")
        mutated = f"{head}Signature={quote(flip(unquote(signature)), safe='')}"
        mutated += f"&{rest}" if rest else ""
        expect(SignatureDoesNotMatch, verify, method, mutated, headers, bucket=bucket)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("key", ODD_KEYS)
def test_botocore_header_signed_object_requests(style: str, key: str) -> None:
    for call in operations(cached_client(style), key):
        check_signed(*wire(call))


@pytest.mark.parametrize("style", STYLES)
def test_botocore_header_signed_bucket_requests(style: str) -> None:
    for call in bucket_operations(cached_client(style)):
        check_signed(*wire(call))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("key", ODD_KEYS)
def test_botocore_presigned_urls(style: str, key: str) -> None:
    client = cached_client(style)
    for method, params in [
        ("get_object", {"Bucket": "bucket", "Key": key}),
        ("get_object", {"Bucket": "bucket", "Key": key, "VersionId": "v+1", "ResponseExpires": 0}),
        ("head_object", {"Bucket": "bucket", "Key": key}),
        ("put_object", {"Bucket": "bucket", "Key": key, "ContentType": "text/plain"}),
        # x-amz-* headers of a presigned URL travel in its query and are signed as headers
        ("put_object", {"Bucket": "bucket", "Key": key, "Metadata": {"a": "1"}, "ACL": "private"}),
        ("upload_part", {"Bucket": "bucket", "Key": key, "UploadId": "u", "PartNumber": 1}),
    ]:
        target, headers, signed = presign(client, method, params)
        http_method = {"get_object": "GET", "head_object": "HEAD"}.get(method, "PUT")
        if "ContentType" in params:
            headers.append(("Content-Type", params["ContentType"]))
        check_signed(http_method, target, headers, signed)


def test_default_client_with_an_endpoint_presigns_sigv2() -> None:
    """What the issue is about: no signature_version, an endpoint_url, SigV2 URLs."""
    for style in STYLES:
        client = sigv2_client(style, signature_version=None)
        target, headers, signed = presign(client, "get_object", {"Bucket": "b", "Key": "k"})
        assert "AWSAccessKeyId=" in target and "X-Amz-Algorithm" not in target
        check_signed("GET", target, headers, signed)


def hmac_v1_request(headers: HeaderList, url: str = f"{ENDPOINT}/bucket/k") -> HeaderList:
    """A request signed by botocore's HmacV1Auth itself, headers kept as given (repeats
    too), and the headers it went out with."""
    request = AWSRequest(method="PUT", url=url)
    for name, value in headers:
        request.headers[name] = value  # HTTPHeaders: a second assignment repeats the name
    HmacV1Auth(BotoCredentials(ACCESS_KEY, SECRET_KEY)).add_auth(request)
    return [("Host", urlsplit(url).netloc), *request.headers.items()]


def test_repeated_amz_headers_are_joined_in_order() -> None:
    headers = hmac_v1_request(
        [("X-Amz-Meta-Name", "fred"), ("x-amz-meta-name", " barney "), ("x-amz-meta-a", "1")]
    )
    assert "x-amz-meta-a:1\nx-amz-meta-name:fred,barney\n/bucket/k" in string_to_sign(
        "PUT", "/bucket/k", headers
    )
    verify("PUT", "/bucket/k", headers)
    swapped = [(n, {"fred": "barney", " barney ": "fred"}.get(v, v)) for n, v in headers]
    expect(SignatureDoesNotMatch, verify, "PUT", "/bucket/k", swapped)


def test_folded_amz_header_lines_are_unfolded() -> None:
    """RESTAuthentication: "Unfold long headers ... by replacing the folding whitespace
    (including new-line) by a single space"."""
    headers = [("Date", "Tue, 27 Mar 2007 21:06:08 +0000"), ("x-amz-meta-a", "fred,\r\n\t barney")]
    assert string_to_sign("GET", "/b/k", headers).endswith("x-amz-meta-a:fred, barney\n/b/k")


def test_everything_signed_is_checked() -> None:
    client = cached_client("path")
    method, target, headers, _ = wire(
        lambda: client.put_object(
            Bucket="bucket", Key="k", Body=b"d", ContentType="a/b", ContentMD5="bWQ1", Metadata={}
        )
    )
    verify(method, target, headers)
    for tampered in (
        with_header(headers, "Content-MD5", "b3RoZXI="),
        with_header(headers, "Content-MD5", None),
        with_header(headers, "Content-Type", "a/c"),
        with_header(headers, "Date", formatdate(usegmt=True, timeval=time.time() - 1)),
        [*headers, ("x-amz-meta-injected", "1")],
        [*headers, ("x-amz-acl", "public-read")],
    ):
        expect(SignatureDoesNotMatch, verify, method, target, tampered)
    for other in ("POST", "GET"):
        expect(SignatureDoesNotMatch, verify, other, target, headers)
    expect(SignatureDoesNotMatch, verify, method, "/bucket/k2", headers)
    expect(SignatureDoesNotMatch, verify, method, "/bucket/k?acl", headers)
    expect(SignatureDoesNotMatch, verify, method, "/bucket/k?versionId=1", headers)
    # As in S3, query parameters that are not sub-resources are outside the signature
    # (grants are checked against the request as received, whatever they say).
    verify(method, "/bucket/k?prefix=x&max-keys=1", headers)


def test_sub_resource_values_are_signed() -> None:
    client = cached_client("path")
    call = lambda: client.get_object(Bucket="bucket", Key="k", VersionId="v1")  # noqa: E731
    method, target, headers, _ = wire(call)
    verify(method, target, headers)
    expect(SignatureDoesNotMatch, verify, method, target.replace("v1", "v2"), headers)
    expect(SignatureDoesNotMatch, verify, method, target + "&partNumber=1", headers)


def test_virtual_host_bucket_is_signed() -> None:
    """A path-style signature of /bucket/x does not open bucket.host/bucket/x (the key
    "bucket/x"), nor does a virtual-host one open another bucket."""
    path_client, virtual_client = cached_client("path"), cached_client("virtual")
    method, target, headers, _ = wire(lambda: path_client.get_object(Bucket="bucket", Key="x"))
    verify(method, target, headers)
    expect(SignatureDoesNotMatch, verify, method, target, headers, bucket="bucket")
    method, target, headers, _ = wire(lambda: virtual_client.get_object(Bucket="bucket", Key="x"))
    verify(method, target, headers, bucket="bucket")
    expect(SignatureDoesNotMatch, verify, method, target, headers, bucket="other")
    expect(SignatureDoesNotMatch, verify, method, target, headers)


def test_bucket_alone_path_style_in_either_spelling() -> None:
    """botocore signs GET /bucket as /bucket/ (S3 requires it); the literal path, as
    the guide's rule reads, is taken too. Both name the bucket, nothing else."""
    date = formatdate(usegmt=True)
    for signed in ("/bucket/", "/bucket"):
        signature = hmac_v1(SECRET_KEY, f"GET\n\n\n{date}\n{signed}")
        headers = [("Date", date), ("Authorization", f"AWS {ACCESS_KEY}:{signature}")]
        verify("GET", "/bucket", headers)
        expect(SignatureDoesNotMatch, verify, "GET", "/bucke", headers)
    signature = hmac_v1(SECRET_KEY, f"GET\n\n\n{date}\n/bucket/")
    headers = [("Date", date), ("Authorization", f"AWS {ACCESS_KEY}:{signature}")]
    expect(SignatureDoesNotMatch, verify, "GET", "/bucket/x", headers)


def test_x_amz_date_takes_the_date_lines_place() -> None:
    now = datetime.now(UTC)
    for amz_date in (formatdate(usegmt=True), now.strftime("%Y%m%dT%H%M%SZ")):
        string = f"GET\n\n\n\nx-amz-date:{amz_date}\n/b/k"
        headers = [
            ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"),  # ignored: x-amz-date wins
            ("x-amz-date", amz_date),
            ("Authorization", f"AWS {ACCESS_KEY}:{hmac_v1(SECRET_KEY, string)}"),
        ]
        assert string_to_sign("GET", "/b/k", headers) == string
        assert verify("GET", "/b/k", headers).timestamp == now.strftime("%Y%m%dT%H%M%SZ")


key_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
value_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=100, deadline=None)
@given(
    style=st.sampled_from(STYLES),
    key=key_text,
    version=value_text,
    disposition=value_text,
    metadata=st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10),
        value_text,
        max_size=3,
    ),
)
def test_random_requests_signed_by_botocore_verify(
    style: str, key: str, version: str, disposition: str, metadata: dict[str, str]
) -> None:
    client = cached_client(style)
    check_signed(
        *wire(lambda: client.put_object(Bucket="bucket", Key=key, Body=b"x", Metadata=metadata))
    )
    check_signed(
        *wire(
            lambda: client.get_object(
                Bucket="bucket",
                Key=key,
                VersionId=version or "v",
                ResponseContentDisposition=disposition or "d",
            )
        )
    )
    target, headers, signed = presign(
        client,
        "get_object",
        {"Bucket": "bucket", "Key": key, "ResponseContentDisposition": disposition or "d"},
    )
    check_signed("GET", target, headers, signed)


# -- 3. refusals, as S3 answers them ------------------------------------------------------


def signed_get(key: str = "k") -> tuple[str, str, HeaderList]:
    client = cached_client("path")
    method, target, captured, _ = wire(lambda: client.get_object(Bucket="bucket", Key=key))
    return method, target, captured


def test_unknown_key_and_wrong_secret() -> None:
    method, target, headers = signed_get()
    error = expect(InvalidAccessKeyId, verify, method, target, headers, secrets=secret_lookup([]))
    assert (error.code, error.status) == ("InvalidAccessKeyId", 403)
    wrong = secret_lookup([Credentials(ACCESS_KEY, "not the secret")])
    error = expect(SignatureDoesNotMatch, verify, method, target, headers, secrets=wrong)
    assert (error.code, error.status) == ("SignatureDoesNotMatch", 403)
    url = cached_client("path").generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}
    )
    expect(InvalidAccessKeyId, verify, "GET", *presigned(url), secrets=secret_lookup([]))
    expect(SignatureDoesNotMatch, verify, "GET", *presigned(url), secrets=wrong)


def test_request_time() -> None:
    method, target, headers = signed_get()
    for skew in (timedelta(minutes=16), -timedelta(minutes=16)):
        error = expect(
            RequestTimeTooSkewed, verify, method, target, headers, now=datetime.now(UTC) + skew
        )
        assert (error.code, error.status) == ("RequestTimeTooSkewed", 403)
    verify(method, target, headers, now=datetime.now(UTC) + timedelta(minutes=14))
    for date in (None, "yesterday", "20260101", ""):
        error = expect(AccessDenied, verify, method, target, with_header(headers, "Date", date))
        assert error.message == "AWS authentication requires a valid Date or x-amz-date header"
    date = next(v for n, v in headers if n == "Date")
    expect(AccessDenied, verify, method, target, [*headers, ("Date", date)])  # twice
    expect(AccessDenied, verify, method, target, [*headers, ("x-amz-date", "soon")])


def test_presigned_expiry() -> None:
    client = cached_client("path")
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
    )
    target, headers = presigned(url)
    verified = verify("GET", target, headers)
    assert verified.presigned and verified.payload_mode is PayloadMode.UNSIGNED
    later = datetime.now(UTC) + timedelta(seconds=120)
    error = expect(AccessDenied, verify, "GET", target, headers, now=later)
    assert (error.message, error.status) == ("Request has expired", 403)
    # Long-lived SigV2 URLs are S3's: no longest lifetime, unlike SigV4's week.
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=400 * 86400
    )
    verify("GET", *presigned(url), now=datetime.now(UTC) + timedelta(days=399))
    for expires in ("soon", "-1", "1e9", "", "%20"):
        bad = target.replace(target.split("Expires=")[1], expires)
        error = expect(AccessDenied, verify, "GET", bad, headers)
        assert error.message.startswith("Invalid date (should be seconds since epoch)")


def test_query_authentication_needs_all_three_parameters() -> None:
    url = cached_client("path").generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}
    )
    target, headers = presigned(url)
    path, query = target.split("?")
    pairs = query.split("&")
    for dropped in range(3):
        partial = f"{path}?{'&'.join(p for i, p in enumerate(pairs) if i != dropped)}"
        error = expect(AccessDenied, verify, "GET", partial, headers)
        assert error.message == (
            "Query-string authentication requires the Signature, Expires and AWSAccessKeyId "
            "parameters"
        )
    expect(InvalidArgument, verify, "GET", f"{target}&{pairs[0]}", headers)  # twice


def test_malformed_authorization_header() -> None:
    method, target, headers = signed_get()
    for value, message in [
        (f"AWS {ACCESS_KEY}", "AWS authorization header is invalid.  Expected AwsAccessKeyId:"),
        (f"AWS {ACCESS_KEY}:", "AWS authorization header is invalid.  Expected AwsAccessKeyId:"),
        (f"AWS {ACCESS_KEY}:a:b", "AWS authorization header is invalid.  Expected AwsAccessKeyId"),
        (f"AWS  {ACCESS_KEY}:c2ln", "Authorization header is invalid -- one and only one ' '"),
        (f"AWS {ACCESS_KEY}: c2ln", "Authorization header is invalid -- one and only one ' '"),
    ]:
        malformed = with_header(headers, "Authorization", value)
        error = expect(InvalidArgument, verify, method, target, malformed)
        assert error.message.startswith(message) and error.status == 400
    no_key = with_header(headers, "Authorization", "AWS :c2ln")
    expect(InvalidAccessKeyId, verify, method, target, no_key)
    twice = [*headers, ("Authorization", next(v for n, v in headers if n == "Authorization"))]
    expect(AuthorizationHeaderMalformed, verify, method, target, twice)


def test_only_one_mechanism() -> None:
    method, target, headers = signed_get()
    url = cached_client("path").generate_presigned_url(
        "get_object", Params={"Bucket": "bucket", "Key": "k"}
    )
    query_target, _ = presigned(url)
    error = expect(InvalidArgument, verify, method, query_target, headers)
    assert error.message.startswith("Only one auth mechanism allowed")
    expect(InvalidArgument, verify, "GET", query_target + "&X-Amz-Algorithm=AWS4-HMAC-SHA256", [])


def test_payload() -> None:
    """SigV2 signs no payload hash; an x-amz-content-sha256 the client signed is held to."""
    date = formatdate(usegmt=True)

    def signed_put(content_sha256: str | None) -> HeaderList:
        amz = f"x-amz-content-sha256:{content_sha256}\n" if content_sha256 else ""
        signature = hmac_v1(SECRET_KEY, f"PUT\n\n\n{date}\n{amz}/b/k")
        headers = [("Date", date), ("Authorization", f"AWS {ACCESS_KEY}:{signature}")]
        return headers + ([("x-amz-content-sha256", content_sha256)] if content_sha256 else [])

    digest = hashlib.sha256(b"body").hexdigest()
    for value, mode, expected in [
        (None, PayloadMode.UNSIGNED, None),
        ("UNSIGNED-PAYLOAD", PayloadMode.UNSIGNED, None),
        (digest.upper(), PayloadMode.SIGNED, digest),
        ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", PayloadMode.STREAMING_UNSIGNED_TRAILER, None),
    ]:
        verified = verify("PUT", "/b/k", signed_put(value))
        assert (verified.payload_mode, verified.payload_sha256) == (mode, expected)
        assert (verified.scope, verified.signing_key, verified.region) == ("", b"", "")
    for value in (PayloadMode.STREAMING_SIGNED.value, PayloadMode.STREAMING_SIGNED_TRAILER.value):
        error = expect(InvalidRequest, verify, "PUT", "/b/k", signed_put(value))
        assert "AWS4-HMAC-SHA256" in error.message  # chunk signatures need a SigV4 key
    expect(InvalidArgument, verify, "PUT", "/b/k", signed_put("not-a-hash"))


def test_sigv2_refused_when_turned_off() -> None:
    """S3's answer where SigV2 is not supported: 400 InvalidRequest."""
    method, target, headers = signed_get()
    url = cached_client("path").generate_presigned_url(
        "get_object", Params={"Bucket": "b", "Key": "k"}
    )
    for request in ((method, target, headers), ("GET", *presigned(url))):
        verify(*request)
        error = expect(SignatureV2, verify, *request, allow_sigv2=False)
        assert (error.code, error.status) == ("InvalidRequest", 400)
        assert "Please use AWS4-HMAC-SHA256" in error.message


def test_secrets_stay_out_of_reprs() -> None:
    verified = verify(*signed_get())
    assert SECRET_KEY not in repr(verified)


@settings(max_examples=200, deadline=None)
@given(
    target=st.text(max_size=40).map(lambda t: "/" + t),
    headers=st.lists(
        st.tuples(
            st.sampled_from(["Authorization", "Date", "x-amz-date", "Content-MD5", "x-amz-a"]),
            st.text(max_size=40),
        ),
        max_size=5,
    ),
    query=st.lists(
        st.sampled_from(
            ["AWSAccessKeyId=AKIDCLIENT", "Signature=c2ln", "Signature=%", "Expires=99999999999",
             "Expires=x", "acl", "versionId=%FF", "x-amz-a=%", "%", "=", "&"]
        ),
        max_size=6,
    ),
    prefix=st.sampled_from(["", "AWS ", f"AWS {ACCESS_KEY}:"]),
)  # fmt: skip
def test_garbage_gets_an_s3_error_and_nothing_else(
    target: str, headers: HeaderList, query: list[str], prefix: str
) -> None:
    headers = [(n, prefix + v if n == "Authorization" else v) for n, v in headers]
    full = target + ("?" + "&".join(query) if query else "")
    with contextlib.suppress(S3Error):
        verify("GET", full, headers)


# -- 4. end to end, through s3cache in front of SeaweedFS -----------------------------------


def fetch(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def put_directly(upstream: SeaweedS3, bucket: str, key: str, body: bytes) -> None:
    with contextlib.closing(upstream.client()) as direct:
        direct.put_object(Bucket=bucket, Key=key, Body=body)


def error_code(body: bytes) -> str:
    return body.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode()


@pytest.mark.parametrize("style", STYLES)
def test_presigned_get_and_put_with_urllib(
    make_client: ClientFactory, bucket: str, style: str
) -> None:
    client = make_client(style, signature_version="s3")
    key = "dir/a b+ü%.txt"
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": key, "ContentType": "text/plain"}
    )
    assert "AWSAccessKeyId=" in url
    assert fetch(url, "PUT", b"hello", {"Content-Type": "text/plain"})[0] == 200
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    assert fetch(url) == (200, b"hello")
    assert fetch(url) == (200, b"hello")  # from the cache now
    head = client.generate_presigned_url("head_object", Params={"Bucket": bucket, "Key": key})
    assert fetch(head, "HEAD")[0] == 200
    assert client.head_object(Bucket=bucket, Key=key)["ContentType"] == "text/plain"


def test_default_client_presigned_url_works(
    make_client: ClientFactory, upstream: SeaweedS3, bucket: str
) -> None:
    """boto3 with an endpoint_url and no signature_version presigns with SigV2."""
    put_directly(upstream, bucket, "k", b"from upstream")
    client = make_client("path")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    assert "AWSAccessKeyId=" in url and "X-Amz-Signature" not in url
    assert fetch(url) == (200, b"from upstream")
    url = client.generate_presigned_url(
        "get_object",
        Params={"Bucket": bucket, "Key": "k", "ResponseContentDisposition": "attachment"},
    )
    request = urllib.request.Request(url)
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Content-Disposition"] == "attachment"
    url = client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "up"})
    assert "AWSAccessKeyId=" in url
    parts = urlsplit(url)  # http.client sends no Content-Type of its own, as most clients
    target = f"{parts.path}?{parts.query}"
    assert raw_request(parts.port or 80, "PUT", target, {}, b"uploaded")[0] == 200
    with contextlib.closing(upstream.client()) as direct:
        assert direct.get_object(Bucket=bucket, Key="up")["Body"].read() == b"uploaded"


@pytest.mark.parametrize("style", STYLES)
def test_header_signed_sigv2_client_does_everything(
    make_client: ClientFactory, bucket: str, style: str
) -> None:
    client = make_client(style, signature_version="s3")
    body = b"sigv2 body"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    client.put_object(
        Bucket=bucket, Key="a b/k+1", Body=body, ContentMD5=md5, Metadata={"note": "x y"}
    )
    got = client.get_object(Bucket=bucket, Key="a b/k+1")
    assert (got["Body"].read(), got["Metadata"]) == (body, {"note": "x y"})
    assert client.get_object(Bucket=bucket, Key="a b/k+1", Range="bytes=2-5")["Body"].read() == (
        body[2:6]
    )
    assert client.head_object(Bucket=bucket, Key="a b/k+1")["ContentLength"] == len(body)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="a b/")
    assert [item["Key"] for item in listed["Contents"]] == ["a b/k+1"]
    assert [b["Name"] for b in client.list_buckets()["Buckets"]].count(bucket) == 1
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    part_body = b"p" * (5 * 1024 * 1024)
    parts = [
        {"PartNumber": n, "ETag": client.upload_part(
            Bucket=bucket, Key="big", UploadId=upload, PartNumber=n, Body=data
        )["ETag"]}
        for n, data in ((1, part_body), (2, b"tail"))
    ]  # fmt: skip
    assert len(client.list_parts(Bucket=bucket, Key="big", UploadId=upload)["Parts"]) == 2
    client.complete_multipart_upload(
        Bucket=bucket, Key="big", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == part_body + b"tail"
    client.delete_object(Bucket=bucket, Key="a b/k+1")
    with pytest.raises(ClientError) as caught:
        client.head_object(Bucket=bucket, Key="a b/k+1")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "big"}]})
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def test_content_md5_goes_through_and_is_checked(make_client: ClientFactory, bucket: str) -> None:
    """SigV2 signs Content-MD5 but no payload hash: the upstream checks the body."""
    client = make_client("path", signature_version="s3")
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as caught:
        client.put_object(Bucket=bucket, Key="k", Body=b"body", ContentMD5=wrong)
    assert caught.value.response["Error"]["Code"] == "BadDigest"
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def raw_request(
    port: int, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_refusals_as_a_client_sees_them(
    s3cache: S3CacheProcess, upstream: SeaweedS3, make_client: ClientFactory, bucket: str
) -> None:
    put_directly(upstream, bucket, "k", b"secret bytes")
    client = make_client("path", signature_version="s3")
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=1
    )
    time.sleep(2.1)  # Expires is in whole seconds
    status, body = fetch(url)
    assert (status, error_code(body)) == (403, "AccessDenied") and b"Request has expired" in body
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    head, signature = url.split("Signature=", 1)
    value, _, rest = signature.partition("&")
    tampered = f"{head}Signature={quote(flip(unquote(value)), safe='')}&{rest}"
    status, body = fetch(tampered)
    assert (status, error_code(body)) == (403, "SignatureDoesNotMatch")
    stranger = client_of(
        f"http://127.0.0.1:{s3cache.port}",
        _Keys("AKIDNOBODY", "nobody's secret", upstream.region),
        signature_version="s3",
    )
    url = stranger.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    status, body = fetch(url)
    assert (status, error_code(body)) == (403, "InvalidAccessKeyId")
    with pytest.raises(ClientError) as caught:
        stranger.get_object(Bucket=bucket, Key="k")
    assert caught.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    date = formatdate(time.time() - 3600, usegmt=True)
    signature = hmac_v1(upstream.secret_key, f"GET\n\n\n{date}\n/{bucket}/k")
    status, body = raw_request(
        s3cache.port,
        "GET",
        f"/{bucket}/k",
        {"Date": date, "Authorization": f"AWS {upstream.access_key}:{signature}"},
    )
    assert (status, error_code(body)) == (403, "RequestTimeTooSkewed")
    date = formatdate(usegmt=True)  # the same request, on time
    signature = hmac_v1(upstream.secret_key, f"GET\n\n\n{date}\n/{bucket}/k")
    assert raw_request(
        s3cache.port,
        "GET",
        f"/{bucket}/k",
        {"Date": date, "Authorization": f"AWS {upstream.access_key}:{signature}"},
    ) == (200, b"secret bytes")
    status, body = raw_request(
        s3cache.port, "GET", f"/{bucket}/k", {"Authorization": f"AWS {upstream.access_key}"}
    )
    assert (status, error_code(body)) == (400, "InvalidArgument")


class _Keys:
    """An upstream-like set of keys for client_of: someone nobody gave a key."""

    def __init__(self, access_key: str, secret_key: str, region: str) -> None:
        self.endpoint_url = ""
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region


def wait_for_log(proxy: S3CacheProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_tail(100) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in proxy.log_tail(100)


def test_allow_sigv2_false_refuses_sigv2_and_sighup_turns_it_back_on(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    put_directly(upstream, bucket, "k", b"bytes")
    config = tmp_path / "s3cache.toml"
    config.write_text("allow_sigv2 = false\n")
    proxy = S3CacheProcess(tmp_path / "run", upstream, extra_args=["--config", str(config)])
    with proxy:
        sigv2 = client_of(proxy.endpoint_url, upstream, signature_version="s3")
        sigv4 = client_of(proxy.endpoint_url, upstream, signature_version="s3v4")
        url = sigv2.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
        status, body = fetch(url)
        assert (status, error_code(body)) == (400, "InvalidRequest")
        assert b"Please use AWS4-HMAC-SHA256" in body
        with pytest.raises(ClientError) as caught:
            sigv2.get_object(Bucket=bucket, Key="k")
        assert caught.value.response["Error"]["Code"] == "InvalidRequest"
        assert sigv4.get_object(Bucket=bucket, Key="k")["Body"].read() == b"bytes"
        v4_url = sigv4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
        assert fetch(v4_url) == (200, b"bytes")
        config.write_text("allow_sigv2 = true\n")
        proxy.send_signal(signal.SIGHUP)
        wait_for_log(proxy, "SIGHUP: reloaded")
        assert fetch(url) == (200, b"bytes")
        assert sigv2.get_object(Bucket=bucket, Key="k")["Body"].read() == b"bytes"
        sigv2.close()
        sigv4.close()


def test_client_key_grants_apply_to_sigv2(tmp_path: Path, upstream: SeaweedS3) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    direct = upstream.client()
    direct.create_bucket(Bucket=bucket)
    for key in ("public/a", "private/b"):
        direct.put_object(Bucket=bucket, Key=key, Body=key.encode())
    config = tmp_path / "s3cache.toml"
    config.write_text(
        "[[client_keys]]\n"
        f'access_key = "{ACCESS_KEY}"\nsecret_key = "{SECRET_KEY}"\n'
        f'allow = ["{bucket}/public/*"]\naccess = "read-only"\n'
    )
    proxy = S3CacheProcess(tmp_path / "run", upstream, extra_args=["--config", str(config)])
    keys = _Keys(ACCESS_KEY, SECRET_KEY, upstream.region)
    try:
        with proxy:
            client = client_of(proxy.endpoint_url, keys, signature_version="s3")
            presign_get = functools.partial(client.generate_presigned_url, "get_object")
            assert fetch(presign_get(Params={"Bucket": bucket, "Key": "public/a"})) == (
                200,
                b"public/a",
            )
            status, body = fetch(presign_get(Params={"Bucket": bucket, "Key": "private/b"}))
            assert (status, error_code(body)) == (403, "AccessDenied")
            put = client.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": "public/new"}
            )
            status, body = fetch(put, "PUT", b"x", {"Content-Type": ""})
            assert (status, error_code(body)) == (403, "AccessDenied")  # read-only
            assert client.get_object(Bucket=bucket, Key="public/a")["Body"].read() == b"public/a"
            with pytest.raises(ClientError) as caught:
                client.get_object(Bucket=bucket, Key="private/b")
            assert caught.value.response["Error"]["Code"] == "AccessDenied"
            listed = client.list_objects_v2(Bucket=bucket, Prefix="public/")
            assert [item["Key"] for item in listed["Contents"]] == ["public/a"]
            with pytest.raises(ClientError):
                client.list_objects_v2(Bucket=bucket)
            # The upstream's own keys are not client keys once client keys are set.
            owner = client_of(proxy.endpoint_url, upstream, signature_version="s3")
            with pytest.raises(ClientError) as caught:
                owner.get_object(Bucket=bucket, Key="public/a")
            assert caught.value.response["Error"]["Code"] == "InvalidAccessKeyId"
            client.close()
            owner.close()
    finally:
        for key in ("public/a", "private/b"):
            direct.delete_object(Bucket=bucket, Key=key)
        direct.delete_bucket(Bucket=bucket)
        direct.close()


def test_sigv2_presigned_reads_are_cached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """A SigV2 presigned GET is a plain read (its AWSAccessKeyId, Signature and Expires
    are the client's own): the second one is a hit, no GET reaches the upstream."""
    put_directly(upstream, bucket, "shard", b"x" * 100_000)
    with Relay(upstream.endpoint_url) as relay:
        proxy = S3CacheProcess(tmp_path, upstream, upstream_endpoint=relay.endpoint_url)
        with proxy:
            client = client_of(proxy.endpoint_url, upstream, signature_version="s3")
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "shard"}
            )
            assert "AWSAccessKeyId=" in url
            assert fetch(url) == (200, b"x" * 100_000)
            relay.reset()
            assert fetch(url) == (200, b"x" * 100_000)
            assert relay.count("GET") == 0
            with urllib.request.urlopen(proxy.endpoint_url + "/_s3cache/stats") as answer:
                stats = json.loads(answer.read())
            assert stats["reads"]["hit"] == 1
            client.close()
