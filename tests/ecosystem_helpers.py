"""Helpers of tests/test_ecosystem.py: s3cache's stats around a read, deterministic
content, and the map-style PyTorch dataset whose workers read through boto3."""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from s3cache.sandbox.proxy import S3CacheProcess

KIB = 1024
MIB = 1024 * KIB


def content(length: int, seed: int) -> bytes:
    """Reproducible incompressible bytes."""
    return random.Random(seed).randbytes(length)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Window:
    """What s3cache counted between two snapshots of /_s3cache/stats."""

    proxy: S3CacheProcess
    reads: dict[str, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)
    block_fetches: float = 0.0

    def describe(self) -> str:
        return (
            f"reads {self.reads}, served bytes {self.served}, "
            f"upstream block fetches {self.block_fetches}\n"
            f"--- s3cache log ---\n{self.proxy.log_tail()}"
        )

    def assert_all_hits(self, at_least: int) -> None:
        """Every object byte of the window came from the cache, and at least
        ``at_least`` reads were hits. (``bypass`` is allowed: a HEAD or GET the upstream
        answers with 404, such as a library probing for a "directory", is relayed
        uncached and carries no object bytes.)"""
        assert self.reads.get("miss", 0) == 0, self.describe()
        assert self.reads.get("partial", 0) == 0, self.describe()
        assert self.served.get("upstream", 0) == 0, self.describe()
        assert self.block_fetches == 0, self.describe()
        assert self.reads.get("hit", 0) >= at_least, self.describe()


class CacheStats:
    """Reads s3cache's counters; ``window()`` measures what a block of code did."""

    def __init__(self, proxy: S3CacheProcess) -> None:
        self.proxy = proxy

    def read(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.proxy.endpoint_url}/_s3cache/stats") as answer:
            data: dict[str, Any] = json.load(answer)
            return data

    def settle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until no block fetch is in flight (a response can end before the fetch
        that brought its last bytes is recorded), then return the stats."""
        deadline = time.monotonic() + timeout
        data = self.read()
        while data["fills_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
            data = self.read()
        return data

    @contextmanager
    def window(self) -> Iterator[Window]:
        before = self.settle()
        window = Window(self.proxy)
        yield window
        after = self.settle()
        window.reads = {k: after["reads"][k] - before["reads"].get(k, 0) for k in after["reads"]}
        window.served = {
            k: after["served_bytes"][k] - before["served_bytes"].get(k, 0)
            for k in after["served_bytes"]
        }
        window.block_fetches = after["upstream_block_fetches"] - before["upstream_block_fetches"]


class BotoObjectDataset:
    """A map-style torch Dataset: item i is object ``keys[i]``, read with GetObject.

    The boto3 client is made in each DataLoader worker by ``worker_init_fn`` (boto3
    clients must not cross a fork); the parent never makes one."""

    def __init__(self, make_client: Callable[[], Any], bucket: str, keys: list[str]) -> None:
        self.make_client = make_client
        self.bucket = bucket
        self.keys = keys
        self.client: Any = None
        self.worker = -1

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        assert self.client is not None, "no client: worker_init_fn did not run"
        key = self.keys[index]
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return {
            "key": key,
            "worker": self.worker,
            "sha256": sha256(body),
            "data": torch.frombuffer(bytearray(body), dtype=torch.uint8),
        }


def init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: one boto3 client per worker."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    assert info is not None
    dataset = info.dataset
    assert isinstance(dataset, BotoObjectDataset)
    dataset.worker = worker_id
    dataset.client = dataset.make_client()
