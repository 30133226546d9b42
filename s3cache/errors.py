"""The errors s3cache itself answers with, one class per S3 error code.

    S3Error                      any error a client sees as an S3 error document
    ├── InvalidArgument          400  a request parameter is malformed
    ├── InvalidRequest           400  the request cannot be parsed or is not allowed
    ├── InvalidBucketName        400  the bucket name breaks S3's naming rules
    ├── KeyTooLongError          400  the key is longer than 1,024 bytes
    ├── IncompleteBody           400  the body ended before its declared length
    ├── RequestTimeout           400  the body stalled past body_timeout
    ├── MalformedXML             400  a request body's XML does not parse or validate
    ├── XAmzContentSHA256Mismatch 400 the body does not hash to the signed payload hash
    ├── BadDigest                400  the body does not match its Content-MD5 or checksum
    ├── InvalidPart              400  a completed upload names a part that is not there
    ├── InvalidPartOrder         400  ... or names its parts out of order
    ├── EntityTooSmall           400  ... or a part but the last is under 5 MiB
    ├── AuthorizationHeaderMalformed       400  the SigV4 Authorization header cannot be used
    ├── AuthorizationQueryParametersError  400  the SigV4 presigned-URL parameters cannot be used
    ├── AccessDenied             403
    ├── InvalidAccessKeyId       403  no secret is known for the access key
    ├── SignatureDoesNotMatch    403  the SigV4 signature (or a chunk's) is wrong
    ├── RequestTimeTooSkewed     403  the request time is over 15 minutes from the server's
    ├── NoSuchKey                404
    ├── NoSuchBucket             404  a write-back to a bucket the upstream does not have
    ├── NoSuchUpload             404  a part of a write-back upload aborted meanwhile
    ├── MethodNotAllowed         405
    ├── PreconditionFailed       412  an If-Match or If-Unmodified-Since condition is false
    ├── InvalidRange             416  the Range cannot be satisfied
    ├── InternalError            500  a fault of s3cache itself
    └── ServiceUnavailable       503  the upstream cannot be reached

Errors that the upstream answers pass through as the upstream sent them; these classes
are for what s3cache decides on its own. The one place that turns an exception into a
response is ``server.middleware``; the one place that renders the XML is
:func:`error_document`.

Codes and statuses: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape


class S3Error(Exception):
    code = "InternalError"
    status = 500

    def __init__(self, message: str, *, resource: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.resource = resource
        self.headers: dict[str, str] = {}  # extra response headers, e.g. Content-Range


class InvalidArgument(S3Error):
    code = "InvalidArgument"
    status = 400


class InvalidRequest(S3Error):
    code = "InvalidRequest"
    status = 400


class InvalidBucketName(S3Error):
    code = "InvalidBucketName"
    status = 400


class KeyTooLongError(S3Error):
    code = "KeyTooLongError"
    status = 400


class IncompleteBody(S3Error):
    code = "IncompleteBody"
    status = 400


class RequestTimeout(S3Error):
    code = "RequestTimeout"
    status = 400


class MalformedXML(S3Error):
    code = "MalformedXML"
    status = 400


class XAmzContentSHA256Mismatch(S3Error):
    code = "XAmzContentSHA256Mismatch"
    status = 400


class BadDigest(S3Error):
    code = "BadDigest"
    status = 400


class InvalidPart(S3Error):
    code = "InvalidPart"
    status = 400


class InvalidPartOrder(S3Error):
    code = "InvalidPartOrder"
    status = 400


class EntityTooSmall(S3Error):
    code = "EntityTooSmall"
    status = 400


class AuthorizationHeaderMalformed(S3Error):
    code = "AuthorizationHeaderMalformed"
    status = 400


class AuthorizationQueryParametersError(S3Error):
    code = "AuthorizationQueryParametersError"
    status = 400


class AccessDenied(S3Error):
    code = "AccessDenied"
    status = 403


class InvalidAccessKeyId(S3Error):
    code = "InvalidAccessKeyId"
    status = 403


class SignatureDoesNotMatch(S3Error):
    code = "SignatureDoesNotMatch"
    status = 403


class RequestTimeTooSkewed(S3Error):
    code = "RequestTimeTooSkewed"
    status = 403


class NoSuchKey(S3Error):
    code = "NoSuchKey"
    status = 404


class NoSuchBucket(S3Error):
    code = "NoSuchBucket"
    status = 404


class NoSuchUpload(S3Error):
    code = "NoSuchUpload"
    status = 404


class MethodNotAllowed(S3Error):
    code = "MethodNotAllowed"
    status = 405


class PreconditionFailed(S3Error):
    code = "PreconditionFailed"
    status = 412


class InvalidRange(S3Error):
    code = "InvalidRange"
    status = 416


class InternalError(S3Error):
    code = "InternalError"
    status = 500


class ServiceUnavailable(S3Error):
    code = "ServiceUnavailable"
    status = 503


def error_document(error: S3Error, request_id: str) -> bytes:
    """The S3 error body: ``<Error><Code/><Message/><Resource/><RequestId/></Error>``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{error.code}</Code>"
        f"<Message>{_xml_text(error.message)}</Message>"
        f"<Resource>{_xml_text(error.resource)}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()


def _xml_text(text: str) -> str:
    """Escaped for XML, with the characters XML 1.0 cannot carry (control characters,
    lone surrogates) percent-encoded: a hostile key still gets a well-formed document."""
    return escape(_NOT_XML.sub(_percent, text))


def _percent(match: re.Match[str]) -> str:
    char = match[0]
    if 0xD800 <= ord(char) <= 0xDFFF:
        return "%3F"
    return "".join(f"%{byte:02X}" for byte in char.encode())


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
