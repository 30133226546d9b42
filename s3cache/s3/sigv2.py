"""Verification of clients' AWS Signature Version 2, as S3 does it. Pure: no I/O.

S3 user guide, "Signing and authenticating REST requests" (``RESTAuthentication``),
which botocore implements in ``botocore.auth.HmacV1Auth`` (the Authorization header)
and ``HmacV1QueryAuth`` (presigned URLs: what boto3's ``generate_presigned_url`` makes by
default for a client with an ``endpoint_url``)::

    Signature = Base64(HMAC-SHA1(secret, UTF-8(StringToSign)))
    StringToSign = Verb "\\n" Content-MD5 "\\n" Content-Type "\\n" Date "\\n"
                   CanonicalizedAmzHeaders CanonicalizedResource

* Two forms: ``Authorization: AWS AKID:Signature`` with the request time in ``Date``,
  or in ``x-amz-date`` (then the Date line is empty), within 15 minutes of the server's
  clock; or the query parameters ``AWSAccessKeyId``, ``Signature`` and ``Expires``
  (seconds since the epoch, on the Date line), good until ``Expires``.
* CanonicalizedAmzHeaders: every ``x-amz-*`` header, names lower-cased and sorted,
  repeated headers joined with ``,``, folded lines unfolded, values trimmed; each line
  ends with a newline. A presigned URL carries them as query parameters (botocore moves
  them there), which count as headers.
* CanonicalizedResource: ``/bucket`` for a virtual-host request, then the path exactly
  as received (still encoded: S3 signs it "literally as it appears in the HTTP
  request"), then the sub-resources among the query parameters, sorted by name, each
  with its decoded value.

Content-MD5 is signed but not checked here: the header goes on to the upstream, which
checks the body against it. Signatures are compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from s3cache.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    RequestTimeTooSkewed,
    SignatureDoesNotMatch,
)
from s3cache.s3.sigv4 import (
    _BAD_CONTENT_SHA256,
    _MISMATCH,
    _NO_DATE,
    _SENTINELS,
    _SHA256_HEX,
    _TIMESTAMP_FORMAT,
    _TOO_SKEWED,
    DEFAULT_MAX_SKEW,
    Headers,
    PayloadMode,
    SecretLookup,
    VerifiedRequest,
    _header_map,
    _is_digits,
    _matches,
    _parse_http_date,
    _parse_timestamp,
    _split_query,
    _text,
    _wire,
)

__all__ = ["SUBRESOURCES", "string_to_sign", "verify_sigv2"]

# The query parameters that belong to the CanonicalizedResource: the sub-resources and
# response overrides RESTAuthentication lists, and the later ones botocore's HmacV1Auth
# signs too (so S3 must: boto3 clients sign them for requests S3 accepts).
SUBRESOURCES = frozenset(
    {
        "acl",
        "cors",
        "delete",
        "lifecycle",
        "location",
        "logging",
        "notification",
        "partNumber",
        "policy",
        "requestPayment",
        "restore",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "website",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        # botocore's additions
        "accelerate",
        "analytics",
        "defaultObjectAcl",
        "inventory",
        "metrics",
        "object-lock",
        "replication",
        "select",
        "select-type",
        "storageClass",
    }
)

_QUERY_PARAMS = ("AWSAccessKeyId", "Signature", "Expires")
_LAST_SECOND = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
_FOLD = re.compile(r"\r?\n[ \t]+")
_ONE_SPACE = "Authorization header is invalid -- one and only one ' ' (space) required"
_NOT_KEY_COLON_SIGNATURE = "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature"
_QUERY_REQUIRED = (
    "Query-string authentication requires the Signature, Expires and AWSAccessKeyId parameters"
)
_NO_SIGNED_STREAMING = (
    "Chunk-signed (STREAMING-AWS4-HMAC-SHA256-PAYLOAD) uploads need AWS4-HMAC-SHA256; "
    "this request is signed with Signature Version 2."
)


def verify_sigv2(
    method: str,
    raw_path: str,
    headers: Headers,
    secrets: SecretLookup,
    *,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    virtual_host_bucket: str | None = None,
) -> VerifiedRequest:
    """Check a request's SigV2 signature; raise the S3Error that S3 would answer.

    ``raw_path`` is the request target as received (path and query, still encoded);
    ``headers`` a mapping or (name, value) pairs, duplicates kept.
    ``virtual_host_bucket``: the bucket a virtual-host request named in its Host (it
    heads the canonical resource); None for path-style requests. ``now`` must be
    timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    path, _, raw_query = raw_path.partition("?")
    if not path.startswith("/"):
        raise InvalidRequest("request target must be an absolute path")
    header_map = _header_map(headers)
    query = _query(raw_query)
    presigned = "authorization" not in header_map
    access_key, signature, date_line, when = _signature_parameters(
        header_map, query, now, max_skew
    )
    secret = secrets(access_key)
    if secret is None:
        raise InvalidAccessKeyId(
            "The AWS Access Key Id you provided does not exist in our records."
        )
    payload_mode, payload_sha256 = _payload(header_map)
    strings = _strings_to_sign(
        method, path, query, header_map, date_line, presigned, virtual_host_bucket
    )
    for string in strings:
        if _matches(_sign(secret, string), signature):
            return VerifiedRequest(
                access_key=access_key,
                payload_mode=payload_mode,
                payload_sha256=payload_sha256,
                presigned=presigned,
                timestamp=when.strftime(_TIMESTAMP_FORMAT),
                scope="",
                signature=signature,
                signing_key=b"",
                version=2,
            )
    raise SignatureDoesNotMatch(_MISMATCH)


