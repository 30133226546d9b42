"""Hand-built S3 requests for the upload tests: SigV4 headers signed with botocore's S3
signer for any ``x-amz-content-sha256`` value, and bodies in AWS's streaming
encodings, sent with ``http.client`` so that the bytes on the wire are exactly these.

- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` (AWS S3 API reference, "Transferring Payload
  in Multiple Chunks (Chunked Upload)", ``sigv4-streaming``): the seed signature is the
  one of the Authorization header; chunk ``i`` is
  ``hex(len);chunk-signature=SIG_i\\r\\n DATA \\r\\n`` with
  ``SIG_i = HMAC(signing key, "AWS4-HMAC-SHA256-PAYLOAD\\n" + timestamp + "\\n" + scope
  + "\\n" + SIG_(i-1) + "\\n" + sha256("") + "\\n" + sha256(DATA))``, and the body ends
  with the signed empty chunk and an empty line.
- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` as botocore writes it
  (``botocore.httpchecksum.AwsChunkedWrapper``): unsigned chunks, then the checksum
  trailer.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SIGNATURE = re.compile(r"Signature=([0-9a-f]{64})$")


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str
    region: str


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _FixedPayloadSigner(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 SigV4 signer, with the payload hash given rather than computed."""

    def __init__(self, keys: Keys, content_sha256: str) -> None:
        super().__init__(Credentials(keys.access_key, keys.secret_key), "s3", keys.region)
        self._content_sha256 = content_sha256

    def payload(self, request: AWSRequest) -> str:
        return self._content_sha256


def sign(
    method: str,
    endpoint_url: str,
    path: str,
    headers: Mapping[str, str],
    content_sha256: str,
    keys: Keys,
) -> dict[str, str]:
    """The request headers, plus X-Amz-Date, X-Amz-Content-SHA256 and Authorization.

    Every header given is signed (Content-Length and Content-Encoding included)."""
    request = AWSRequest(method=method, url=endpoint_url + path, headers=dict(headers))
    _FixedPayloadSigner(keys, content_sha256).add_auth(request)
    return {name: str(value) for name, value in request.headers.items()}


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def chunk_signature(key: bytes, timestamp: str, scope: str, previous: str, data: bytes) -> str:
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256-PAYLOAD",
            timestamp,
            scope,
            previous,
            EMPTY_SHA256,
            hashlib.sha256(data).hexdigest(),
        ]
    )
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def encode_signed_chunks(
    payload: bytes, chunk_size: int, key: bytes, timestamp: str, scope: str, seed_signature: str
) -> bytes:
    """The aws-chunked body of STREAMING-AWS4-HMAC-SHA256-PAYLOAD, signatures chained."""
    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)]
    out = bytearray()
    previous = seed_signature
    for data in [*chunks, b""]:
        previous = chunk_signature(key, timestamp, scope, previous, data)
        out += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(data), previous.encode(), data)
    return bytes(out)


def signed_streaming_length(payload_length: int, chunk_size: int) -> int:
    """Content-Length of the STREAMING-AWS4-HMAC-SHA256-PAYLOAD body of a payload."""
    full, rest = divmod(payload_length, chunk_size)
    sizes = [chunk_size] * full + ([rest] if rest else []) + [0]
    return sum(len(f"{n:x};chunk-signature=") + 64 + 2 + n + 2 for n in sizes)


def seed_signature(headers: Mapping[str, str]) -> str:
    match = _SIGNATURE.search(headers["Authorization"])
    assert match is not None, headers["Authorization"]
    return match[1]


def signed_streaming_put(
    endpoint_url: str,
    path: str,
    payload: bytes,
    keys: Keys,
    *,
    chunk_size: int = 64 * 1024,
    extra_headers: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a STREAMING-AWS4-HMAC-SHA256-PAYLOAD PUT of ``payload``."""
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(len(payload)),
        "Content-Length": str(signed_streaming_length(len(payload), chunk_size)),
        **(extra_headers or {}),
    }
    signed = sign("PUT", endpoint_url, path, headers, STREAMING_SIGNED, keys)
    timestamp = signed["X-Amz-Date"]
    scope = f"{timestamp[:8]}/{keys.region}/s3/aws4_request"
    key = signing_key(keys.secret_key, timestamp[:8], keys.region)
    body = encode_signed_chunks(payload, chunk_size, key, timestamp, scope, seed_signature(signed))
    assert len(body) == int(headers["Content-Length"])
    return signed, body


def unsigned_trailer_put(
    endpoint_url: str, path: str, payload: bytes, keys: Keys, *, chunk_size: int = 64 * 1024
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a STREAMING-UNSIGNED-PAYLOAD-TRAILER PUT with a CRC32
    trailer, encoded by botocore, sent with a Content-Length."""
    wrapper = AwsChunkedWrapper(
        io.BytesIO(payload),
        checksum_cls=Crc32Checksum,
        checksum_name="x-amz-checksum-crc32",
        chunk_size=chunk_size,
    )
    body = b"".join(iter(lambda: wrapper.read(1 << 20), b""))
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(len(payload)),
        "X-Amz-Trailer": "x-amz-checksum-crc32",
        "Content-Length": str(len(body)),
    }
    return sign("PUT", endpoint_url, path, headers, STREAMING_UNSIGNED_TRAILER, keys), body


def send(
    port: int, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None
) -> Response:
    """One request on a fresh connection to 127.0.0.1:port (Host 127.0.0.1:port)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return Response(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def send_truncated(
    port: int, method: str, path: str, headers: Mapping[str, str], partial_body: bytes
) -> None:
    """Send the head and only ``partial_body``, then close the connection."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + partial_body)
