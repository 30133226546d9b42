"""Several s3cache nodes as one cache.

Each object has one owner among the nodes, chosen by rendezvous hashing of its bucket
and key over the node URLs. A node that does not own a key asks the owner for it, over
the same HTTP port, with the request authenticated by the shared cluster secret (an
HMAC of the method, path and time — never the client's credentials); the owner answers
from its cache (filling it once for the whole cluster) and the asking node streams the
answer to its client. Ranges, conditionals and single-flight work across nodes because
the owner serves every read of its keys.

Writes of a key (PutObject, CopyObject, the multipart calls, DeleteObject) are handled
at the key's owner too, so that its write mode (write_rules: the cache filled through,
or a write-back journaled) and the order of its writes are decided in one place. The
node the client reached authenticates and authorizes it, then passes it on as a peer
request: headers and body as the upstream would get them from that node (an
aws-chunked body with chunk signatures is decoded there, each signature checked as the
bytes go through; the owner gets the plain body, its decoded length and the client's
checksum headers), and the owner's answer streams back unchanged. A write whose owner
cannot be connected to goes to the next node in rendezvous order (possibly this one);
one that fails once it was sent is answered 503 (it may have been applied: never sent
twice). Waits across nodes: ``settle`` (until the owners of some keys have no
write-back of them pending: DeleteObjects, a copy's source) and ``flush`` (every node's
pending writes under a prefix).

Failure: a peer that cannot be connected to within ``peer_timeout``, does not answer a
read within ``upstream_read_timeout``, or fails its health check (``peer_timeout``), is
taken as down; its keys go to the next node in rendezvous order (possibly
this one) until a health check sees it back. A peer not checked yet is not down; a
starting node is not ready until it knows every peer's state (``waiting_for``, see
STARTUP_GRACE_SECONDS). Nodes come from ``peers`` or from the
addresses a DNS name (a Kubernetes headless Service) resolves to, re-resolved
periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from s3cache.config import Settings
from s3cache.errors import ServiceUnavailable
from s3cache.forward import relay_response, upstream_request
from s3cache.hashing import ranked
from s3cache.s3.addressing import S3Address, encode_path, encode_query
from s3cache.signing import PEER_HEADER, Signer
from s3cache.upstream import _s3_error_in_chain

log = logging.getLogger(__name__)

HEALTH_SECONDS = 2.0
# Nodes started together: the first health checks go out before the peers listen, and
# a refused connection then says nothing of whether the peer will be up a moment later.
# For STARTUP_GRACE_SECONDS after this node starts, a peer that has not answered yet is
# checked every STARTUP_PROBE_SECONDS and this node is not ready (readyz) until it has
# answered; after that a failed check settles it as down.
STARTUP_GRACE_SECONDS = 10.0
STARTUP_PROBE_SECONDS = 0.2
DNS_SECONDS = 30.0
# Request headers that shape a read's answer, passed on to the owner.
_READ_HEADERS = (
    "Range",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
    "x-amz-checksum-mode",
)


@dataclass(frozen=True, slots=True)
class Ownership:
    """Which node owns which key: rendezvous hashing over ``nodes``, skipping those
    taken as ``down``. No nodes: this node alone (no cluster). Every worker of a node
    decides with the same one (the primary sends its own to the secondaries)."""

    self_url: str = ""
    nodes: tuple[str, ...] = ()
    down: frozenset[str] = frozenset()
    # Since when this node may own keys another node owned meanwhile (this process
    # started, or a node it would leave them to went down or left): a copy the upstream
    # confirmed before then may have missed writes made there, and is asked for again
    # before it is served (``CacheStore.expire_validated_before``).
    gained_at: float = 0.0

    def owner(self, bucket: str, key: str) -> str | None:
        """The node that serves this object: None if it is this one."""
        for node in ranked(f"{bucket}/{key}", self.nodes) if self.nodes else ():
            if node == self.self_url:
                return None
            if node not in self.down:
                return node
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "self": self.self_url,
            "nodes": list(self.nodes),
            "down": sorted(self.down),
            "gained_at": self.gained_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ownership:
        return cls(
            str(data["self"]),
            tuple(data["nodes"]),
            frozenset(data["down"]),
            float(data.get("gained_at", 0.0)),
        )

    def _others_up(self) -> frozenset[str]:
        return frozenset(self.nodes) - self.down - {self.self_url}


class PeerSigner:
    """The cluster secret's claims (``signing.Signer``) on requests from node to node,
    in ``X-S3cache-Peer``: of the method and the request target."""

    def __init__(self, secret: str) -> None:
        self._signer = Signer(secret, "cluster")

    def sign(self, method: str, target: str) -> str:
        return self._signer.sign(method, target)

    def verify(self, request: web.Request) -> bool:
        """True if the request comes from a peer (raises AccessDenied for a bad
        signature); False if it does not claim to."""
        claim = request.headers.get(PEER_HEADER)
        if claim is None:
            return False
        self._signer.verify(claim, request.method, request.raw_path)
        return True


class Cluster:
    def __init__(self, settings: Settings) -> None:
        self.self_url = (settings.advertise_url or "").rstrip("/")
        self._nodes: tuple[str, ...] = settings.peers
        self._dns = settings.peers_dns
        self._secret = settings.cluster_secret or ""
        self.signer = PeerSigner(self._secret)
        self._timeout = settings.peer_timeout
        # A cold read waits on the owner's upstream fetch: give it the upstream's time.
        self._read_timeout = settings.upstream_read_timeout
        # A write, a settle or a flush at a peer waits as long as the peer takes (a
        # write-back completion joins GiBs, a DELETE waits for the key's pending upload,
        # a flush for the upstream): the peer's health check tells whether it is alive.
        self._waiting = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
        self._down: set[str] = set()
        self._probed: set[str] = set()  # peers health-checked at least once
        self._answered: set[str] = set()  # peers that answered a health check once
        self._started = time.monotonic()
        self._session: aiohttp.ClientSession | None = None
        self.ownership = Ownership()
        # Called when ``ownership`` changed (the primary tells its secondaries).
        self.on_change: list[Callable[[], None]] = []
        self._changed()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self._secret) and (bool(self._nodes) or self._dns is not None)

    async def start(self) -> None:
        if not self.enabled:
            return
        self._started = time.monotonic()
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=self._read_timeout
            ),
        )
        self._tasks.append(asyncio.create_task(self._check_health_forever()))
        if self._dns is not None:
            self._tasks.append(asyncio.create_task(self._resolve_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def state(self) -> dict[str, object]:
        """The nodes and which of them are taken as down (for stats)."""
        return {"nodes": list(self._nodes), "down": sorted(self._down)} if self.enabled else {}

    def waiting_for(self) -> list[str]:
        """The peers whose state this node does not know yet (readyz waits for them):
        not checked yet, or, while this node is starting, not answering yet."""
        if not self.enabled:
            return []
        starting = time.monotonic() - self._started < STARTUP_GRACE_SECONDS
        return [
            node
            for node in self._nodes
            if node != self.self_url
            and (node not in self._probed or (starting and node not in self._answered))
        ]

    # --- ownership ---------------------------------------------------------------

    def owner(self, bucket: str, key: str) -> str | None:
        """The node that serves this object: None if it is this one."""
        return self.ownership.owner(bucket, key)

    def _changed(self) -> None:
        """The nodes, or which of them are down, changed: so may the owner of a key."""
        if self.enabled:
            nodes = self._nodes or (self.self_url,)
            old = self.ownership
            new = Ownership(self.self_url, nodes, frozenset(self._down), old.gained_at)
            if not old.nodes or old._others_up() - new._others_up():
                new = dataclasses.replace(new, gained_at=time.time())  # keys came here
            self.ownership = new
        for hook in self.on_change:
            hook()

    # --- asking the owner --------------------------------------------------------

    async def read_from(
        self, node: str, request: web.Request, address: S3Address
    ) -> web.StreamResponse | None:
        """Serve a read through its owner; None if the owner cannot be reached (it is
        then taken as down, and the caller serves the read itself)."""
        assert self._session is not None and address.bucket is not None
        path = encode_path(address.bucket, address.key)
        query = encode_query(address.query)
        target = path + ("?" + query if query else "")
        headers = {name: request.headers[name] for name in _READ_HEADERS if name in request.headers}
        headers[PEER_HEADER] = self.sign(request.method, target)
        url = yarl.URL(node + target, encoded=True)
        try:
            response = await self._session.request(
                request.method, url, headers=headers, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._mark_down(node, exc)
            return None
        async with response:
            if response.status == 403 and PEER_HEADER.lower() in response.headers:
                log.error("peer %s refused our cluster signature: check cluster_secret", node)
            return await relay_response(request, response)

    async def write_to(
        self, node: str, request: web.Request, address: S3Address
    ) -> aiohttp.ClientResponse | None:
        """Send a client's write of one key (authenticated and authorized here) to its
        owner ``node``; the caller relays the answer. None if the owner cannot be
        connected to: it is taken as down and nothing was sent (the caller passes the
        write to the next node). A failure once the request went out is a 503."""
        assert self._session is not None and address.bucket is not None
        headers, body = upstream_request(request)  # (chunk signatures checked as it goes)
        path = encode_path(address.bucket, address.key)
        query = encode_query(address.query)
        target = path + ("?" + query if query else "")
        headers[PEER_HEADER] = self.sign(request.method, target)
        url = yarl.URL(node + target, encoded=True)
        try:
            return await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._waiting,
            )
        except aiohttp.ClientConnectorError as exc:
            self._mark_down(node, exc)
            return None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            client_fault = _s3_error_in_chain(exc)
            if client_fault is not None:
                raise client_fault from None  # the client's body was bad, not the peer
            raise ServiceUnavailable(
                f"The node that owns the key failed during the write ({exc}); retry."
            ) from exc

    async def settle(self, bucket: str, keys: list[str]) -> None:
        """Wait until the owners of ``keys`` (the other nodes) have no write-back of one
        of them pending. An owner that cannot be asked is skipped: what it holds goes up
        when it is back."""
        by_owner: dict[str, list[str]] = {}
        for key in keys:
            node = self.owner(bucket, key)
            if node is not None:
                by_owner.setdefault(node, []).append(key)
        await asyncio.gather(
            *(
                self._post_and_wait(node, "settle", {"bucket": bucket, "keys": owned})
                for node, owned in by_owner.items()
            )
        )

    async def flush(self, bucket: str | None, prefix: str) -> tuple[int, list[str]]:
        """Flush every other node (those taken as down too: they may be back): how many
        objects were pending at them, and the nodes that could not be asked."""
        if not self.enabled:
            return 0, []
        body: dict[str, object] | None = None
        if bucket is not None:
            body = {"bucket": bucket, "prefix": prefix}
        nodes = [node for node in self._nodes if node != self.self_url]
        answers = await asyncio.gather(
            *(self._post_and_wait(node, "flush", body) for node in nodes)
        )
        flushed = 0
        unreachable = []
        for node, answer in zip(nodes, answers, strict=True):
            if answer is None:
                unreachable.append(node)
            elif isinstance(count := answer.get("flushed"), int):
                flushed += count
        return flushed, unreachable

    async def _post_and_wait(
        self, node: str, name: str, body: dict[str, object] | None
    ) -> dict[str, object] | None:
        """POST /_s3cache/peer/NAME at a node and wait for its JSON answer, however long
        it takes; None (logged) if the node cannot be asked."""
        assert self._session is not None
        target = f"/_s3cache/peer/{name}"
        try:
            async with self._session.post(
                node + target,
                json=body,
                headers={PEER_HEADER: self.sign("POST", target)},
                timeout=self._waiting,
            ) as response:
                if response.status == 200:
                    answer = await response.json()
                    return answer if isinstance(answer, dict) else {}
                log.warning("peer %s answered %s to %s", node, response.status, name)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("peer %s could not be asked to %s: %s", node, name, exc)
        return None

    async def invalidate(self, bucket: str, keys: list[str]) -> None:
        """Tell each key's owner that a write changed it."""
        by_owner: dict[str, list[str]] = {}
        for key in keys:
            node = self.owner(bucket, key)
            if node is not None:
                by_owner.setdefault(node, []).append(key)
        for node, owned in by_owner.items():
            await self._post_invalidate(node, bucket, owned)

    async def _post_invalidate(self, node: str, bucket: str, keys: list[str]) -> None:
        assert self._session is not None
        target = "/_s3cache/peer/invalidate"
        try:
            async with self._session.post(
                node + target,
                json={"bucket": bucket, "keys": keys},
                headers={PEER_HEADER: self.sign("POST", target)},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                if response.status != 200:
                    log.warning("peer %s did not take an invalidation: %s", node, response.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # A node that is down serves nothing; it revalidates after its TTL.
            self._mark_down(node, exc)

    # --- peer authentication -----------------------------------------------------

    def sign(self, method: str, target: str) -> str:
        return self.signer.sign(method, target)

    def verify(self, request: web.Request) -> bool:
        return self.signer.verify(request)

    # --- membership --------------------------------------------------------------

    def _mark_down(self, node: str, reason: BaseException) -> None:
        if node not in self._down:
            log.warning("peer %s is down (%s): its keys go to the next node", node, reason)
            self._down.add(node)
            self._changed()

    async def _check_health_forever(self) -> None:
        while True:
            await asyncio.gather(
                *(self._check(node) for node in self._nodes if node != self.self_url)
            )
            await asyncio.sleep(STARTUP_PROBE_SECONDS if self.waiting_for() else HEALTH_SECONDS)

    async def _check(self, node: str) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                node + "/_s3cache/healthz", timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as response:
                healthy = response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._mark_down(node, exc)
            self._probed.add(node)
            return
        self._probed.add(node)
        if healthy:
            self._answered.add(node)
        if healthy and node in self._down:
            log.info("peer %s is back: its keys return to it", node)
            self._down.discard(node)
            self._changed()

    async def _resolve_forever(self) -> None:
        assert self._dns is not None
        host, _, port = self._dns.rpartition(":")
        scheme = self.self_url.split("://", 1)[0] or "http"
        while True:
            with contextlib.suppress(OSError):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, int(port), type=socket.SOCK_STREAM
                )
                addresses = sorted({info[4][0] for info in infos})
                nodes = tuple(f"{scheme}://{address}:{port}" for address in addresses)
                if nodes and nodes != self._nodes:
                    log.info("cluster nodes from %s: %s", self._dns, ", ".join(nodes))
                    self._nodes = nodes
                    self._changed()
            await asyncio.sleep(DNS_SECONDS)
