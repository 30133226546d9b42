"""Training epochs through s3cache over an emulated WAN link: stall fraction and hit ratio.

The epoch simulation of the "Training access patterns" issue (point 6). A dataset of N
objects (default 200 x 1 MiB) lives in a real S3 server (SeaweedFS on loopback); between
it and its readers sits an emulated WAN link (a Relay, in its own process: +20 ms before
each response, 25 MB/s per connection). A training loop reads the dataset for several
epochs, in a new seeded shuffle each epoch, and computes for a fixed time per object
(default 20 ms, one object per step).

The consumer is a data loader as PyTorch's DataLoader(num_workers=2, prefetch_factor=2)
works: ``--readers`` threads (2) sharing one boto3 client, at most ``2 x readers``
objects requested ahead of the step being computed; the training step waits for its
object (the stall), then sleeps for the compute time. Two readers over the WAN link
(~15 MB/s each for 1 MiB objects: 20 ms + 42 ms per GET) cannot keep up with the
consumer (52 MB/s), so the direct read stalls and the cache has something to hide;
with ``--readers 4`` the direct read keeps up (about 2% stall). Every object's SHA-256 is checked in
the reader threads. Stall fraction = time the step waited for its object / epoch time;
the epoch time includes the sampler's work (the manifest submissions).

Modes, with the same shuffles:

    direct    consumer -> relay -> upstream, no cache (the reference)
    lru       consumer -> s3cache -> relay -> upstream, no manifest (plain LRU)
    manifest  the same, the sampler calling submit_epoch(order of epoch e) at its
              start and submit_epoch(order of epoch e+1, append=True) right after (it
              knows its seeds)

each s3cache mode with the cache twice the dataset and half the dataset, on a fresh
cache. Hit ratio = reads.hit / (hit + miss + partial + bypass) in the epoch, from
/_s3cache/stats deltas; WAN bytes = s3cache_upstream_bytes_total delta. Upstream
bandwidth (for the cold-epoch target) is measured: the rate of a warm job (POST
/_s3cache/prefetch of the dataset) through the same relay into a fresh s3cache with the
same flags, i.e. what s3cache pulls with its prefetch concurrency (the nominal per-
connection cap x prefetch_concurrency is printed beside it). Consumer rate = object
size / compute time.

Targets (PASS/MISS, never asserted): warm epochs stall < 5%; with the dataset twice the
cache, the manifest's hit ratio >= 0.95 x cache/dataset (plain LRU shown beside it); a
cold epoch with a manifest <= 1.1 x max(dataset / upstream bandwidth, dataset / consumer
rate). Prints the method and a table, writes bench/results/epochs.{md,json,png}.

    .venv/bin/python bench/epochs.py [--quick] [--objects 200] [--object-size 1MiB]
        [--epochs 4] [--compute-ms 20] [--readers 2] [--modes direct,lru,manifest]
        [--cache-ratios 2,0.5] [--no-append] [--untuned] [--s3cache-arg=--FLAG=VALUE ...]

s3cache runs with ``--block-size 1MiB --prefetch-concurrency 8`` (``--untuned``: its
defaults); ``--s3cache-arg`` adds flags. ``--no-append``: the manifest mode does not
submit the next epoch's order.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `s3cache` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from s3cache.config import parse_size
from s3cache.epoch import submit_epoch
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

BUCKET = "epochs"
PREFIX = "train/"
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1234
#: s3cache flags of every s3cache run.
BASE_ARGS = ["--access-log", "off", "--log-level", "warning"]
#: Then these, unless --untuned (see the module's report in bench/results/epochs.md).
TUNED_ARGS = ["--block-size", "1MiB", "--prefetch-concurrency", "8"]

# The relay runs in its own process, so that its pacing does not share a GIL with the
# consumer's threads. It prints its endpoint and stops when its stdin closes.
_RELAY_SCRIPT = """
import sys
from s3cache.sandbox.relay import Relay
relay = Relay(sys.argv[1], delay=float(sys.argv[2]), bandwidth=float(sys.argv[3]))
relay.start()
print(relay.endpoint_url, flush=True)
sys.stdin.read()
relay.stop()
"""


@dataclass
class Params:
    objects: int
    object_size: int
    epochs: int
    compute: float
    readers: int
    depth: int
    delay: float
    bandwidth: float
    s3cache_args: list[str]
    append: bool = True  # the manifest mode submits the next epoch's order too

    @property
    def dataset(self) -> int:
        return self.objects * self.object_size


@dataclass
class Epoch:
    epoch: int
    seconds: float
    stall_seconds: float
    stall_fraction: float
    hit_ratio: float | None
    reads: dict[str, float] = field(default_factory=dict)
    wan_bytes: float = 0.0
    evicted_bytes: float = 0.0
    prefetched_bytes: float = 0.0
    stalled_steps: int = 0  # steps that waited more than 1 ms
    stall_by_quarter: list[float] = field(default_factory=list)  # stall s per epoch quarter


@dataclass
class Run:
    mode: str
    cache_size: int | None
    epochs: list[Epoch]
    log_tail: str = ""

    @property
    def label(self) -> str:
        if self.cache_size is None:
            return self.mode
        return f"{self.mode}, cache {self.cache_size / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def wan_relay(target: str, delay: float, bandwidth: float) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _RELAY_SCRIPT, target, str(delay), str(bandwidth)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip()
        if not endpoint.startswith("http://"):
            raise RuntimeError(f"the relay did not start (said {endpoint!r})")
        yield endpoint
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fetch_json(url: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def snapshot(endpoint: str) -> dict[str, Any]:
    """/_s3cache/stats, plus the upstream body bytes from /_s3cache/metrics."""
    stats: dict[str, Any] = fetch_json(f"{endpoint}/_s3cache/stats")
    with urllib.request.urlopen(f"{endpoint}/_s3cache/metrics", timeout=30) as answer:
        text = answer.read().decode()
    stats["wan_bytes"] = sum(
        float(value)
        for value in re.findall(r"^s3cache_upstream_bytes_total\{[^}]*\} (\S+)$", text, re.M)
    )
    return stats


# --------------------------------------------------------------------------- dataset


def make_dataset(upstream: SeaweedS3, params: Params) -> dict[str, str]:
    client = upstream.client()
    client.create_bucket(Bucket=BUCKET)
    digests = {}
    for index in range(params.objects):
        key = f"{PREFIX}sample-{index:05d}.bin"
        body = os.urandom(params.object_size)
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        digests[key] = hashlib.sha256(body).hexdigest()
    client.close()
    return digests


def epoch_order(keys: list[str], epoch: int) -> list[str]:
    """The sampler's seeded shuffle of an epoch (the same in every mode)."""
    order = sorted(keys)
    random.Random(SEED * 1000 + epoch).shuffle(order)
    return order


