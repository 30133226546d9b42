"""Two s3cache nodes of two workers each (``--workers 2 --peers``) on loopback as one
cache, in front of one upstream through a counting relay. Every read and write goes on
a new connection, so that the kernel spreads them over the workers of a node
(SO_REUSEPORT): each object crosses the upstream once for the cluster, a write through
any worker of any node is seen by the next read through any other, and a killed
worker or node is routed around."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from s3cache.hashing import ranked
from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, _client, get, new_connection_per_request
from tests.test_workers import wait_for, worker_pids

SECRET = "cluster-secret-for-tests"
CONNECTIONS = 12


class _Supervised(NamedTuple):
    proxy: S3CacheProcess  # what ``worker_pids`` looks at


class Cluster:
    def __init__(self, root: Path, upstream: SeaweedS3, relay: Relay) -> None:
        self.relay = relay
        self.nodes = [
            S3CacheProcess(root / f"node{i}", upstream, upstream_endpoint=relay.endpoint_url)
            for i in range(2)
        ]
        self.urls = [node.endpoint_url for node in self.nodes]
        for node in self.nodes:
            node._extra_args = [
                *("--workers", "2", "--peers", ",".join(self.urls)),
                *("--advertise-url", node.endpoint_url, "--cluster-secret", SECRET),
                *("--peer-timeout", "1s", "--block-size", str(BLOCK)),
            ]
        # One request a connection: each reaches whichever worker the kernel picks.
        self.clients = [new_connection_per_request(_client(url, upstream)) for url in self.urls]

    def owner(self, bucket: str, key: str) -> int:
        return self.urls.index(ranked(f"{bucket}/{key}", self.urls)[0])

    def keys_of(self, bucket: str, owner: int, count: int, prefix: str = "k") -> list[str]:
        keys = (f"{prefix}{i}" for i in range(1000))
        return [key for key in keys if self.owner(bucket, key) == owner][:count]

    def stats(self, index: int) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.urls[index]}/_s3cache/stats", timeout=10) as answer:
            data: dict[str, Any] = json.load(answer)
            return data

    def ready(self, index: int) -> bool:
        """The node's secondary is linked and its primary sees no peer down."""
        try:
            stats = self.stats(index)
        except OSError:
            return False
        return bool(stats["workers"]["secondaries"]) and not stats["cluster"]["down"]

    def wait_ready(self) -> None:
        for index in range(len(self.nodes)):
            wait_for(lambda index=index: self.ready(index), f"node {index} ready")

    def reads_served_by_secondaries(self) -> list[int]:
        return [
            sum(s["reads_served"] for s in self.stats(i)["workers"]["secondaries"].values())
            for i in range(len(self.nodes))
        ]

    def upstream_gets(self, bucket: str) -> int:
        """GETs of the bucket's objects at the upstream, once no fill is in flight."""
        for index in range(len(self.nodes)):
            wait_for(lambda index=index: not self.stats(index)["fills_in_flight"], "fills")
        time.sleep(0.2)  # the relay records an exchange just after relaying it
        return sum(
            1
            for record in self.relay.records()
            if record.method == "GET" and record.path.startswith(f"/{bucket}/")
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream: SeaweedS3) -> Iterator[Cluster]:
    with Relay(upstream.endpoint_url) as relay:
        running = Cluster(tmp_path_factory.mktemp("cluster"), upstream, relay)
        try:
            for node in running.nodes:
                node.start()
            running.wait_ready()
            yield running
        finally:
            for client in running.clients:
                client.close()
            for node in running.nodes:
                node.stop()


def read_everywhere(cluster: Cluster, bucket: str, keys: list[str]) -> list[bytes]:
    """Each key read through every node, each read on a new connection, many at once."""
    jobs = [(client, key) for key in keys for client in cluster.clients]
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return list(pool.map(lambda job: get(job[0], bucket, job[1]), jobs))


def test_every_object_crosses_the_upstream_once(
    cluster: Cluster, upstream: SeaweedS3, bucket: str
) -> None:
    direct = upstream.client()
    bodies = {}
    for owner in (0, 1):
        for key in cluster.keys_of(bucket, owner, 6):
            bodies[key] = os.urandom(2 * BLOCK + 1 + len(bodies))
            direct.put_object(Bucket=bucket, Key=key, Body=bodies[key])
    direct.close()
    served_before = cluster.reads_served_by_secondaries()
    keys = list(bodies) * 4
    assert read_everywhere(cluster, bucket, keys) == [bodies[k] for k in keys for _ in (0, 1)]
    # Three blocks an object, each fetched once for the whole cluster, whichever worker
    # of whichever node was asked.
    assert cluster.upstream_gets(bucket) == 3 * len(bodies)
    # The secondaries of both nodes served hits themselves (reported in batches).
    wait_for(
        lambda: all(
            now > before
            for now, before in zip(
                cluster.reads_served_by_secondaries(), served_before, strict=True
            )
        ),
        "reads served by the secondaries of both nodes",
    )


