"""Three s3cache nodes on loopback as one cache, in front of one upstream (through a
counting relay): each object is fetched from the upstream once for the whole cluster;
a node that stops is routed around, and gets its keys back when it returns."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from s3cache.hashing import ranked
from s3cache.sandbox.proxy import S3CacheProcess, free_port
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, _client

SECRET = "cluster-secret-for-tests"


class Nodes:
    def __init__(self, tmp_path: Path, upstream: SeaweedS3, relay: Relay) -> None:
        self.nodes = [
            S3CacheProcess(tmp_path / f"node{i}", upstream, upstream_endpoint=relay.endpoint_url)
            for i in range(3)
        ]
        urls = ",".join(node.endpoint_url for node in self.nodes)
        for node in self.nodes:
            node._extra_args = [
                "--peers",
                urls,
                "--advertise-url",
                node.endpoint_url,
                "--cluster-secret",
                SECRET,
                "--peer-timeout",
                "1s",
                "--block-size",
                str(BLOCK),
            ]
        self.clients = [_client(node.endpoint_url, upstream) for node in self.nodes]

    def owner_index(self, bucket: str, key: str) -> int:
        urls = [node.endpoint_url for node in self.nodes]
        return urls.index(ranked(f"{bucket}/{key}", urls)[0])


@pytest.fixture
def cluster(tmp_path: Path, upstream: SeaweedS3) -> Iterator[tuple[Nodes, Relay]]:
    with Relay(upstream.endpoint_url) as relay:
        nodes = Nodes(tmp_path, upstream, relay)
        for node in nodes.nodes:
            node.start()
        wait_until_all_see_each_other(nodes)
        try:
            yield nodes, relay
        finally:
            for client in nodes.clients:
                client.close()
            for node in nodes.nodes:
                node.stop()


def wait_until_all_see_each_other(nodes: Nodes, timeout: float = 20.0) -> None:
    """Nodes started one after the other first see the later ones as down, until a
    health check (every 2 s) sees them up."""
    deadline = time.monotonic() + timeout
    for node in nodes.nodes:
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/stats") as answer:
                if not json.load(answer)["cluster"]["down"]:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{node.endpoint_url} still sees peers down")


def wait_until_all_ready(nodes: Nodes, timeout: float = 30.0) -> None:
    """Every node's readyz answers 200 (what an orchestrator waits for)."""
    deadline = time.monotonic() + timeout
    for node in nodes.nodes:
        while True:
            try:
                with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/readyz", timeout=5):
                    break
            except urllib.error.HTTPError as exc:
                exc.close()
            assert time.monotonic() < deadline, f"{node.endpoint_url} not ready in {timeout}s"
            time.sleep(0.05)


def read(client: Any, bucket: str, key: str, **extra: Any) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    return data


