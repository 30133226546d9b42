"""Cluster benchmark: upstream bytes for one cold epoch read through 3 nodes, and
aggregate warm throughput with 1, 2 and 3 nodes on this machine.

Method: SeaweedFS upstream behind a counting relay; N s3cache nodes on loopback forming
one cache (--peers, --cluster-secret), started together and read once every node's
readyz is 200; a dataset of OBJECTS objects of SIZE; a cold epoch where READERS
threads read every object through the nodes round-robin (each object from every node
once, so 3 reads per object for 3 nodes); then warm epochs with READERS threads spread
over the nodes. The nodes, the clients and the upstream share
the machine's cores: report as measured. Never asserts.

    .venv/bin/python bench/cluster.py [--objects 64] [--size 4MiB] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3

READERS = 12
BUCKET = "bench-cluster"


def client(endpoint: str, upstream: SeaweedS3) -> Any:
    return client_of(endpoint, upstream, max_pool_connections=READERS)


def start_nodes(
    count: int, workdir: Path, upstream: SeaweedS3, relay: Relay
) -> list[S3CacheProcess]:
    """The nodes, started together, once every one's readyz is 200 (as an orchestrator
    would send them traffic)."""
    nodes = [
        S3CacheProcess(workdir / f"n{count}-{i}", upstream, upstream_endpoint=relay.endpoint_url)
        for i in range(count)
    ]
    urls = ",".join(n.endpoint_url for n in nodes)
    for node in nodes:
        node._extra_args = [
            "--peers",
            urls,
            "--advertise-url",
            node.endpoint_url,
            "--cluster-secret",
            "bench-secret",
            "--log-level",
            "warning",
            "--access-log",
            "off",
            "--cache-size",
            "8GiB",
        ]
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda node: node.start(), nodes))
    for node in nodes:
        wait_ready(node)
    return nodes


def wait_ready(node: S3CacheProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{node.endpoint_url}/_s3cache/readyz", timeout=5):
                return
        except urllib.error.HTTPError as exc:
            exc.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.endpoint_url} not ready within {timeout}s")
        time.sleep(0.05)


def read_all(clients: list[Any], keys: list[str], rounds: int = 1) -> tuple[int, float]:
    jobs = [(clients[i % len(clients)], key) for r in range(rounds) for i, key in enumerate(keys)]

    def read(job: tuple[Any, str]) -> int:
        c, key = job
        return len(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    started = time.perf_counter()
    with ThreadPoolExecutor(READERS) as pool:
        total = sum(pool.map(read, jobs))
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--size", default="4MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    results: dict[str, Any] = {"objects": args.objects, "size": size, "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="s3cache-cluster-") as tmp:
        workdir = Path(tmp)
        with SeaweedS3(workdir / "upstream") as upstream, Relay(upstream.endpoint_url) as relay:
            direct = upstream.client()
            direct.create_bucket(Bucket=BUCKET)
            keys = [f"epoch/{i:04d}" for i in range(args.objects)]
            for key in keys:
                direct.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size))
            dataset = args.objects * size
            for count in (1, 2, 3):
                nodes = start_nodes(count, workdir, upstream, relay)
                clients = [client(n.endpoint_url, upstream) for n in nodes]
                relay.reset()
                read_all(clients, keys, rounds=count)  # cold: every object from every node
                cold_ratio = relay.bytes_sent() / dataset
                rates = []
                for _ in range(args.runs):
                    total, seconds = read_all(clients, keys, rounds=2)
                    rates.append(total / seconds / 1e6)
                results[f"{count}_nodes"] = {
                    "cold_upstream_bytes_over_dataset": cold_ratio,
                    "warm_mb_per_s": rates,
                }
                print(
                    f"{count} node(s): cold epoch upstream bytes = {cold_ratio:.2f} x dataset; "
                    f"warm aggregate {statistics.median(rates):.0f} MB/s "
                    f"(min {min(rates):.0f}, max {max(rates):.0f}) over {args.runs} runs"
                )
                for c in clients:
                    c.close()
                for node in nodes:
                    node.stop()
    print(
        f"method: {os.cpu_count()} cores shared by upstream, nodes and {READERS} boto3 reader "
        f"threads; {args.objects} objects x {args.size}; warm = 2 rounds over the dataset "
        f"spread over the nodes; median of {args.runs}"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