# --------------------------------------------------------------------------- the loop


def read_epoch(
    client: Any, order: list[str], digests: dict[str, str], params: Params, pool: ThreadPoolExecutor
) -> tuple[float, float, list[float]]:
    """One epoch of the training loop; (seconds, stalled seconds, wait of each step)."""

    def load(key: str) -> int:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if hashlib.sha256(body).hexdigest() != digests[key]:
            raise RuntimeError(f"wrong bytes for {key}")
        return len(body)

    started = time.perf_counter()
    pending: deque[Future[int]] = deque()
    upcoming = iter(order)
    for key in upcoming:
        pending.append(pool.submit(load, key))
        if len(pending) >= params.depth:
            break
    waits = []
    while pending:
        asked = time.perf_counter()
        pending.popleft().result()
        waits.append(time.perf_counter() - asked)
        following = next(upcoming, None)
        if following is not None:
            pending.append(pool.submit(load, following))
        time.sleep(params.compute)  # the training step
    return time.perf_counter() - started, sum(waits), waits


def run_mode(
    mode: str,
    cache_size: int | None,
    upstream: SeaweedS3,
    wan: str,
    digests: dict[str, str],
    params: Params,
    workdir: Path,
) -> Run:
    keys = sorted(digests)
    proxy = None
    if cache_size is not None:
        args = [*BASE_ARGS, "--cache-size", str(cache_size), *params.s3cache_args]
        proxy = S3CacheProcess(
            Path(tempfile.mkdtemp(dir=workdir)), upstream, upstream_endpoint=wan, extra_args=args
        )
        proxy.start()
    run = Run(mode, cache_size, [])
    try:
        endpoint = proxy.endpoint_url if proxy else wan
        client = client_of(
            endpoint,
            upstream,
            retries={"max_attempts": 1},
            max_pool_connections=params.readers,
            read_timeout=120,
        )
        with ThreadPoolExecutor(params.readers) as pool:
            before = snapshot(endpoint) if proxy else None
            for number in range(1, params.epochs + 1):
                order = epoch_order(keys, number)
                began = time.perf_counter()
                if mode == "manifest" and proxy:
                    submit_epoch(endpoint, BUCKET, order)
                    if number < params.epochs and params.append:
                        following = epoch_order(keys, number + 1)
                        submit_epoch(endpoint, BUCKET, following, append=True)
                sampler = time.perf_counter() - began
                seconds, stalled, waits = read_epoch(client, order, digests, params, pool)
                seconds += sampler
                stalled += sampler
                epoch = Epoch(
                    epoch=number,
                    seconds=seconds,
                    stall_seconds=stalled,
                    stall_fraction=stalled / seconds,
                    hit_ratio=None,
                    stalled_steps=sum(1 for wait in waits if wait > 0.001),
                    stall_by_quarter=[
                        sum(waits[q * len(waits) // 4 : (q + 1) * len(waits) // 4])
                        for q in range(4)
                    ],
                )
                if proxy and before is not None:
                    after = snapshot(endpoint)
                    reads = {k: v - before["reads"].get(k, 0) for k, v in after["reads"].items()}
                    total = sum(reads.get(k, 0) for k in ("hit", "miss", "partial", "bypass"))
                    epoch.reads = reads
                    epoch.hit_ratio = reads["hit"] / total if total else None
                    epoch.wan_bytes = after["wan_bytes"] - before["wan_bytes"]
                    epoch.evicted_bytes = after["evicted_bytes"] - before["evicted_bytes"]
                    epoch.prefetched_bytes = (
                        after["prefetch"]["bytes"] - before["prefetch"]["bytes"]
                    )
                    before = after
                run.epochs.append(epoch)
                say(describe_epoch(run, epoch, params))
        client.close()
    finally:
        if proxy:
            run.log_tail = proxy.log_tail(20)
            proxy.stop()
    return run


def measure_upstream_bandwidth(
    upstream: SeaweedS3, wan: str, params: Params, workdir: Path
) -> tuple[float, float]:
    """A warm job of the whole dataset into a fresh s3cache (cache 2x the dataset):
    (bytes/s, seconds)."""
    args = [*BASE_ARGS, "--cache-size", str(2 * params.dataset), *params.s3cache_args]
    proxy = S3CacheProcess(
        Path(tempfile.mkdtemp(dir=workdir)), upstream, upstream_endpoint=wan, extra_args=args
    )
    with proxy:
        started = time.perf_counter()
        job = fetch_json(
            f"{proxy.endpoint_url}/_s3cache/prefetch", {"bucket": BUCKET, "prefix": PREFIX}
        )
        deadline = started + 600
        while job["state"] in ("listing", "running") and time.perf_counter() < deadline:
            time.sleep(0.02)
            job = fetch_json(f"{proxy.endpoint_url}/_s3cache/jobs/{job['id']}")
        seconds = time.perf_counter() - started
        if job["state"] != "done":
            say(f"warning: the warm job ended {job['state']}: {job['message']}")
        return job["bytes_done"] / seconds, seconds


# --------------------------------------------------------------------------- report


def say(text: str) -> None:
    print(text, flush=True)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def describe_epoch(run: Run, epoch: Epoch, params: Params) -> str:
    text = (
        f"  {run.label:<28} epoch {epoch.epoch}: {epoch.seconds:6.2f} s, "
        f"stall {pct(epoch.stall_fraction):>6} ({epoch.stalled_steps} steps waited)"
    )
    if run.cache_size is not None:
        text += (
            f", hit ratio {pct(epoch.hit_ratio):>6}, WAN {epoch.wan_bytes / params.dataset:.2f}"
            f" x dataset, evicted {epoch.evicted_bytes / 2**20:.0f} MiB"
        )
    return text


def evaluate(
    runs: list[Run], params: Params, upstream_rate: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The targets of the issue, PASS/MISS each (never asserted)."""
    consumer_rate = params.object_size / params.compute
    cold_bound = max(params.dataset / upstream_rate, params.dataset / consumer_rate)
    bounds = {
        "consumer_rate_bytes_per_s": consumer_rate,
        "upstream_rate_bytes_per_s": upstream_rate,
        "cold_epoch_bound_s": cold_bound,
    }
    targets: list[dict[str, Any]] = []
    for run in runs:
        if run.cache_size is None:
            continue
        warm = run.epochs[1:]
        if warm:
            worst = max(e.stall_fraction for e in warm)
            small = run.cache_size >= params.dataset
            targets.append(
                {
                    "target": f"warm epochs stall < 5% ({run.label})",
                    "expected": small or run.mode == "manifest",
                    "value": pct(worst) + " worst",
                    "pass": worst < 0.05,
                }
            )
        if run.mode == "manifest":
            cold = run.epochs[0]
            targets.append(
                {
                    "target": f"cold epoch <= 1.1 x {cold_bound:.2f} s ({run.label})",
                    "expected": True,
                    "value": (
                        f"{cold.seconds:.2f} s = {cold.seconds / cold_bound:.2f} x bound "
                        f"(waited {cold.stall_seconds:.2f} s; the loop's own time "
                        f"{cold.seconds - cold.stall_seconds:.2f} s vs "
                        f"{params.objects * params.compute:.2f} s of nominal compute)"
                    ),
                    "pass": cold.seconds <= 1.1 * cold_bound,
                }
            )
        if run.cache_size < params.dataset and warm:
            need = 0.95 * run.cache_size / params.dataset
            worst_hit = min(e.hit_ratio or 0.0 for e in warm)
            targets.append(
                {
                    "target": f"hit ratio >= {need:.3f} (0.95 x cache/dataset) ({run.label})",
                    "expected": run.mode == "manifest",
                    "value": f"{worst_hit:.3f} worst warm epoch",
                    "pass": worst_hit >= need,
                }
            )
    return targets, bounds


def table(runs: list[Run], params: Params) -> str:
    lines = [
        "| mode | cache | epoch | time s | stall | hit ratio | WAN / dataset | evicted MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cache = (
            "—"
            if run.cache_size is None
            else f"{run.cache_size / 2**20:.0f} MiB ({run.cache_size / params.dataset:g}x)"
        )
        for e in run.epochs:
            direct = run.cache_size is None
            lines.append(
                f"| {run.mode} | {cache} | {e.epoch} | {e.seconds:.2f} | {pct(e.stall_fraction)} "
                f"| {pct(e.hit_ratio)} | {'—' if direct else f'{e.wan_bytes / params.dataset:.2f}'}"
                f" | {'—' if direct else f'{e.evicted_bytes / 2**20:.0f}'} |"
            )
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | result |", "|---|---|---|"]
    for t in targets:
        verdict = "PASS" if t["pass"] else "MISS"
        if not t["expected"]:
            verdict += " (not expected: shown for contrast)"
        lines.append(f"| {t['target']} | {t['value']} | {verdict} |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    figure, (stall_axes, hit_axes) = plt.subplots(1, 2, figsize=(12, 5))
    for number, run in enumerate(runs):
        epochs = [e.epoch for e in run.epochs]
        style = {"color": f"C{number}", "marker": "o", "label": run.label}
        if run.cache_size is None:
            style["linestyle"] = "--"
        stall_axes.plot(epochs, [e.stall_fraction * 100 for e in run.epochs], **style)
        if run.cache_size is not None:
            hit_axes.plot(epochs, [(e.hit_ratio or 0) * 100 for e in run.epochs], **style)
    stall_axes.axhline(5, color="grey", linewidth=0.8, linestyle=":")
    stall_axes.set(title="stall fraction per epoch", xlabel="epoch", ylabel="% of epoch time")
    hit_axes.set(title="hit ratio per epoch (reads.hit / reads)", xlabel="epoch", ylabel="%")
    for axes in (stall_axes, hit_axes):
        axes.set_xticks(sorted({e.epoch for run in runs for e in run.epochs}))
        axes.grid(alpha=0.3)
    handles, labels = stall_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 x 512 KiB, 3 epochs")
    parser.add_argument("--objects", type=int)
    parser.add_argument("--object-size", type=parse_size)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--compute-ms", type=float, default=20.0)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth", type=parse_size, default=25_000_000, help="per connection")
    parser.add_argument("--modes", default="direct,lru,manifest")
    parser.add_argument("--cache-ratios", default="2,0.5", help="cache size / dataset size")
    parser.add_argument(
        "--s3cache-arg", action="append", default=[], help="extra s3cache flag (repeatable)"
    )
    parser.add_argument(
        "--no-append", action="store_true", help="manifest mode: no next epoch's order"
    )
    parser.add_argument("--untuned", action="store_true", help="s3cache's default flags")
    parser.add_argument("--no-measure", action="store_true", help="upstream rate from the cap")
    parser.add_argument("--out", default="epochs", help="results file name stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    objects = args.objects or (60 if args.quick else 200)
    size = args.object_size or (512 * 1024 if args.quick else 1024 * 1024)
    epochs = args.epochs or (3 if args.quick else 4)
    extra = [] if args.untuned else list(TUNED_ARGS)
    extra += [part for arg in args.s3cache_arg for part in arg.split("=", 1)]
    params = Params(
        objects=objects,
        object_size=size,
        epochs=epochs,
        compute=args.compute_ms / 1000,
        readers=args.readers,
        depth=2 * args.readers,
        delay=args.delay_ms / 1000,
        bandwidth=float(args.bandwidth),
        s3cache_args=extra,
        append=not args.no_append,
    )
    return args, params


def prefetch_concurrency(params: Params) -> int:
    concurrency = 8  # s3cache's default
    args = params.s3cache_args
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--prefetch-concurrency":
            concurrency = int(value)
    return concurrency


def main(argv: list[str] | None = None) -> int:
    args, params = parse_args(argv)
    modes = args.modes.split(",")
    ratios = [float(r) for r in args.cache_ratios.split(",")]
    started = time.perf_counter()
    method = (
        f"method: {params.objects} objects x {params.object_size / 2**20:g} MiB = "
        f"{params.dataset / 2**20:g} MiB; {params.epochs} epochs, a seeded shuffle each; "
        f"{params.compute * 1000:g} ms compute per object; consumer: {params.readers} reader "
        f"threads (one boto3 client), {params.depth} objects requested ahead of the step, "
        f"SHA-256 of every object checked; WAN link: Relay (own process) +"
        f"{params.delay * 1000:g} ms per response, {params.bandwidth / 1e6:g} MB/s per "
        f"connection; SeaweedFS upstream on loopback; s3cache flags: "
        f"{' '.join(params.s3cache_args) or '(defaults)'}; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at start, Python {platform.python_version()}"
    )
    say(method)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="s3cache-epochs-") as tmp:
        workdir = Path(tmp)
        with SeaweedS3(workdir / "upstream") as upstream:
            digests = make_dataset(upstream, params)
            with wan_relay(upstream.endpoint_url, params.delay, params.bandwidth) as wan:
                concurrency = prefetch_concurrency(params)
                nominal = params.bandwidth * concurrency
                if args.no_measure:
                    upstream_rate, warm_seconds = nominal, 0.0
                else:
                    upstream_rate, warm_seconds = measure_upstream_bandwidth(
                        upstream, wan, params, workdir
                    )
                bandwidth_line = (
                    f"upstream bandwidth through the relay: {upstream_rate / 1e6:.1f} MB/s "
                    f"measured (warm job of the dataset, {warm_seconds:.2f} s, prefetch "
                    f"concurrency {concurrency}); nominal cap x concurrency "
                    f"{nominal / 1e6:.0f} MB/s"
                )
                say(bandwidth_line)
                if "direct" in modes:
                    runs.append(run_mode("direct", None, upstream, wan, digests, params, workdir))
                for ratio in ratios:
                    cache_size = int(params.dataset * ratio)
                    for mode in ("lru", "manifest"):
                        if mode in modes:
                            runs.append(
                                run_mode(mode, cache_size, upstream, wan, digests, params, workdir)
                            )
    elapsed = time.perf_counter() - started
    targets, bounds = evaluate(runs, params, upstream_rate)
    text = table(runs, params)
    verdicts = targets_table(targets)
    summary = (
        f"consumer rate {bounds['consumer_rate_bytes_per_s'] / 1e6:.1f} MB/s "
        f"(object size / compute), upstream {upstream_rate / 1e6:.1f} MB/s (measured warm job), "
        f"cold-epoch bound {bounds['cold_epoch_bound_s']:.2f} s; total run {elapsed:.0f} s"
    )
    say("")
    say(text)
    say("")
    say(verdicts)
    say(summary)
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.out}.md").write_text(
        f"# Training epochs through s3cache\n\n`bench/epochs.py`: see its docstring.\n\n"
        f"{method}\n\n{bandwidth_line}\n\n{text}\n\n{verdicts}\n\n{summary}\n"
    )
    (results / f"{args.out}.json").write_text(
        json.dumps(
            {
                "params": asdict(params),
                "s3cache_args": params.s3cache_args,
                "cpu_count": os.cpu_count(),
                "load_average_end": os.getloadavg(),
                "bounds": bounds,
                "warm_job_seconds": warm_seconds,
                "runs": [
                    {
                        "mode": run.mode,
                        "cache_size": run.cache_size,
                        "epochs": [asdict(e) for e in run.epochs],
                    }
                    for run in runs
                ],
                "targets": targets,
                "seconds": elapsed,
            },
            indent=2,
        )
    )
    if plot(runs, results / f"{args.out}.png"):
        say(f"wrote {results / args.out}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
