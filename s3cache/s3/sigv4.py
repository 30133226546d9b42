"""Verification of clients' AWS Signature Version 4, as S3 does it. Pure: no I/O.

Two forms, both ``AWS4-HMAC-SHA256``:

* the ``Authorization`` header (S3 API reference, "Authenticating Requests: Using the
  Authorization Header", ``sigv4-auth-using-authorization-header`` and
  ``sig-v4-header-based-auth``), where ``x-amz-content-sha256`` names the payload: its
  SHA-256, ``UNSIGNED-PAYLOAD`` or one of the streaming modes of ``sigv4-streaming`` and
  ``sigv4-streaming-trailers``;
* the presigned URL (``sigv4-query-string-auth``): ``X-Amz-Algorithm``,
  ``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-Expires``, ``X-Amz-SignedHeaders`` and
  ``X-Amz-Signature`` in the query, payload ``UNSIGNED-PAYLOAD``.

The canonical request is built from the request target as received. S3 does not
normalize paths (``..``, ``//`` and a trailing ``/`` are part of the key) and encodes them
once: the canonical URI is the percent-decoded path re-encoded with the RFC 3986
unreserved set, ``/`` kept, so the documented ``PUT /test$file.text`` signs
``/test%24file.text``. The canonical query string decodes and re-encodes every name and
value the same way (``+`` is a literal plus, as in :mod:`s3cache.s3.addressing`) and
sorts by name, then value. For botocore, the AWS CLI and the other AWS SDKs this is the
target exactly as sent. A client that encodes differently from S3 (``%2F`` for ``/``,
lower-case hex, raw sub-delimiters) and signs what it sent is accepted too: the target
as sent, its query pairs sorted, is tried second. Both forms are functions of the bytes
on the wire, which the signature covers, and :mod:`~s3cache.s3.addressing` decodes the
path once either way, so neither lets a signature cover another key.

Anonymous requests are the caller's policy: :func:`verify_request` answers a request
that carries no signature of any kind with :class:`Unsigned` (an ``AccessDenied``).
Signature Version 2 (``Authorization: AWS …``, ``AWSAccessKeyId``/``Signature`` in the
query) is recognised and answered with :class:`SignatureV2`, the ``InvalidRequest`` S3
gives where SigV2 is not supported; :func:`s3cache.s3.signatures.verify_request`, the
entry point for both versions, hands those requests to :mod:`s3cache.s3.sigv2`, which
shares this module's parsing and decoding helpers.
Secrets never appear in exceptions or reprs; signatures are compared in constant time;
signing keys (four HMACs each) are cached per secret, date, region and service.

Streaming bodies (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``) are checked chunk by
chunk by a :class:`ChunkVerifier` plugged into
:class:`~s3cache.s3.chunked.AwsChunkedDecoder`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import Enum
from functools import lru_cache
from typing import Literal, Protocol
from urllib.parse import quote, unquote_to_bytes

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
from s3cache.s3.chunked import HashLike

__all__ = [
    "ChunkVerifier",
    "Credentials",
    "PayloadMode",
    "SecretLookup",
    "SignatureV2",
    "Unsigned",
    "VerifiedRequest",
    "chunk_verifier",
    "secret_lookup",
    "verify_request",
]

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_MAX_SKEW = timedelta(minutes=15)
# sigv4-query-string-auth: "The minimum value you can set is 1, and the maximum is
# 604800 (seven days)."
MAX_PRESIGNED_EXPIRES = 604800

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
# Bytes UriEncode leaves alone, and "/" (which it leaves alone only in a path).
_UNRESERVED = re.compile(rb"[A-Za-z0-9\-._~/]*")
_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_QUERY_AUTH_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
# Signature Version 2, which S3 still names in its "not supported" answer.
_SIGV2_QUERY_PARAMS = frozenset({"AWSAccessKeyId", "Signature"})
_ANY_QUERY_AUTH_PARAMS = frozenset(_QUERY_AUTH_PARAMS) | _SIGV2_QUERY_PARAMS

_NOT_SIGNED = "There were headers present in the request which were not signed"
_UNSUPPORTED = (
    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
)
_NO_DATE = "AWS authentication requires a valid Date or x-amz-date header"
_TOO_SKEWED = "The difference between the request time and the current time is too large."
_BOTH_MECHANISMS = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
    "Signature query string parameter or the Authorization header should be specified"
)
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method."
)
_BAD_CONTENT_SHA256 = (
    "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER "
    "or a valid sha256 value."
)


class PayloadMode(Enum):
    """What ``x-amz-content-sha256`` says about the body, and so what the caller checks."""

    SIGNED = "sha256"  # the body must hash to VerifiedRequest.payload_sha256
    UNSIGNED = "UNSIGNED-PAYLOAD"
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


_SENTINELS = {mode.value: mode for mode in PayloadMode if mode is not PayloadMode.SIGNED}


@dataclass(frozen=True, slots=True)
class Credentials:
    """One client key pair; ``repr`` shows the access key only."""

    access_key: str
    secret_key: str = field(repr=False)


class SecretLookup(Protocol):
    """The secret key of an access key, or None for a key nobody was given."""

    def __call__(self, access_key: str, /) -> str | None: ...


def secret_lookup(credentials: Iterable[Credentials]) -> SecretLookup:
    """A SecretLookup over a fixed set of key pairs."""
    return {c.access_key: c.secret_key for c in credentials}.get


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """Who signed a request whose signature checked out, and what its body must satisfy.

    A SigV2 request (``version`` 2) has no credential scope and no signing key (both
    empty) and no chunk signatures: its body is what ``x-amz-content-sha256`` says, if
    the client sent one, else unsigned."""

    access_key: str
    payload_mode: PayloadMode
    payload_sha256: str | None  # lower-case hex, for PayloadMode.SIGNED only
    presigned: bool
    timestamp: str  # the signed request time (SigV2 presigned: its expiry), ISO 8601 basic
    scope: str  # 20130524/us-east-1/s3/aws4_request
    signature: str  # the seed of the chunk-signature chain
    signing_key: bytes = field(repr=False)
    version: Literal[2, 4] = 4

    @property
    def region(self) -> str:
        """The region signed for ("" for SigV2, which names none)."""
        parts = self.scope.split("/")
        return parts[1] if len(parts) > 1 else ""


@dataclass(slots=True)  # not frozen: built on every request, and frozen costs more
class _Signed:
    """The parsed signature parameters of either form."""

    presigned: bool
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str = ""  # presigned only: X-Amz-Date and X-Amz-Expires, decoded
    expires: str = ""


class Unsigned(AccessDenied):
    """The request carries no signature of any kind: no Authorization header, no SigV4
    or SigV2 query authentication. Whether it may pass anyway is the caller's policy."""


