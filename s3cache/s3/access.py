"""What a request touches: every object, prefix and bucket an S3 operation names, and
whether it reads, lists or writes it. Pure: no I/O.

Authorization (``server.auth``) checks each of these against the client key's grants,
so that no operation reaches data outside them:

- an object request reads (GET, HEAD, SelectObjectContent) or writes (PUT, POST,
  DELETE) the object of its path; CopyObject and UploadPartCopy also read the object
  named by ``x-amz-copy-source``;
- DeleteObjects writes every key its XML body names (the request line names none);
- a listing (ListObjects v1/v2, ListObjectVersions, ListMultipartUploads) lists the
  prefix it asks for; no other query parameter changes what is touched;
- HeadBucket and GetBucketLocation only tell that a bucket exists: any grant in the
  bucket allows them; every other bucket operation (policy, ACL, CreateBucket,
  DeleteBucket…) touches the whole bucket.

A key is also checked in the form an upstream that folds ``//`` and resolves ``.``
and ``..`` would read it in (SeaweedFS folds ``//``): whichever form the upstream uses,
it is granted.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import unquote

from s3cache.errors import AccessDenied, InvalidArgument, MalformedXML
from s3cache.s3.addressing import CLIENT_AUTH_PARAMS, S3Address
from s3cache.s3.operations import LIST_PARAMS


class Action(enum.Enum):
    READ = "read"
    LIST = "list"
    WRITE = "write"


class Scope(enum.Enum):
    OBJECT = "object"  # one key
    PREFIX = "prefix"  # the keys under a prefix (a listing)
    BUCKET = "bucket"  # the whole bucket
    IN_BUCKET = "in_bucket"  # anything in the bucket (it exists)
    SERVICE = "service"  # the bucket list


class Touch(NamedTuple):
    """One thing a request touches: ``name`` is the key (OBJECT) or prefix (PREFIX).
    (A tuple: made for every request, it costs less than a dataclass.)"""

    action: Action
    scope: Scope
    bucket: str = ""
    name: str = ""


# Bucket operations that only tell whether the bucket exists and where.
_BUCKET_PROBES = frozenset({"", "location"})
# Parameters of a bucket GET that make it a listing of keys under ``prefix``.
_LISTINGS = frozenset({"", "versions", "uploads"})
# The body of a DeleteObjects request names at most 1,000 keys.
MAX_DELETE_KEYS = 1000


def touches(
    method: str,
    address: S3Address,
    headers: Mapping[str, str],
    delete_body: bytes | None = None,
) -> list[Touch]:
    """Everything the request reads, lists or writes. ``delete_body``: the body of a
    DeleteObjects request, when it was read (without it, the request needs write access
    to the whole bucket)."""
    if address.bucket is None:
        return [Touch(Action.LIST, Scope.SERVICE)]
    if address.key is not None:
        return _object_touches(method, address.bucket, address.key, address, headers)
    return _bucket_touches(method, address, delete_body)


def _object_touches(
    method: str, bucket: str, key: str, address: S3Address, headers: Mapping[str, str]
) -> list[Touch]:
    select = method == "POST" and address.has_param("select")  # SelectObjectContent
    reads = method in ("GET", "HEAD", "OPTIONS") or select
    found = [Touch(Action.READ if reads else Action.WRITE, Scope.OBJECT, bucket, key)]
    copy_source = headers.get("x-amz-copy-source")
    if copy_source is not None and method == "PUT":
        source_bucket, source_key = copy_source_of(copy_source)
        found.append(Touch(Action.READ, Scope.OBJECT, source_bucket, source_key))
    return found


def _bucket_touches(method: str, address: S3Address, delete_body: bytes | None) -> list[Touch]:
    bucket = address.bucket
    assert bucket is not None
    names = {name.lower() for name, _ in address.query}
    sub_resources = {
        name for name in names if not name.startswith("x-amz-")
    } - LIST_PARAMS - CLIENT_AUTH_PARAMS
    if method in ("GET", "HEAD") and sub_resources <= _BUCKET_PROBES and (
        method == "HEAD" or "location" in sub_resources
    ):
        return [Touch(Action.READ, Scope.IN_BUCKET, bucket)]
    if method == "GET" and len(sub_resources) <= 1 and sub_resources <= _LISTINGS:
        # A parameter given twice may be read either way by the upstream: every value.
        prefixes = [value for name, value in address.query if name == "prefix"] or [""]
        return [Touch(Action.LIST, Scope.PREFIX, bucket, prefix) for prefix in prefixes]
    if method == "POST" and sub_resources == {"delete"}:
        if delete_body is None:
            return [Touch(Action.WRITE, Scope.BUCKET, bucket)]
        return [Touch(Action.WRITE, Scope.OBJECT, bucket, key) for key in deleted_keys(delete_body)]
    reads = method in ("GET", "HEAD")
    return [Touch(Action.READ if reads else Action.WRITE, Scope.BUCKET, bucket)]


def copy_source_of(header: str) -> tuple[str, str]:
    """The bucket and key of ``x-amz-copy-source`` (``[/]bucket/key[?versionId=…]``,
    URL-encoded). https://docs.aws.amazon.com/AmazonS3/latest/API/API_CopyObject.html"""
    path = header.partition("?")[0]  # a "?" in the key is sent encoded
    if path.startswith("arn:"):
        # An access point names no bucket s3cache can check a grant against.
        raise AccessDenied("Copy sources given as access point ARNs are not supported.")
    bucket, slash, key = unquote(path.removeprefix("/")).partition("/")
    if not bucket or not slash or not key:
        raise InvalidArgument(
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey."
        )
    return bucket, key


