"""A secondary worker (``s3cache serve --workers N``, see ``supervisor``).

It shares the port with the primary and serves the reads it can answer alone: a GET or
HEAD of an object the primary has announced on the channel (complete, every block
checked, ``workerlink.Ready``), still fresh by its TTL, of a key this node owns by the
primary's view of the cluster (``cluster.Ownership``, sent on the channel), signed by a
key that may read it or by a peer node (the cluster secret, checked here). Those bytes
come straight from the primary's cache file, zero-copy. Every other request (misses,
keys other nodes own, writes, listings, admin) goes to the primary over its Unix socket
as it came, signature and body included (a peer's too: the primary checks it again),
and its answer comes back as it is; the primary knows the client's address from the
signed ``X-S3cache-Client`` header.

The primary says when an announced object goes (``gone``) and, after a write, waits
for this worker to confirm (``sync``) before the writer hears back. Without a channel
(start-up, the primary restarting) this worker serves nothing itself. While the
primary's socket takes no connections yet (it is opening the index, or being started
again) a request waits for it, up to PRIMARY_WAIT_SECONDS, instead of failing with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

from s3cache.cluster import Ownership, PeerSigner
from s3cache.config import DEFAULT_RULE, LiveSettings, WorkerRole
from s3cache.errors import AccessDenied, ServiceUnavailable
from s3cache.forward import HOP_BY_HOP, relay_response
from s3cache.reader import RULE, Reader, answer
from s3cache.s3.addressing import S3Address, resolve
from s3cache.s3.operations import classify
from s3cache.s3.ranges import ByteRange
from s3cache.sendfile import send_file_range
from s3cache.server.admin import ADMIN_PREFIX
from s3cache.server.auth import Authenticator
from s3cache.server.handlers import PEER_KEY_ID
from s3cache.server.keys import AUTH, LIVE_SETTINGS, ROLE, UPSTREAM
from s3cache.server.middleware import BUCKET, KEY_ID, OPERATION, PROXIED
from s3cache.server.workerlink import (
    CHANNEL_PATH,
    Ready,
    WorkerSigner,
    unix_path,
)
from s3cache.signing import CLIENT_HEADER, WORKER_HEADER
from s3cache.store import files
from s3cache.store.entry import stale
from s3cache.upstream import Upstream, UpstreamBroken

log = logging.getLogger(__name__)

MAX_REPLICAS = 16384  # announced objects remembered
MAX_OPEN_FILES = 4096  # of their files kept open, as the primary (least recently used closed)
READS_FLUSH_SECONDS = 0.2
RECONNECT_SECONDS = 0.5
# How long a request waits for the primary's socket to take connections (the primary
# opening its index at start-up, or started again after a crash); then 503.
PRIMARY_WAIT_SECONDS = 15.0
PRIMARY_RETRY_SECONDS = 0.05
PROXY_CHUNK = 1 << 20
# Request headers not passed on to the primary: this hop's, and those only a worker sets.
_NOT_PASSED_ON = HOP_BY_HOP | {WORKER_HEADER.lower(), CLIENT_HEADER.lower()}


class _Replica:
    __slots__ = ("fd", "gone", "pins", "ready")

    def __init__(self, ready: Ready) -> None:
        self.ready = ready
        self.fd: int | None = None
        self.pins = 0
        self.gone = False

    def close_if_unused(self) -> None:
        if self.gone and self.pins == 0:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Replicas:
    """The objects the primary announced, by key and by entry id."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[tuple[str, str], _Replica] = OrderedDict()
        self._by_id: dict[int, _Replica] = {}
        self._open: OrderedDict[int, _Replica] = OrderedDict()  # replicas with an fd
        self._reads: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, bucket: str, key: str) -> _Replica | None:
        replica = self._by_key.get((bucket, key))
        if replica is not None:
            self._by_key.move_to_end((bucket, key))
        return replica

    def add(self, ready: Ready) -> None:
        old = self._by_key.get((ready.bucket, ready.key))
        if old is not None:
            if old.ready.id == ready.id:
                old.ready = ready  # revalidated: a new validated_at
                return
            self._forget(old)
        replica = _Replica(ready)
        self._by_key[(ready.bucket, ready.key)] = replica
        self._by_id[ready.id] = replica
        while len(self._by_key) > MAX_REPLICAS:
            _, oldest = self._by_key.popitem(last=False)
            self._forget(oldest)

    def remove(self, entry_ids: list[int]) -> None:
        for entry_id in entry_ids:
            replica = self._by_id.get(entry_id)
            if replica is not None:
                self._forget(replica)

    def clear(self) -> None:
        for replica in list(self._by_id.values()):
            self._forget(replica)

    def _forget(self, replica: _Replica) -> None:
        ready = replica.ready
        if self._by_key.get((ready.bucket, ready.key)) is replica:
            del self._by_key[(ready.bucket, ready.key)]
        self._by_id.pop(ready.id, None)
        self._open.pop(ready.id, None)
        replica.gone = True
        replica.close_if_unused()

    def opened(self, replica: _Replica) -> None:
        """``replica`` holds an open file now: close the least recently used others
        beyond MAX_OPEN_FILES (those not being sent from)."""
        if replica.gone:
            return  # closed when its last reader is done
        self._open[replica.ready.id] = replica
        self._open.move_to_end(replica.ready.id)
        if len(self._open) <= MAX_OPEN_FILES:
            return
        for entry_id, other in list(self._open.items()):
            if len(self._open) <= MAX_OPEN_FILES:
                break
            if other.pins == 0:
                del self._open[entry_id]
                other.close()

    def record_read(self, replica: _Replica, start: int, end: int) -> None:
        r = replica.ready
        self._reads.append([r.bucket, r.key, r.id, start, end])

    def take_reads(self) -> list[list[Any]]:
        reads, self._reads = self._reads, []
        return reads


