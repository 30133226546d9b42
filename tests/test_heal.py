"""A damaged or missing cache file heals (issue #15, item 3).

A block file deleted, truncated (to 0, or mid-block), with a byte flipped, or replaced
by a directory, while s3cache is stopped or running (the entry in its in-memory view,
its file open): the next read returns the object's bytes (refetched, or passed
through), never a 500 or a short body; the index is repaired (damaged blocks cleared,
or the entry dropped), so that the read after is a hit again, also after a restart.

``s3cache verify`` and ``POST /_s3cache/verify`` report what they found (missing and
truncated files, damaged blocks, orphan files) with 200, and repair the index as
diskcache's ``check(fix=True)`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.server.secondary import READS_FLUSH_SECONDS
from tests.cached_proxy import BLOCK, Cached, _client, put, running_cache

pytestmark = pytest.mark.faults

SIZE = 3 * BLOCK + 1000  # four blocks, the last one short


def data_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "data").rglob("*") if p.parent.name != "data")


def the_file(tmp_path: Path) -> Path:
    (path,) = data_files(tmp_path)
    return path


def delete(path: Path) -> None:
    path.unlink()


def truncate_to_zero(path: Path) -> None:
    os.truncate(path, 0)


def truncate_mid_block(path: Path) -> None:
    os.truncate(path, BLOCK + BLOCK // 2)


def flip_byte(path: Path) -> None:
    with path.open("r+b") as file:
        file.seek(BLOCK + 17)
        byte = file.read(1)
        file.seek(BLOCK + 17)
        file.write(bytes([byte[0] ^ 0xFF]))


def replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def replace_subdir_by_file(path: Path) -> None:
    """The file's directory (data/XY/) becomes a plain file: ENOTDIR on open."""
    shutil.rmtree(path.parent)
    path.parent.write_bytes(b"not a directory")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "deleted": delete,
    "truncated-to-0": truncate_to_zero,
    "truncated-mid-block": truncate_mid_block,
    "byte-flipped": flip_byte,
    "replaced-by-directory": replace_by_directory,
    "subdir-replaced-by-file": replace_subdir_by_file,
}


def read_ok(cached: Cached, bucket: str, key: str, body: bytes) -> None:
    """One GET through s3cache: 200, the whole body, byte for byte (boto3 checks the
    length against Content-Length and raises on a short body or an error status)."""
    answer = cached.client.get_object(Bucket=bucket, Key=key)
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    data = answer["Body"].read()
    assert len(data) == len(body)
    assert data == body


def assert_heals(cached: Cached, bucket: str, key: str, body: bytes) -> None:
    """The read after the damage is right; the one after that is right too, and the
    next one is a hit (the index was repaired and the bytes cached again)."""
    read_ok(cached, bucket, key, body)
    cached.settle()
    read_ok(cached, bucket, key, body)
    cached.settle()
    cached.relay.reset()
    read_ok(cached, bucket, key, body)
    assert cached.relay.records() == [], "not a hit after the repair"


def assert_hit_after_restart(cached: Cached, bucket: str, key: str, body: bytes) -> None:
    """After a restart, the index and the files agree: a hit, byte for byte."""
    cached.settle()
    cached.proxy.stop()
    cached.proxy.start()
    cached.relay.reset()
    read_ok(cached, bucket, key, body)
    read_ok(cached, bucket, key, body)
    cached.settle()
    assert [r for r in cached.relay.records() if r.method == "GET"] == []


def log_has_no_500(cached: Cached) -> None:
    """No request failed inside s3cache (a handler's exception is logged with its
    traceback, by aiohttp or by the error middleware)."""
    text = cached.proxy.log_path.read_text(errors="replace")
    assert "Error handling request" not in text, cached.proxy.log_tail()
    assert "Traceback" not in text, cached.proxy.log_tail()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_while_stopped_heals(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, damage: str
) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "obj", SIZE)
        read_ok(cached, bucket, "obj", body)
        cached.settle()
        cached.proxy.stop()
        DAMAGE[damage](the_file(tmp_path))
        cached.proxy.start()
        assert_heals(cached, bucket, "obj", body)
        assert_hit_after_restart(cached, bucket, "obj", body)
        log_has_no_500(cached)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_while_running_heals(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, damage: str
) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "obj", SIZE)
        read_ok(cached, bucket, "obj", body)
        cached.settle()
        read_ok(cached, bucket, "obj", body)  # a hit: in the view, verified, file open
        DAMAGE[damage](the_file(tmp_path))
        assert_heals(cached, bucket, "obj", body)
        assert_hit_after_restart(cached, bucket, "obj", body)
        log_has_no_500(cached)


