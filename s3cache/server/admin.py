"""Admin endpoints under ``/_s3cache/`` (no bucket can have that name).

GET  healthz            alive
GET  readyz             upstream reachable, cache dirs writable, index open
GET  stats              the cache at a glance (JSON)
GET  metrics            Prometheus text format
POST verify             check every cache file and block now, repair the index (a report)
POST prefetch           start a warm job: {"bucket", "prefix"} or {"bucket", "keys"}
GET  jobs               warm jobs and their progress
GET  jobs/ID            one job
DELETE jobs/ID          cancel it
POST manifest           an epoch's read order: {"bucket", "keys": [key | [key, start, end]]}
POST flush              wait until every write-back object (under {"bucket", "prefix"}) is upstream,
                        at every node of the cluster

Peer requests (signed with the cluster secret): POST peer/invalidate, peer/settle (wait
until some keys have no write-back pending here), peer/flush (this node's part of a flush).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from s3cache.errors import AccessDenied, InvalidArgument, MethodNotAllowed, NoSuchKey
from s3cache.metrics import (
    CACHE_EVICTED_BYTES,
    CACHE_EVICTIONS,
    CACHE_READS,
    FILLS_IN_FLIGHT,
    PREFETCH_USEFUL_BYTES,
    PREFETCH_WASTED_BYTES,
    PREFETCHED_BYTES,
    SERVED_BYTES,
    UPSTREAM_BLOCK_FETCHES,
    ByteSource,
    CacheOutcome,
    Snapshot,
    exposition,
)
from s3cache.s3.addressing import validate_bucket
from s3cache.server.keys import (
    AUTH,
    CLUSTER,
    FILLER,
    HUB,
    LIVE_SETTINGS,
    PREFETCHER,
    STORE,
    UPSTREAM,
    WRITER,
)
from s3cache.server.workerlink import VIA_WORKER

ADMIN_PREFIX = "/_s3cache/"
MAX_ADMIN_BODY = 64 * 1024 * 1024  # a manifest of a few hundred thousand keys


PROBES = frozenset({"healthz", "readyz"})  # always open: orchestrators probe them
OBSERVING = frozenset({"stats", "metrics"})  # open unless admin_open_metrics is off


async def handle_admin(request: web.Request, name: str) -> web.StreamResponse:
    app = request.app
    method = request.method
    if name.startswith("peer/") and method == "POST" and app[CLUSTER].verify(request):
        return await _peer(request, name.removeprefix("peer/"))
    hub = app.get(HUB)
    if name == "worker/channel" and hub is not None and VIA_WORKER in request:
        return await hub.channel(request, request[VIA_WORKER])
    _check_access(request, name)
    if name.startswith("jobs/"):
        return _job(request, name.removeprefix("jobs/"))
    route = (method if method != "HEAD" else "GET", name)
    if route == ("GET", "healthz"):
        return web.Response(text="ok\n")
    if route == ("GET", "readyz"):
        problems = await readiness_problems(app)
        return web.json_response(
            {"ready": not problems, "problems": problems}, status=503 if problems else 200
        )
    if route == ("GET", "stats"):
        values = await asyncio.get_running_loop().run_in_executor(None, Snapshot)
        return web.json_response(stats(app, values))
    if route == ("GET", "metrics"):
        body = await asyncio.get_running_loop().run_in_executor(None, exposition)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")
    if route == ("POST", "verify"):
        return web.json_response(await app[STORE].verify_all())
    if route == ("POST", "prefetch"):
        return await _start_warm(request)
    if route == ("GET", "jobs"):
        return web.json_response([job.as_dict() for job in app[PREFETCHER].jobs.values()])
    if route == ("POST", "manifest"):
        return await _submit_manifest(request)
    if route == ("POST", "flush"):
        return await _flush(request)
    raise NoSuchKey("No such s3cache admin endpoint.", resource=request.path)


def _check_access(request: web.Request, name: str) -> None:
    """Health probes are open, stats and metrics too unless admin_open_metrics is off;
    the rest needs the admin key and, with a separate admin listener, must come to it."""
    settings = request.app[LIVE_SETTINGS].current
    if name in PROBES or (name in OBSERVING and settings.admin_open_metrics):
        return
    if settings.admin_listen is not None:
        local = request.transport.get_extra_info("sockname") if request.transport else None
        if local is None or local[1] != settings.admin_listen[1]:
            raise NoSuchKey("No such s3cache admin endpoint.", resource=request.path)
    if not request.app[AUTH].admin_allowed(request):
        raise AccessDenied("Admin actions need the admin key.", resource=request.path)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise InvalidArgument("request body too large")
    try:
        body = json.loads(await request.content.read(MAX_ADMIN_BODY + 1))
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InvalidArgument("the body is not usable JSON") from exc
    if not isinstance(body, dict) or not isinstance(body.get("bucket"), str):
        raise InvalidArgument('expected a JSON object with a "bucket"')
    validate_bucket(body["bucket"])
    return body


async def _start_warm(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    prefix, keys = body.get("prefix"), body.get("keys")
    if (prefix is None) == (keys is None):
        raise InvalidArgument('give either "prefix" or "keys"')
    if prefix is not None and not isinstance(prefix, str):
        raise InvalidArgument('"prefix" must be a string')
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise InvalidArgument('"keys" must be a list of strings')
    job = request.app[PREFETCHER].warm(body["bucket"], prefix, keys)
    return web.json_response(job.as_dict(), status=202)


def _job(request: web.Request, job_id: str) -> web.StreamResponse:
    prefetcher = request.app[PREFETCHER]
    if request.method in ("GET", "HEAD"):
        job = prefetcher.jobs.get(job_id)
    elif request.method == "DELETE":
        job = prefetcher.cancel(job_id)
    else:
        raise MethodNotAllowed("GET or DELETE a job", resource=request.path)
    if job is None:
        raise NoSuchKey("No such job.", resource=request.path)
    return web.json_response(job.as_dict())


async def _peer(request: web.Request, name: str) -> web.StreamResponse:
    """What another node of the cluster asks of this one."""
    app = request.app
    if name == "flush":
        bucket, prefix = await _flush_target(request)
        return web.json_response({"flushed": await app[WRITER].flush(bucket, prefix)})
    change = await _json_body(request)
    keys = [key for key in change.get("keys", []) if isinstance(key, str)]
    if name == "invalidate":
        for key in keys:
            # A write-back here not yet upstream is newer than the write that changed the
            # key elsewhere (a DeleteObjects waited for those before: peer/settle): kept.
            if not app[WRITER].pending(change["bucket"], key):
                await app[FILLER].invalidate(change["bucket"], key)
        hub = app.get(HUB)
        if hub is not None:
            await hub.sync()  # no secondary worker of this node serves what changed
        return web.json_response({"invalidated": len(keys)})
    if name == "settle":
        for key in keys:
            await app[WRITER].settle(change["bucket"], key)
        return web.json_response({"settled": len(keys)})
    raise NoSuchKey("No such s3cache peer endpoint.", resource=request.path)


async def _flush_target(request: web.Request) -> tuple[str | None, str]:
    """The bucket and prefix of a flush (no body: every bucket)."""
    if not request.can_read_body:
        return None, ""
    body = await _json_body(request)
    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise InvalidArgument('"prefix" must be a string')
    return body["bucket"], prefix


async def _flush(request: web.Request) -> web.StreamResponse:
    """Answer once every write-back object under the bucket/prefix (or everywhere, with
    no body) is upstream, at this node and every other node of the cluster: the barrier
    a training script calls before it exits. 503 if a node could not be asked (what it
    holds may not be upstream)."""
    app = request.app
    bucket, prefix = await _flush_target(request)
    here, (there, unreachable) = await asyncio.gather(
        app[WRITER].flush(bucket, prefix), app[CLUSTER].flush(bucket, prefix)
    )
    answer: dict[str, object] = {"flushed": here + there, "writeback": app[WRITER].stats()}
    if app[CLUSTER].enabled:
        answer["unreachable_nodes"] = unreachable
    return web.json_response(answer, status=503 if unreachable else 200)


async def _submit_manifest(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    items: list[tuple[str, tuple[int, int] | None]] = []
    keys = body.get("keys", [])
    if not isinstance(keys, list):
        raise InvalidArgument('"keys" must be a list')
    for item in keys:
        if isinstance(item, str):
            items.append((item, None))
        elif (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and all(isinstance(n, int) and n >= 0 for n in item[1:])
            and item[1] < item[2]
        ):
            items.append((item[0], (item[1], item[2])))
        else:
            raise InvalidArgument('"keys" items are KEY or [KEY, START, END) byte ranges')
    append = body.get("append", False)
    if not isinstance(append, bool):
        raise InvalidArgument('"append" must be true or false')
    manifest = request.app[PREFETCHER].submit_manifest(body["bucket"], items, append=append)
    return web.json_response({"bucket": manifest.bucket, "items": len(items)})


async def readiness_problems(app: web.Application) -> dict[str, str]:
    """Ready: the upstream answers, every cache dir takes writes, the index is open,
    and in a cluster every peer's state is known (until then a peer started with this
    node may still look down to it, and this node would fetch that peer's keys itself)."""
    problems = await app[STORE].check()
    unreachable = await app[UPSTREAM].probe()
    if unreachable:
        problems["upstream"] = unreachable
    waiting = app[CLUSTER].waiting_for()
    if waiting:
        peers = f"{len(waiting)} peer{'s' if len(waiting) > 1 else ''}"
        problems["peers"] = f"waiting for first probe of {peers}: {', '.join(waiting)}"
    return problems


