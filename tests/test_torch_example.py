"""bench/torch_example.py against the real upstream and s3cache: every sample's bytes
are right in both epochs, and the second epoch is served from the cache."""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.seaweed import SeaweedS3

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import torch_example  # noqa: E402

pytestmark = pytest.mark.ecosystem

OBJECT_READS = ("hit", "miss", "partial", "bypass")  # GETs of objects, by outcome


def stats(proxy: S3CacheProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{proxy.endpoint_url}/_s3cache/stats") as answer:
        data: dict[str, Any] = json.load(answer)
        return data


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_torch_example_reads_every_sample_and_hits_the_cache_in_epoch_two(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    bucket: str,
    make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The example takes its credentials from the standard AWS environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", upstream.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", upstream.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", upstream.region)
    client = make_client()
    objects = {
        f"train/sample-{i:02d}.bin": random.Random(i).randbytes(40_000 + 3_001 * i)
        for i in range(10)
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.put_object(Bucket=bucket, Key="other/not-a-sample", Body=b"x")

    seen: dict[int, list[str]] = {0: [], 1: []}
    start = stats(s3cache)
    boundary: list[dict[str, Any]] = []

    def on_sample(epoch: int, key: str, data: Any) -> None:
        assert bytes(data.numpy()) == objects[key], key
        seen[epoch].append(key)
        if epoch == 0 and len(seen[0]) == len(objects):
            # The last sample of epoch one: its workers are done (epoch two's start
            # after this loop), once s3cache has counted the last read.
            boundary.append(reads_settled(s3cache, start, len(objects)))

    argv = ["--endpoint", s3cache.endpoint_url, "--bucket", bucket, "--prefix", "train/"]
    assert torch_example.main([*argv, "--epochs", "2"], on_sample=on_sample) == 0
    end = reads_settled(s3cache, start, 2 * len(objects))

    for epoch in (0, 1):
        assert sorted(seen[epoch]) == sorted(objects)  # every sample, once
    assert seen[0] != seen[1]  # a new shuffle each epoch
    second = {k: end["reads"][k] - boundary[0]["reads"][k] for k in end["reads"]}
    assert second["hit"] == len(objects), second
    assert end["served_bytes"]["upstream"] == boundary[0]["served_bytes"]["upstream"]


def reads_settled(proxy: S3CacheProcess, start: dict[str, Any], reads: int) -> dict[str, Any]:
    """The stats once s3cache has counted ``reads`` reads since ``start`` (a response
    is counted just after its last byte went out)."""
    deadline = time.monotonic() + 10
    while True:
        now = stats(proxy)
        counted = sum(now["reads"][k] - start["reads"][k] for k in OBJECT_READS)
        if counted >= reads or time.monotonic() > deadline:
            return now
        time.sleep(0.01)
