"""The upstream S3: one long-lived HTTP client that signs every request with s3cache's
own credentials.

aiobotocore supplies what a client of AWS must get right and s3cache must not
reimplement: the standard credential chain (environment, shared config and profile,
container and instance metadata, with refresh), and botocore's SigV4 signer. The
requests themselves are sent with aiohttp, byte for byte as s3cache builds them: a
pass-through proxy must forward operations it does not model (and headers, query
parameters and bodies verbatim), which a modelled client cannot do, and the cache's
block fetches are plain ranged GETs that need nothing more.

This module is the one place where aiohttp client and botocore exceptions become
s3cache errors (:class:`s3cache.errors.ServiceUnavailable`, :class:`UpstreamBroken`),
and where the rule for bodies is kept (:func:`iter_body`): a body is exactly as long as
its head says, or the caller never sees it complete.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import aiohttp
import yarl
from aiobotocore.session import AioSession
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from s3cache.config import Settings
from s3cache.errors import InvalidArgument, S3Error, ServiceUnavailable
from s3cache.metrics import (
    UPSTREAM_BYTES,
    UPSTREAM_DURATION,
    UPSTREAM_ERRORS,
    UPSTREAM_REQUESTS,
    UpstreamKind,
    labelled,
    status_class,
)
from s3cache.s3.addressing import encode_path, encode_query
from s3cache.s3.listing import parse_list_v2

log = logging.getLogger(__name__)

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
READ_CHUNK = 256 * 1024
PROBE_TIMEOUT = 5.0


class UpstreamBroken(Exception):
    """A response body from the upstream ended early or the connection failed mid-way."""


class OverlongBody(Exception):
    """A response body ran past the length its head announced: none of it is trusted."""


class _VerbatimPathSigner(SigV4Auth):  # type: ignore[misc]
    """SigV4 for S3: the path is signed as sent (already URI-encoded once, no
    normalisation of ``//`` or ``.``), and the payload hash is whatever the caller put
    in ``X-Amz-Content-SHA256``."""

    def _normalize_url_path(self, path: str) -> str:
        return path


class Upstream:
    """Sends signed requests to the upstream S3 and returns its raw responses."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._credentials: Any = None
        # The upstream key pair in use (refreshed credentials included): with no client
        # keys configured, clients must sign with it.
        self.current_credentials: Any = None
        self._endpoint = yarl.URL(
            settings.upstream_endpoint or f"https://s3.{settings.upstream_region}.amazonaws.com"
        )
        addressing = settings.upstream_addressing
        if addressing == "auto":
            addressing = "path" if settings.upstream_endpoint else "virtual"
        self._virtual_host = addressing == "virtual"

    async def start(self) -> None:
        settings = self._settings
        botocore_session = AioSession(profile=settings.upstream_profile)
        try:
            self._credentials = await botocore_session.get_credentials()
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"cannot load upstream credentials: {exc}") from exc
        if self._credentials is None:
            log.warning("no upstream credentials found: requests go upstream unsigned")
        else:
            self.current_credentials = await self._credentials.get_frozen_credentials()
        connector = aiohttp.TCPConnector(
            limit=settings.upstream_max_connections, ssl=self._ssl_context()
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.upstream_connect_timeout,
                sock_read=settings.upstream_read_timeout,
            ),
            # Headers go upstream as the client sent them: no defaults of aiohttp's own.
            skip_auto_headers=("Content-Type", "Accept-Encoding"),
            read_bufsize=READ_CHUNK,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self._settings.upstream_verify_tls:
            return False
        if self._settings.upstream_ca_bundle is not None:
            return ssl.create_default_context(cafile=str(self._settings.upstream_ca_bundle))
        return True

    def url(
        self, bucket: str | None, key: str | None, query: tuple[tuple[str, str], ...] = ()
    ) -> yarl.URL:
        """The upstream URL of a resource, encoded once, exactly as it will be signed."""
        endpoint = self._endpoint
        if self._virtual_host and bucket and "." not in bucket:
            host = f"{bucket}.{endpoint.host}"
            path = encode_path(None, key)
        else:
            host = endpoint.host or ""
            path = encode_path(bucket, key)
        base_path = endpoint.raw_path.rstrip("/")
        raw_query = encode_query(query)
        netloc = host if endpoint.explicit_port is None else f"{host}:{endpoint.explicit_port}"
        text = f"{endpoint.scheme}://{netloc}{base_path}{path}"
        return yarl.URL(text + ("?" + raw_query if raw_query else ""), encoded=True)

    async def request(
        self,
        method: str,
        url: yarl.URL,
        headers: Mapping[str, str],
        body: AsyncIterable[bytes] | bytes | None = None,
        *,
        kind: UpstreamKind,
    ) -> aiohttp.ClientResponse:
        """Sign and send one request; the caller reads and releases the response.

        ``headers`` must include ``X-Amz-Content-SHA256`` when there is a body (the
        payload hash, ``UNSIGNED-PAYLOAD`` or a streaming mode): it is signed as given.
        """
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        try:
            for value in headers.values():
                value.encode("latin-1")  # what an HTTP/1.1 header can carry
        except UnicodeError as exc:
            raise InvalidArgument("A header value is not valid.") from exc
        signed = await self._sign(method, url, headers)
        started = time.perf_counter()
        try:
            response = await self._session.request(
                method, url, headers=signed, data=body, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            client_fault = _s3_error_in_chain(exc)
            if client_fault is not None:
                raise client_fault from None  # the client's body was bad, not the upstream
            labelled(UPSTREAM_ERRORS, kind.value).inc()
            labelled(UPSTREAM_REQUESTS, kind.value, status_class(None)).inc()
            raise ServiceUnavailable(f"upstream unreachable: {_describe(exc)}") from exc
        labelled(UPSTREAM_DURATION, kind.value).observe(time.perf_counter() - started)
        labelled(UPSTREAM_REQUESTS, kind.value, status_class(response.status)).inc()
        return response

    async def probe(self) -> str | None:
        """Why the upstream cannot be reached, or None if it answers (any HTTP status
        counts: the question is reachability, not permission)."""
        try:
            response = await asyncio.wait_for(
                self.request("HEAD", self.url(None, None), {}, kind=UpstreamKind.PROBE),
                timeout=PROBE_TIMEOUT,
            )
        except (ServiceUnavailable, TimeoutError) as exc:
            return str(exc) or "no answer in time"
        response.release()
        return None

    async def list_objects(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        """Every (key, size) under a prefix, following continuation tokens."""
        objects: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix)]
            if token:
                query.append(("continuation-token", token))
            response = await self.request(
                "GET", self.url(bucket, None, tuple(query)), {}, kind=UpstreamKind.BLOCK
            )
            async with response:
                body = await response.read()
                if response.status != 200:
                    raise ServiceUnavailable(f"listing s3://{bucket}/{prefix}: {response.status}")
            page = parse_list_v2(body)
            objects.extend(page.objects)
            if page.next_token is None:
                return objects
            token = page.next_token

    async def _sign(self, method: str, url: yarl.URL, headers: Mapping[str, str]) -> dict[str, str]:
        request_headers = dict(headers)
        request_headers.setdefault("X-Amz-Content-SHA256", UNSIGNED_PAYLOAD)
        if self._credentials is None:
            return request_headers
        try:
            frozen = await self._credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"cannot refresh upstream credentials: {exc}") from exc
        self.current_credentials = frozen
        aws_request = AWSRequest(method=method, url=str(url), headers=request_headers)
        _VerbatimPathSigner(frozen, "s3", self._settings.upstream_region).add_auth(aws_request)
        return dict(aws_request.headers.items())