def stats(app: web.Application, values: Snapshot) -> dict[str, object]:
    """The cache at a glance, as JSON (with several workers, the request counts of all
    of them: ``values``)."""
    sample = values.value
    store = app[STORE]
    reads = {outcome.value: sample(CACHE_READS, outcome=outcome.value) for outcome in CacheOutcome}
    served = {source.value: sample(SERVED_BYTES, source=source.value) for source in ByteSource}
    served_total = sum(served.values())
    return {
        "capacity_bytes": store.capacity,
        "configured_capacity_bytes": store.configured_capacity,
        "used_bytes": store.used,
        "entries": store.entries,
        "entries_in_memory": store.entries_in_view(),
        "degraded": store.degraded,
        "degraded_dirs": {f"cache_dir_{n}": f.reason.value for n, f in store.faults.items()},
        "reads": reads,
        "served_bytes": served,
        "byte_hit_ratio": served["cache"] / served_total if served_total else None,
        "upstream_block_fetches": sample(UPSTREAM_BLOCK_FETCHES),
        "fills_in_flight": sample(FILLS_IN_FLIGHT),
        "evictions": sample(CACHE_EVICTIONS),
        "evicted_bytes": sample(CACHE_EVICTED_BYTES),
        "cluster": app[CLUSTER].state(),
        "writeback": app[WRITER].stats(),
        "workers": {
            "count": app[LIVE_SETTINGS].current.workers,
            "secondaries": hub.state() if (hub := app.get(HUB)) is not None else {},
        },
        "prefetch": {
            "bytes": sample(PREFETCHED_BYTES),
            "useful_bytes": sample(PREFETCH_USEFUL_BYTES),
            "wasted_bytes": sample(PREFETCH_WASTED_BYTES),
            "jobs_running": sum(1 for job in app[PREFETCHER].jobs.values() if job.finished is None),
        },
    }