class _Stale(Exception):
    """The announced file is gone: the primary answers instead."""


class _ReplicaBody:
    """An announced object's complete file as the CachedBody of a hit."""

    __slots__ = ("_fd", "_replica", "_secondary")

    def __init__(self, secondary: Secondary, replica: _Replica) -> None:
        self._secondary = secondary
        self._replica = replica
        self._fd = -1

    def announce(self, request: web.Request) -> None:
        pass

    async def ready(self, span: ByteRange) -> int:
        replica = self._replica
        self._fd = fd = await self._secondary._fd(replica)
        if replica.ready.stamp is None or files.stamp(fd) != replica.ready.stamp:
            # Not the file whose every block the primary checked (changed since, by
            # someone else: the primary writes no complete file). The primary
            # checks it again and heals it.
            raise _Stale()
        return span.length

    async def send(
        self, request: web.Request, response: web.StreamResponse, span: ByteRange
    ) -> bool:
        await send_file_range(request, response, self._fd, span.start, span.length)
        self._secondary.replicas.record_read(self._replica, span.start, span.end + 1)
        return True


class Secondary:
    def __init__(self, live: LiveSettings, role: WorkerRole) -> None:
        self._live = live
        self._role = role
        self._signer = WorkerSigner(role.secret)
        self._peers = PeerSigner(live.current.cluster_secret or "")
        self._ownership: Ownership | None = None  # the primary's, from the channel
        self.replicas = Replicas()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # No cap on connections: each request passed on holds one for its whole
            # answer (a 1 GiB GET included), and a cap would stall the ones over it.
            connector=aiohttp.UnixConnector(path=unix_path(self._role.primary_url), limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._task = asyncio.create_task(self._channel_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.replicas.clear()
        if self._session is not None:
            await self._session.close()

    # --- requests --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if WORKER_HEADER in request.headers:
            # Only workers sign as workers, and only to the primary.
            raise AccessDenied("Bad worker signature.")
        if request.raw_path.startswith(ADMIN_PREFIX):
            return await self.proxy(request)
        settings = self._live.current
        address = resolve(request.host, request.raw_path, settings.virtual_host_domains)
        if not Reader.cacheable(request, address):
            return await self.proxy(request)
        assert address.bucket is not None and address.key is not None
        replica = self.replicas.get(address.bucket, address.key)
        if replica is None or not self._owns(address.bucket, address.key):
            # A miss, or a key another node owns now (this node's copy may be older
            # than the owner's): the primary fills it, or asks the owner.
            return await self.proxy(request)
        if stale(replica.ready.validated_at, settings.ttl_for(address.bucket, address.key)):
            return await self.proxy(request)  # the primary revalidates it
        request[OPERATION] = classify(request.method, address, request.headers)
        request[BUCKET] = address.bucket
        rule = settings.rule_for(address.bucket, address.key)
        request[RULE] = DEFAULT_RULE if rule is None else rule.name
        request[KEY_ID] = self._key_id(request, address)
        try:
            return await self._serve(request, address, replica)
        except _Stale:
            self.replicas.remove([replica.ready.id])
            return await self.proxy(request)

    def _owns(self, bucket: str, key: str) -> bool:
        """This node owns the key by the primary's view (none yet: it cannot tell)."""
        return self._ownership is not None and self._ownership.owner(bucket, key) is None

    def _key_id(self, request: web.Request, address: S3Address) -> str:
        """Who reads: a peer node (its cluster signature checked here, AccessDenied if
        bad), or a client key that may read the object."""
        if self._peers.verify(request):
            return PEER_KEY_ID
        return request.app[AUTH].authorize(request, address)

    async def _serve(
        self, request: web.Request, address: S3Address, replica: _Replica
    ) -> web.StreamResponse:
        replica.pins += 1
        try:
            return await answer(request, address, replica.ready.meta, _ReplicaBody(self, replica))
        finally:
            replica.pins -= 1
            replica.close_if_unused()

    async def _fd(self, replica: _Replica) -> int:
        if replica.fd is None:
            try:
                fd = await asyncio.to_thread(os.open, replica.ready.path, os.O_RDONLY)
            except OSError as exc:  # deleted, or not a file any more
                raise _Stale() from exc
            if replica.fd is None and not replica.gone:
                replica.fd = fd
            else:
                os.close(fd)  # another request opened it meanwhile, or it went
                if replica.fd is None:
                    raise _Stale()
        self.replicas.opened(replica)
        return replica.fd

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Pass a request to the primary as it came, and its answer back."""
        assert self._session is not None
        request[PROXIED] = True
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = str(peer[0]) if isinstance(peer, tuple) else ""
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _NOT_PASSED_ON
        )
        headers[WORKER_HEADER] = self._signer.sign(
            self._role.index, request.method, request.raw_path, client
        )
        headers[CLIENT_HEADER] = client
        answer = await self._send_to_primary(request, headers)
        async with answer:
            return await relay_response(request, answer, _pieces(answer))

    async def _send_to_primary(
        self, request: web.Request, headers: CIMultiDict[str]
    ) -> aiohttp.ClientResponse:
        """The primary's answer head; while its socket takes no connections, try again
        for up to PRIMARY_WAIT_SECONDS, then ServiceUnavailable."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PRIMARY_WAIT_SECONDS
        while True:
            try:
                return await self._session.request(
                    request.method,
                    yarl.URL("http://s3cache" + request.raw_path, encoded=True),
                    headers=headers,
                    data=request.content if request.body_exists else None,
                    allow_redirects=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                )
            except aiohttp.ClientConnectorError as exc:
                # Not connected: nothing of the request (body included) was sent, so it
                # may go again once the primary listens.
                if loop.time() >= deadline:
                    raise _unavailable(exc) from exc
                await asyncio.sleep(PRIMARY_RETRY_SECONDS)
            except (aiohttp.ClientError, OSError) as exc:
                raise _unavailable(exc) from exc

    # --- the channel -----------------------------------------------------------------

    async def _channel_forever(self) -> None:
        while True:
            try:
                await self._channel()
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                log.debug("channel to the primary: %s", exc)
            self.replicas.clear()  # nobody tells us what goes any more
            self._ownership = None
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _channel(self) -> None:
        assert self._session is not None
        sign = self._signer.sign(self._role.index, "GET", CHANNEL_PATH, "")
        async with self._session.ws_connect(
            "http://s3cache" + CHANNEL_PATH,
            headers={WORKER_HEADER: sign, CLIENT_HEADER: ""},
            heartbeat=10.0,
            max_msg_size=64 * 1024 * 1024,
        ) as socket:
            log.info("worker %d: channel to the primary open", self._role.index)
            flusher = asyncio.create_task(self._send_reads_forever(socket))
            try:
                async for message in socket:
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        break
                    data = json.loads(message.data)
                    if "ownership" in data:
                        ownership = Ownership.from_json(data["ownership"])
                        if self._ownership is not None and (
                            ownership.gained_at > self._ownership.gained_at
                        ):
                            # Copies confirmed before then are the primary's to check
                            # again: announced anew once it has.
                            self.replicas.clear()
                        self._ownership = ownership
                    if "ready" in data:
                        self.replicas.add(Ready.from_json(data["ready"]))
                    if "gone" in data:
                        self.replicas.remove([int(i) for i in data["gone"]])
                    if "sync" in data:
                        await socket.send_str(json.dumps({"ack": data["sync"]}))
            finally:
                flusher.cancel()

    async def _send_reads_forever(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await asyncio.sleep(READS_FLUSH_SECONDS)
            reads = self.replicas.take_reads()
            if reads:
                await socket.send_str(json.dumps({"reads": reads}))


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"The cache's primary worker is unavailable: {exc}")


async def _pieces(answer: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The primary's answer body; UpstreamBroken if it breaks off."""
    try:
        async for chunk in answer.content.iter_chunked(PROXY_CHUNK):
            yield chunk
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise UpstreamBroken(f"the primary's answer broke off: {exc}") from exc


SECONDARY = web.AppKey("secondary", Secondary)


async def secondary_components(app: web.Application) -> AsyncIterator[None]:
    """What a secondary needs: the upstream's credentials (the default client key),
    the authenticator, and its link to the primary."""
    live = app[LIVE_SETTINGS]
    role = app[ROLE]
    upstream = Upstream(live.current)
    await upstream.start()
    app[UPSTREAM] = upstream
    app[AUTH] = Authenticator(live, upstream)
    secondary = Secondary(live, role)
    await secondary.start()
    app[SECONDARY] = secondary
    try:
        yield
    finally:
        await secondary.close()
        await upstream.close()


async def handle_secondary(request: web.Request) -> web.StreamResponse:
    return await request.app[SECONDARY].handle(request)