def verify(cached: Cached) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{cached.proxy.endpoint_url}/_s3cache/verify", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.status, json.load(answer)


def verify_cli(cached: Cached) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3cache", "verify", "--endpoint", cached.proxy.endpoint_url],
        capture_output=True,
        text=True,
        timeout=120,
    )


KEYS = ("deleted", "truncated", "flipped", "directory", "fine")


def damage_all(tmp_path: Path, files_by_key: dict[str, Path]) -> Path:
    """Damage every object but "fine" its own way; add an orphan file (no row)."""
    delete(files_by_key["deleted"])
    truncate_mid_block(files_by_key["truncated"])
    flip_byte(files_by_key["flipped"])
    replace_by_directory(files_by_key["directory"])
    orphan = tmp_path / "cache" / "data" / "00" / ("0" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    os.utime(orphan, (1, 1))  # old: not a file being created right now
    return orphan


def file_of_each(cached: Cached, tmp_path: Path, bucket: str) -> dict[str, Path]:
    """Which file holds which object: read them one by one and see what appears."""
    seen: set[Path] = set()
    found = {}
    for key in KEYS:
        read_ok(cached, bucket, key, cached.bodies[key])  # type: ignore[attr-defined]
        cached.settle()
        (new,) = set(data_files(tmp_path)) - seen
        seen.add(new)
        found[key] = new
    return found


@pytest.mark.parametrize("when", ["stopped", "running"])
def test_verify_reports_and_repairs(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, when: str
) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        bodies = {key: put(cached, bucket, key, SIZE) for key in KEYS}
        cached.bodies = bodies  # type: ignore[attr-defined]
        files_by_key = file_of_each(cached, tmp_path, bucket)
        if when == "stopped":
            cached.proxy.stop()
            orphan = damage_all(tmp_path, files_by_key)
            cached.proxy.start()
        else:
            orphan = damage_all(tmp_path, files_by_key)
        status, report = verify(cached)
        assert status == 200
        assert report["entries"] == len(KEYS)
        assert report["missing_files"] == 2  # deleted; a directory where the file was
        assert report["truncated_files"] == 1
        assert report["corrupt_blocks"] >= 2  # flipped: 1; truncated: blocks 1..3
        # (Stopped, the orphan was old at the restart: the sweep after start-up may
        # have removed it first.)
        assert report["orphan_files"] == 1 or (when == "stopped" and not report["orphan_files"])
        assert report["entries_dropped"] == 2
        problems = {item["key"]: item["problem"] for item in report["damaged"]}
        assert problems == {
            "deleted": "missing",
            "directory": "missing",
            "truncated": "truncated",
            "flipped": "corrupt",
        }
        assert not orphan.exists()
        # Repaired: a second pass finds nothing, and the CLI says so.
        clean = verify_cli(cached)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert ["missing_files", "0"] in [line.split() for line in clean.stdout.splitlines()]
        for key in KEYS:
            read_ok(cached, bucket, key, bodies[key])
        cached.settle()
        cached.relay.reset()
        for key in KEYS:
            read_ok(cached, bucket, key, bodies[key])
        assert cached.relay.records() == []
        log_has_no_500(cached)


def test_verify_cli_reports_damage(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "obj", SIZE)
        read_ok(cached, bucket, "obj", body)
        cached.settle()
        delete(the_file(tmp_path))
        result = verify_cli(cached)
        assert result.returncode == 3, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert any(line.split() == ["missing_files", "1"] for line in lines), result.stdout
        assert any("missing" in line and "obj" in line for line in lines), result.stdout
        read_ok(cached, bucket, "obj", body)


def read_many(cached: Cached, bucket: str, key: str, body: bytes) -> None:
    """Reads on 24 new connections, 8 at a time: the kernel spreads them over the
    workers (each answered by whichever worker accepted it)."""
    client = cached.spread_client

    def one(_: int) -> None:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert data == body

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(24)))


def secondary_reads(cached: Cached) -> int:
    secondaries = cached.stats()["workers"]["secondaries"]
    return sum(int(worker["reads_served"]) for worker in secondaries.values())