class SignatureV2(InvalidRequest):
    """The request is signed with Signature Version 2, which this module does not verify:
    S3's answer where SigV2 is not supported (``s3.sigv2`` verifies it)."""


def verify_request(
    method: str,
    raw_path: str,
    headers: Headers,
    secrets: SecretLookup,
    *,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    region: str | None = None,
    service: str = "s3",
) -> VerifiedRequest:
    """Check a request's SigV4 signature; raise the S3Error that S3 would answer
    (:class:`SignatureV2` for a SigV2 request).

    ``raw_path`` is the request target as received (path and query, still encoded);
    ``headers`` a mapping or a list of (name, value) pairs, duplicates kept (a multidict's
    ``items()`` keeps them). ``region`` None accepts whatever region the client signed
    for. ``now`` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    path, _, raw_query = raw_path.partition("?")
    if not path.startswith("/"):
        raise InvalidRequest("request target must be an absolute path")
    header_map = _header_map(headers)
    query = _split_query(raw_query)
    names = [_text(name) for name, _ in query]  # decoded once, in query order
    signed = _parse_signature(header_map, query, names)
    _check_scope(signed, region, service)
    timestamp, when = _request_time(signed, header_map)
    _check_time(signed, when, now, max_skew)
    secret = secrets(signed.access_key)
    if secret is None:
        raise InvalidAccessKeyId(
            "The AWS Access Key Id you provided does not exist in our records."
        )
    _check_signed_headers(signed, header_map)
    payload_mode, payload_hash = _payload(signed, header_map, query, names)
    if signed.presigned:  # the signature does not sign itself
        query = [pair for pair, name in zip(query, names, strict=True) if name != "X-Amz-Signature"]
    scope = f"{signed.date}/{signed.region}/{signed.service}/aws4_request"
    key = _signing_key(secret, signed.date, signed.region, signed.service)
    prefix = f"{ALGORITHM}\n{timestamp}\n{scope}\n"
    if not _signature_matches(method, path, query, header_map, signed, payload_hash, key, prefix):
        raise SignatureDoesNotMatch(_MISMATCH)
    return VerifiedRequest(
        access_key=signed.access_key,
        payload_mode=payload_mode,
        payload_sha256=payload_hash.lower() if payload_mode is PayloadMode.SIGNED else None,
        presigned=signed.presigned,
        timestamp=timestamp,
        scope=scope,
        signature=signed.signature,
        signing_key=key,
    )


def _signature_matches(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    header_map: dict[str, list[str]],
    signed: _Signed,
    payload_hash: str,
    key: bytes,
    prefix: str,
) -> bool:
    """Whether the signature is the one of the canonical request, its target in S3's
    encoding or as sent. ``prefix`` is the string to sign up to the request's hash."""
    rest = "\n".join(
        (
            _canonical_headers(signed.signed_headers, header_map),
            ";".join(signed.signed_headers),
            payload_hash,
        )
    )

    def signs(target: tuple[str, str]) -> bool:
        canonical = f"{method}\n{target[0]}\n{target[1]}\n{rest}"
        return _matches(_hmac_hex(key, prefix + _sha256_hex(canonical)), signed.signature)

    s3_form = _s3_target(path, query)
    if signs(s3_form):
        return True
    wire_form = _wire_target(path, query)  # only for clients that encode otherwise
    return wire_form != s3_form and signs(wire_form)