def deleted_keys(document: bytes) -> list[str]:
    """The keys a DeleteObjects body names: at most 1,000, else MalformedXML."""
    keys = keys_in(document, "Object")
    if len(keys) > MAX_DELETE_KEYS:
        raise MalformedXML(_MALFORMED)
    return keys


def keys_in(document: bytes, parent: str) -> list[str]:
    """The ``<Key>`` of every ``<parent>`` element (``Object`` in a DeleteObjects
    request, ``Deleted`` in its answer). Read so that no key the upstream could take
    from the document is missed: elements matched by local name anywhere in the tree,
    all the text of each Key. A document that does not parse, or declares a DTD
    (entities another parser may expand otherwise), is MalformedXML."""
    if b"<!DOCTYPE" in document.upper() or b"<!ENTITY" in document.upper():
        raise MalformedXML(_MALFORMED)
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        raise MalformedXML(_MALFORMED) from None
    return [
        "".join(child.itertext())
        for element in root.iter()
        if _local_name(element) == parent
        for child in element
        if _local_name(child) == "Key"
    ]


_MALFORMED = (
    "The XML you provided was not well-formed or did not validate against our published schema."
)


def _local_name(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1] if isinstance(element.tag, str) else ""


def key_forms(bucket: str, key: str) -> list[tuple[str, str]]:
    """The object as sent, and as an upstream that folds ``//`` and resolves dot
    segments would read it (when that differs): a grant must cover both. A path that
    resolves to no key becomes ``(bucket, "")`` (only a whole-bucket grant covers it);
    one that climbs out of every bucket, ``("", "")`` (only ``*``)."""
    if "//" not in key and "/." not in "/" + key:
        return [(bucket, key)]  # the common case: nothing to fold
    resolved: list[str] = []
    for segment in [bucket, *key.split("/")]:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment not in ("", "."):
            resolved.append(segment)
    trailing = "/" if key.endswith("/") and len(resolved) > 1 else ""
    folded = (resolved[0], "/".join(resolved[1:]) + trailing) if resolved else ("", "")
    return [(bucket, key), folded]
