"""Cache rules (never, admit_after, quota; SIGHUP reloads them), their metrics, and the
S3-FIFO eviction policy (a scan does not evict a working set read again; pins and
write-back entries stay; a restart keeps the queues)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

from s3cache.config import CacheRule, ConfigError, Settings, load_settings
from s3cache.rules import Admission
from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.store import policy
from s3cache.store.cache import CacheStore
from s3cache.store.entry import Entry, ObjectMeta
from tests.cached_proxy import BLOCK, Cached, get, put, running_cache

KIB = 1024


def settings_of(tmp_path: Path, toml: str) -> Settings:
    config = tmp_path / "s3cache.toml"
    config.write_text(toml)
    return load_settings(environ={"S3CACHE_CONFIG": str(config)})


def test_rules_longest_prefix_wins(tmp_path: Path) -> None:
    settings = settings_of(
        tmp_path,
        """
[[cache_rules]]
name = "scratch"
prefix = "data"
never = true

[[cache_rules]]
name = "train"
prefix = "s3://data/train/"
admit_after = 2
admit_window = "10m"
quota = "1GiB"
""",
    )
    train = settings.rule_for("data", "train/x")
    assert train is not None and train.name == "train"
    assert (train.admit_after, train.admit_window, train.quota) == (2, 600.0, 1024**3)
    scratch = settings.rule_for("data", "tmp/x")
    assert scratch is not None and scratch.never
    assert settings.rule_for("other", "train/x") is None
    assert settings.eviction_policy == "s3fifo"


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ('name = "a"\nprefix = "b"\nttl = "1h"', "ttl is not a cache rule field; write it in "),
        ('name = "a"\nprefix = "b"\nadmit_after = 0', "admit_after"),
        ('name = "a"\nprefix = "b"\nquota = "lots"', "not a size"),
        ('name = "a"\nprefix = "b"\nnever = true\nquota = "1GiB"', "never does not combine"),
        ('name = "default"\nprefix = "b"', "not 'default'"),
        ('name = "a b"\nprefix = "b"', "name must be"),
        ('name = "a"', "prefix must be"),
        ('name = "a"\nprefix = "b"\nadmit = 2', "unknown field admit"),
    ],
)
def test_bad_rule_names_itself(tmp_path: Path, rule: str, says: str) -> None:
    with pytest.raises(ConfigError, match=rf"^cache_rules in .*rule 1 \(.*{re.escape(says)}"):
        settings_of(tmp_path, f"[[cache_rules]]\n{rule}\n")


def test_two_rules_one_prefix_refused(tmp_path: Path) -> None:
    toml = '[[cache_rules]]\nname = "a"\nprefix = "b/"\n[[cache_rules]]\nname = "c"\nprefix = "b"\n'
    with pytest.raises(ConfigError, match="two rules with the same prefix: b/"):
        settings_of(tmp_path, toml)


def test_bad_rule_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[cache_rules]]\nname = "scans"\nprefix = "b"\nadmit_after = "often"\n')
    result = subprocess.run(
        [sys.executable, "-m", "s3cache", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cache_rules" in lines[0] and "scans" in lines[0] and "often" in lines[0]


def test_admission_counts_within_the_window() -> None:
    rule = settings_rule(admit_after=3, admit_window=10.0)
    admission = Admission(limit=2)
    assert not admission.admit(rule, "b", "k", now=0.0)
    assert not admission.admit(rule, "b", "k", now=1.0)
    assert admission.admit(rule, "b", "k", now=2.0)  # the third read within 10 s
    assert not admission.admit(rule, "b", "k", now=3.0)  # admitted once: counts again
    assert not admission.admit(rule, "b", "k", now=20.0)  # the window ran out: 1 again
    assert not admission.admit(rule, "b", "j", now=20.0)
    assert not admission.admit(rule, "b", "i", now=20.0)
    assert len(admission) == 2  # bounded: the least recently read key is forgotten


def settings_rule(*, admit_after: int, admit_window: float) -> CacheRule:
    return CacheRule(name="r", prefix="b/", admit_after=admit_after, admit_window=admit_window)


def test_rule_usage_longest_prefix_wins() -> None:
    outer = CacheRule(name="outer", prefix="b/")
    inner = CacheRule(name="inner", prefix="b/x/")
    innermost = CacheRule(name="innermost", prefix="b/x/y/")
    other = CacheRule(name="other", prefix="c/")
    sums = {"b/": 100, "b/x/": 30, "b/x/y/": 10, "c/": 5}
    usage = policy.rule_usage([outer, inner, innermost, other], 120, sums)
    assert usage == {"outer": 70, "inner": 20, "innermost": 10, "other": 5, "default": 15}


# --- rules through a real s3cache ------------------------------------------------------


def rules_config(tmp_path: Path, text: str) -> list[str]:
    config = tmp_path / "rules.toml"
    config.write_text(text)
    return ["--config", str(config)]


def metric(cached: Cached, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in cached.metrics().splitlines():
        if line.startswith(f"{name}{{"):
            head, _, value = line.rpartition(" ")
            found = ",".join(sorted(head[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


def test_never_passes_through(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    toml = f'[[cache_rules]]\nname = "scans"\nprefix = "{bucket}/scan/"\nnever = true\n'
    with running_cache(tmp_path, upstream, *rules_config(tmp_path, toml)) as cached:
        body = put(cached, bucket, "scan/a", 3 * BLOCK)
        for _ in range(3):
            assert get(cached.client, bucket, "scan/a") == body
        cached.settle()
        assert len(cached.gets()) == 3  # every read went upstream
        assert cached.stats()["entries"] == 0  # nothing cached
        assert metric(cached, "s3cache_rule_reads_total", rule="scans", outcome="bypass") == 3
        assert metric(
            cached, "s3cache_rule_served_bytes_total", rule="scans", source="upstream"
        ) == 9 * BLOCK
        other = put(cached, bucket, "train/a", BLOCK)
        assert get(cached.client, bucket, "train/a") == other
        assert get(cached.client, bucket, "train/a") == other
        cached.settle()
        assert len(cached.gets()) == 1  # no rule: cached as always
        assert metric(cached, "s3cache_rule_reads_total", rule="default", outcome="hit") == 1


def test_admit_after_two(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    toml = f'[[cache_rules]]\nname = "twice"\nprefix = "{bucket}"\nadmit_after = 2\n'
    with running_cache(tmp_path, upstream, *rules_config(tmp_path, toml)) as cached:
        body = put(cached, bucket, "k", 2 * BLOCK)
        assert get(cached.client, bucket, "k") == body  # first read: uncached
        cached.settle()
        assert (len(cached.gets()), cached.stats()["entries"]) == (1, 0)
        assert get(cached.client, bucket, "k") == body  # second read: cached
        cached.settle()
        assert cached.stats()["entries"] == 1
        upstream_gets = len(cached.gets())
        assert get(cached.client, bucket, "k") == body  # third read: a hit
        cached.settle()
        assert len(cached.gets()) == upstream_gets
        reads = {
            outcome: metric(cached, "s3cache_rule_reads_total", rule="twice", outcome=outcome)
            for outcome in ("bypass", "miss", "hit")
        }
        assert reads == {"bypass": 1, "miss": 1, "hit": 1}
        assert metric(cached, "s3cache_rule_used_bytes", rule="twice") == 2 * BLOCK


def test_quota_holds_and_evicts_within_the_rule(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    toml = f'[[cache_rules]]\nname = "small"\nprefix = "{bucket}/q/"\nquota = "1MiB"\n'
    with running_cache(tmp_path, upstream, *rules_config(tmp_path, toml)) as cached:
        others = {f"o/{n}": put(cached, bucket, f"o/{n}", BLOCK) for n in range(3)}
        for key, body in others.items():
            assert get(cached.client, bucket, key) == body
        for n in range(10):
            body = put(cached, bucket, f"q/{n}", BLOCK)
            assert get(cached.client, bucket, f"q/{n}") == body
            cached.settle()
            assert metric(cached, "s3cache_rule_used_bytes", rule="small") <= 1024**2
        assert metric(cached, "s3cache_rule_used_bytes", rule="small") == 4 * BLOCK
        assert metric(cached, "s3cache_rule_evictions_total", rule="small") == 6
        assert metric(cached, "s3cache_rule_evicted_bytes_total", rule="small") == 6 * BLOCK
        assert metric(cached, "s3cache_rule_used_bytes", rule="default") == 3 * BLOCK
        cached.relay.reset()
        for key, body in others.items():
            assert get(cached.client, bucket, key) == body
        cached.settle()
        assert cached.gets() == []  # the entries of no rule were left alone


def test_sighup_reloads_the_rules(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> None:
    args = rules_config(tmp_path, "")
    with running_cache(tmp_path, upstream, *args) as cached:
        body = put(cached, bucket, "a", BLOCK)
        assert get(cached.client, bucket, "a") == body
        cached.settle()
        assert cached.stats()["entries"] == 1
        rule = f'[[cache_rules]]\nname = "off"\nprefix = "{bucket}/b"\nnever = true\n'
        rules_config(tmp_path, rule)
        cached.proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: reloaded" not in cached.proxy.log_tail(100):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = put(cached, bucket, "b", BLOCK)
        assert get(cached.client, bucket, "b") == other
        assert get(cached.client, bucket, "b") == other
        cached.settle()
        assert len(cached.gets()) == 2  # passed through, both times
        assert cached.stats()["entries"] == 1
        assert metric(cached, "s3cache_rule_reads_total", rule="off", outcome="bypass") == 2


def test_scan_does_not_evict_the_working_set(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """A working set read every 'epoch' stays while a scan of 4.5x the cache passes (the
    last 1.5x of it after the last epoch: more than LRU can keep)."""
    with running_cache(tmp_path, upstream, cache_size="4MiB") as cached:
        working = {f"w/{n}": put(cached, bucket, f"w/{n}", BLOCK) for n in range(5)}
        for _ in range(2):
            for key, body in working.items():
                assert get(cached.client, bucket, key) == body
        for n in range(72):  # 18 MiB read once
            put(cached, bucket, f"scan/{n}", BLOCK)
            get(cached.client, bucket, f"scan/{n}")
            for key in working if n in (24, 48) else ():
                assert get(cached.client, bucket, key) == working[key]  # the next epoch
        cached.settle()
        assert cached.stats()["evictions"] >= 50
        cached.relay.reset()
        for key, body in working.items():
            assert get(cached.client, bucket, key) == body
        cached.settle()
        assert cached.gets() == []  # every read of the working set a hit


# --- the S3-FIFO store -----------------------------------------------------------------


async def open_store(tmp_path: Path, eviction_policy: str = "s3fifo") -> CacheStore:
    settings = Settings(
        cache_dirs=(tmp_path,),
        cache_size=64 * 64 * KIB,
        block_size=64 * KIB,
        eviction_policy=eviction_policy,
    )
    store = CacheStore(settings)
    await store.open()
    return store


async def fill(store: CacheStore, key: str) -> Entry:
    meta = ObjectMeta(etag='"e"', size=64 * KIB, last_modified="", headers=())
    entry = await store.create("b", key, meta)
    data = bytes(64 * KIB)
    await store.write(entry, 0, data)
    await store.add_block(entry, 0, xxhash.xxh3_64_intdigest(data))
    return entry


async def keys_left(store: CacheStore) -> set[str]:
    rows = await store._in_index_thread(store.index.entries_after, 0, 1000)
    return {row.key for row in rows}


def test_store_scan_keeps_what_is_read_again_pins_and_keep(tmp_path: Path) -> None:
    async def scenario() -> tuple[set[str], set[str]]:
        store = await open_store(tmp_path)
        hot = [await fill(store, f"hot/{n}") for n in range(8)]
        for entry in hot:
            store.touch(entry)  # the read that created it: not counted
            store.touch(entry)  # read again
        pinned = await fill(store, "pinned")
        store.pin(pinned)
        kept = await fill(store, "kept")
        store.keep.add(kept.id)
        for n in range(200):  # 3x the cache, read once
            await fill(store, f"scan/{n}")
            await store.evict_to(48 * 64 * KIB, only_above=56 * 64 * KIB)
        left = await keys_left(store)
        await store.close()
        reopened = await open_store(tmp_path)  # the queues survive a restart
        for n in range(100):
            await fill(reopened, f"again/{n}")
            await reopened.evict_to(48 * 64 * KIB, only_above=56 * 64 * KIB)
        after = await keys_left(reopened)
        await reopened.close()
        return left, after

    left, after = asyncio.run(scenario())
    assert {f"hot/{n}" for n in range(8)} | {"pinned", "kept"} <= left
    assert len([key for key in left if key.startswith("scan/")]) < 48
    assert {f"hot/{n}" for n in range(8)} | {"kept"} <= after


def test_store_lru_loses_the_working_set_to_a_scan(tmp_path: Path) -> None:
    """The same scan under eviction_policy = "lru": what S3-FIFO is for."""

    async def scenario() -> set[str]:
        store = await open_store(tmp_path, "lru")
        hot = [await fill(store, f"hot/{n}") for n in range(8)]
        for entry in hot:
            store.touch(entry)
            store.touch(entry)
        for n in range(200):
            await fill(store, f"scan/{n}")
            await store.evict_to(48 * 64 * KIB, only_above=56 * 64 * KIB)
        left = await keys_left(store)
        await store.close()
        return left

    assert not any(key.startswith("hot/") for key in asyncio.run(scenario()))