# -- parsing the signature parameters -----------------------------------------------------


def _parse_signature(
    header_map: dict[str, list[str]], query: list[tuple[str, str]], query_names: list[str]
) -> _Signed:
    authorization = header_map.get("authorization", [])
    names = set(query_names)
    if bool(authorization) + ("X-Amz-Algorithm" in names) + ("Signature" in names) > 1:
        raise InvalidArgument(_BOTH_MECHANISMS)
    if authorization:
        if len(authorization) > 1:
            raise AuthorizationHeaderMalformed(
                "The authorization header is malformed; it appears more than once."
            )
        return _parse_authorization(authorization[0])
    if "X-Amz-Algorithm" in names or "X-Amz-Credential" in names:
        return _parse_query_auth(query, query_names)
    if names & _SIGV2_QUERY_PARAMS:
        raise SignatureV2(_UNSUPPORTED)
    if names & _ANY_QUERY_AUTH_PARAMS:
        raise AccessDenied("Access Denied")  # a fragment of query authentication
    raise Unsigned("Access Denied")


def _parse_authorization(value: str) -> _Signed:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        if algorithm == "AWS":
            raise SignatureV2(_UNSUPPORTED)
        if algorithm == "AWS4-ECDSA-P256-SHA256":  # SigV4a
            raise InvalidRequest(_UNSUPPORTED)
        raise InvalidArgument("Unsupported Authorization Type")
    parts: dict[str, str] = {}
    for component in rest.split(","):
        name, eq, component_value = component.strip().partition("=")
        if not eq or name in parts:
            raise AuthorizationHeaderMalformed(
                "The authorization header is malformed; the authorization component "
                f'"{component.strip()}" is malformed.'
            )
        parts[name] = component_value
    if set(parts) != {"Credential", "SignedHeaders", "Signature"}:
        raise AuthorizationHeaderMalformed(
            "The authorization header is malformed; the authorization header requires three "
            "components: Credential, SignedHeaders, and Signature."
        )
    access_key, date, region, scope_service = _parse_credential(parts["Credential"], False)
    return _Signed(
        presigned=False,
        access_key=access_key,
        date=date,
        region=region,
        service=scope_service,
        signed_headers=_parse_signed_headers(parts["SignedHeaders"], False),
        signature=parts["Signature"],
    )


