"""A short-lived cache of bucket listings (ListObjects v1 and v2).

Data loaders list their dataset at every epoch start; with thousands of keys that is
many round trips over the WAN. Listings are kept ``list_cache_ttl`` seconds (0: off),
keyed by bucket and query, and dropped at once by any write through s3cache to the same
bucket. Only complete 200 answers of at most ``MAX_LISTING_BYTES`` are kept.

Write-back objects not yet upstream (``writes``) are merged into the answers, as the
upstream will list them once it has them (``merge_pending``).
"""

from __future__ import annotations

import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from s3cache.forward import relay_response, response_headers, send_upstream
from s3cache.s3.addressing import CLIENT_AUTH_PARAMS, S3Address
from s3cache.upstream import Upstream

MAX_LISTING_BYTES = 4 * 1024 * 1024
MAX_LISTINGS = 1024
# Request headers that change a listing's answer, besides the query.
_VARYING_HEADERS = (
    "x-amz-request-payer",
    "x-amz-expected-bucket-owner",
    "x-amz-optional-object-attributes",
)


@dataclass(frozen=True, slots=True)
class Listed:
    """An object to list that the upstream does not have yet."""

    key: str
    size: int
    etag: str
    modified: float  # seconds since the epoch


# Listings of other things than a bucket's current keys: nothing to merge.
_NOT_MERGED = frozenset({"versions", "uploads"})


@dataclass(frozen=True, slots=True)
class _Listing:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    stored: float


class ListingCache:
    def __init__(
        self,
        ttl: float,
        upstream: Upstream,
        pending: Callable[[str, str], Sequence[Listed]] = lambda bucket, prefix: (),
    ) -> None:
        self._ttl = ttl
        self._upstream = upstream
        self._listings: OrderedDict[tuple[str, ...], _Listing] = OrderedDict()
        # The write-back objects of a bucket not yet upstream, by key prefix.
        self._pending = pending

    async def list(self, request: web.Request, address: S3Address) -> web.StreamResponse:
        """Answer a listing from the cache if fresh, else from the upstream (keeping
        the answer)."""
        assert address.bucket is not None
        key = self._key(request, address)
        params = {name.lower(): value for name, value in address.query}
        pending: Sequence[Listed] = ()
        if not _NOT_MERGED & set(params):
            pending = self._pending(address.bucket, params.get("prefix", ""))
        listing = self._listings.get(key)
        if listing is not None and time.monotonic() - listing.stored <= self._ttl:
            self._listings.move_to_end(key)
            return _answer(listing.status, listing.headers, listing.body, params, pending)
        response = await send_upstream(request, address, self._upstream)
        async with response:
            length = response.content_length
            if (
                (self._ttl <= 0 and not pending)
                or response.status != 200
                or length is None
                or length > MAX_LISTING_BYTES
            ):
                return await relay_response(request, response)
            body = await response.read()
            headers = response_headers(response)
        if self._ttl > 0:
            self._store(key, _Listing(200, headers, body, time.monotonic()))
        return _answer(200, headers, body, params, pending)

    def invalidate(self, bucket: str) -> None:
        for key in [key for key in self._listings if key[0] == bucket]:
            del self._listings[key]

    def _store(self, key: tuple[str, ...], listing: _Listing) -> None:
        self._listings[key] = listing
        self._listings.move_to_end(key)
        while len(self._listings) > MAX_LISTINGS:
            self._listings.popitem(last=False)

    @staticmethod
    def _key(request: web.Request, address: S3Address) -> tuple[str, ...]:
        assert address.bucket is not None
        query = sorted(
            f"{name}={value}"
            for name, value in address.query
            if name.lower() not in CLIENT_AUTH_PARAMS
        )
        varying = [f"{name}:{request.headers.get(name, '')}" for name in _VARYING_HEADERS]
        return (address.bucket, *query, *varying)


def _answer(
    status: int,
    headers: CIMultiDict[str],
    body: bytes,
    params: Mapping[str, str],
    pending: Sequence[Listed],
) -> web.Response:
    if pending:
        body = merge_pending(body, params, pending)
    return web.Response(status=status, headers=headers, body=body)


def merge_pending(document: bytes, params: Mapping[str, str], pending: Sequence[Listed]) -> bytes:
    """A ListObjects (v1 or v2) answer with the objects of ``pending`` in it, as the
    upstream will list them: each under the listing's prefix, within the page's span
    of keys (after start-after/marker; up to the page's last key if it is truncated),
    rolled up into a CommonPrefixes under a delimiter, URL-encoded with
    encoding-type=url. A document that does not parse is left as it is.
    https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html"""
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        return document
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    encoded = params.get("encoding-type") == "url"

    def text(value: str) -> str:
        return urllib.parse.quote(value, safe="/") if encoded else value

    def plain(element: ET.Element, tag: str) -> str:
        value = element.findtext(ns + tag) or ""
        return urllib.parse.unquote(value) if encoded else value

    contents = {plain(c, "Key"): c for c in root.findall(ns + "Contents")}
    prefixes = {plain(c, "Prefix"): c for c in root.findall(ns + "CommonPrefixes")}
    prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
    lower = params.get("start-after") or params.get("marker") or ""
    seen = sorted([*contents, *prefixes])
    if params.get("continuation-token") and seen:
        lower = max(lower, seen[0])
    truncated = (root.findtext(ns + "IsTruncated") or "").strip().lower() == "true"
    upper = seen[-1] if truncated and seen else None
    for item in pending:
        if not item.key.startswith(prefix) or item.key <= lower:
            continue
        if upper is not None and item.key > upper:
            continue
        rest = item.key[len(prefix) :]
        if delimiter and delimiter in rest:
            common = prefix + rest[: rest.index(delimiter) + len(delimiter)]
            if common not in prefixes:
                element = ET.Element(ns + "CommonPrefixes")
                ET.SubElement(element, ns + "Prefix").text = text(common)
                prefixes[common] = element
            continue
        element = contents.get(item.key) or ET.Element(ns + "Contents")
        for child in list(element):
            element.remove(child)
        ET.SubElement(element, ns + "Key").text = text(item.key)
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(item.modified))
        ET.SubElement(element, ns + "LastModified").text = modified
        ET.SubElement(element, ns + "ETag").text = item.etag
        ET.SubElement(element, ns + "Size").text = str(item.size)
        ET.SubElement(element, ns + "StorageClass").text = "STANDARD"
        contents[item.key] = element
    children = list(root)
    listed = [c for c in children if c.tag in (ns + "Contents", ns + "CommonPrefixes")]
    at = children.index(listed[0]) if listed else len(children)
    for child in listed:
        root.remove(child)
    ordered = [contents[k] for k in sorted(contents)] + [prefixes[k] for k in sorted(prefixes)]
    for offset, child in enumerate(ordered):
        root.insert(at + offset, child)
    count = root.find(ns + "KeyCount")
    if count is not None:
        count.text = str(len(ordered))
    if ns:
        ET.register_namespace("", ns.strip("{}"))
    merged: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return merged
