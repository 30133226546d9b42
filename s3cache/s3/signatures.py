"""The one entry point for verifying a client's signature, whichever version it is.

SigV4 (:mod:`s3cache.s3.sigv4`) is tried first: it is what every current SDK sends,
and it recognises a SigV2 request for what it is (:class:`~s3cache.s3.sigv4.SignatureV2`)
at no cost to SigV4 requests. That request then goes to :mod:`s3cache.s3.sigv2`, unless
the caller refuses SigV2, in which case it keeps S3's answer where SigV2 is not
supported: ``400 InvalidRequest``, "Please use AWS4-HMAC-SHA256". Pure: no I/O.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from s3cache.s3 import sigv2, sigv4
from s3cache.s3.sigv4 import DEFAULT_MAX_SKEW, Headers, SecretLookup, VerifiedRequest

__all__ = ["verify_request"]


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
    allow_sigv2: bool = True,
    virtual_host_bucket: str | None = None,
) -> VerifiedRequest:
    """Check a request's signature (SigV4, or SigV2 when ``allow_sigv2``); raise the
    S3Error that S3 would answer. An unsigned request raises
    :class:`~s3cache.s3.sigv4.Unsigned`.

    ``region`` and ``service`` scope SigV4 (SigV2 names neither);
    ``virtual_host_bucket``: the bucket a virtual-host request named in its Host, which
    SigV2 signs as part of the resource (None for path-style). The other arguments are
    those of :func:`s3cache.s3.sigv4.verify_request`.
    """
    try:
        return sigv4.verify_request(
            method,
            raw_path,
            headers,
            secrets,
            now=now,
            max_skew=max_skew,
            region=region,
            service=service,
        )
    except sigv4.SignatureV2:
        if not allow_sigv2:
            raise
    return sigv2.verify_sigv2(
        method,
        raw_path,
        headers,
        secrets,
        now=now,
        max_skew=max_skew,
        virtual_host_bucket=virtual_host_bucket,
    )