def _parse_query_auth(query: list[tuple[str, str]], names: list[str]) -> _Signed:
    params: dict[str, str] = {}
    for (_, raw_value), name in zip(query, names, strict=True):
        if name in _QUERY_AUTH_PARAMS:
            if name in params:
                raise AuthorizationQueryParametersError(f"{name} appears more than once.")
            params[name] = _text(raw_value)
    if len(params) != len(_QUERY_AUTH_PARAMS):
        raise AuthorizationQueryParametersError(
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
            "and X-Amz-Expires parameters."
        )
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise AuthorizationQueryParametersError('X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    access_key, date, region, scope_service = _parse_credential(params["X-Amz-Credential"], True)
    return _Signed(
        presigned=True,
        access_key=access_key,
        date=date,
        region=region,
        service=scope_service,
        signed_headers=_parse_signed_headers(params["X-Amz-SignedHeaders"], True),
        signature=params["X-Amz-Signature"],
        amz_date=params["X-Amz-Date"],
        expires=params["X-Amz-Expires"],
    )


@lru_cache(maxsize=256)  # a key signs with the same credential scope all day
def _parse_credential(value: str, presigned: bool) -> tuple[str, str, str, str]:
    """``AKID/YYYYMMDD/region/service/aws4_request`` into its first four parts."""
    parts = value.rsplit("/", 4)
    if len(parts) != 5 or not all(parts[:4]) or not _is_digits(parts[1], 8):
        raise _credential_error(
            presigned,
            "the Credential is mal-formed; "
            'expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".',
        )
    if parts[4] != "aws4_request":
        raise _credential_error(
            presigned, f'incorrect terminal "{parts[4]}". This endpoint uses "aws4_request".'
        )
    return parts[0], parts[1], parts[2], parts[3]


@lru_cache(maxsize=256)  # clients sign the same few header sets
def _parse_signed_headers(value: str, presigned: bool) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    if all(names) and all(name == name.strip().lower() for name in names):
        return names
    if presigned:
        raise AuthorizationQueryParametersError("X-Amz-SignedHeaders is mal-formed.")
    raise AuthorizationHeaderMalformed(
        "The authorization header is malformed; the SignedHeaders component is mal-formed."
    )


def _is_digits(value: str, length: int | None = None) -> bool:
    """ASCII digits only (str.isdigit also takes other scripts' digits), ``length`` of them."""
    return value.isascii() and value.isdigit() and (length is None or len(value) == length)


def _credential_error(presigned: bool, detail: str) -> S3Error:
    if presigned:
        return AuthorizationQueryParametersError(
            f"Error parsing the X-Amz-Credential parameter; {detail}"
        )
    return AuthorizationHeaderMalformed(f"The authorization header is malformed; {detail}")


# -- checks -------------------------------------------------------------------------------


def _check_scope(signed: _Signed, region: str | None, service: str) -> None:
    if signed.service != service:
        raise _credential_error(
            signed.presigned,
            f'incorrect service "{signed.service}". This endpoint belongs to "{service}".',
        )
    if region is not None and signed.region != region:
        # S3 names the right region in the error and in x-amz-bucket-region, which
        # botocore's S3RegionRedirector reads to re-sign for it.
        error = _credential_error(
            signed.presigned, f"the region '{signed.region}' is wrong; expecting '{region}'"
        )
        error.headers["x-amz-bucket-region"] = region
        raise error


def _request_time(signed: _Signed, header_map: dict[str, list[str]]) -> tuple[str, datetime]:
    """The signed timestamp (ISO 8601 basic) and its instant."""
    if signed.presigned:
        when = _parse_timestamp(signed.amz_date)
        if when is None:
            raise AuthorizationQueryParametersError(
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
            )
        timestamp = signed.amz_date
    else:
        found = _header_time(header_map)
        if found is None:
            raise AccessDenied(_NO_DATE)
        timestamp, when = found
    if timestamp[:8] != signed.date:
        raise _credential_error(
            signed.presigned, "Invalid credential date. Date is not the same as X-Amz-Date."
        )
    return timestamp, when


def _header_time(header_map: dict[str, list[str]]) -> tuple[str, datetime] | None:
    """X-Amz-Date if present, else Date (which botocore signs with when a request has
    one; the string to sign then carries it in ISO 8601 basic form)."""
    amz_date = header_map.get("x-amz-date")
    if amz_date is not None:
        when = _parse_timestamp(amz_date[0]) if len(amz_date) == 1 else None
        return None if when is None else (amz_date[0], when)
    date = header_map.get("date")
    when = _parse_http_date(date[0]) if date is not None and len(date) == 1 else None
    return None if when is None else (when.strftime(_TIMESTAMP_FORMAT), when)


def _parse_http_date(value: str) -> datetime | None:
    """An HTTP date (RFC 9110 §5.6.7: IMF-fixdate and the obsolete forms), in UTC."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@lru_cache(maxsize=1024)
def _parse_timestamp(value: str) -> datetime | None:
    """Cached: every request signed in the same second carries the same timestamp."""
    if not _TIMESTAMP.fullmatch(value):
        return None
    try:  # by hand: datetime.strptime costs more than the rest of a verification
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _check_time(signed: _Signed, when: datetime, now: datetime, max_skew: timedelta) -> None:
    if not signed.presigned:
        if abs(now - when) > max_skew:
            raise RequestTimeTooSkewed(_TOO_SKEWED)
        return
    expires = _parse_expires(signed.expires)
    # A presigned URL is good from X-Amz-Date (give or take the clock skew) until
    # X-Amz-Date + X-Amz-Expires; S3's answers for either side are AccessDenied.
    if when - now > max_skew:
        raise AccessDenied("Request is not yet valid")
    if now - when > timedelta(seconds=expires):
        raise AccessDenied("Request has expired")


def _parse_expires(value: str) -> int:
    if not _is_digits(value.removeprefix("-")):
        raise AuthorizationQueryParametersError("X-Amz-Expires should be a number")
    expires = int(value)
    if expires < 0:
        raise AuthorizationQueryParametersError("X-Amz-Expires must be non-negative")
    if expires > MAX_PRESIGNED_EXPIRES:
        raise AuthorizationQueryParametersError(
            "X-Amz-Expires must be less than a week (in seconds) that is 604800"
        )
    return expires


def _check_signed_headers(signed: _Signed, header_map: dict[str, list[str]]) -> None:
    """S3 refuses a request whose Host or any x-amz-* header is outside the signature,
    except x-amz-content-sha256 (its value is the canonical request's last line anyway)."""
    covered = set(signed.signed_headers)
    unsigned = [
        name
        for name in header_map
        if name.startswith("x-amz-") and name != "x-amz-content-sha256" and name not in covered
    ]
    if "host" not in covered or unsigned:
        raise AccessDenied(_NOT_SIGNED)


def _payload(
    signed: _Signed,
    header_map: dict[str, list[str]],
    query: list[tuple[str, str]],
    names: list[str],
) -> tuple[PayloadMode, str]:
    """The payload mode and the canonical request's last line."""
    if signed.presigned:
        value = next(
            (
                _text(v)
                for (_, v), name in zip(query, names, strict=True)
                if name == "X-Amz-Content-Sha256"
            ),
            None,
        )
        if value is None:
            return PayloadMode.UNSIGNED, PayloadMode.UNSIGNED.value
    else:
        values = header_map.get("x-amz-content-sha256")
        if not values:
            raise InvalidRequest("Missing required header for this request: x-amz-content-sha256")
        value = values[0] if len(values) == 1 else ""
    mode = _SENTINELS.get(value)
    if mode is not None:
        return mode, value
    if not _SHA256_HEX.fullmatch(value):
        raise InvalidArgument(_BAD_CONTENT_SHA256)
    return PayloadMode.SIGNED, value


# -- the canonical request ----------------------------------------------------------------


def _header_map(headers: Headers) -> dict[str, list[str]]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    header_map: dict[str, list[str]] = {}
    for name, value in pairs:
        header_map.setdefault(name.lower(), []).append(value)
    return header_map


def _header_values(headers: Headers, name: str) -> list[str]:
    return _header_map(headers).get(name, [])


def _canonical_headers(names: tuple[str, ...], header_map: dict[str, list[str]]) -> str:
    """``name:value`` lines, each value trimmed and its inner whitespace runs collapsed
    (botocore's ``' '.join(value.split())``), repeated headers joined with ``,``. A
    signed header the request lacks is signed empty, as S3 does."""
    lines = (
        f"{name}:{','.join(' '.join(v.split()) for v in header_map.get(name, []))}\n"
        for name in names
    )
    return "".join(lines)


def _split_query(raw_query: str) -> list[tuple[str, str]]:
    """Raw (still encoded) name/value pairs; ``?uploads`` gives ("uploads", "")."""
    return [
        (name, value)
        for name, _, value in (item.partition("=") for item in raw_query.split("&") if item)
    ]


def _s3_target(path: str, query: list[tuple[str, str]]) -> tuple[str, str]:
    """(canonical URI, canonical query string) in S3's encoding."""
    pairs = sorted([(_canonical(n), _canonical(v)) for n, v in query])
    return _canonical(path, "/"), "&".join([f"{n}={v}" for n, v in pairs])


def _wire_target(path: str, query: list[tuple[str, str]]) -> tuple[str, str]:
    """The same, from the target as sent (its query pairs sorted)."""
    return path, "&".join([f"{n}={v}" for n, v in sorted(query)])


@lru_cache(maxsize=8192)
def _canonical(raw: str, safe: str = "") -> str:
    """A received path or query component in UriEncode form. Cached: most components
    repeat from request to request (parameter names, credential, expiry, hot keys)."""
    return _uri_encode(_decode(raw), safe=safe)


def _text(raw: str) -> str:
    if "%" not in raw and raw.isascii():
        return raw
    return _decode(raw).decode("utf-8", "surrogateescape")


def _decode(text: str) -> bytes:
    """Percent-decode to bytes."""
    if "%" not in text and text.isascii():
        return text.encode("ascii")
    return unquote_to_bytes(_wire(text))


def _wire(text: str) -> bytes:
    """The bytes a received string came from: aiohttp decodes the request line and
    header values as UTF-8 with surrogateescape. Other lone surrogates (from callers
    that made the string up) pass through rather than raise."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _uri_encode(raw: bytes, safe: str = "") -> str:
    """AWS's UriEncode: every byte but A-Z a-z 0-9 - . _ ~ (and ``safe``) as %XX."""
    if _UNRESERVED.fullmatch(raw) and ("/" in safe or b"/" not in raw):
        return raw.decode("ascii")  # nothing to encode (the common case)
    return quote(raw, safe=safe)


# -- signatures ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _hmac_hex(key: bytes, message: str) -> str:
    return hmac.digest(key, _wire(message), "sha256").hex()


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(_wire(text)).hexdigest()


def _matches(expected: str, provided: str) -> bool:
    return hmac.compare_digest(expected.encode(), _wire(provided))


# -- streaming ----------------------------------------------------------------------------


class ChunkVerifier:
    """Checks the chunk-signature chain of a streaming SigV4 body, chunk by chunk.

    Plug it into the decoder and call :meth:`finish` with its trailers at the end::

        verifier = chunk_verifier(verified)
        decoder = AwsChunkedDecoder(
            chunk_hasher_factory=verifier.new_hasher, on_chunk_end=verifier.on_chunk_end
        )
        ...  # decoder.feed(piece) for each piece; decoder.finish()
        verifier.finish(decoder.trailers)

    Chunk ``i`` is signed over ``AWS4-HMAC-SHA256-PAYLOAD``, the request timestamp and
    scope, signature ``i-1`` (the seed: the request's own), the SHA-256 of the empty string
    and the SHA-256 of the chunk's data (``sigv4-streaming``); the last, empty chunk too.
    With ``-TRAILER``, ``x-amz-trailer-signature`` signs ``AWS4-HMAC-SHA256-TRAILER``, the
    timestamp, scope, the last chunk's signature and the SHA-256 of the other trailers as
    ``name:value\\n`` lines in wire order (``sigv4-streaming-trailers``).
    ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` chunks carry no signature and must not.
    A bad or missing signature raises ``SignatureDoesNotMatch``.
    """

    __slots__ = ("_ended", "_key", "_mode", "_previous", "_prefix")

    def __init__(self, verified: VerifiedRequest) -> None:
        if verified.payload_mode not in _STREAMING:
            raise ValueError(f"{verified.payload_mode} is not a streaming payload")
        self._mode = verified.payload_mode
        self._key = verified.signing_key
        self._previous = verified.signature
        self._prefix = f"{verified.timestamp}\n{verified.scope}\n"
        self._ended = False

    def __repr__(self) -> str:
        return f"ChunkVerifier({self._mode.value})"

    @staticmethod
    def new_hasher() -> HashLike:
        return hashlib.sha256()

    def on_chunk_end(self, signature: str | None, hasher: HashLike) -> None:
        digest = hasher.hexdigest()
        if self._mode is PayloadMode.STREAMING_UNSIGNED_TRAILER:
            if signature is not None:
                raise SignatureDoesNotMatch("A chunk of an unsigned payload carries a signature.")
        else:
            string_to_sign = (
                f"AWS4-HMAC-SHA256-PAYLOAD\n{self._prefix}{self._previous}\n"
                f"{EMPTY_SHA256}\n{digest}"
            )
            expected = _hmac_hex(self._key, string_to_sign)
            if signature is None or not _matches(expected, signature):
                raise SignatureDoesNotMatch(_MISMATCH)
            self._previous = expected
        # The decoder passes a zero-length chunk only as the last one.
        self._ended = digest == EMPTY_SHA256

    def finish(self, trailers: Mapping[str, str]) -> None:
        """Check the trailers once the decoder is done (names lower-case, wire order)."""
        if not self._ended:
            raise IncompleteBody("The request body ended before its final chunk.")
        if self._mode is PayloadMode.STREAMING_UNSIGNED_TRAILER:
            return
        signature = trailers.get("x-amz-trailer-signature")
        others = "".join(
            f"{name}:{value}\n"
            for name, value in trailers.items()
            if name != "x-amz-trailer-signature"
        )
        if self._mode is PayloadMode.STREAMING_SIGNED:
            if trailers:  # trailers outside any signature
                raise SignatureDoesNotMatch(_MISMATCH)
            return
        string_to_sign = (
            f"AWS4-HMAC-SHA256-TRAILER\n{self._prefix}{self._previous}\n{_sha256_hex(others)}"
        )
        if signature is None or not _matches(_hmac_hex(self._key, string_to_sign), signature):
            raise SignatureDoesNotMatch(_MISMATCH)


_STREAMING = frozenset(
    {
        PayloadMode.STREAMING_SIGNED,
        PayloadMode.STREAMING_SIGNED_TRAILER,
        PayloadMode.STREAMING_UNSIGNED_TRAILER,
    }
)


def chunk_verifier(verified: VerifiedRequest) -> ChunkVerifier:
    """The verifier for a streaming request's body (ValueError for other payloads)."""
    return ChunkVerifier(verified)
