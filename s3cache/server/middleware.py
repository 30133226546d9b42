"""Request id and the one place where exceptions become S3 error responses."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from s3cache.errors import InternalError, S3Error, error_document

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    return os.urandom(8).hex().upper()


def error_response(error: S3Error, request_id: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_document(error, request_id),
        content_type="application/xml",
        headers={**error.headers, "x-amz-request-id": request_id},
    )


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer of s3cache's own carries its request id."""
    if "x-amz-request-id" not in response.headers and REQUEST_ID in request:
        response.headers["x-amz-request-id"] = request[REQUEST_ID]


@web.middleware
async def s3_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and answer every failure with an S3 error document."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    try:
        return await handler(request)
    except S3Error as error:
        if not error.resource:
            error.resource = request.path
        log.info("%s %s -> %s %s", request.method, request.path, error.status, error.code)
        return error_response(error, request_id)
    except ConnectionError:
        raise  # the client went away: there is nobody to answer
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(InternalError("We encountered an internal error."), request_id)
