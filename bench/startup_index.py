"""Start-up time of s3cache with a large index.

Method: build an index of N entries (default 1,000,000) with the store's own schema,
each entry with two present blocks, directly with SQLite (no data files: start-up must
not look at them); then start `s3cache serve` on that cache directory, several times,
and time from process start until `/_s3cache/healthz` answers, and until the first
GET of a cached entry answers from the cache (the upstream is a closed port: any
upstream request would fail). Reports the median of the runs. Never asserts.

    .venv/bin/python bench/startup_index.py [--entries 1000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from s3cache.sandbox.proxy import free_port
from s3cache.store import files
from s3cache.store.index import Index

BLOCK = 8 * 1024 * 1024


def build_index(cache_dir: Path, entries: int) -> None:
    index = Index(cache_dir / "index.sqlite3")
    db = index._db  # the benchmark fills the real schema directly, in bulk
    now = time.time()
    db.execute("BEGIN")
    batch = []
    for number in range(entries):
        key = f"dataset/train/shard-{number:08d}.tar"
        batch.append(
            (
                "bench",
                key,
                f'"{number:032x}"',
                2 * BLOCK,
                "Fri, 27 Nov 2026 07:00:00 GMT",
                "[]",
                0,
                files.file_name("bench", key, str(number)),
                BLOCK,
                2 * BLOCK,
                now,
                now,
            )
        )
        if len(batch) == 50_000:
            _insert(db, batch)
            batch = []
    _insert(db, batch)
    db.execute("COMMIT")
    db.execute("BEGIN")
    db.execute("INSERT INTO blocks SELECT id, 0, id FROM entries")
    db.execute("INSERT INTO blocks SELECT id, 1, id FROM entries")
    db.execute("COMMIT")
    index.close()


def _insert(db: object, batch: list[tuple[object, ...]]) -> None:
    db.executemany(  # type: ignore[attr-defined]
        "INSERT INTO entries (bucket, key, etag, size, last_modified, headers, dir, file,"
        " block_size, present_bytes, validated_at, accessed_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch,
    )


def time_start(cache_dir: Path) -> tuple[float, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true"
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3cache",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream-endpoint",
            f"http://127.0.0.1:{free_port()}",
            "--cache-dir",
            str(cache_dir),
            "--cache-size",
            "100TiB",
            "--log-level",
            "warning",
            # The HEAD below is unsigned: this measures start-up, not authentication.
            "--allow-anonymous",
            "true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _wait(f"http://127.0.0.1:{port}/_s3cache/healthz", started)
        # A HEAD of a cached entry is answered from the index, with no upstream.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/bench/dataset/train/shard-00123456.tar", method="HEAD"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        first_hit = time.perf_counter() - started
        return ready, first_hit
    finally:
        process.terminate()
        process.wait(60)


def _wait(url: str, started: float) -> float:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3cache-startup-") as tmp:
        cache_dir = Path(tmp)
        built = time.perf_counter()
        build_index(cache_dir, args.entries)
        size = (cache_dir / "index.sqlite3").stat().st_size
        print(
            f"built an index of {args.entries:,} entries ({size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - built:.1f} s"
        )
        runs = [time_start(cache_dir) for _ in range(args.runs)]
    ready = [r[0] for r in runs]
    first = [r[1] for r in runs]
    print(
        f"method: {platform.node() and 'this machine'}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, uvloop; process start -> /_s3cache/healthz answers, "
        f"and -> first HEAD of a cached entry answered; {args.runs} runs"
    )
    print(
        f"start-up to healthz:    median {statistics.median(ready):.3f} s "
        f"(min {min(ready):.3f}, max {max(ready):.3f})"
    )
    print(
        f"start-up to first hit:  median {statistics.median(first):.3f} s "
        f"(min {min(first):.3f}, max {max(first):.3f})"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "startup_index.json").write_text(
        json.dumps(
            {"entries": args.entries, "ready_seconds": ready, "first_hit_seconds": first}, indent=2
        )
    )


if __name__ == "__main__":
    main()
