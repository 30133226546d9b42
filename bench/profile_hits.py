"""Profile s3cache's small-object hit path under wrk.

SeaweedFS and s3cache start on loopback; ``--objects`` objects of ``--size`` are uploaded,
read once through s3cache (so every later GET is a hit), and wrk then sends presigned GETs
over ``--connections`` connections for ``--seconds``. With ``--py-spy`` the s3cache
processes are sampled by py-spy meanwhile (``--py-spy-format``: ``raw`` collapsed stacks,
``speedscope`` or ``flamegraph``) and the busiest functions are printed: own time
(leaf frames) and total time (anywhere on the stack). Extra s3cache flags go after ``--``.

A benchmark, not a test: it reports, it does not assert.

    .venv/bin/python bench/profile_hits.py [--objects 1000] [--size 100KiB] [--seconds 10]
        [--connections 64] [--py-spy] [-- --workers 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.scenarios import process_tree
from s3cache.config import parse_size
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _top(collapsed: Path, count: int = 25) -> str:
    """Own and total sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        n = int(number)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "own time:"]
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in own.most_common(count)]
    lines.append("total time:")
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in total.most_common(count)]
    return "\n".join(lines)


def _py_spy(py_spy: str, pid: int, out: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [py_spy, "record", "-p", str(pid), "-o", str(out), "-r", "200"]
    command += ["-d", str(int(args.seconds)), "-f", args.py_spy_format]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--size", default="100KiB")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--py-spy", action="store_true", help="sample s3cache with py-spy")
    parser.add_argument("--py-spy-format", default="raw")
    parser.add_argument("extra", nargs="*", help="s3cache serve flags (after --)")
    args = parser.parse_args()
    size = parse_size(args.size)
    wrk = loadgen.wrk_path()
    if wrk is None:
        sys.exit("wrk not found (apt-get install wrk)")
    py_spy = str(Path(sys.executable).parent / "py-spy")
    if args.py_spy and not Path(py_spy).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)

    with tempfile.TemporaryDirectory(prefix="s3cache-profile-") as tmp:
        work = Path(tmp)
        with SeaweedS3(work / "seaweed") as upstream:
            bucket = "profile"
            upstream.client().create_bucket(Bucket=bucket)
            body = b"x" * size
            keys = [f"obj/{i:06d}" for i in range(args.objects)]
            for key in keys:
                upstream.client().put_object(Bucket=bucket, Key=key, Body=body)
            flags = ["--access-log", "off", "--cache-ttl", "1h", *args.extra]
            with S3CacheProcess(work / "cache", upstream, extra_args=flags) as cache:
                client = client_of(cache.endpoint_url, upstream, signature_version="s3v4")
                for key in keys:
                    client.get_object(Bucket=bucket, Key=key)["Body"].read()
                urls = [
                    client.generate_presigned_url(
                        "get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=3600
                    )
                    for k in keys
                ]
                script = work / "hits.lua"
                loadgen.write_wrk_script(script, [loadgen.split_url(u)[2] for u in urls])
                assert cache.pid is not None
                rates = []
                for run in range(args.runs):
                    spies = []
                    if args.py_spy:
                        RESULTS.mkdir(exist_ok=True)
                        for pid in process_tree(cache.pid):
                            out = RESULTS / f"profile_hits_{pid}.{args.py_spy_format}"
                            spies.append((out, _py_spy(py_spy, pid, out, args)))
                        time.sleep(0.5)
                    pids = process_tree(cache.pid)
                    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
                    result = loadgen.run_wrk(
                        wrk, cache.endpoint_url, script, 2, args.connections, args.seconds
                    )
                    cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before
                    rates.append(result.requests_per_second)
                    print(
                        f"run {run + 1}: {result.requests_per_second:,.0f} req/s, "
                        f"s3cache CPU {cpu / args.seconds:.0%} of a core, "
                        f"{cpu / max(result.requests, 1) * 1e6:.0f} us per request; "
                        f"wrk {result.cpu_seconds / args.seconds:.0%} of a core, "
                        f"{result.cpu_us_per_request:.0f} us per request; "
                        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                        f"non-2xx {result.non_2xx}, socket errors {result.socket_errors}",
                        flush=True,
                    )
                    for out, spy in spies:
                        spy.wait(60)
                        print(f"py-spy: {out.name}")
                        if args.py_spy_format == "raw":
                            print(_top(out))


if __name__ == "__main__":
    main()
