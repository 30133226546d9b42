"""The one middleware every request goes through: request id, the one place where
exceptions become S3 error responses, request metrics and the access log."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from s3cache.errors import InternalError, InvalidRequest, S3Error, error_document
from s3cache.metrics import (
    REQUEST_DURATION,
    REQUESTS,
    TIME_TO_FIRST_BYTE,
    CacheOutcome,
    labelled,
    status_class,
)
from s3cache.reader import OUTCOME
from s3cache.s3.operations import Operation
from s3cache.server.keys import LIVE_SETTINGS

log = logging.getLogger(__name__)
access_log = logging.getLogger("s3cache.access")

REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
HEAD_SENT = web.RequestKey("head_sent", float)
OPERATION = web.RequestKey("operation", Operation)
BUCKET = web.RequestKey("bucket", str)
KEY_ID = web.RequestKey("key_id", str)
# Passed on to the primary worker, which counts and logs it.
PROXIED = web.RequestKey("proxied", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    """16 hex digits, unique enough to find a request in the logs (not a secret)."""
    return f"{random.getrandbits(64):016X}"


def error_response(error: S3Error, request_id: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_document(error, request_id),
        content_type="application/xml",
        headers={**error.headers, "x-amz-request-id": request_id},
    )


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of s3cache's own carries its request id; the moment the head goes
    out is the time to first byte."""
    request[HEAD_SENT] = time.perf_counter()
    if "x-amz-request-id" not in response.headers and REQUEST_ID in request:
        response.headers["x-amz-request-id"] = request[REQUEST_ID]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with an S3 error document; count and log every request."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    request[STARTED] = time.perf_counter()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
    except S3Error as error:
        if not error.resource:
            error.resource = request.path
        response = error_response(error, request_id)
    except web.HTTPException as exc:
        # aiohttp's own refusals (a request target its router cannot route, like
        # "OPTIONS *"): a request s3cache cannot parse.
        response = error_response(InvalidRequest(exc.reason, resource=request.raw_path), request_id)
    except ConnectionError:
        raise  # the client went away: there is nobody to answer
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = error_response(InternalError("We encountered an internal error."), request_id)
    finally:
        _record(request, response)
    return response


def _record(request: web.Request, response: web.StreamResponse | None) -> None:
    if request.get(PROXIED):
        return
    now = time.perf_counter()
    status = response.status if response is not None else None
    operation = request.get(OPERATION, Operation.OTHER)
    outcome = request.get(OUTCOME, CacheOutcome.FORWARD)
    duration = now - request[STARTED]
    first_byte = request.get(HEAD_SENT, now) - request[STARTED]
    labelled(REQUESTS, operation.value, status_class(status)).inc()
    if operation is not Operation.ADMIN:
        labelled(REQUEST_DURATION, outcome.value).observe(duration)
        labelled(TIME_TO_FIRST_BYTE, outcome.value).observe(first_byte)
    log_format = request.app[LIVE_SETTINGS].current.access_log
    if log_format == "off" or not access_log.isEnabledFor(logging.INFO):
        return
    fields = {
        "request_id": request[REQUEST_ID],
        "key_id": request.get(KEY_ID, "-"),
        "bucket": request.get(BUCKET, "-"),
        "operation": operation.value,
        "status": status if status is not None else "-",
        "bytes": _body_bytes(response),
        "duration_ms": round(duration * 1000, 3),
        "ttfb_ms": round(first_byte * 1000, 3),
        "outcome": outcome.value,
    }
    if log_format == "json":
        access_log.info(json.dumps(fields))
    else:
        access_log.info(" ".join(f"{name}={value}" for name, value in fields.items()))


def _body_bytes(response: web.StreamResponse | None) -> int:
    if response is None:
        return 0
    if response.prepared:
        return response.body_length
    body = response.body if isinstance(response, web.Response) else None
    return len(body) if isinstance(body, bytes) else 0
