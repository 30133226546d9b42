"""A cache directory that runs out of space (a real, small tmpfs): fills stop, clients
still get their bytes from the upstream, the cache says it is degraded (metric and
readyz), and it recovers by itself when space returns."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.store.files import choose_dir
from tests.cached_proxy import BLOCK, get, put, running_cache

pytestmark = pytest.mark.faults


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def readyz(endpoint: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{endpoint}/_s3cache/readyz", timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_disk_full_then_space_returns(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, small_disk: Path
) -> None:
    # Two cache dirs: the index lives on the first (a real disk); keys chosen so that
    # their data lands on the second, the 2 MiB tmpfs.
    keys = [k for k in (f"obj-{i}" for i in range(200)) if choose_dir(bucket, k, 2) == 1][:3]
    with running_cache(
        tmp_path, upstream, "--cache-dir", str(small_disk), "--scrub-rate", "0"
    ) as cached:
        bodies = {key: put(cached, bucket, key, 6 * BLOCK) for key in keys}  # 1.5 MiB each
        for key, body in bodies.items():
            assert get(cached.client, bucket, key) == body  # the client never sees the fault
        cached.settle()
        stats = cached.stats()
        assert stats["degraded"] is True
        status, report = readyz(cached.proxy.endpoint_url)
        assert status == 503 and "cache_dir_1" in report["problems"]  # type: ignore[operator]
        assert "s3cache_cache_degraded 1.0" in cached.metrics()
        for key, body in bodies.items():  # still right, partly from the upstream
            assert get(cached.client, bucket, key) == body
        # Space returns: the same tmpfs, grown.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        deadline = time.monotonic() + 30
        while readyz(cached.proxy.endpoint_url)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert readyz(cached.proxy.endpoint_url)[0] == 200
        for key, body in bodies.items():
            assert get(cached.client, bucket, key) == body
        cached.settle()
        assert cached.stats()["degraded"] is False
        cached.relay.reset()
        for key, body in bodies.items():  # and now everything is cached
            assert get(cached.client, bucket, key) == body
        assert cached.relay.records() == []