def test_read_after_write_through_any_worker_of_any_node(cluster: Cluster, bucket: str) -> None:
    for owner in (0, 1):
        key = cluster.keys_of(bucket, owner, 1, prefix="hot")[0]
        for version in range(4):
            body = os.urandom(BLOCK + version)
            writer = cluster.clients[version % 2]  # the owner, then the other node
            writer.put_object(Bucket=bucket, Key=key, Body=body)
            digests = {
                hashlib.sha256(b).hexdigest() for b in read_everywhere(cluster, bucket, [key] * 8)
            }
            assert digests == {hashlib.sha256(body).hexdigest()}
        # A DeleteObjects through the node that does not own the key: dropped at the
        # owner, by every worker.
        cluster.clients[1 - owner].delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key}]})
        for client in cluster.clients * 8:
            with pytest.raises(client.exceptions.NoSuchKey):
                client.get_object(Bucket=bucket, Key=key)


def test_a_forged_peer_signature_is_refused_by_every_worker(
    cluster: Cluster, upstream: SeaweedS3, bucket: str
) -> None:
    key = cluster.keys_of(bucket, 0, 1, prefix="peer")[0]
    body = os.urandom(1000)
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key=key, Body=body)
    direct.close()
    read_everywhere(cluster, bucket, [key] * 8)  # announced to node 0's secondary
    forged = {"X-S3cache-Peer": f"{int(time.time())}:{'0' * 64}", "Connection": "close"}
    url = f"{cluster.urls[0]}/{bucket}/{key}"
    answers = {answer_of(urllib.request.Request(url, headers=forged)) for _ in range(CONNECTIONS)}
    assert answers == {(403, "AccessDenied")}


def answer_of(request: urllib.request.Request) -> tuple[int, str]:
    """The status of an answer, and the S3 error code in its body if there is one."""
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read().decode()
        return exc.code, body.partition("<Code>")[2].partition("</Code>")[0]


def test_a_killed_secondary_is_restarted_and_reads_go_on(
    cluster: Cluster, upstream: SeaweedS3, bucket: str
) -> None:
    direct = upstream.client()
    bodies = {f"w{i}": os.urandom(BLOCK + 1 + i) for i in range(8)}
    for key, body in bodies.items():
        direct.put_object(Bucket=bucket, Key=key, Body=body)
    direct.close()
    keys = list(bodies) * 2
    expected = [bodies[k] for k in keys for _ in (0, 1)]
    assert read_everywhere(cluster, bucket, keys) == expected
    for index, node in enumerate(cluster.nodes):
        before = worker_pids(_Supervised(node))
        os.kill(before[1], signal.SIGKILL)
        assert read_everywhere(cluster, bucket, keys) == expected  # while it is down too

        def restarted(node: S3CacheProcess = node, before: dict[int, int] = before) -> bool:
            return worker_pids(_Supervised(node)).get(1, before[1]) != before[1]

        wait_for(restarted, f"node {index}'s secondary restarted")
        cluster.wait_ready()
        assert read_everywhere(cluster, bucket, keys) == expected
    assert cluster.upstream_gets(bucket) == 2 * len(bodies)  # two blocks an object, once


def test_a_killed_node_hands_its_keys_over_and_gets_them_back(
    cluster: Cluster, upstream: SeaweedS3, bucket: str
) -> None:
    """Node 1 is killed: node 0 serves (and caches) node 1's keys meanwhile. Once node 1
    is back they are its again: a write at node 1 is seen through every worker of node
    0, whose own copy, cached while it owned the key, is never served again."""
    victim, survivor = cluster.nodes[1], 0
    keys = cluster.keys_of(bucket, 1, 4, prefix="moving")
    direct = upstream.client()
    for key in keys:
        direct.put_object(Bucket=bucket, Key=key, Body=b"old " + key.encode())
    direct.close()
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)  # the supervisor: its workers die with it
    victim.stop()
    old = [b"old " + key.encode() for key in keys]
    client = cluster.clients[survivor]
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        for _ in range(2):  # cached at node 0, then served by its workers
            assert list(pool.map(lambda key: get(client, bucket, key), keys * 6)) == old * 6
    wait_for(lambda: cluster.stats(survivor)["cluster"]["down"] == [cluster.urls[1]], "down")
    victim.start()
    cluster.wait_ready()
    # A write at node 0 waits until node 0's secondary has taken all the primary told
    # it before: the ownership that changed when node 1 came back, too.
    unrelated = cluster.keys_of(bucket, survivor, 1, prefix="sync")[0]
    client.put_object(Bucket=bucket, Key=unrelated, Body=b"sync")
    new = [b"new " + key.encode() for key in keys]
    for key, body in zip(keys, new, strict=True):
        cluster.clients[1].put_object(Bucket=bucket, Key=key, Body=body)
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        assert list(pool.map(lambda key: get(client, bucket, key), keys * 6)) == new * 6