def string_to_sign(
    method: str, raw_path: str, headers: Headers, *, virtual_host_bucket: str | None = None
) -> str:
    """The StringToSign of a request as S3 computes it, whether or not its signature
    parameters are valid: presigned when it has query authentication parameters and no
    Authorization header, else signed (or to be signed) in the header."""
    path, _, raw_query = raw_path.partition("?")
    header_map = _header_map(headers)
    query = _query(raw_query)
    presigned = "authorization" not in header_map and any(
        name in _QUERY_PARAMS for name, _ in query
    )
    if presigned:
        date_line = next((_text(value) for name, value in query if name == "Expires"), "")
    else:
        date_line = _date_line(header_map)
    strings = _strings_to_sign(
        method, path, query, header_map, date_line, presigned, virtual_host_bucket
    )
    return next(strings)


def _strings_to_sign(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    header_map: dict[str, list[str]],
    date_line: str,
    presigned: bool,
    bucket: str | None,
) -> Iterator[str]:
    """The StringToSign for each spelling of the canonical resource, S3's first. A
    presigned request's ``x-amz-*`` query parameters are signed as headers."""
    amz = _amz_headers(header_map, query if presigned else [])
    md5 = _positional(header_map, "content-md5")
    content_type = _positional(header_map, "content-type")
    head = f"{method}\n{md5}\n{content_type}\n{date_line}\n{amz}"
    for resource in _canonical_resources(path, query, bucket):
        yield head + resource


# -- parsing ------------------------------------------------------------------------------


def _signature_parameters(
    header_map: dict[str, list[str]],
    query: list[tuple[str, str]],
    now: datetime,
    max_skew: timedelta,
) -> tuple[str, str, str, datetime]:
    """The access key, signature, Date line and instant (the request time; presigned:
    the expiry) of either form, once the time checks out."""
    authorization = header_map.get("authorization")
    if not authorization:
        access_key, signature, expires = _parse_query_auth(query)
        return access_key, signature, expires, _expiry(expires, now)
    access_key, signature = _parse_authorization(authorization)
    when = _request_time(header_map)
    if abs(now - when) > max_skew:
        raise RequestTimeTooSkewed(_TOO_SKEWED)
    return access_key, signature, _date_line(header_map), when


def _parse_authorization(values: list[str]) -> tuple[str, str]:
    """``AWS AKID:Signature`` into the access key and the signature."""
    if len(values) > 1:
        raise AuthorizationHeaderMalformed(
            "The authorization header is malformed; it appears more than once."
        )
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme != "AWS":
        raise InvalidArgument("Unsupported Authorization Type")
    if " " in rest:
        raise InvalidArgument(_ONE_SPACE)
    access_key, colon, signature = rest.partition(":")
    if not colon or not signature or ":" in signature:
        raise InvalidArgument(_NOT_KEY_COLON_SIGNATURE)
    return access_key, signature


def _query(raw_query: str) -> list[tuple[str, str]]:
    """Query pairs: decoded names, raw (still encoded) values."""
    return [(_text(name), value) for name, value in _split_query(raw_query)]


def _request_time(header_map: dict[str, list[str]]) -> datetime:
    """The request time: ``x-amz-date`` if present, else ``Date``. Both are HTTP dates
    (RFC 2616 formats); an ``x-amz-date`` in SigV4's ISO 8601 form is taken too (it is
    signed either way)."""
    amz_date = header_map.get("x-amz-date")
    values = amz_date if amz_date is not None else header_map.get("date", [])
    when = None
    if len(values) == 1:
        when = _parse_http_date(values[0])
        if when is None and amz_date is not None:
            when = _parse_timestamp(values[0])
    if when is None:
        raise AccessDenied(_NO_DATE)
    return when


