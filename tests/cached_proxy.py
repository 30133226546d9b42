"""s3cache behind a counting relay in front of the real upstream, for tests that
count what s3cache asks of the upstream."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

BLOCK = 256 * 1024


class Cached:
    """s3cache -> relay -> upstream, with a client of s3cache and one of the upstream."""

    def __init__(self, proxy: S3CacheProcess, relay: Relay, upstream: SeaweedS3) -> None:
        self.proxy = proxy
        self.relay = relay
        self.direct = upstream.client()
        self._upstream = upstream
        self.client = _client(proxy.endpoint_url, upstream)
        self._spread: Any = None

    def close(self) -> None:
        self.client.close()
        self.direct.close()
        if self._spread is not None:
            self._spread.close()

    @property
    def spread_client(self) -> Any:
        """A client of s3cache that sends each request on a new connection (made on
        first use), for reads that the kernel should spread over the workers."""
        if self._spread is None:
            self._spread = new_connection_per_request(
                _client(self.proxy.endpoint_url, self._upstream)
            )
        return self._spread

    def gets(self) -> list[Any]:
        return [r for r in self.relay.records() if r.method == "GET"]

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no fill is in flight (a response can end before the block fetch
        that brought its last bytes does)."""
        deadline = time.monotonic() + timeout
        while self.stats()["fills_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the relay records an exchange just after relaying it

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.proxy.endpoint_url}/_s3cache/metrics") as answer:
            text: str = answer.read().decode()
            return text

    def fetched_ranges(self) -> list[tuple[int, int]]:
        self.settle()
        ranges = []
        for record in self.gets():
            spec = record.headers.get("range", "")
            first, _, last = spec.removeprefix("bytes=").partition("-")
            ranges.append((int(first), int(last)))
        return sorted(ranges)

    def stats(self) -> dict[str, Any]:

        with urllib.request.urlopen(f"{self.proxy.endpoint_url}/_s3cache/stats") as answer:
            data: dict[str, Any] = json.load(answer)
            return data


def _client(endpoint_url: str, upstream: SeaweedS3, **config: Any) -> Any:
    return client_of(
        endpoint_url, upstream, retries={"max_attempts": 1}, max_pool_connections=64, **config
    )


def new_connection_per_request(client: Any) -> Any:
    """``client``, made to send every request with ``Connection: close`` (added after
    signing), so that each one goes on a new connection, as from a fresh client, but
    without the cost of making a client. With ``--workers``, the kernel chooses the
    worker of each connection (SO_REUSEPORT)."""
    client.meta.events.register("before-send.s3", _close_connection)
    return client


def _close_connection(request: Any, **_: Any) -> None:
    request.headers["Connection"] = "close"


@contextlib.contextmanager
def running_cache(
    tmp_path: Path,
    upstream: SeaweedS3,
    *extra: str,
    cache_size: str = "64MiB",
    max_file_size: int | None = None,
) -> Iterator[Cached]:
    """s3cache (failing on any blocking call on its event loop) behind a relay."""
    with Relay(upstream.endpoint_url) as relay:
        proxy = S3CacheProcess(
            tmp_path,
            upstream,
            upstream_endpoint=relay.endpoint_url,
            extra_args=["--block-size", str(BLOCK), "--cache-size", cache_size, *extra],
            debug_blocking=True,
            max_file_size=max_file_size,
        )
        with proxy:
            cached = Cached(proxy, relay, upstream)
            try:
                yield cached
            finally:
                cached.close()
        assert proxy.blocking_calls() == []


def put(cached: Cached, bucket: str, key: str, size: int, **extra: Any) -> bytes:
    body = os.urandom(size)
    cached.direct.put_object(Bucket=bucket, Key=key, Body=body, **extra)
    cached.relay.reset()
    return body


def get(client: Any, bucket: str, key: str, **extra: Any) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    return data