async def iter_body(
    response: aiohttp.ClientResponse, *, kind: UpstreamKind, length: int | None = None
) -> AsyncIterator[bytes]:
    """The response body in pieces as they arrive; raises UpstreamBroken if it cannot
    be read to its end.

    With ``length`` (what the head announced), the body must be exactly that long: the
    piece that completes it is yielded only once the body has ended there, so a body
    that runs past it (OverlongBody) or ends before it (UpstreamBroken) is never seen
    whole by the caller."""
    received = labelled(UPSTREAM_BYTES, kind.value)
    seen = 0
    last: bytes | None = None
    try:
        async for chunk in response.content.iter_any():
            received.inc(len(chunk))
            seen += len(chunk)
            if length is not None and seen >= length:
                if seen > length:
                    raise OverlongBody(f"body runs past the {length} bytes announced")
                last = chunk
                continue
            yield chunk
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        labelled(UPSTREAM_ERRORS, kind.value).inc()
        raise UpstreamBroken(_describe(exc)) from exc
    if length is not None and seen < length:
        labelled(UPSTREAM_ERRORS, kind.value).inc()
        raise UpstreamBroken(f"body ended at byte {seen} of the {length} announced")
    if last is not None:
        yield last


def _s3_error_in_chain(exc: BaseException) -> S3Error | None:
    """aiohttp wraps an error raised while streaming the request body; find it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, S3Error):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    """The exception in a line for a log or an error message; at most 300 characters (a
    parse error quotes what the upstream sent, which may be a whole body)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "…"
