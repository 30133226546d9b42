"""Which bucket and key a request addresses, and how to spell them to the upstream.

Path-style: ``/bucket/key``. Virtual-host: ``Host: bucket.<domain>`` and ``/key``.
https://docs.aws.amazon.com/AmazonS3/latest/userguide/VirtualHosting.html

Keys are taken from the raw request path and percent-decoded exactly once, so every
byte a client can put in a key (spaces, unicode, ``+``, ``%``, ``=``, ``//``, a
trailing ``/``) survives the round trip. Keys never become filesystem paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from s3cache.errors import InvalidBucketName, InvalidRequest, KeyTooLongError

MAX_KEY_BYTES = 1024

# S3 bucket naming rules (general purpose buckets), plus the legacy upper-case and
# underscore names that older regions still serve.
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")

# Query parameters that authenticate the client's own presigned request; they mean
# nothing to the upstream, which gets s3cache's signature instead.
# https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html
CLIENT_AUTH_PARAMS = frozenset(
    {
        "x-amz-algorithm",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-signedheaders",
        "x-amz-signature",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "expires",
    }
)


@dataclass(frozen=True, slots=True)
class S3Address:
    """What a request addresses: the service (no bucket), a bucket, or an object."""

    bucket: str | None
    key: str | None
    query: tuple[tuple[str, str], ...]
    virtual_host: bool = False  # the bucket came from the Host header (SigV2 signs it)

    def param(self, name: str) -> str | None:
        for param_name, value in self.query:
            if param_name == name:
                return value
        return None

    def has_param(self, name: str) -> bool:
        return any(param_name == name for param_name, _ in self.query)

    @property
    def resource(self) -> str:
        """The resource named in error documents: ``/bucket/key``."""
        return "/" + "/".join(part for part in (self.bucket, self.key) if part is not None)


def resolve(host: str, raw_path: str, domains: tuple[str, ...]) -> S3Address:
    """Parse the Host header and raw request target into an S3Address."""
    path, _, raw_query = raw_path.partition("?")
    if not path.startswith("/"):
        raise InvalidRequest("request target must be an absolute path")
    query = parse_query(raw_query)
    bucket = _virtual_host_bucket(host, domains)
    virtual = bucket is not None
    if bucket is None:
        bucket_part, slash, key_part = path[1:].partition("/")
        bucket = _decode(bucket_part) or None
        key = _decode(key_part) if slash and key_part else None
    else:
        key = _decode(path[1:]) or None
    if bucket is not None:
        validate_bucket(bucket)
    if key is not None and len(key.encode()) > MAX_KEY_BYTES:
        raise KeyTooLongError("Your key is too long", resource=f"/{bucket}")
    return S3Address(bucket=bucket, key=key, query=query, virtual_host=virtual)


def validate_bucket(bucket: str) -> None:
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise InvalidBucketName("The specified bucket is not valid.", resource=f"/{bucket}")


def parse_query(raw_query: str) -> tuple[tuple[str, str], ...]:
    """Decode ``a=1&b&c=x%20y`` into pairs, order kept. ``+`` stays ``+``: S3 signs
    query strings encoded with ``%20`` for a space."""
    pairs = []
    for item in raw_query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((_decode(name), _decode(value)))
    return tuple(pairs)


def encode_path(bucket: str | None, key: str | None) -> str:
    """The path for a path-style upstream request, URI-encoded as SigV4 expects."""
    parts = [quote(bucket, safe="")] if bucket else []
    if key is not None:
        parts.append(quote(key, safe="/~"))
    return "/" + "/".join(parts)


def encode_query(query: tuple[tuple[str, str], ...]) -> str:
    """Re-encode query pairs for the upstream, dropping the client's own auth params.

    A parameter that came without ``=`` (``?uploads``) is sent the same way."""
    parts = []
    for name, value in query:
        if name.lower() in CLIENT_AUTH_PARAMS:
            continue
        encoded = quote(name, safe="-_.~")
        parts.append(f"{encoded}={quote(value, safe='-_.~')}" if value else encoded)
    return "&".join(parts)


def _virtual_host_bucket(host: str, domains: tuple[str, ...]) -> str | None:
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    hostname = hostname.lower().rstrip(".")
    for domain in domains:
        if hostname.endswith("." + domain):
            return hostname[: -len(domain) - 1]
    return None


def _decode(text: str) -> str:
    if "%" not in text and text.isascii():
        return text  # nothing to decode (most names, values and keys)
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("the request path is not valid UTF-8 once decoded") from exc
