"""One cache shared by several jobs: a training set read every epoch while a scan passes.

The benchmark of issue #17 ("A cache shared by many jobs"), run for each eviction policy
(``--eviction-policy lru`` and ``s3fifo``) side by side, on the same data, in one run.
Real processes: SeaweedFS on loopback as the upstream, s3cache as ``s3cache serve``
(one worker, block size = object size), boto3 clients in threads of this process.

Case 1, "scan": job A reads its training set (0.6 x cache_size) every epoch in a
seeded shuffle (2 reader threads) while scan C reads 3 x cache_size once, in key
order (2 reader threads), concurrently, from the start. A's hit ratio per epoch is
taken from ``s3cache_rule_reads_total{rule="job_a"}`` deltas (the buckets are named by
cache rules that set nothing but a name). Warm epochs: from the third on, the first
in which a policy that keeps what is read again can hit (epoch 1 is cold; in epoch 2
A's objects are read for the second time, as a scan's never are).

Case 2, "manifests": jobs B (0.5 x cache_size) and D (1.0 x) each submit their
epoch's order (and the next one, ``append``) to ``/_s3cache/manifest`` and read it
(2 reader threads each), in rounds (both jobs read one epoch per round), while the
same scan runs. Upstream bytes of the jobs per round = ``s3cache_upstream_bytes_total``
delta minus the scan's (``s3cache_rule_served_bytes_total{rule="scan",
source="upstream"}``: the scan is read once, every byte a miss). The minimum the
cache size allows per round is B + D - cache_size (0.5 x cache_size): at most
cache_size of the 1.5 x cache_size read every round can stay. Shown beside it: the
ratio to B + D - 0.97 x cache_size, the minimum with what eviction leaves in the cache
(``cache_low_watermark``, 0.97 by default; eviction runs from 0.98 down to it).

Median of ``--runs`` runs (each on a fresh cache); prints the method and a table,
writes bench/results/shared_cache.{md,json}. Never asserts.

    .venv/bin/python bench/shared_cache.py [--quick] [--cache-size 128MiB]
        [--object-size 256KiB] [--epochs 6] [--rounds 4] [--runs 3]
        [--policies lru,s3fifo]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `s3cache` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3cache.config import parse_size
from s3cache.epoch import submit_epoch
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

SEED = 1717
JOBS = {"job-a": 0.6, "scan": 3.0, "job-b": 0.5, "job-d": 1.0}  # bucket -> x cache_size
READERS = 2
EVICTED = "s3cache_rule_evicted_bytes_total"
LOW_WATERMARK = 0.97  # s3cache's default cache_low_watermark
RULES = "".join(
    f'[[cache_rules]]\nname = "{bucket.replace("-", "_")}"\nprefix = "{bucket}"\n\n'
    for bucket in JOBS
)


@dataclass
class Params:
    cache_size: int
    object_size: int
    epochs: int
    rounds: int
    runs: int
    policies: list[str]
    cases: list[str]
    s3cache_args: list[str]

    def low_watermark(self) -> float:
        """cache_low_watermark as the s3cache flags set it."""
        for arg in self.s3cache_args:
            if arg.startswith("--cache-low-watermark="):
                return float(arg.split("=", 1)[1])
        return LOW_WATERMARK

    def count(self, bucket: str) -> int:
        return round(JOBS[bucket] * self.cache_size / self.object_size)


@dataclass
class Result:
    policy: str
    run: int
    case: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of the s3cache process


def say(text: str) -> None:
    print(text, flush=True)


def keys(bucket: str, params: Params) -> list[str]:
    return [f"o-{n:05d}" for n in range(params.count(bucket))]


def shuffle(items: list[str], salt: int) -> list[str]:
    order = list(items)
    random.Random(SEED * 1000 + salt).shuffle(order)
    return order


def upload(upstream: SeaweedS3, params: Params) -> None:
    client = upstream.client()
    body = os.urandom(params.object_size)
    for bucket in JOBS:
        client.create_bucket(Bucket=bucket)
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda key, b=bucket: client.put_object(Bucket=b, Key=key, Body=body),
                    keys(bucket, params),
                )
            )
    client.close()


def metrics(endpoint: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{endpoint}/_s3cache/metrics", timeout=30) as answer:
        text = answer.read().decode()
    values = {}
    # Samples with labels and without (the prefetch counters have none).
    for name, labels, value in re.findall(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels))
        values[(name, pairs)] = float(value)
    return values


def total(values: dict[Any, float], name: str, **want: str) -> float:
    wanted = set(want.items())
    return sum(v for (n, labels), v in values.items() if n == name and wanted <= labels)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **want: str) -> float:
    return total(after, name, **want) - total(before, name, **want)


def rule_reads(values: dict[Any, float], rule: str) -> dict[str, float]:
    return {
        outcome: total(values, "s3cache_rule_reads_total", rule=rule, outcome=outcome)
        for outcome in ("hit", "miss", "partial", "bypass")
    }


def read_all(client: Any, bucket: str, order: list[str], size: int, stop: threading.Event) -> int:
    def load(key: str) -> int:
        if stop.is_set():
            return 0
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if len(body) != size:
            raise RuntimeError(f"{bucket}/{key}: {len(body)} bytes, not {size}")
        return 1

    with ThreadPoolExecutor(READERS) as pool:
        return sum(pool.map(load, order))


class Scan:
    """Scan C in the background: every object of the scan bucket once, in key order."""

    def __init__(self, client: Any, params: Params) -> None:
        self.done = 0
        self.stop = threading.Event()
        self._client, self._params = client, params
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        order = keys("scan", self._params)
        for first in range(0, len(order), 16):
            if self.stop.is_set():
                return
            self.done += read_all(
                self._client, "scan", order[first : first + 16], self._params.object_size, self.stop
            )

    def __enter__(self) -> Scan:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join()

    def fraction(self) -> float:
        return self.done / self._params.count("scan")


def cpu_seconds(proxy: S3CacheProcess) -> float:
    """User + system CPU time of the s3cache process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{proxy.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_cache(upstream: SeaweedS3, policy: str, params: Params, workdir: Path) -> S3CacheProcess:
    config = workdir / "rules.toml"
    config.write_text(RULES)
    proxy = S3CacheProcess(
        workdir,
        upstream,
        extra_args=[
            "--config", str(config),
            "--cache-size", str(params.cache_size),
            "--block-size", str(params.object_size),
            "--eviction-policy", policy,
            "--access-log", "off",
            "--log-level", "warning",
            *params.s3cache_args,
        ],
    )  # fmt: skip
    proxy.start()
    return proxy


def case_scan(upstream: SeaweedS3, policy: str, run: int, params: Params, workdir: Path) -> Result:
    result = Result(policy, run, "scan")
    proxy = start_cache(upstream, policy, params, workdir)
    began = time.perf_counter()
    try:
        endpoint = proxy.endpoint_url
        client = client_of(endpoint, upstream, max_pool_connections=8, retries={"max_attempts": 2})
        with Scan(client, params) as scan:
            for epoch in range(1, params.epochs + 1):
                before = rule_reads(metrics(endpoint), "job_a")
                started = time.perf_counter()
                order = shuffle(keys("job-a", params), run * 100 + epoch)
                read_all(client, "job-a", order, params.object_size, threading.Event())
                after = rule_reads(metrics(endpoint), "job_a")
                reads = {k: after[k] - before[k] for k in after}
                result.epochs.append(
                    {
                        "epoch": epoch,
                        "hit_ratio": reads["hit"] / max(1.0, sum(reads.values())),
                        "reads": reads,
                        "seconds": time.perf_counter() - started,
                        "scan_done": scan.fraction(),
                    }
                )
        client.close()
        result.cpu_seconds = cpu_seconds(proxy)
    finally:
        proxy.stop()
    result.seconds = time.perf_counter() - began
    return result


def case_manifests(
    upstream: SeaweedS3, policy: str, run: int, params: Params, workdir: Path
) -> Result:
    result = Result(policy, run, "manifests")
    proxy = start_cache(upstream, policy, params, workdir)
    began = time.perf_counter()
    try:
        endpoint = proxy.endpoint_url
        client = client_of(endpoint, upstream, max_pool_connections=8, retries={"max_attempts": 2})
        jobs = ("job-b", "job-d")
        with Scan(client, params) as scan, ThreadPoolExecutor(len(jobs)) as pool:
            for number in range(1, params.rounds + 1):
                orders = {job: shuffle(keys(job, params), run * 100 + number) for job in jobs}
                following = {
                    job: shuffle(keys(job, params), run * 100 + number + 1) for job in jobs
                }
                for job in jobs:
                    submit_epoch(endpoint, job, orders[job])
                    if number < params.rounds:
                        submit_epoch(endpoint, job, following[job], append=True)
                before = metrics(endpoint)
                started = time.perf_counter()
                never = threading.Event()
                readers = [
                    pool.submit(read_all, client, job, orders[job], params.object_size, never)
                    for job in jobs
                ]
                for reader in readers:
                    reader.result()
                after = metrics(endpoint)
                upstream_bytes = delta(before, after, "s3cache_upstream_bytes_total")
                scan_bytes = delta(
                    before, after, "s3cache_rule_served_bytes_total", rule="scan", source="upstream"
                )
                jobs_bytes = upstream_bytes - scan_bytes
                wasted = delta(before, after, "s3cache_prefetch_wasted_bytes_total")
                prefetched = delta(before, after, "s3cache_prefetched_bytes_total")
                reads = {
                    job: {
                        outcome: count - rule_reads(before, job.replace("-", "_"))[outcome]
                        for outcome, count in rule_reads(after, job.replace("-", "_")).items()
                    }
                    for job in jobs
                }
                read = sum(params.count(job) for job in jobs) * params.object_size
                minimum = read - params.cache_size
                # What eviction leaves (cache_low_watermark, 0.97 by default) can stay.
                minimum_low = read - int(params.cache_size * params.low_watermark())
                result.epochs.append(
                    {
                        "round": number,
                        "jobs_upstream_bytes": jobs_bytes,
                        "minimum_bytes": minimum,
                        "ratio_to_minimum": jobs_bytes / minimum,
                        "ratio_to_minimum_at_low_watermark": jobs_bytes / minimum_low,
                        "prefetch_wasted_bytes": wasted,
                        "prefetched_bytes": prefetched,
                        "reads": reads,
                        "evicted_bytes": {
                            rule: delta(before, after, EVICTED, rule=rule)
                            for rule in ("job_b", "job_d", "scan")
                        },
                        "seconds": time.perf_counter() - started,
                        "scan_done": scan.fraction(),
                    }
                )
        client.close()
        result.cpu_seconds = cpu_seconds(proxy)
    finally:
        proxy.stop()
    result.seconds = time.perf_counter() - began
    return result


CASES = (case_scan, case_manifests)


def summarize(results: list[Result], params: Params) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for policy in params.policies:
        mine = {
            case: [r for r in results if r.policy == policy and r.case == case]
            for case in params.cases
        }
        entry: dict[str, Any] = {}
        if mine.get("scan"):
            scans = mine["scan"]
            entry["job_a_hit_ratio_by_epoch"] = [
                statistics.median(r.epochs[e]["hit_ratio"] for r in scans)
                for e in range(params.epochs)
            ]
            warm = [statistics.mean(e["hit_ratio"] for e in r.epochs[2:]) for r in scans]
            entry["job_a_warm_hit_ratio"] = statistics.median(warm)
            entry["job_a_warm_hit_ratio_runs"] = warm
        if mine.get("manifests"):
            manifests = mine["manifests"]
            entry["manifest_ratio_to_minimum_by_round"] = [
                statistics.median(r.epochs[n]["ratio_to_minimum"] for r in manifests)
                for n in range(params.rounds)
            ]
            later = [
                statistics.mean(e["ratio_to_minimum"] for e in r.epochs[1:]) for r in manifests
            ]
            entry["manifest_ratio_to_minimum_rounds_2_on"] = statistics.median(later)
            entry["manifest_ratio_runs"] = later
            low = [
                statistics.mean(e["ratio_to_minimum_at_low_watermark"] for e in r.epochs[1:])
                for r in manifests
            ]
            entry["manifest_ratio_to_minimum_at_low_watermark_rounds_2_on"] = statistics.median(
                low
            )
        for case, runs in mine.items():
            if runs:
                entry[f"{case}_cpu_seconds"] = statistics.median(r.cpu_seconds for r in runs)
        summary[policy] = entry
    return summary


def table(summary: dict[str, Any], params: Params) -> str:
    lines = [
        "| policy | A hit ratio by epoch | A warm (3..) | manifests: upstream / minimum by "
        "round | rounds 2.. | rounds 2.., minimum at the low watermark | s3cache CPU s "
        "(scan, manifests) |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, s in summary.items():
        epochs = " ".join(f"{v:.2f}" for v in s.get("job_a_hit_ratio_by_epoch", []))
        rounds = " ".join(f"{v:.2f}" for v in s.get("manifest_ratio_to_minimum_by_round", []))
        warm = s.get("job_a_warm_hit_ratio")
        later = s.get("manifest_ratio_to_minimum_rounds_2_on")
        low = s.get("manifest_ratio_to_minimum_at_low_watermark_rounds_2_on")
        lines.append(
            f"| {policy} | {epochs or '-'} | {'-' if warm is None else f'{warm:.2f}'} | "
            f"{rounds or '-'} | {'-' if later is None else f'{later:.2f}'} | "
            f"{'-' if low is None else f'{low:.2f}'} | "
            f"{s.get('scan_cpu_seconds', math.nan):.1f}, "
            f"{s.get('manifests_cpu_seconds', math.nan):.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32MiB cache, 1 run")
    parser.add_argument("--cache-size", default="128MiB")
    parser.add_argument("--object-size", default="256KiB")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--policies", default="lru,s3fifo")
    parser.add_argument("--cases", default="scan,manifests")
    parser.add_argument(
        "--s3cache-arg", action="append", default=[], help="one more s3cache flag, --FLAG=VALUE"
    )
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    params = Params(
        cache_size=parse_size("32MiB" if args.quick else args.cache_size),
        object_size=parse_size(args.object_size),
        epochs=args.epochs,
        rounds=args.rounds,
        runs=1 if args.quick else args.runs,
        policies=args.policies.split(","),
        cases=args.cases.split(","),
        s3cache_args=args.s3cache_arg,
    )
    return args, params


def main(argv: list[str] | None = None) -> int:
    args, params = parse_args(argv)
    counts = ", ".join(f"{b} {params.count(b)}" for b in JOBS)
    method = (
        f"method: cache_size {params.cache_size / 2**20:g} MiB, objects of "
        f"{params.object_size / 2**10:g} KiB (one block each); objects per bucket: {counts}; "
        f"case scan: job A {params.epochs} epochs (seeded shuffles) with scan C concurrent; "
        f"case manifests: jobs B and D with epoch manifests, {params.rounds} rounds, scan "
        f"concurrent; {READERS} reader threads per job (boto3); median of {params.runs} runs, "
        f"a fresh cache each; policies {', '.join(params.policies)} in the same run; "
        f"SeaweedFS on loopback, no WAN emulation; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at start, Python {platform.python_version()}"
    )
    say(method)
    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="s3cache-shared-") as tmp:
        workdir = Path(tmp)
        with SeaweedS3(workdir / "upstream") as upstream:
            upload(upstream, params)
            say(f"uploaded in {time.perf_counter() - started:.0f} s")
            for run in range(1, params.runs + 1):
                for policy in params.policies:
                    for case in CASES:
                        if case.__name__.removeprefix("case_") not in params.cases:
                            continue
                        where = Path(tempfile.mkdtemp(dir=workdir))
                        result = case(upstream, policy, run, params, where)
                        results.append(result)
                        say(f"run {run} {policy} {result.case}: {json.dumps(result.epochs)}")
    summary = summarize(results, params)
    text = table(summary, params)
    elapsed = time.perf_counter() - started
    say("")
    say(text)
    say(f"total {elapsed:.0f} s")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / "shared_cache"
    out.with_suffix(".md").write_text(
        f"# A cache shared by jobs\n\n`bench/shared_cache.py`: see its docstring.\n\n"
        f"{method}\n\n{text}\n\ntotal {elapsed:.0f} s\n"
    )
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "params": asdict(params),
                "cpu_count": os.cpu_count(),
                "load_average_end": os.getloadavg(),
                "summary": summary,
                "results": [asdict(r) for r in results],
                "seconds": elapsed,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