def _date_line(header_map: dict[str, list[str]]) -> str:
    """Date as sent, or empty when ``x-amz-date`` is present ("if you include the
    x-amz-date header, use the empty string for the Date when constructing the
    StringToSign"): x-amz-date is then signed among the x-amz-* headers."""
    if "x-amz-date" in header_map:
        return ""
    return ",".join(value.strip() for value in header_map.get("date", []))


def _parse_query_auth(query: list[tuple[str, str]]) -> tuple[str, str, str]:
    """The access key, signature and Expires of a presigned URL, decoded."""
    params: dict[str, str] = {}
    for name, raw_value in query:
        if name in _QUERY_PARAMS:
            if name in params:
                raise InvalidArgument(f"{name} appears more than once.")
            params[name] = _text(raw_value)
    if len(params) != len(_QUERY_PARAMS):
        raise AccessDenied(_QUERY_REQUIRED)
    return params["AWSAccessKeyId"], params["Signature"], params["Expires"]


def _expiry(expires: str, now: datetime) -> datetime:
    """The instant ``Expires`` names; a request after it is refused as S3 refuses it.
    SigV2 sets no longest lifetime (SigV4's is a week)."""
    if not _is_digits(expires):
        raise AccessDenied(f"Invalid date (should be seconds since epoch): {expires}")
    seconds = int(expires)
    if now.timestamp() > seconds:
        raise AccessDenied("Request has expired")
    return datetime.fromtimestamp(min(seconds, _LAST_SECOND), UTC)


def _payload(header_map: dict[str, list[str]]) -> tuple[PayloadMode, str | None]:
    """What the body must satisfy: SigV2 signs no payload, but an ``x-amz-content-sha256``
    the client sent (and so signed) is held to, as the SigV4 modes are."""
    values = header_map.get("x-amz-content-sha256")
    if values is None:
        return PayloadMode.UNSIGNED, None
    value = values[0] if len(values) == 1 else ""
    mode = _SENTINELS.get(value)
    if mode in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER):
        raise InvalidRequest(_NO_SIGNED_STREAMING)  # its chunk signatures need a SigV4 key
    if mode is not None:
        return mode, None
    if not _SHA256_HEX.fullmatch(value):
        raise InvalidArgument(_BAD_CONTENT_SHA256)
    return PayloadMode.SIGNED, value.lower()


# -- the string to sign -------------------------------------------------------------------


def _positional(header_map: dict[str, list[str]], name: str) -> str:
    """Content-MD5 or Content-Type: the value alone, or empty when absent."""
    return ",".join(value.strip() for value in header_map.get(name, []))


def _amz_headers(header_map: dict[str, list[str]], query: list[tuple[str, str]]) -> str:
    """CanonicalizedAmzHeaders: ``name:v1,v2\\n`` per ``x-amz-*`` name, sorted."""
    amz: dict[str, list[str]] = {
        name: values for name, values in header_map.items() if name.startswith("x-amz-")
    }
    for name, raw_value in query:
        lower = name.lower()
        if lower.startswith("x-amz-"):
            amz.setdefault(lower, []).append(_text(raw_value))
    return "".join(
        f"{name}:{','.join(_FOLD.sub(' ', value).strip() for value in amz[name])}\n"
        for name in sorted(amz)
    )


def _canonical_resources(
    path: str, query: list[tuple[str, str]], bucket: str | None
) -> Iterator[str]:
    """The CanonicalizedResource S3 signs, then the other spelling some clients sign.

    A path-style request for a bucket alone (``/bucket``) is signed by botocore as
    ``/bucket/``, which S3 requires; a client that signs the path literally, as the
    guide's rule reads, is accepted too. Both name the same bucket."""
    subresources = sorted(
        ((name, _text(raw_value)) for name, raw_value in query if name in SUBRESOURCES),
        key=lambda pair: pair[0],
    )
    suffix = "&".join(f"{name}={value}" if value else name for name, value in subresources)
    suffix = "?" + suffix if suffix else ""
    if bucket is not None:
        yield f"/{bucket}{path}{suffix}"
        return
    if path.count("/") == 1 and path != "/":
        yield f"{path}/{suffix}"
    yield path + suffix


def _sign(secret: str, string: str) -> str:
    digest = hmac.digest(secret.encode("utf-8"), _wire(string), "sha1")
    return base64.b64encode(digest).decode("ascii")
