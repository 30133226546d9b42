"""Three s3cache nodes on loopback as one cache, in front of one upstream (through a
counting relay): each object is fetched from the upstream once for the whole cluster;
a node that stops is routed around, and gets its keys back when it returns."""

from __future__ import annotations

import contextlib
import hashlib
import io
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
from s3cache.sandbox.relay import Fault, Relay
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import BLOCK, _client
from tests.sigv4_streaming import Keys, send, signed_streaming_put

SECRET = "cluster-secret-for-tests"


class Nodes:
    def __init__(
        self, tmp_path: Path, upstream: SeaweedS3, relay: Relay, extra: tuple[str, ...] = ()
    ) -> None:
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
                *extra,
            ]
        self.clients = [_client(node.endpoint_url, upstream) for node in self.nodes]

    def owner_index(self, bucket: str, key: str) -> int:
        urls = [node.endpoint_url for node in self.nodes]
        return urls.index(ranked(f"{bucket}/{key}", urls)[0])


@pytest.fixture
def cluster(tmp_path: Path, upstream: SeaweedS3) -> Iterator[tuple[Nodes, Relay]]:
    with _running(tmp_path, upstream) as running:
        yield running


@pytest.fixture
def writing(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> Iterator[tuple[Nodes, Relay]]:
    """The cluster with write rules: write-through under through/, write-back under back/."""
    rules = ("--write-rule", f"{bucket}/through/=through", "--write-rule", f"{bucket}/back/=back")
    with _running(tmp_path, upstream, *rules, "--writeback-retry-max", "0.5s") as running:
        yield running


@contextlib.contextmanager
def _running(tmp_path: Path, upstream: SeaweedS3, *extra: str) -> Iterator[tuple[Nodes, Relay]]:
    with Relay(upstream.endpoint_url) as relay:
        nodes = Nodes(tmp_path, upstream, relay, extra)
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


# --- writes: handled where the key's owner is ----------------------------------------


def stats_of(node: S3CacheProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/stats") as answer:
        data: dict[str, Any] = json.load(answer)
        return data


def flush_at(node: S3CacheProcess, bucket: str, prefix: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"bucket": bucket, "prefix": prefix}).encode()
    request = urllib.request.Request(f"{node.endpoint_url}/_s3cache/flush", body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def owned_by(nodes: Nodes, bucket: str, prefix: str, owner: int) -> str:
    """A key under ``prefix`` that node ``owner`` owns."""
    return next(
        f"{prefix}{n}" for n in range(1000) if nodes.owner_index(bucket, f"{prefix}{n}") == owner
    )


def multipart_upload(client: Any, bucket: str, key: str, body: bytes) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    client.upload_fileobj(io.BytesIO(body), bucket, key, Config=config)


@pytest.mark.parametrize("mode", ["through", "back"])
def test_writes_through_a_non_owner_are_handled_at_the_owner(
    writing: tuple[Nodes, Relay], upstream: SeaweedS3, bucket: str, mode: str
) -> None:
    """A PUT and a multipart upload sent to a node that does not own the key: the owner
    applies its write mode (the cache filled, or the write journaled and acknowledged
    before the upstream has it); the next GET through any node takes 0 upstream GETs;
    a flush at a third node returns once the owner's uploads are upstream."""
    nodes, relay = writing
    direct = upstream.client()
    owner = 1
    sender, third = nodes.clients[2], nodes.nodes[0]
    small = owned_by(nodes, bucket, f"{mode}/s", owner)
    big = owned_by(nodes, bucket, f"{mode}/b", owner)
    bodies = {small: os.urandom(3 * BLOCK + 5), big: os.urandom(12 * 2**20 + 7)}
    if mode == "back":
        relay.fault = Fault(status=503, match_method="PUT")  # the upstream refuses uploads
    answer = sender.put_object(Bucket=bucket, Key=small, Body=bodies[small])
    assert answer["ETag"] == f'"{hashlib.md5(bodies[small]).hexdigest()}"'
    multipart_upload(sender, bucket, big, bodies[big])
    writes = [stats_of(node)["writeback"]["writes"] for node in nodes.nodes]
    assert writes[owner] == {mode: 2} and writes[0] == writes[2] == {}
    if mode == "back":
        assert stats_of(nodes.nodes[owner])["writeback"]["pending_objects"] == 2
        with pytest.raises(Exception, match="404|Not Found"):
            direct.head_object(Bucket=bucket, Key=small)
    relay.reset()
    for client in nodes.clients:  # read-after-write through every node, from the owner
        for key, body in bodies.items():
            assert read(client, bucket, key) == body
    assert relay.count("GET") == 0
    threading.Timer(1.0, lambda: setattr(relay, "fault", None)).start()
    status, flushed = flush_at(third, bucket, f"{mode}/")
    assert status == 200 and flushed["unreachable_nodes"] == []
    assert flushed["flushed"] == (2 if mode == "back" else 0)
    for key, body in bodies.items():  # upstream when flush returned
        assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    assert not direct.list_multipart_uploads(Bucket=bucket).get("Uploads")
    direct.close()


def test_a_signed_streaming_write_is_checked_where_it_arrives(
    writing: tuple[Nodes, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    """aws-chunked with chunk signatures: the node the client reached checks every chunk
    and passes the owner the decoded body. A bad chunk signature is refused (403), and
    the owner acknowledges nothing."""
    nodes, _ = writing
    keys = Keys(upstream.access_key, upstream.secret_key, upstream.region)
    key = owned_by(nodes, bucket, "back/signed", 1)
    sender = nodes.nodes[0]
    port = int(sender.endpoint_url.rsplit(":", 1)[1])
    path = f"/{bucket}/{key}"
    good = os.urandom(200 * 1024)
    headers, body = signed_streaming_put(sender.endpoint_url, path, good, keys)
    answer = send(port, "PUT", path, headers, body)
    assert answer.status == 200, answer.body
    etag = {name.lower(): value for name, value in answer.headers.items()}["etag"]
    assert etag == f'"{hashlib.md5(good).hexdigest()}"'
    bad_payload = os.urandom(200 * 1024)
    headers, body = signed_streaming_put(sender.endpoint_url, path, bad_payload, keys)
    tampered = body.replace(bad_payload[70_000:70_010], bytes(10), 1)  # 2nd chunk's data
    refused = send(port, "PUT", path, headers, tampered)
    assert refused.status == 403 and b"SignatureDoesNotMatch" in refused.body
    writes = stats_of(nodes.nodes[1])["writeback"]
    assert writes["writes"] == {"back": 1}  # the good one only
    for client in nodes.clients:
        assert read(client, bucket, key) == good
    status, _ = flush_at(sender, bucket, "back/")
    assert status == 200
    direct = upstream.client()
    assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == good
    direct.close()


def test_deletes_through_any_node_go_upstream_after_the_pending_write_back(
    writing: tuple[Nodes, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    """A write-back pending at its owner, then a DeleteObject and a DeleteObjects of it
    through other nodes: the deletes reach the upstream after the upload (not before,
    which the upload would then undo), and no node serves the key afterwards."""
    nodes, relay = writing
    one, many = owned_by(nodes, bucket, "back/one", 1), owned_by(nodes, bucket, "back/many", 2)
    relay.fault = Fault(status=503, match_method="PUT")
    nodes.clients[0].put_object(Bucket=bucket, Key=one, Body=b"1" * 5000)
    nodes.clients[0].put_object(Bucket=bucket, Key=many, Body=b"2" * 5000)
    threading.Timer(1.0, lambda: setattr(relay, "fault", None)).start()
    nodes.clients[0].delete_object(Bucket=bucket, Key=one)  # its owner is node 1
    deleted = nodes.clients[0].delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": many}, {"Key": "back/other"}]}
    )
    assert {item["Key"] for item in deleted["Deleted"]} == {many, "back/other"}
    time.sleep(0.5)  # the relay records an exchange just after relaying it
    records = [(r.method, r.status, r.target.rstrip("=")) for r in relay.records()]
    assert records.index(("PUT", 200, f"/{bucket}/{one}")) < records.index(
        ("DELETE", 204, f"/{bucket}/{one}")
    ), records
    assert records.index(("PUT", 200, f"/{bucket}/{many}")) < records.index(
        ("POST", 200, f"/{bucket}?delete")
    ), records
    direct = upstream.client()
    for key in (one, many):
        with pytest.raises(Exception, match="404|Not Found"):
            direct.head_object(Bucket=bucket, Key=key)
        for client in nodes.clients:
            with pytest.raises(Exception, match="NoSuchKey"):
                client.get_object(Bucket=bucket, Key=key)
    assert all(stats_of(node)["writeback"]["pending_objects"] == 0 for node in nodes.nodes)
    direct.close()


def test_a_write_whose_owner_is_down_goes_to_the_next_node(
    writing: tuple[Nodes, Relay], bucket: str
) -> None:
    nodes, relay = writing
    urls = [node.endpoint_url for node in nodes.nodes]
    key = owned_by(nodes, bucket, "through/x", 2)
    successor = urls.index(ranked(f"{bucket}/{key}", urls)[1])
    sender = next(n for n in (0, 1) if n != successor)
    nodes.nodes[2].stop()
    body = os.urandom(2 * BLOCK)
    nodes.clients[sender].put_object(Bucket=bucket, Key=key, Body=body)
    assert stats_of(nodes.nodes[successor])["writeback"]["writes"] == {"through": 1}
    relay.reset()
    for client in nodes.clients[:2]:
        assert read(client, bucket, key) == body
    assert relay.count("GET") == 0
    # A flush cannot tell what the stopped node holds: it says so.
    status, answer = flush_at(nodes.nodes[sender], bucket, "")
    assert status == 503 and answer["unreachable_nodes"] == [urls[2]]


def test_a_node_back_serves_no_copy_older_than_the_writes_made_while_it_was_away(
    cluster: tuple[Nodes, Relay], bucket: str
) -> None:
    """A key's owner stops; its key is written through another node meanwhile (the
    next node in rendezvous order owns it then). Back, the owner must not serve the
    copy it had cached before (well within its TTL): it asks the upstream again."""
    nodes, _ = cluster
    victim = 2
    key = owned_by(nodes, bucket, "away/", victim)
    nodes.clients[0].put_object(Bucket=bucket, Key=key, Body=b"old" * 1000)
    for client in nodes.clients:
        assert read(client, bucket, key) == b"old" * 1000  # cached at the owner
    nodes.nodes[victim].stop()
    nodes.clients[0].put_object(Bucket=bucket, Key=key, Body=b"new" * 1000)
    assert read(nodes.clients[1], bucket, key) == b"new" * 1000
    nodes.nodes[victim].start()
    wait_until_all_see_each_other(nodes)
    for client in nodes.clients:
        assert read(client, bucket, key) == b"new" * 1000
