"""Object metadata: what the cache keeps of an upstream GET/HEAD answer, the one check
of such an answer against what was asked, and the headers the cache answers with.

GetObject response headers: https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from s3cache.s3.conditions import parse_http_date
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

# RFC 9110 §14.4: ``bytes first-last/complete-length``, the length ``*`` if unknown.
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Verdict(enum.Enum):
    """What an upstream GET/HEAD answer is good for, against what was asked."""

    CACHEABLE = "cacheable"  # exactly the bytes asked, of a version the cache can keep
    UNCACHED = "uncached"  # a valid answer the cache cannot keep: served as it came
    CHANGED = "changed"  # of another version than the entry's (ETag or size differ)
    BROKEN = "broken"  # contradicts the request or itself


@dataclass(frozen=True, slots=True)
class Checked:
    """An upstream answer's verdict, why, and for a cacheable one its version."""

    verdict: Verdict
    reason: str = ""
    meta: ObjectMeta | None = None


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes 0-99/1234`` -> (0, 99, 1234); ``bytes 0-99/*`` -> (0, 99, None)."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


def check_answer(
    method: str,
    status: int,
    headers: Mapping[str, str],
    asked: tuple[int, int] | None,
    known: ObjectMeta | None = None,
) -> Checked:
    """The one check of a 200/206 answer to a GET or HEAD the cache sent: ``asked`` is
    the Range it sent (first, last byte) or None, ``known`` the version it expects.

    Cacheable only if the body is exactly the asked span clipped to the object's size
    (a 200 counts when that span is the whole object), Content-Length agrees, and ETag
    and a parseable Last-Modified are there (GetObject always sends them:
    https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html). A valid answer
    short of that (no ETag, so no If-Match; no Last-Modified; size unknown, ``/*``; a
    200 for a range, RFC 9110 §14.2 lets a server ignore Range) is UNCACHED."""
    span = _body_span(method, status, headers)
    if isinstance(span, Checked):
        return span
    first, last, total = span
    if method == "GET" and asked is not None and (first, last) != _clipped(asked, total):
        if status == 200:
            return Checked(Verdict.UNCACHED, "200 to a ranged GET: the upstream ignores Range")
        return Checked(Verdict.BROKEN, f"Content-Range bytes {first}-{last} for {asked}")
    etag = headers.get("ETag")
    last_modified = headers.get("Last-Modified")
    if not etag:
        return Checked(Verdict.UNCACHED, "no ETag")
    if not last_modified or parse_http_date(last_modified) is None:
        return Checked(Verdict.UNCACHED, "no Last-Modified date")
    if known is not None:
        if etag != known.etag or total != known.size:
            return Checked(Verdict.CHANGED, f"now {etag}, {total} bytes")
        return Checked(Verdict.CACHEABLE, meta=known)
    kept = tuple(
        (name, value) for name, value in headers.items() if name.lower() not in _PER_RESPONSE
    )
    meta = ObjectMeta(etag=etag, size=total, last_modified=last_modified, headers=kept)
    return Checked(Verdict.CACHEABLE, meta=meta)


def _body_span(
    method: str, status: int, headers: Mapping[str, str]
) -> tuple[int, int, int] | Checked:
    """(first, last, total) of what the body carries (last = first - 1 if nothing), or
    the verdict that it cannot be told."""
    length_text = headers.get("Content-Length")
    length = int(length_text) if length_text is not None and length_text.isdigit() else None
    if length_text is not None and length is None:
        return Checked(Verdict.BROKEN, f"Content-Length {length_text!r}")
    if status == 200:
        if length is None:
            return Checked(Verdict.UNCACHED, "size unknown (no Content-Length)")
        return 0, length - 1, length
    if status != 206 or method != "GET":
        return Checked(Verdict.BROKEN, f"{status} to a {method}")
    content_range = parse_content_range(headers.get("Content-Range"))
    if content_range is None:
        return Checked(Verdict.BROKEN, f"Content-Range {headers.get('Content-Range')!r}")
    first, last, total = content_range
    if last < first or (total is not None and last >= total):
        return Checked(Verdict.BROKEN, f"Content-Range {headers.get('Content-Range')!r}")
    if length is not None and length != last - first + 1:
        return Checked(Verdict.BROKEN, f"Content-Length {length} for bytes {first}-{last}")
    if total is None:
        return Checked(Verdict.UNCACHED, "size unknown (Content-Range bytes a-b/*)")
    return first, last, total


def _clipped(asked: tuple[int, int], total: int) -> tuple[int, int]:
    """The span a Range ``bytes=first-last`` selects of ``total`` bytes (RFC 9110
    §14.1.2: a last byte past the end means the end)."""
    return asked[0], min(asked[1], total - 1)


def announced_length(status: int, headers: Mapping[str, str]) -> int | None:
    """How many body bytes an answer's head announces: its Content-Length, or the span
    of a 206's Content-Range (a chunked or close-delimited 206); None if it does not
    say (or has no body: 1xx, 204, 304). Raises ValueError if the two disagree."""
    if status < 200 or status in (204, 304):
        return None
    length_text = headers.get("Content-Length")
    length = int(length_text) if length_text is not None and length_text.isdigit() else None
    content_range = parse_content_range(headers.get("Content-Range")) if status == 206 else None
    if content_range is None or content_range[1] < content_range[0]:
        return length
    span = content_range[1] - content_range[0] + 1
    if length is not None and length != span:
        raise ValueError(f"Content-Length {length} for {headers.get('Content-Range')}")
    return span


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
