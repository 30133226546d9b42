"""A short-lived cache of bucket listings (ListObjects v1 and v2).

Data loaders list their dataset at every epoch start; with thousands of keys that is
many round trips over the WAN. Listings are kept ``list_cache_ttl`` seconds (0: off),
keyed by bucket and query, and dropped at once by any write through s3cache to the same
bucket. Only complete 200 answers of at most ``MAX_LISTING_BYTES`` are kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
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
class _Listing:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    stored: float


class ListingCache:
    def __init__(self, ttl: float, upstream: Upstream) -> None:
        self._ttl = ttl
        self._upstream = upstream
        self._listings: OrderedDict[tuple[str, ...], _Listing] = OrderedDict()

    async def list(self, request: web.Request, address: S3Address) -> web.StreamResponse:
        """Answer a listing from the cache if fresh, else from the upstream (keeping
        the answer)."""
        assert address.bucket is not None
        key = self._key(request, address)
        listing = self._listings.get(key)
        if listing is not None and time.monotonic() - listing.stored <= self._ttl:
            self._listings.move_to_end(key)
            return web.Response(status=listing.status, headers=listing.headers, body=listing.body)
        response = await send_upstream(request, address, self._upstream)
        async with response:
            length = response.content_length
            if (
                self._ttl <= 0
                or response.status != 200
                or length is None
                or length > MAX_LISTING_BYTES
            ):
                return await relay_response(request, response)
            body = await response.read()
            headers = response_headers(response)
        self._store(key, _Listing(200, headers, body, time.monotonic()))
        return web.Response(status=200, headers=headers, body=body)

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
