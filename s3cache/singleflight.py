"""Single-flight: one piece of work per key at a time, shared by every caller that
asks for the same key while it runs (an object's open, a revalidation, a cache file's
open, a block's check, a bucket's check).

Two ways to run the work:

- ``lead``: the first caller does the work itself and ``publish``es what the others
  get (they get ``failed`` if it ends without publishing: an exception, a
  cancellation); the others wait with ``joined``. The leader's own result may say more
  than what it shares (an upstream answer only it can relay, say).
- ``shared``: the work runs in a task of its own, and every caller, the first one
  included, gets its outcome (value or exception); a caller cancelled while it waits
  leaves it running for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    def __contains__(self, key: K) -> bool:
        """Is work for ``key`` under way?"""
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def joined(self, key: K) -> Awaitable[V] | None:
        """What the flight of ``key`` under way shares (shielded: a caller cancelled
        while it waits leaves the flight alone), or None if there is none: the caller
        then ``lead``s one."""
        flight = self._flights.get(key)
        return None if flight is None else asyncio.shield(flight)

    @contextlib.contextmanager
    def lead(self, key: K, failed: V) -> Iterator[Callable[[V], None]]:
        """Lead the flight of ``key``: yields ``publish``, which gives its callers
        their value; those waiting when the block ends without publishing get
        ``failed``. The key is free again when the block ends."""
        flight: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            yield flight.set_result
        finally:
            del self._flights[key]
            if not flight.done():
                flight.set_result(failed)

    async def run(self, key: K, work: Callable[[], Awaitable[V]], failed: V) -> V:
        """``work()``, done by the first caller of ``key`` (``lead``), whose value the
        others get (``failed`` if it raised or was cancelled)."""
        joined = self.joined(key)
        if joined is not None:
            return await joined
        with self.lead(key, failed) as publish:
            value = await work()
            publish(value)
            return value

    async def shared(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """The outcome of ``work()``, run once in a task for all who ask for ``key``
        while it runs."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)
