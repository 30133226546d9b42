"""Object metadata: what the cache keeps of an upstream GET/HEAD answer, and the
headers it answers with from it.

GetObject response headers: https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from multidict import CIMultiDict

from s3cache.s3.ranges import ByteRange
from s3cache.store.entry import ObjectMeta

# Headers that describe the transfer or the exchange, not the object: never replayed.
_PER_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-range",
        "accept-ranges",
        "date",
        "server",
        "etag",
        "last-modified",
        "x-amz-request-id",
        "x-amz-id-2",
        "vary",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-expose-headers",
    }
)
# Full-object checksums only describe the whole object: sent only for whole-object
# answers to a request with x-amz-checksum-mode: ENABLED, as S3 does.
_CHECKSUM = "x-amz-checksum-"

# response-* query parameters override these headers (GetObject "Overriding response
# header values").
RESPONSE_OVERRIDES = {
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
    "response-content-language": "Content-Language",
    "response-content-type": "Content-Type",
    "response-expires": "Expires",
}

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class MetadataError(ValueError):
    """The upstream's answer lacks what the cache needs to keep the object."""


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes 0-99/1234`` -> (0, 99, 1234)."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None
    start, end, total = (int(group) for group in match.groups())
    return start, end, total


def meta_from_response(status: int, headers: Mapping[str, str]) -> ObjectMeta:
    """ObjectMeta from a 200/206 GET or a 200 HEAD of the upstream."""
    etag = headers.get("ETag")
    last_modified = headers.get("Last-Modified")
    if not etag or not last_modified:
        raise MetadataError("upstream answer has no ETag or Last-Modified")
    if status == 206:
        content_range = parse_content_range(headers.get("Content-Range"))
        if content_range is None:
            raise MetadataError("206 answer without a usable Content-Range")
        size = content_range[2]
    else:
        length = headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise MetadataError("answer without a Content-Length")
        size = int(length)
    kept = tuple(
        (name, value) for name, value in headers.items() if name.lower() not in _PER_RESPONSE
    )
    return ObjectMeta(etag=etag, size=size, last_modified=last_modified, headers=kept)


def object_headers(
    meta: ObjectMeta,
    byte_range: ByteRange | None,
    query: Mapping[str, str],
    *,
    checksum_mode: bool,
) -> CIMultiDict[str]:
    """The headers of a 200/206 answer from the cache, as S3 would send them."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["ETag"] = meta.etag
    headers["Last-Modified"] = meta.last_modified
    headers["Accept-Ranges"] = "bytes"
    for name, value in meta.headers:
        if name.lower().startswith(_CHECKSUM) and (byte_range is not None or not checksum_mode):
            continue
        headers.add(name, value)
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range(meta.size)
    for parameter, header in RESPONSE_OVERRIDES.items():
        if parameter in query:
            headers[header] = query[parameter]
    return headers


def not_modified_headers(meta: ObjectMeta) -> CIMultiDict[str]:
    """A 304 carries the validators and caching headers, no body headers
    (RFC 9110 §15.4.5)."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["ETag"] = meta.etag
    headers["Last-Modified"] = meta.last_modified
    for name, value in meta.headers:
        if name.lower() in ("cache-control", "expires", "content-location", "vary"):
            headers.add(name, value)
    return headers
