"""Pass a request through to the upstream, re-signed, with bodies streamed both ways.

Everything that s3cache does not answer from its cache comes here: listings, writes,
multipart uploads, bucket operations, and reads it cannot cache exactly. Status,
headers and body come back as the upstream sent them. Memory stays bounded: bodies
move in pieces of at most a few hundred KiB, and each side waits for the other
(aiohttp's flow control on both sockets).

Upload bodies, by the client's ``x-amz-content-sha256``
(https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-auth-using-authorization-header.html):

- a SHA-256 hex digest, ``UNSIGNED-PAYLOAD`` or none: sent as they came, the digest
  kept, so the upstream still checks the body;
- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``: sent as they came (aws-chunked with its
  trailing checksum: nothing in it is tied to the client's key);
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``: the chunk signatures belong to the
  client's key, so the body is decoded and sent plain as ``UNSIGNED-PAYLOAD`` with its
  decoded length. A trailing checksum of the signed-trailer mode is not carried over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from s3cache.errors import (
    IncompleteBody,
    InvalidRequest,
    RequestTimeout,
    ServiceUnavailable,
    XAmzContentSHA256Mismatch,
)
from s3cache.metrics import UpstreamKind
from s3cache.s3.addressing import S3Address
from s3cache.s3.chunked import AwsChunkedDecoder, AwsChunkedError
from s3cache.s3.objectmeta import announced_length
from s3cache.s3.sigv4 import ChunkVerifier, VerifiedRequest, chunk_verifier
from s3cache.signing import CLAIM_HEADERS
from s3cache.upstream import UNSIGNED_PAYLOAD, OverlongBody, Upstream, UpstreamBroken, iter_body

log = logging.getLogger(__name__)

# Headers that describe one hop only (RFC 9110 §7.6.1; Expect, RFC 9110 §10.1.1, is
# answered by the hop it reaches): never passed on, either way. The body is re-framed
# on the next hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
# Plus s3cache's own claims (signing), and what s3cache sets itself for the upstream.
# Date and x-amz-date are the client's signing time (every SigV2 request has a Date):
# s3cache's own signature carries its own time.
_NOT_FORWARDED_REQUEST = (
    HOP_BY_HOP
    | CLAIM_HEADERS
    | {
        "host",
        "authorization",
        "date",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
        "content-length",
    }
)
_NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {"content-length"}
_SIGNED_STREAMING = (
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
)
_BODY_PIECE = 256 * 1024
_THREAD_HASHED = 64 * 1024  # pieces at least this big are hashed off the loop
DEFAULT_BODY_TIMEOUT = 60.0

# Set on a request by the server's authentication: who signed it and what its body
# must satisfy (checked here, as the body streams through).
VERIFIED = web.RequestKey("verified", VerifiedRequest)
BODY_TIMEOUT = web.RequestKey("body_timeout", float)


async def forward(
    request: web.Request, address: S3Address, upstream: Upstream
) -> web.StreamResponse:
    """Send ``request`` to the upstream and stream the answer back to the client."""
    response = await send_upstream(request, address, upstream)
    async with response:
        return await relay_response(request, response)


async def send_upstream(
    request: web.Request, address: S3Address, upstream: Upstream, *, body: bytes | None = None
) -> aiohttp.ClientResponse:
    """Send ``request`` to the upstream, re-signed; the caller relays the answer.
    ``body``: the request body, if the caller has already read it (as it came)."""
    headers, streamed = upstream_request(request)
    if body is not None:
        headers["Content-Length"] = str(len(body))
    url = upstream.url(address.bucket, address.key, address.query)
    return await upstream.request(
        request.method, url, headers, streamed if body is None else body, kind=UpstreamKind.FORWARD
    )


async def relay_response(
    request: web.Request,
    response: aiohttp.ClientResponse,
    body: AsyncIterator[bytes] | None = None,
) -> web.StreamResponse:
    """Copy an upstream response (status, headers, body) to the client; ``body``: its
    pieces, if not read (and counted) as an upstream response body.

    If the upstream body breaks off, or is shorter or longer than its head announced
    (Content-Length, or a 206's Content-Range), the client's connection is aborted: a
    client must never take a short body for a whole one, nor a whole one for the
    upstream's."""
    length: int | None = None
    if body is None and request.method != "HEAD":
        try:
            length = announced_length(response.status, response.headers)
        except ValueError as exc:
            response.close()  # its framing is not trusted: the connection is not reused
            raise ServiceUnavailable(f"upstream answer contradicts itself: {exc}") from None
    out = web.StreamResponse(
        status=response.status, reason=response.reason, headers=response_headers(response)
    )
    if response.content_length is not None:
        out.content_length = response.content_length
    await out.prepare(request)
    if request.method == "HEAD":
        return out
    try:
        if body is None:
            body = iter_body(response, kind=UpstreamKind.FORWARD, length=length)
        async for chunk in body:
            await out.write(chunk)
    except ConnectionError:
        abort(request)  # the client went away
        return out
    except (UpstreamBroken, OverlongBody) as exc:
        log.warning("upstream body not as announced, aborting the client connection: %s", exc)
        response.close()
        abort(request)
        return out
    await out.write_eof()
    return out


def response_headers(response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """The upstream's response headers that go on to the client."""
    return CIMultiDict(
        (name, value)
        for name, value in response.headers.items()
        if name.lower() not in _NOT_FORWARDED_RESPONSE
    )


def abort(request: web.Request) -> None:
    """Drop the client's connection without completing the response."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def is_signed_streaming(request: web.Request) -> bool:
    """The body is aws-chunked with chunk signatures (decoded on the way through)."""
    return request.headers.get("x-amz-content-sha256", "") in _SIGNED_STREAMING


def upstream_request(
    request: web.Request,
) -> tuple[CIMultiDict[str], AsyncIterator[bytes] | None]:
    """The headers and body stream of ``request`` as they go to the upstream (decoded
    and checked as the module docstring says); the body is None if there is none."""
    headers: CIMultiDict[str] = CIMultiDict(
        (name, value)
        for name, value in request.headers.items()
        if name.lower() not in _NOT_FORWARDED_REQUEST
    )
    verified = request.get(VERIFIED)
    content_sha256 = request.headers.get("x-amz-content-sha256", UNSIGNED_PAYLOAD)
    if content_sha256 in _SIGNED_STREAMING:
        return _decoded_upload(request, headers, verified)
    headers["X-Amz-Content-SHA256"] = content_sha256
    if not request.body_exists:
        return headers, None
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    expected = verified.payload_sha256 if verified is not None else None
    return headers, _request_body(request, expected, _body_timeout(request))


def _decoded_upload(
    request: web.Request, headers: CIMultiDict[str], verified: VerifiedRequest | None
) -> tuple[CIMultiDict[str], AsyncIterator[bytes]]:
    decoded_length = headers.pop("x-amz-decoded-content-length", None)
    if decoded_length is None or not decoded_length.isdigit():
        raise InvalidRequest("aws-chunked upload without a valid x-amz-decoded-content-length")
    encodings = [
        part.strip()
        for part in headers.pop("content-encoding", "").split(",")
        if part.strip() and part.strip() != "aws-chunked"
    ]
    if encodings:
        headers["Content-Encoding"] = ", ".join(encodings)
    headers.pop("x-amz-trailer", None)
    headers["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
    headers["Content-Length"] = decoded_length
    verifier = chunk_verifier(verified) if verified is not None else None
    return headers, _decode_chunked(request, int(decoded_length), verifier, _body_timeout(request))


async def _pieces(request: web.Request, stall_limit: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a body that stalls ``stall_limit`` seconds is a
    RequestTimeout (a slow client cannot hold a connection forever)."""
    while True:
        try:
            async with asyncio.timeout(stall_limit):  # (no task per piece, as wait_for)
                chunk = await request.content.read(_BODY_PIECE)
        except TimeoutError as exc:
            raise RequestTimeout(
                "Your socket connection to the server was not read from or written to "
                "within the timeout period."
            ) from exc
        if not chunk:
            return
        yield chunk


async def _request_body(
    request: web.Request, expected_sha256: str | None, stall_limit: float
) -> AsyncIterator[bytes]:
    """The body as it came. With a signed payload hash, the last piece is held back until
    the whole body hashed right, so the upstream never stores a body that does not match
    what the client signed. Large pieces are hashed in a worker thread (SHA-256 releases
    the GIL) while the next one is read: the loop does not stop for it."""
    expected_length = request.content_length
    received = 0
    digest = hashlib.sha256() if expected_sha256 else None
    hashing: asyncio.Future[None] | None = None
    loop = asyncio.get_running_loop()
    held: bytes | None = None
    async for chunk in _pieces(request, stall_limit):
        received += len(chunk)
        if digest is not None:
            if hashing is not None:
                await hashing
                hashing = None
            if len(chunk) >= _THREAD_HASHED:
                hashing = loop.run_in_executor(None, digest.update, chunk)
            else:
                digest.update(chunk)
        if held:
            yield held
        held = chunk
    if hashing is not None:
        await hashing
    if expected_length is not None and received != expected_length:
        raise IncompleteBody("The request body ended before its Content-Length")
    if digest is not None and digest.hexdigest() != expected_sha256:
        raise XAmzContentSHA256Mismatch(
            "The provided 'x-amz-content-sha256' header does not match what was computed."
        )
    if held:
        yield held


async def _decode_chunked(
    request: web.Request,
    decoded_length: int,
    verifier: ChunkVerifier | None,
    stall_limit: float,
) -> AsyncIterator[bytes]:
    """The decoded payload, each chunk's signature checked when the client signed it.
    The last piece is held back until the whole body has been checked, so the upstream
    never receives a complete body from an invalid one."""
    decoder = (
        AwsChunkedDecoder(
            chunk_hasher_factory=verifier.new_hasher, on_chunk_end=verifier.on_chunk_end
        )
        if verifier is not None
        else AwsChunkedDecoder()
    )
    held: bytes | None = None
    try:
        async for chunk in _pieces(request, stall_limit):
            for piece in decoder.feed(chunk):
                if decoder.total_decoded > decoded_length:
                    raise IncompleteBody("aws-chunked body is longer than declared")
                if held:
                    yield held
                held = piece
        decoder.finish()
    except AwsChunkedError as exc:
        raise InvalidRequest(f"malformed aws-chunked body: {exc}") from exc
    if verifier is not None:
        verifier.finish(decoder.trailers)
    if decoder.total_decoded != decoded_length:
        raise IncompleteBody("aws-chunked body does not match x-amz-decoded-content-length")
    if held:
        yield held


def _body_timeout(request: web.Request) -> float:
    timeout: float = request.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)
    return timeout
