"""Several s3cache nodes as one cache.

Each object has one owner among the nodes, chosen by rendezvous hashing of its bucket
and key over the node URLs. A node that does not own a key asks the owner for it, over
the same HTTP port, with the request authenticated by the shared cluster secret (an
HMAC of the method, path and time — never the client's credentials); the owner answers
from its cache (filling it once for the whole cluster) and the asking node streams the
answer to its client. Ranges, conditionals and single-flight work across nodes because
the owner serves every read of its keys.

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
import hashlib
import hmac
import logging
import socket
import time

import aiohttp
import yarl
from aiohttp import web

from s3cache.config import Settings
from s3cache.errors import AccessDenied
from s3cache.forward import relay_response
from s3cache.hashing import ranked
from s3cache.s3.addressing import S3Address, encode_path, encode_query

log = logging.getLogger(__name__)

PEER_HEADER = "X-S3cache-Peer"
PEER_AUTH_WINDOW = 300.0  # seconds a peer request's timestamp may be off
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


class Cluster:
    def __init__(self, settings: Settings) -> None:
        self.self_url = (settings.advertise_url or "").rstrip("/")
        self._nodes: tuple[str, ...] = settings.peers
        self._dns = settings.peers_dns
        self._secret = (settings.cluster_secret or "").encode()
        self._timeout = settings.peer_timeout
        # A cold read waits on the owner's upstream fetch: give it the upstream's time.
        self._read_timeout = settings.upstream_read_timeout
        self._down: set[str] = set()
        self._probed: set[str] = set()  # peers health-checked at least once
        self._answered: set[str] = set()  # peers that answered a health check once
        self._started = time.monotonic()
        self._session: aiohttp.ClientSession | None = None
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
        if not self.enabled:
            return None
        for node in ranked(f"{bucket}/{key}", self._nodes or (self.self_url,)):
            if node == self.self_url:
                return None
            if node not in self._down:
                return node
        return None

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

    def sign(self, method: str, target: str, now: float | None = None) -> str:
        stamp = str(int(now if now is not None else time.time()))
        digest = hmac.new(self._secret, f"{stamp}\n{method}\n{target}".encode(), hashlib.sha256)
        return f"{stamp}:{digest.hexdigest()}"

    def verify(self, request: web.Request) -> bool:
        """True if the request comes from a peer (raises AccessDenied for a bad
        signature); False if it does not claim to."""
        claim = request.headers.get(PEER_HEADER)
        if claim is None:
            return False
        stamp, _, _ = claim.partition(":")
        if not self._secret or not stamp.isdigit():
            raise AccessDenied("Bad cluster signature.")
        if abs(time.time() - int(stamp)) > PEER_AUTH_WINDOW:
            raise AccessDenied("Cluster signature expired.")
        expected = self.sign(request.method, request.raw_path, now=int(stamp))
        if not hmac.compare_digest(expected.encode(), claim.encode()):
            raise AccessDenied("Bad cluster signature.")
        return True

    # --- membership --------------------------------------------------------------

    def _mark_down(self, node: str, reason: BaseException) -> None:
        if node not in self._down:
            log.warning("peer %s is down (%s): its keys go to the next node", node, reason)
            self._down.add(node)

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
            await asyncio.sleep(DNS_SECONDS)
