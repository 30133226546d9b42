"""The primary worker's side of the channel to the secondaries (``workerlink``).

It tells the secondaries which objects they may serve themselves (each complete and
verified object, when the primary answers a read of it), tells them at once when an
entry goes (dropped, evicted, invalidated, a block found damaged), and, after a write
through s3cache, waits until every secondary has stopped serving what the write changed
(``sync``) before the client hears back: read-after-write holds whichever worker the
next read reaches. In a cluster it also tells them, first thing and whenever it
changes, which node owns which key as this node sees it (``cluster.Ownership``): a
secondary serves only keys this node owns now, as the primary does (an entry of a key
whose owner is another node may be older than the owner's). Reads the secondaries
served come back in batches and count as reads here (LRU order, read-ahead, epoch
manifests).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from s3cache.cluster import Cluster
from s3cache.prefetch import Prefetcher
from s3cache.server.workerlink import VIA_WORKER, Ready, WorkerSigner, servable
from s3cache.store.cache import CacheStore
from s3cache.store.entry import Entry

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 5.0  # a secondary that does not confirm in time is cut off


class _Channel:
    def __init__(self, index: int, socket: web.WebSocketResponse) -> None:
        self.index = index
        self.socket = socket
        self.acked = 0
        self.acks: dict[int, asyncio.Future[None]] = {}
        self.announced: set[int] = set()  # entry ids this worker was told of
        self.reads_served = 0  # reads it reported serving itself
        self._outbox: asyncio.Queue[str] = asyncio.Queue()

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message: they leave one at a time, in order."""
        self._outbox.put_nowait(json.dumps(message))

    async def send_forever(self) -> None:
        while True:
            text = await self._outbox.get()
            try:
                await self.socket.send_str(text)
            except (ConnectionError, RuntimeError):
                return  # the channel closed: its reader loop ends too


class WorkerHub:
    def __init__(
        self, signer: WorkerSigner, store: CacheStore, prefetcher: Prefetcher, cluster: Cluster
    ) -> None:
        self.signer = signer
        self._store = store
        self._prefetcher = prefetcher
        self._cluster = cluster
        self._channels: dict[int, _Channel] = {}
        self._sequence = 0
        store.on_gone.append(self.gone)
        cluster.on_change.append(self.ownership_changed)

    # --- the primary's side of the events ------------------------------------------

    def on_read(self, request: web.Request, entry: Entry) -> None:
        """The primary answers a read from this entry. Secondaries not yet told of it
        may serve it from now on; the secondary that passed this read on is told again
        (it asked because it has no fresh copy: it forgot it, or its TTL ran out and
        validated_at has moved on)."""
        asking = request.get(VIA_WORKER)
        told = [
            channel
            for channel in self._channels.values()
            if channel.index == asking or entry.id not in channel.announced
        ]
        # A hit every secondary already knows of (the common case) costs no more.
        if not told or not servable(entry):
            return
        message = {"ready": Ready.of(entry).to_json()}
        for channel in told:
            channel.announced.add(entry.id)
            channel.send(message)

    def gone(self, entry_id: int) -> None:
        for channel in self._channels.values():
            if entry_id in channel.announced:
                channel.announced.discard(entry_id)
                channel.send({"gone": [entry_id]})

    def ownership_changed(self) -> None:
        """The primary's view of who owns which key changed: the secondaries take it at
        once (and serve only the keys this node owns by it)."""
        message = {"ownership": self._cluster.ownership.to_json()}
        for channel in self._channels.values():
            channel.send(message)

    async def sync(self) -> None:
        """Return once every secondary has handled every message sent so far."""
        if not self._channels:
            return
        self._sequence += 1
        number = self._sequence
        waits = []
        for channel in list(self._channels.values()):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            channel.acks[number] = future
            channel.send({"sync": number})
            waits.append((channel, future))
        for channel, future in waits:
            try:
                await asyncio.wait_for(future, SYNC_TIMEOUT)
            except TimeoutError:
                log.error("worker %d did not confirm an invalidation: cut off", channel.index)
                await channel.socket.close()

    def state(self) -> dict[str, object]:
        """The secondaries linked now, for stats."""
        return {
            str(index): {"reads_served": channel.reads_served, "objects": len(channel.announced)}
            for index, channel in sorted(self._channels.items())
        }

    # --- the channel -----------------------------------------------------------------

    async def channel(self, request: web.Request, index: int) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=10.0, max_msg_size=64 * 1024 * 1024)
        await socket.prepare(request)
        old = self._channels.get(index)
        if old is not None:
            await old.socket.close()
        channel = self._channels[index] = _Channel(index, socket)
        channel.send({"ownership": self._cluster.ownership.to_json()})  # before any ready
        log.info("worker %d connected", index)
        sender = asyncio.create_task(channel.send_forever())
        try:
            async for message in socket:
                if message.type is not WSMsgType.TEXT:
                    break
                self._received(channel, json.loads(message.data))
        finally:
            sender.cancel()
            if self._channels.get(index) is channel:
                del self._channels[index]
            for future in channel.acks.values():
                if not future.done():
                    future.set_result(None)  # a closed channel serves nothing any more
            log.info("worker %d disconnected", index)
        return socket

    def _received(self, channel: _Channel, message: dict[str, Any]) -> None:
        if "ack" in message:
            number = int(message["ack"])
            for pending in [n for n in channel.acks if n <= number]:
                future = channel.acks.pop(pending)
                if not future.done():
                    future.set_result(None)
        reads = message.get("reads", [])
        channel.reads_served += len(reads)
        for bucket, key, entry_id, start, end in reads:
            entry = self._store.peek(bucket, key)
            if entry is not None and entry.id == entry_id and not entry.dropped:
                self._store.touch(entry)
                self._prefetcher.observe_read(entry, int(start), int(end))
