"""Which S3 operation a request is, as a small fixed set (for metrics and logs)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from s3cache.s3.addressing import CLIENT_AUTH_PARAMS, S3Address

# Query parameters of the listings of a bucket (ListObjects v1 and v2, and with
# ?versions or ?uploads, ListObjectVersions and ListMultipartUploads) that name no
# sub-resource of their own.
LIST_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "marker",
        "max-keys",
        "continuation-token",
        "start-after",
        "encoding-type",
        "fetch-owner",
        "key-marker",
        "version-id-marker",
        "upload-id-marker",
        "max-uploads",
        "optional-object-attributes",
        "x-id",
    }
)
_READ_PARAMS = frozenset(
    {
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        "versionid",
        "partnumber",
        "x-id",
    }
)


class Operation(enum.Enum):
    GET_OBJECT = "get_object"
    HEAD_OBJECT = "head_object"
    PUT_OBJECT = "put_object"
    COPY_OBJECT = "copy_object"
    DELETE = "delete"
    LIST = "list"
    MULTIPART = "multipart"
    BUCKET = "bucket"
    OTHER = "other"
    ADMIN = "admin"


def classify(method: str, address: S3Address, headers: Mapping[str, str]) -> Operation:
    params = {
        name
        for name in (name.lower() for name, _ in address.query)
        if not name.startswith("x-amz-") and name not in CLIENT_AUTH_PARAMS
    }
    if address.bucket is None:
        return Operation.LIST if method == "GET" else Operation.OTHER
    if "uploads" in params or "uploadid" in params:
        return Operation.MULTIPART
    if address.key is None:
        return _bucket_operation(method, params)
    if not params <= _READ_PARAMS:
        return Operation.OTHER  # ?tagging, ?acl, ?attributes, …
    if method == "GET":
        return Operation.GET_OBJECT
    if method == "HEAD":
        return Operation.HEAD_OBJECT
    if method == "PUT":
        return Operation.COPY_OBJECT if "x-amz-copy-source" in headers else Operation.PUT_OBJECT
    if method == "DELETE":
        return Operation.DELETE
    return Operation.OTHER


def _bucket_operation(method: str, params: set[str]) -> Operation:
    if method == "GET" and params <= LIST_PARAMS:
        return Operation.LIST
    if method == "POST" and "delete" in params:
        return Operation.DELETE
    return Operation.BUCKET
