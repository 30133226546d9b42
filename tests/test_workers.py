"""``s3cache serve --workers 2``: a real supervisor, a primary and a secondary worker on
one port (SO_REUSEPORT), in front of the real upstream through a counting relay.

Clients use many connections, so that the kernel spreads them over both workers."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from s3cache.sandbox.proxy import client_of
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import (
    BLOCK,
    Cached,
    _client,
    get,
    new_connection_per_request,
    put,
    running_cache,
)

CONNECTIONS = 12


@pytest.fixture
def workers(tmp_path: Path, upstream: SeaweedS3) -> Iterator[Cached]:
    with running_cache(tmp_path, upstream, "--workers", "2", cache_size="256MiB") as cached:
        wait_for(lambda: bool(cached.stats()["workers"]["secondaries"]), "the secondary links")
        yield cached


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_all(cached: Cached, bucket: str, keys: list[str]) -> list[bytes]:
    """Each key read on its own new connection, CONNECTIONS at once."""
    client = cached.spread_client
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return list(pool.map(lambda key: get(client, bucket, key), keys))


def worker_pids(cached: Cached) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's children and their environment."""
    assert cached.proxy.pid is not None
    children = Path(f"/proc/{cached.proxy.pid}/task/{cached.proxy.pid}/children").read_text()
    found = {}
    for pid in map(int, children.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # it exited just now
        for item in environ:
            if item.startswith(b"S3CACHE_INTERNAL_WORKER_INDEX="):
                found[int(item.split(b"=", 1)[1])] = pid
    return found


def metric_total(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_both_workers_serve_and_the_metrics_count_every_request_once(
    workers: Cached, upstream: SeaweedS3, bucket: str
) -> None:
    bodies = {f"k{i}": put(workers, bucket, f"k{i}", 3 * BLOCK + 11) for i in range(16)}
    keys = list(bodies) * 6
    for key, body in zip(keys, read_all(workers, bucket, keys), strict=True):
        assert body == bodies[key]
    # Each block came from the upstream once, whichever worker was asked.
    workers.settle()
    assert len(workers.gets()) == 16 * 4
    # The secondary served reads itself (it reports them to the primary in batches).
    wait_for(
        lambda: workers.stats()["workers"]["secondaries"]["1"]["reads_served"] > 0,
        "reads served by the secondary",
    )
    # One scrape sees every worker: each GET counted once, not once per worker it
    # crossed, and the bytes served add up to what the clients received.
    text = workers.metrics()
    assert metric_total(text, 's3cache_requests_total{operation="get_object"') == len(keys)
    served = metric_total(text, "s3cache_served_bytes_total")
    assert served == sum(len(bodies[key]) for key in keys)
    # The secondary's hits are counted as the primary's are, by cache rule too.
    assert metric_total(text, "s3cache_rule_served_bytes_total") == served
    assert metric_total(text, "s3cache_rule_reads_total") == len(keys)
    assert metric_total(text, "s3cache_cache_capacity_bytes") == 256 * 1024**2


def test_a_write_through_any_worker_is_seen_by_every_next_read(
    workers: Cached, upstream: SeaweedS3, bucket: str
) -> None:
    client = _client(workers.proxy.endpoint_url, upstream)
    try:
        for version in range(4):
            body = os.urandom(2 * BLOCK + version)
            # A write through s3cache, on a new connection each time (either worker).
            workers.spread_client.put_object(Bucket=bucket, Key="hot", Body=body)
            digests = {
                hashlib.sha256(b).hexdigest() for b in read_all(workers, bucket, ["hot"] * 24)
            }
            assert digests == {hashlib.sha256(body).hexdigest()}
        assert get(client, bucket, "hot") == body
    finally:
        client.close()


def test_a_forged_worker_signature_is_refused(workers: Cached) -> None:
    request = urllib.request.Request(
        f"{workers.proxy.endpoint_url}/_s3cache/stats",
        headers={"X-S3cache-Worker": f"1:{int(time.time())}:0000", "X-S3cache-Client": "10.0.0.1"},
    )
    # Whichever worker takes it, the primary checks the claim and refuses it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert b"<Code>AccessDenied</Code>" in refused.value.read()


def test_a_killed_worker_is_restarted_and_reads_go_on(
    workers: Cached, upstream: SeaweedS3, bucket: str
) -> None:
    bodies = {f"k{i}": put(workers, bucket, f"k{i}", BLOCK + i) for i in range(8)}
    keys = list(bodies) * 3
    assert read_all(workers, bucket, keys) == [bodies[k] for k in keys]
    for victim in (1, 0):  # the secondary, then the primary
        before = worker_pids(workers)
        assert sorted(before) == [0, 1]
        os.kill(before[victim], signal.SIGKILL)

        def restarted(victim: int = victim, before: dict[int, int] = before) -> bool:
            now = worker_pids(workers)
            return now.get(victim, before[victim]) != before[victim]

        wait_for(restarted, "the worker restarted")
        wait_for(
            lambda: _linked(workers),
            "the secondary linked to the primary again",
        )
        assert read_all(workers, bucket, keys) == [bodies[k] for k in keys]
    assert workers.proxy.stop() == 0  # SIGTERM: every worker drains and exits


def _linked(cached: Cached) -> bool:
    try:
        return bool(cached.stats()["workers"]["secondaries"])
    except (OSError, KeyError):
        return False


def test_a_killed_supervisor_takes_its_workers_and_a_restart_serves_at_once(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--workers", "2", cache_size="256MiB") as cached:
        wait_for(lambda: _linked(cached), "the secondary links")
        bodies = {f"k{i}": put(cached, bucket, f"k{i}", BLOCK + i) for i in range(8)}
        keys = list(bodies) * 3
        assert read_all(cached, bucket, keys) == [bodies[k] for k in keys]
        workers = worker_pids(cached)
        assert sorted(workers) == [0, 1]
        old_run_dir = _run_dir(workers[0])
        assert cached.proxy.pid is not None
        os.kill(cached.proxy.pid, signal.SIGKILL)
        assert cached.proxy.wait(10) == -signal.SIGKILL
        try:
            wait_for(
                lambda: not any(_alive(pid) for pid in workers.values()),
                "the workers to die with their supervisor",
                timeout=10,
            )
        finally:  # orphans left by a failure do not outlive the test
            for pid in workers.values():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        # No orphan holds the port. (A killed process's main thread is a zombie before
        # its other threads have exited and its sockets closed: waited for, bounded.)
        wait_for(lambda: _bindable(cached.proxy.port), "the port to be free", timeout=10)
        # Again on the same port and cache directory. The client is made first (each
        # read will open its own connection) so that the reads start as soon as any
        # worker accepts connections: the primary may still be opening the index.
        client = _client_without_retries(cached, upstream)
        try:
            cached.proxy.start(wait=False)
            wait_for(lambda: _accepts(cached.proxy.port), "a worker listening")
            assert _read_once_each(client, bucket, keys) == [bodies[k] for k in keys]
            writer = client_of(cached.proxy.endpoint_url, upstream)
            new = os.urandom(BLOCK + 99)
            writer.put_object(Bucket=bucket, Key="k0", Body=new)
            writer.close()
            assert set(_read_once_each(client, bucket, ["k0"] * 24)) == {new}
        finally:
            client.close()
        # The killed supervisor's run directory went when the new one started.
        assert not old_run_dir.exists()


def test_only_run_directories_nobody_holds_are_removed(tmp_path: Path) -> None:
    import fcntl

    from s3cache.supervisor import LOCK_NAME, RUN_PREFIX, remove_dead_run_dirs

    held, dead, unknown = (tmp_path / f"{RUN_PREFIX}{name}" for name in ("a", "b", "c"))
    for run_dir in (held, dead, unknown):
        run_dir.mkdir()
        (run_dir / "primary.sock").write_bytes(b"")
    for run_dir in (held, dead):
        (run_dir / LOCK_NAME).write_bytes(b"")
    lock = os.open(held / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a live supervisor (or worker) holds it
        remove_dead_run_dirs(tmp_path)
        assert held.exists() and not dead.exists() and unknown.exists()
    finally:
        os.close(lock)
    remove_dead_run_dirs(tmp_path)  # its last holder is gone
    assert not held.exists() and unknown.exists()


def _client_without_retries(cached: Cached, upstream: SeaweedS3) -> Any:
    """Each request on its own new connection, with no retry at all."""
    return new_connection_per_request(
        client_of(
            cached.proxy.endpoint_url,
            upstream,
            retries={"total_max_attempts": 1},
            max_pool_connections=CONNECTIONS,
        )
    )


def _read_once_each(client: Any, bucket: str, keys: list[str]) -> list[bytes]:
    """Each key read once (on its own new connection), CONNECTIONS at once, with no
    retry at all: a 503 fails the read."""
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return list(pool.map(lambda key: get(client, bucket, key), keys))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper holds no socket: not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _run_dir(pid: int) -> Path:
    """The run directory of a worker's supervisor (its primary's socket is in it)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == b"S3CACHE_INTERNAL_WORKER_PRIMARY":
            return Path(value.decode().removeprefix("unix:")).parent
    raise AssertionError(f"worker {pid} has no primary URL")


def _bindable(port: int) -> bool:
    """A plain listener (no SO_REUSEPORT) could take the port."""
    with socket.socket() as plain:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        try:
            plain.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_sighup_reloads_every_worker(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    config = tmp_path / "s3cache.toml"
    config.write_text('cache_ttl = "1h"\n')
    direct = upstream.client()
    direct.put_object(Bucket=bucket, Key="k", Body=b"first")
    with running_cache(tmp_path, upstream, "--workers", "2", "--config", str(config)) as cached:
        wait_for(lambda: _linked(cached), "the secondary links")
        assert set(read_all(cached, bucket, ["k"] * 24)) == {b"first"}
        direct.put_object(Bucket=bucket, Key="k", Body=b"second")
        # Both workers answer from the cache for an hour.
        assert set(read_all(cached, bucket, ["k"] * 24)) == {b"first"}
        config.write_text('cache_ttl = "0s"\n')
        cached.proxy.send_signal(signal.SIGHUP)  # to the supervisor, which passes it on
        wait_for(
            lambda: cached.proxy.log_tail(200).count("SIGHUP: reloaded") == 2,
            "both workers reloaded",
        )
        assert set(read_all(cached, bucket, ["k"] * 24)) == {b"second"}
    direct.close()


def test_a_secondary_keeps_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    from s3cache.server.secondary import MAX_OPEN_FILES, Replicas
    from s3cache.server.workerlink import Ready
    from s3cache.store.entry import ObjectMeta

    replicas = Replicas()
    meta = ObjectMeta(etag='"e"', size=1, last_modified="Thu, 01 Jan 2026 00:00:00 GMT", headers=())
    opened = []
    for i in range(MAX_OPEN_FILES + 40):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x")
        replicas.add(Ready(i, "b", f"k{i}", str(path), time.time(), meta, stamp=None))
        replica = replicas.get("b", f"k{i}")
        assert replica is not None
        replica.fd = os.open(path, os.O_RDONLY)
        if i == 0:
            replica.pins += 1  # being sent from: never closed under it
        replicas.opened(replica)
        opened.append(replica)
    assert sum(r.fd is not None for r in opened) == MAX_OPEN_FILES
    assert opened[0].fd is not None
    # An entry that goes while it is being sent from is closed when the send ends.
    replicas.remove([0])
    assert opened[0].fd is not None
    opened[0].pins -= 1
    opened[0].close_if_unused()
    assert opened[0].fd is None
    replicas.clear()
    assert all(r.fd is None for r in opened)
