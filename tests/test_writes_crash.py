"""Nothing acknowledged is lost (issue #16, item 4): s3cache killed with SIGKILL 50
times at random moments while write-back uploads are under way, restarted on the same
cache dir each time; and an upstream that is away for a while."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import botocore.exceptions

from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.relay import Fault, Relay
from s3cache.sandbox.seaweed import SeaweedS3

KILLS = 50


def _process(tmp_path: Path, upstream: SeaweedS3, relay: Relay, bucket: str) -> S3CacheProcess:
    return S3CacheProcess(
        tmp_path,
        upstream,
        upstream_endpoint=relay.endpoint_url,
        extra_args=[
            "--block-size", "256KiB", "--cache-size", "512MiB", "--writeback-max", "256MiB",
            "--write-rule", f"{bucket}=back", "--writeback-concurrency", "4",
            "--writeback-retry-max", "1s",
        ],
        debug_blocking=True,
    )


class Writers:
    """Threads putting new keys through s3cache, each remembering what it was told."""

    def __init__(self, endpoint: str, upstream: SeaweedS3, bucket: str) -> None:
        self.acknowledged: dict[str, bytes] = {}
        self.unsure: dict[str, bytes] = {}  # sent, answer lost (s3cache killed meanwhile)
        # Cleared while s3cache is down: a writer whose request failed waits for it
        # instead of knocking at a closed port (which takes CPU from the start-up).
        self.serving = threading.Event()
        self.serving.set()
        self._endpoint, self._upstream, self._bucket = endpoint, upstream, bucket
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(4)]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, number: int) -> None:
        client = client_of(
            self._endpoint, self._upstream, retries={"max_attempts": 0, "mode": "standard"},
            connect_timeout=2, read_timeout=20,
        )
        rng = random.Random(number)
        while not self._stop.is_set():
            with self._lock:
                self._count += 1
                key = f"ckpt/{number}-{self._count:05d}.bin"
            body = rng.randbytes(rng.choice((1, 64, 300, 900)) * 1024 + rng.randrange(1000))
            try:
                answer = client.put_object(Bucket=self._bucket, Key=key, Body=body)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                self.unsure[key] = body
                time.sleep(0.05)
                self.serving.wait(60)
                continue
            assert answer["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
            self.acknowledged[key] = body
        client.close()


def _flush(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/_s3cache/flush", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()


def _upstream_objects(direct: Any, bucket: str) -> dict[str, bytes]:
    found = {}
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found[item["Key"]] = direct.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def test_fifty_sigkills_lose_nothing_acknowledged(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    rng = random.Random(16)
    direct = upstream.client()
    with Relay(upstream.endpoint_url, delay=0.05) as relay:
        proxy = _process(tmp_path, upstream, relay, bucket)
        proxy.start()
        try:
            with Writers(proxy.endpoint_url, upstream, bucket) as writers:
                for _ in range(KILLS):
                    time.sleep(rng.uniform(0.05, 0.35))
                    writers.serving.clear()
                    proxy.send_signal(signal.SIGKILL)
                    proxy.wait(10)
                    proxy.start()
                    writers.serving.set()
            _flush(proxy.endpoint_url)
            assert proxy.blocking_calls() == []
        finally:
            proxy.stop()
    assert len(writers.acknowledged) > 100, "too few writes to mean anything"
    stored = _upstream_objects(direct, bucket)
    lost = [key for key in writers.acknowledged if key not in stored]
    assert not lost, f"{len(lost)} acknowledged objects never reached the upstream: {lost[:5]}"
    wrong = [k for k, body in writers.acknowledged.items() if stored[k] != body]
    assert not wrong, f"wrong bytes upstream: {wrong[:5]}"
    sent = {**writers.unsure, **writers.acknowledged}
    unknown = [key for key in stored if key not in sent]
    assert not unknown, f"objects nobody wrote: {unknown[:5]}"
    partial = [key for key, body in stored.items() if body != sent[key]]
    assert not partial, f"partial or wrong objects upstream: {partial[:5]}"
    direct.close()


def test_upstream_away_writes_acknowledged_until_the_cap_then_drained(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    direct = upstream.client()
    with Relay(upstream.endpoint_url) as relay:
        proxy = _process(tmp_path, upstream, relay, bucket)
        proxy._extra_args += ["--writeback-max", "2MiB"]  # (the last value wins)
        with proxy:
            client = client_of(proxy.endpoint_url, upstream, retries={"max_attempts": 0})
            relay.fault = Fault(status=503, match_method="PUT")  # away: every upload refused
            bodies = {f"away/{n}.bin": os.urandom(150 * 1024) for n in range(12)}
            for key, body in bodies.items():
                client.put_object(Bucket=bucket, Key=key, Body=body)
                time.sleep(0.3)  # a few seconds away in all, uploads retried meanwhile
            stats = _stats(proxy)["writeback"]
            assert stats["pending_objects"] == 12 and stats["upload_failures"] >= 12
            # Over writeback_max: done write-through, so the upstream's refusal shows.
            try:
                client.put_object(Bucket=bucket, Key="away/big.bin", Body=os.urandom(400 * 1024))
                raise AssertionError("a write past writeback_max was acknowledged")
            except botocore.exceptions.ClientError as exc:
                assert exc.response["Error"]["Code"] == "SlowDown"
            assert _stats(proxy)["writeback"]["fallbacks_to_through"] == 1
            relay.fault = None
            _flush(proxy.endpoint_url)
            client.close()
    stored = _upstream_objects(direct, bucket)
    assert stored == bodies
    direct.close()


def _stats(proxy: S3CacheProcess) -> dict[str, Any]:
    import json

    with urllib.request.urlopen(f"{proxy.endpoint_url}/_s3cache/stats") as answer:
        data: dict[str, Any] = json.load(answer)
        return data