def settled_secondary_reads(cached: Cached) -> int:
    """The reads the secondaries served, once no report of earlier reads is on its way
    (the count stays the same for longer than the secondaries take to report)."""
    count = secondary_reads(cached)
    while True:
        time.sleep(READS_FLUSH_SECONDS * 1.5)
        now = secondary_reads(cached)
        if now == count:
            return count
        count = now


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory, upstream: SeaweedS3
) -> Iterator[tuple[Cached, Path]]:
    """s3cache with two workers, shared by the tests of this module that damage one
    object each (its own key in its own bucket): and its workdir."""
    workdir = tmp_path_factory.mktemp("two-workers")
    with running_cache(workdir, upstream, "--workers", "2", "--scrub-rate", "0") as cached:
        deadline = time.monotonic() + 30
        while not cached.stats()["workers"]["secondaries"] and time.monotonic() < deadline:
            time.sleep(0.05)
        yield cached, workdir


@pytest.mark.parametrize(
    "damage", ["byte-flipped", "deleted", "truncated-mid-block", "truncated-to-0"]
)
def test_damage_while_running_heals_with_workers(
    two_workers: tuple[Cached, Path], bucket: str, damage: str
) -> None:
    """Two workers: the secondary serves the object from its own open fd of the file."""
    cached, workdir = two_workers
    before = set(data_files(workdir))
    body = put(cached, bucket, "obj", SIZE)
    read_ok(cached, bucket, "obj", body)
    cached.settle()
    (path,) = set(data_files(workdir)) - before  # this object's file
    served_before = settled_secondary_reads(cached)  # (earlier tests' reads)
    read_many(cached, bucket, "obj", body)
    deadline = time.monotonic() + 10
    while secondary_reads(cached) == served_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert secondary_reads(cached) > served_before  # the secondary has the file open
    DAMAGE[damage](path)
    read_many(cached, bucket, "obj", body)
    cached.settle()
    read_many(cached, bucket, "obj", body)
    cached.settle()
    cached.relay.reset()
    read_many(cached, bucket, "obj", body)
    assert cached.gets() == [], "not a hit after the repair"
    log_has_no_500(cached)


def test_file_cut_short_mid_response_aborts_it_and_heals(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """A hit whose file is truncated while its body is going out (after its blocks were
    checked): the client sees the connection close before Content-Length bytes, never
    a complete short body; the next read is right."""
    size = 96 * BLOCK  # 24 MiB: more than the socket buffers hold
    with running_cache(tmp_path, upstream, "--scrub-rate", "0") as cached:
        body = put(cached, bucket, "big", size)
        read_ok(cached, bucket, "big", body)
        cached.settle()
        read_ok(cached, bucket, "big", body)  # a hit: checked, file open
        v4 = _client(cached.proxy.endpoint_url, upstream, signature_version="s3v4")
        url = urllib.parse.urlsplit(
            v4.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "big"}, ExpiresIn=300
            )
        )
        v4.close()
        with socket.socket() as sock:
            # A small receive buffer (no autotuning): most of the body is still in the
            # file, not in socket buffers, when the file is cut.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(60)
            sock.connect((url.hostname, url.port))
            sock.sendall(
                f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
            )
            received = b""
            while b"\r\n\r\n" not in received or len(received) < 1024 * 1024:
                received += sock.recv(65536)
            head, _, first = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert f"content-length: {size}".encode() in head.lower()
            truncate_to_zero(the_file(tmp_path))
            rest = b""
            while piece := sock.recv(1 << 20):
                rest += piece
        got = first + rest
        assert len(got) < size  # the connection closed short: never a whole short body
        assert got == body[: len(got)]
        assert_heals(cached, bucket, "big", body)
        log_has_no_500(cached)


def test_a_file_damaged_before_a_secondary_opens_it_is_not_served(
    two_workers: tuple[Cached, Path], bucket: str
) -> None:
    """The primary announced the object (every block checked), then the file was
    damaged before any secondary opened it: a secondary serves only the file as the
    primary checked it, so its first open must not take the damaged file for it."""
    cached, workdir = two_workers
    before = set(data_files(workdir))
    body = put(cached, bucket, "obj", SIZE)
    read_ok(cached, bucket, "obj", body)  # answered by the primary: announced to all
    cached.settle()
    (path,) = set(data_files(workdir)) - before
    time.sleep(READS_FLUSH_SECONDS * 2)  # the announcement is on the channel
    served_before = settled_secondary_reads(cached)
    flip_byte(path)
    read_many(cached, bucket, "obj", body)  # some on the secondary: right bytes only
    cached.settle()
    read_many(cached, bucket, "obj", body)
    deadline = time.monotonic() + 10
    while secondary_reads(cached) == served_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert secondary_reads(cached) > served_before  # the secondary serves it, healed
    log_has_no_500(cached)
