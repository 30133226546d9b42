"""A flipped byte in a cached block is detected by its xxh3 hash — when a block is
first served after a restart, by ``s3cache verify`` and by the background scrub —
and the block is dropped and fetched again, never served."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, Cached, get, put, running_cache

pytestmark = pytest.mark.faults


def data_file(tmp_path: Path) -> Path:
    (path,) = [p for p in (tmp_path / "cache" / "data").rglob("*") if p.is_file()]
    return path


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def corrupt_blocks(cached: Cached) -> float:
    text = cached.metrics()
    line = next(
        line for line in text.splitlines() if line.startswith("s3cache_corrupt_blocks_total")
    )
    return float(line.split()[-1])


def rows(table: str) -> list[list[str]]:
    """The lines of a printed table, split into words."""
    return [line.split() for line in table.splitlines()]


def refetched_blocks(cached: Cached) -> list[int]:
    return [first // BLOCK for first, _ in cached.fetched_ranges()]


def test_damage_while_stopped_is_caught_on_first_read(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "obj", 3 * BLOCK)
        assert get(cached.client, bucket, "obj") == body
        cached.settle()
        cached.proxy.stop()
        flip_byte(data_file(tmp_path), BLOCK + 1234)  # in block 1
        cached.proxy.start()
        cached.relay.reset()
        assert get(cached.client, bucket, "obj") == body
        assert refetched_blocks(cached) == [1]
        assert corrupt_blocks(cached) == 1
        cached.relay.reset()
        assert get(cached.client, bucket, "obj") == body
        assert cached.relay.records() == []


def test_verify_finds_damage_in_a_running_cache(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "obj", 3 * BLOCK)
        assert get(cached.client, bucket, "obj") == body
        cached.settle()
        flip_byte(data_file(tmp_path), 2 * BLOCK + 7)  # block 2, already verified
        result = subprocess.run(
            [sys.executable, "-m", "s3cache", "verify", "--endpoint", cached.proxy.endpoint_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 3, result.stderr
        assert ["corrupt_blocks", "1"] in rows(result.stdout)
        cached.relay.reset()
        assert get(cached.client, bucket, "obj") == body
        assert refetched_blocks(cached) == [2]
        clean = subprocess.run(
            [sys.executable, "-m", "s3cache", "verify", "--endpoint", cached.proxy.endpoint_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert clean.returncode == 0
        assert ["corrupt_blocks", "0"] in rows(clean.stdout)


def test_background_scrub_finds_damage(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    # A short rest between passes: the pass after the damage starts soon (the first
    # pass, at start-up, found the index empty).
    with running_cache(
        tmp_path, upstream, "--scrub-rate", "64MiB", "--scrub-pause", "200ms"
    ) as cached:
        body = put(cached, bucket, "obj", 2 * BLOCK)
        assert get(cached.client, bucket, "obj") == body
        cached.settle()
        flip_byte(data_file(tmp_path), 10)  # block 0
        deadline = time.monotonic() + 90
        while corrupt_blocks(cached) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert corrupt_blocks(cached) == 1
        cached.relay.reset()
        assert get(cached.client, bucket, "obj") == body
        assert refetched_blocks(cached) == [0]