def test_each_object_fetched_once_for_the_whole_cluster(
    cluster: tuple[Nodes, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    nodes, relay = cluster
    direct = upstream.client()
    bodies = {f"obj{i}": os.urandom(3 * BLOCK + i) for i in range(6)}
    for key, body in bodies.items():
        direct.put_object(Bucket=bucket, Key=key, Body=body)
    relay.reset()
    barrier = threading.Barrier(9)

    def read_everything(index: int) -> None:
        barrier.wait()
        client = nodes.clients[index % 3]
        for key, body in bodies.items():
            assert (
                hashlib.sha256(read(client, bucket, key)).digest() == hashlib.sha256(body).digest()
            )
            assert read(client, bucket, key, Range="bytes=10-99") == body[10:100]

    with ThreadPoolExecutor(9) as pool:
        list(pool.map(read_everything, range(9)))
    time.sleep(0.5)
    gets = [r for r in relay.records() if r.method == "GET"]
    assert relay.bytes_sent() == sum(len(b) for b in bodies.values())  # once, cluster-wide
    assert len(gets) == sum(-(-len(b) // BLOCK) for b in bodies.values())
    direct.close()


def test_a_cluster_started_together_fetches_each_object_once(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """Three nodes started at once, read through as soon as every readyz is 200: a node
    that served while it still took its peers as down (not yet probed, or probed
    before they listened) fetched their keys itself, and the dataset crossed the WAN
    about twice."""
    direct = upstream.client()
    bodies = {f"epoch/{i:02d}": os.urandom(BLOCK + 1000 * i) for i in range(12)}
    for key, body in bodies.items():
        direct.put_object(Bucket=bucket, Key=key, Body=body)
    direct.close()
    with Relay(upstream.endpoint_url) as relay:
        nodes = Nodes(tmp_path, upstream, relay)
        try:
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda node: node.start(), nodes.nodes))
            wait_until_all_ready(nodes)
            jobs = [(client, key) for key in bodies for client in nodes.clients]

            def one(job: tuple[Any, str]) -> bool:
                client, key = job
                return read(client, bucket, key) == bodies[key]

            with ThreadPoolExecutor(9) as pool:
                assert all(pool.map(one, jobs))
            time.sleep(0.5)  # the relay records an exchange just after relaying it
            fetched = sum(
                record.response_body_bytes
                for record in relay.records()
                if record.method == "GET" and record.path.startswith(f"/{bucket}/")
            )
            assert fetched == sum(len(body) for body in bodies.values())  # once, not ~2x
        finally:
            for client in nodes.clients:
                client.close()
            for node in nodes.nodes:
                node.stop()


def test_readyz_waits_for_every_peer_then_takes_a_silent_one_as_down(
    tmp_path: Path, upstream: SeaweedS3
) -> None:
    node = S3CacheProcess(tmp_path / "node", upstream)
    silent = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    node._extra_args = [
        "--peers",
        f"{node.endpoint_url},{silent}",
        "--advertise-url",
        node.endpoint_url,
        "--cluster-secret",
        SECRET,
        "--peer-timeout",
        "1s",
    ]
    with node:
        status, body = readyz(node)
        assert status == 503
        assert body["problems"] == {"peers": f"waiting for first probe of 1 peer: {silent}"}
        # A peer that never answers while this node starts is settled as down (its keys
        # go elsewhere): the node is ready then, bounded by the start-up grace.
        deadline = time.monotonic() + 30
        while readyz(node)[0] != 200:
            assert time.monotonic() < deadline, readyz(node)
            time.sleep(0.2)
        with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/stats") as answer:
            assert json.load(answer)["cluster"]["down"] == [silent]


def readyz(node: S3CacheProcess) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/readyz", timeout=5) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def test_a_write_through_any_node_invalidates_at_the_owner(
    cluster: tuple[Nodes, Relay], bucket: str
) -> None:
    nodes, _ = cluster
    key = "moving"
    owner = nodes.owner_index(bucket, key)
    other = (owner + 1) % 3
    nodes.clients[other].put_object(Bucket=bucket, Key=key, Body=b"one")
    assert read(nodes.clients[owner], bucket, key) == b"one"
    nodes.clients[other].put_object(Bucket=bucket, Key=key, Body=b"two")
    for client in nodes.clients:
        assert read(client, bucket, key) == b"two"


def test_a_stopped_node_is_routed_around_and_gets_its_keys_back(
    cluster: tuple[Nodes, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    nodes, relay = cluster
    direct = upstream.client()
    keys = [f"k{i}" for i in range(12)]
    for key in keys:
        direct.put_object(Bucket=bucket, Key=key, Body=key.encode() * 1000)
    victim = 2
    owned_by_victim = [k for k in keys if nodes.owner_index(bucket, k) == victim]
    assert owned_by_victim
    nodes.nodes[victim].stop()
    for key in keys:  # every request still succeeds through the other two nodes
        for client in nodes.clients[:2]:
            assert read(client, bucket, key) == key.encode() * 1000
    nodes.nodes[victim].start()
    deadline = time.monotonic() + 15
    key = owned_by_victim[0]
    before = relay.count("GET")
    while time.monotonic() < deadline:  # health checks see it back: its keys return
        direct.put_object(Bucket=bucket, Key=key, Body=b"fresh")
        nodes.clients[victim].put_object(Bucket=bucket, Key=key, Body=b"fresh")
        if read(nodes.clients[0], bucket, key) == b"fresh":
            break
        time.sleep(0.5)
    assert read(nodes.clients[0], bucket, key) == b"fresh"
    assert relay.count("GET") > before
    direct.close()


def test_rendezvous_moves_about_one_nth_of_the_keys() -> None:
    nodes = [f"http://node{i}:8080" for i in range(5)]
    keys = [f"bucket/key-{i}" for i in range(20_000)]
    before = {key: ranked(key, nodes)[0] for key in keys}
    after = {key: ranked(key, nodes[:4])[0] for key in keys}  # one of five leaves
    moved = sum(1 for key in keys if before[key] != after[key])
    assert abs(moved / len(keys) - 1 / 5) < 0.02
    assert all(after[key] == before[key] for key in keys if before[key] != nodes[4])
    grown = {key: ranked(key, [*nodes, "http://node5:8080"])[0] for key in keys}
    moved = sum(1 for key in keys if before[key] != grown[key])
    assert abs(moved / len(keys) - 1 / 6) < 0.02
