"""Settings: one frozen object, loaded once at start-up.

Sources, lowest to highest precedence: defaults < TOML file (``--config``) <
``S3CACHE_*`` environment variables < command-line flags. Every setting has one name,
spelled the same way everywhere: ``cache_size`` is ``cache_size = "500GiB"`` in TOML,
``S3CACHE_CACHE_SIZE`` in the environment and ``--cache-size`` on the command line.

Nothing outside this module reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

ENV_PREFIX = "S3CACHE_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


# --- value parsers -------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``"500GiB"`` -> bytes. Binary (KiB, MiB…) and decimal (KB, MB…) units."""
    if isinstance(text, int):
        return int(_non_negative(text))
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 500GiB, 1TB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | int | float) -> float:
    """``"10m"`` -> seconds. Units ms, s, m, h, d; a bare number is seconds."""
    if isinstance(text, int | float):
        return float(_non_negative(text))
    match = _NUMBER_UNIT.match(text)
    unit = (match.group(2).lower() or "s") if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 10m, 1h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``"[::1]:8080"`` or ``":8080"`` -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _non_negative(value: int | float) -> int | float:
    if value < 0:
        raise ValueError(f"must not be negative: {value}")
    return value


def _positive_int(text: str | int) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer: {text!r}")
    return value


def _positive_duration(text: str | int | float) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be a positive duration: {text!r}")
    return value


def _optional_str(text: str) -> str | None:
    return text or None


def _path_list(text: str | Sequence[str]) -> tuple[Path, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    paths = tuple(Path(item.strip()) for item in items if item.strip())
    if not paths:
        raise ValueError("needs at least one directory")
    return paths


def _url_list(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    urls = tuple(item.strip().rstrip("/") for item in items if item.strip())
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
    return urls


def _str_list(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(item.strip().lower() for item in items if item.strip())


def parse_ttl(text: str | int | float) -> float:
    """A duration, or ``immutable`` (never revalidate)."""
    if isinstance(text, str) and text.strip().lower() == "immutable":
        return math.inf
    return parse_duration(text)


def _size_or_auto(text: str | int) -> int | None:
    """A size, or ``auto`` (None: the caller works it out)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    return parse_size(text)


def _fraction(text: str | float) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be a fraction in (0, 1]: {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class TtlRule:
    prefix: str  # "bucket/" or "bucket/some/prefix"
    ttl: float


def _ttl_rules(text: str | Sequence[str] | Sequence[Mapping[str, str]]) -> tuple[TtlRule, ...]:
    return tuple(
        TtlRule(prefix=prefix, ttl=parse_ttl(ttl))
        for prefix, ttl in _prefix_values(text, "ttl", "TTL")  # {prefix = "b/p", ttl = "1h"}
    )


def _prefix_values(
    text: str | Sequence[str] | Sequence[Mapping[str, str]], name: str, shown: str
) -> list[tuple[str, str]]:
    """``BUCKET[/PREFIX]=VALUE`` items (comma-separated, a list, or TOML tables with
    ``prefix`` and ``name``) as (``bucket/prefix``, value) pairs; a bucket alone gets
    its trailing slash."""
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = []
    for item in items:
        if isinstance(item, Mapping):
            prefix, value = str(item["prefix"]), str(item[name])
        else:
            prefix, sep, value = str(item).partition("=")
            if not sep:
                raise ValueError(f"not BUCKET[/PREFIX]={shown}: {item!r}")
        prefix = prefix.strip().removeprefix("s3://")
        if "/" not in prefix:
            prefix += "/"
        pairs.append((prefix, value.strip()))
    return pairs


WRITE_MODES = ("around", "through", "back")


@dataclass(frozen=True, slots=True)
class WriteRule:
    prefix: str  # "bucket/" or "bucket/some/prefix"
    mode: str  # one of WRITE_MODES


def _write_rules(
    text: str | Sequence[str] | Sequence[Mapping[str, str]],
) -> tuple[WriteRule, ...]:
    choose = parse_choice(*WRITE_MODES)
    return tuple(
        WriteRule(prefix=prefix, mode=choose(mode))
        for prefix, mode in _prefix_values(text, "mode", "MODE")  # {prefix, mode = "back"}
    )


class _PrefixRule(Protocol):
    @property
    def prefix(self) -> str: ...


RuleT = TypeVar("RuleT", bound=_PrefixRule)


def longest_prefix_rule(rules: Sequence[RuleT], bucket: str, key: str) -> RuleT | None:
    """The rule whose prefix of ``bucket/key`` is the longest (None if none matches)."""
    path = f"{bucket}/{key}"
    best: RuleT | None = None
    for rule in rules:
        if path.startswith(rule.prefix) and (best is None or len(rule.prefix) > len(best.prefix)):
            best = rule
    return best


@dataclass(frozen=True, slots=True)
class CacheRule:
    """How the cache treats the objects under one bucket/prefix (README, "Cache
    rules"). ``name`` labels the rule's metrics; TTLs stay in ``ttl_rules``."""

    name: str
    prefix: str  # "bucket/" or "bucket/some/prefix"
    never: bool = False  # pass through, never cached
    admit_after: int = 1  # cached from the Nth GET within ``admit_window``
    admit_window: float = 3600.0
    quota: int | None = None  # bytes the rule's entries may hold, at most


DEFAULT_RULE = "default"  # the metrics label of objects that no rule matches
_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RULE_FIELDS = frozenset({"name", "prefix", "never", "admit_after", "admit_window", "quota"})


def _cache_rules(value: object) -> tuple[CacheRule, ...]:
    """TOML: ``[[cache_rules]]`` tables with name, prefix and never, admit_after,
    admit_window or quota. Every error names the rule, in one line."""
    if not isinstance(value, list):
        raise ValueError("cache_rules is a list of tables ([[cache_rules]] in TOML)")
    rules: list[CacheRule] = []
    for number, item in enumerate(value, 1):
        if not isinstance(item, Mapping):
            raise ValueError(f"rule {number} is not a table")
        rules.append(_cache_rule(item, f"rule {number} ({item.get('name', 'no name')!s})"))
    for kind in ("name", "prefix"):
        seen = [getattr(rule, kind) for rule in rules]
        twice = sorted({one for one in seen if seen.count(one) > 1})
        if twice:
            raise ValueError(f"two rules with the same {kind}: {twice[0]}")
    return tuple(rules)


def _cache_rule(item: Mapping[str, Any], where: str) -> CacheRule:
    if "ttl" in item:
        raise ValueError(
            f"{where}: ttl is not a cache rule field; write it in ttl_rules "
            '(ttl_rules = ["BUCKET/PREFIX=DURATION"])'
        )
    unknown = set(item) - _RULE_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]}")
    name, prefix = str(item.get("name", "")), str(item.get("prefix", ""))
    if not _RULE_NAME.match(name) or name == DEFAULT_RULE:
        raise ValueError(f"{where}: name must be 1-64 of A-Z a-z 0-9 _ . - and not 'default'")
    prefix = prefix.strip().removeprefix("s3://")
    if not prefix or prefix.startswith("/"):
        raise ValueError(f"{where}: prefix must be BUCKET or BUCKET/PREFIX")
    if "/" not in prefix:
        prefix += "/"
    field_name = "never"
    try:
        never = parse_bool(item.get("never", False))
        field_name = "admit_after"
        admit_after = _positive_int(item.get("admit_after", 1))
        field_name = "admit_window"
        window = parse_duration(item.get("admit_window", "1h"))
        field_name = "quota"
        quota = parse_size(item["quota"]) if "quota" in item else None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {field_name}: {exc}") from exc
    if never and (admit_after > 1 or quota is not None):
        raise ValueError(f"{where}: never does not combine with admit_after or quota")
    if window <= 0:
        raise ValueError(f"{where}: admit_window must be above 0")
    return CacheRule(name, prefix, never, admit_after, window, quota)


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A key clients sign with, and what it may reach. ``repr`` hides the secret."""

    access_key: str
    secret_key: str = field(repr=False)
    # Bucket or bucket/key patterns (fnmatch: "datasets", "datasets/imagenet/*", "*").
    allow: tuple[str, ...] = ("*",)
    read_only: bool = True


def _client_keys(value: object) -> tuple[ClientKey, ...]:
    """TOML: ``[[client_keys]]`` tables with access_key, secret_key, allow, access."""
    if not isinstance(value, list):
        raise ValueError("client_keys is a list of tables ([[client_keys]] in TOML)")
    keys = []
    for item in value:
        if not isinstance(item, Mapping):
            raise ValueError("each client key is a table")
        unknown = set(item) - {"access_key", "secret_key", "allow", "access"}
        if unknown:
            raise ValueError(f"unknown client key fields: {', '.join(sorted(unknown))}")
        access = item.get("access", "read-only")
        if access not in ("read-only", "read-write"):
            raise ValueError("access is read-only or read-write")
        allow = item.get("allow", ["*"])
        if isinstance(allow, str):
            allow = [allow]
        if not item.get("access_key") or not item.get("secret_key"):
            raise ValueError("a client key needs access_key and secret_key")
        keys.append(
            ClientKey(
                access_key=str(item["access_key"]),
                secret_key=str(item["secret_key"]),
                allow=tuple(str(pattern) for pattern in allow),
                read_only=access == "read-only",
            )
        )
    return tuple(keys)


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


# --- the settings object -------------------------------------------------------------


def _setting(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    *,
    repeat: bool = False,
    secret: bool = False,
    toml_only: bool = False,
) -> Any:
    """A dataclass field carrying its parser and help text (read by the loader).
    ``secret``: hidden from repr; ``toml_only``: structured, no flag or variable."""
    return field(
        default=default,
        repr=not secret,
        metadata={"parse": parse, "help": help, "repeat": repeat, "toml_only": toml_only},
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Every setting of s3cache. Field names are the TOML keys; flags and environment
    variables derive from them."""

    listen: tuple[str, int] = _setting(
        ("127.0.0.1", 8080), parse_listen, "address to serve S3 on, HOST:PORT"
    )
    virtual_host_domains: tuple[str, ...] = _setting(
        (),
        _str_list,
        "domain(s) for virtual-host addressing: a request to BUCKET.DOMAIN addresses BUCKET",
        repeat=True,
    )
    upstream_endpoint: str | None = _setting(
        None, _optional_str, "upstream S3 endpoint URL (default: AWS S3 of the region)"
    )
    upstream_region: str = _setting("us-east-1", str, "upstream region, used for signing")
    upstream_profile: str | None = _setting(
        None, _optional_str, "AWS profile for upstream credentials (default chain otherwise)"
    )
    upstream_addressing: str = _setting(
        "auto",
        parse_choice("auto", "path", "virtual"),
        "how s3cache addresses the upstream: path, virtual, or auto "
        "(virtual for AWS, path for a custom endpoint)",
    )
    upstream_max_connections: int = _setting(
        64, _positive_int, "connections to the upstream, at most"
    )
    upstream_connect_timeout: float = _setting(
        10.0, parse_duration, "time allowed to connect to the upstream"
    )
    upstream_read_timeout: float = _setting(
        60.0, parse_duration, "time allowed between two reads from the upstream"
    )
    upstream_retries: int = _setting(
        3, int, "retries of a failed block fetch (broken transfer, 5xx, SlowDown)"
    )
    upstream_retry_backoff: float = _setting(
        0.1, parse_duration, "first retry delay; doubled at each retry, with jitter"
    )
    upstream_verify_tls: bool = _setting(True, parse_bool, "verify the upstream's certificate")
    upstream_ca_bundle: Path | None = _setting(
        None, lambda t: Path(t) if t else None, "CA bundle file to verify the upstream with"
    )
    cache_dirs: tuple[Path, ...] = _setting(
        (Path("s3cache-data"),),
        _path_list,
        "cache directory; repeat (or comma-separate) for one per drive",
        repeat=True,
    )
    cache_size: int = _setting(10 * 1024**3, parse_size, "bytes the cache may use, all dirs")
    block_size: int = _setting(8 * 1024**2, parse_size, "cache block size")
    cache_high_watermark: float = _setting(
        0.98, _fraction, "usage (fraction of cache_size) at which eviction starts"
    )
    cache_low_watermark: float = _setting(
        0.97, _fraction, "usage (fraction of cache_size) eviction brings the cache down to"
    )
    cache_ttl: float = _setting(
        600.0,
        parse_ttl,
        "how long a cached object is served without asking the upstream whether it "
        "changed; 'immutable' for never",
    )
    ttl_rules: tuple[TtlRule, ...] = _setting(
        (),
        _ttl_rules,
        "per bucket/prefix freshness, BUCKET[/PREFIX]=DURATION|immutable (repeatable); "
        "the longest matching prefix wins",
        repeat=True,
    )
    write_rules: tuple[WriteRule, ...] = _setting(
        (),
        _write_rules,
        "per bucket/prefix write policy, BUCKET[/PREFIX]=around|through|back (repeatable); "
        "the longest matching prefix wins; elsewhere: around",
        repeat=True,
    )
    writeback_max: int = _setting(
        4 * 1024**3,
        parse_size,
        "bytes of write-back objects not yet uploaded, at most (part of cache_size); past "
        "it, writes fall back to write-through",
    )
    writeback_concurrency: int = _setting(
        4, _positive_int, "write-back uploads to the upstream at once"
    )
    writeback_retry_max: float = _setting(
        30.0, parse_duration, "longest wait between two attempts of a failing write-back upload"
    )
    cache_rules: tuple[CacheRule, ...] = _setting(
        (),
        _cache_rules,
        "per bucket/prefix admission and quota ([[cache_rules]] tables: name, prefix, "
        "never, admit_after, admit_window, quota); the longest matching prefix wins",
        toml_only=True,
    )
    eviction_policy: str = _setting(
        "s3fifo",
        parse_choice("s3fifo", "lru"),
        "which entries eviction removes: s3fifo (scan-resistant) or lru",
    )
    list_cache_ttl: float = _setting(
        10.0,
        parse_duration,
        "how long a bucket listing is answered from memory (0: listings always go upstream)",
    )
    scrub_rate: int = _setting(
        32 * 1024**2,
        parse_size,
        "bytes a second the background scrubber re-reads to check block hashes; 0: off",
    )
    scrub_pause: float = _setting(
        60.0, _positive_duration, "how long the background scrubber rests after a full pass"
    )
    prefetch_concurrency: int = _setting(
        8, _positive_int, "block fetches prefetch may have in flight (apart from demand reads)"
    )
    readahead_max: int = _setting(
        64 * 1024**2, parse_size, "largest read-ahead window of a sequential reader"
    )
    manifest_lead: int | None = _setting(
        None,
        _size_or_auto,
        "bytes the epoch manifests, all together, are prefetched ahead of their clients; "
        "auto: twice what prefetch_concurrency fetches hold",
    )
    fill_concurrency: int = _setting(
        32, _positive_int, "ranged upstream GETs filling the cache at once, all objects"
    )
    fill_object_concurrency: int = _setting(
        8, _positive_int, "ranged upstream GETs filling one object at once"
    )
    client_keys: tuple[ClientKey, ...] = _setting(
        (),
        _client_keys,
        "keys clients sign with ([[client_keys]] tables); none: the upstream credentials",
        toml_only=True,
    )
    client_keys_file: Path | None = _setting(
        None, _optional_path, "a TOML file of [[client_keys]] (a secrets file), read at start"
    )
    allow_anonymous: bool = _setting(
        False, parse_bool, "let unsigned requests read (GET/HEAD/list) with s3cache's rights"
    )
    allow_sigv2: bool = _setting(
        True,
        parse_bool,
        "accept AWS Signature Version 2 (what boto3 presigns with by default for an "
        "endpoint_url); false: only SigV4",
    )
    admin_key: str | None = _setting(
        None,
        _optional_str,
        "bearer key for admin actions (prefetch, jobs, manifest, verify); none: loopback only",
        secret=True,
    )
    admin_open_metrics: bool = _setting(
        True, parse_bool, "serve healthz, readyz, stats and metrics without the admin key"
    )
    admin_listen: tuple[str, int] | None = _setting(
        None,
        lambda text: parse_listen(text) if text else None,
        "a separate HOST:PORT for admin endpoints (then the S3 port serves only probes)",
    )
    tls_cert: Path | None = _setting(None, _optional_path, "certificate file: serve HTTPS")
    tls_key: Path | None = _setting(None, _optional_path, "private key file of tls_cert")
    idle_timeout: float = _setting(
        30.0, parse_duration, "close a connection idle (or sending its head) this long"
    )
    body_timeout: float = _setting(
        60.0, parse_duration, "abort an upload whose body stalls this long"
    )
    max_header_size: int = _setting(
        16 * 1024, parse_size, "longest request line or header field accepted"
    )
    peers: tuple[str, ...] = _setting(
        (),
        _url_list,
        "every node's URL, this one's included (repeatable or comma-separated): one cache",
        repeat=True,
    )
    peers_dns: str | None = _setting(
        None,
        _optional_str,
        "HOST:PORT of a DNS name listing the nodes (a headless Service), re-resolved",
    )
    advertise_url: str | None = _setting(
        None, _optional_str, "this node's URL as the other nodes reach it (one of peers)"
    )
    cluster_secret: str | None = _setting(
        None, _optional_str, "shared secret that authenticates nodes to each other", secret=True
    )
    peer_timeout: float = _setting(
        2.0,
        parse_duration,
        "time to connect to a peer, or for its health check, before it is taken as down",
    )
    workers: int = _setting(
        1,
        _positive_int,
        "processes serving the port (SO_REUSEPORT): one owns the cache and fills it, the "
        "others serve its complete objects and pass everything else to it; combines with "
        "peers",
    )
    debug_blocking: bool = _setting(
        False,
        parse_bool,
        "test aid: raise on blocking calls made by s3cache on the event loop "
        "(needs the blockbuster package)",
    )
    access_log: str = _setting(
        "text", parse_choice("text", "json", "off"), "access log: one line per request"
    )
    log_level: str = _setting(
        "info", parse_choice("debug", "info", "warning", "error"), "log level"
    )

    def __post_init__(self) -> None:
        if self.block_size < 64 * 1024:
            raise ConfigError("block_size: must be at least 64KiB")
        if self.cache_low_watermark > self.cache_high_watermark:
            raise ConfigError("cache_low_watermark: must not be above cache_high_watermark")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert: tls_cert and tls_key go together")
        if (self.peers or self.peers_dns) and not (self.advertise_url and self.cluster_secret):
            raise ConfigError("peers: a cluster needs advertise_url and cluster_secret")
        if self.peers and self.advertise_url and self.advertise_url.rstrip("/") not in self.peers:
            raise ConfigError("advertise_url: must be one of peers")

    def rule_for(self, bucket: str, key: str) -> CacheRule | None:
        """The cache rule of bucket/key: the longest matching prefix (None: no rule)."""
        return longest_prefix_rule(self.cache_rules, bucket, key)

    def ttl_for(self, bucket: str, key: str) -> float:
        """Seconds an entry of bucket/key stays fresh (``math.inf``: immutable)."""
        rule = longest_prefix_rule(self.ttl_rules, bucket, key)
        return rule.ttl if rule is not None else self.cache_ttl

    def write_mode_for(self, bucket: str, key: str) -> str:
        """How a write of bucket/key is handled: around, through or back."""
        rule = longest_prefix_rule(self.write_rules, bucket, key)
        return rule.mode if rule is not None else "around"


# Settings that SIGHUP reloads in a running process; the others need a restart.
RELOADABLE = (
    "cache_ttl",
    "ttl_rules",
    "cache_rules",
    "access_log",
    "log_level",
    "client_keys",
    "client_keys_file",
    "allow_anonymous",
    "allow_sigv2",
    "admin_key",
)


class LiveSettings:
    """The settings in force. SIGHUP replaces them with a reloaded copy in which only
    the RELOADABLE fields may differ."""

    __slots__ = ("current",)

    def __init__(self, settings: Settings) -> None:
        self.current = settings

    def reload(self, new: Settings) -> list[str]:
        """Take the reloadable fields of ``new``; return the names of the settings that
        differ but need a restart."""
        kept = [
            spec.name
            for spec in dataclasses.fields(Settings)
            if spec.name not in RELOADABLE
            and getattr(new, spec.name) != getattr(self.current, spec.name)
        ]
        changes = {name: getattr(new, name) for name in RELOADABLE}
        self.current = dataclasses.replace(self.current, **changes)
        return kept


# Flags whose name is not derived from the field name, kept for operators' muscle memory.
_FLAG_NAMES = {
    "cache_dirs": "--cache-dir",
    "virtual_host_domains": "--virtual-host-domain",
    "ttl_rules": "--ttl-rule",
    "write_rules": "--write-rule",
}


def flag_name(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting; unset flags stay ``None``."""
    parser.add_argument("--config", type=Path, help="TOML settings file")
    for spec in dataclasses.fields(Settings):
        if spec.metadata["toml_only"]:
            continue
        kwargs: dict[str, Any] = {"dest": spec.name, "default": None}
        if spec.metadata["repeat"]:
            kwargs["action"] = "append"
        parser.add_argument(flag_name(spec.name), help=spec.metadata["help"], **kwargs)


def load_settings(
    flags: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the four sources into a validated Settings; raise ConfigError naming the
    first bad setting."""
    environ = os.environ if environ is None else environ
    flag_values = vars(flags) if flags is not None else {}
    config_path = flag_values.get("config") or environ.get(env_name("config"))
    raw: dict[str, tuple[str, Any]] = {}
    if config_path:
        for key, value in _read_toml(Path(config_path)).items():
            raw[key] = (f"{key} in {config_path}", value)
    for spec in dataclasses.fields(Settings):
        if spec.metadata["toml_only"]:
            continue
        if env_name(spec.name) in environ:
            raw[spec.name] = (env_name(spec.name), environ[env_name(spec.name)])
        flag_value = flag_values.get(spec.name)
        if flag_value is not None:
            raw[spec.name] = (flag_name(spec.name), flag_value)
    values = _parse_all(raw)
    keys_file = values.get("client_keys_file")
    if keys_file is not None:
        keys = _read_toml(keys_file).get("client_keys", [])
        try:
            values["client_keys"] = values.get("client_keys", ()) + _client_keys(keys)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"client_keys in {keys_file}: {exc}") from exc
    return Settings(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    return {key.replace("-", "_"): value for key, value in data.items()}


@dataclass(frozen=True)
class WorkerRole:
    """What ``s3cache serve --workers N`` tells each worker process it starts, in the
    environment (internal: not settings). Worker 0 owns the cache; the others reach it
    at ``primary_url`` and sign what they send it with ``secret``."""

    index: int
    primary_url: str
    secret: str

    ENV: ClassVar[tuple[str, str, str]] = (
        "S3CACHE_INTERNAL_WORKER_INDEX",
        "S3CACHE_INTERNAL_WORKER_PRIMARY",
        "S3CACHE_INTERNAL_WORKER_SECRET",
    )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> WorkerRole | None:
        environ = os.environ if environ is None else environ
        index, primary, secret = (environ.get(name) for name in cls.ENV)
        if index is None or primary is None or secret is None:
            return None
        return cls(int(index), primary, secret)

    def environment(self) -> dict[str, str]:
        return dict(zip(self.ENV, (str(self.index), self.primary_url, self.secret), strict=True))

    @property
    def primary(self) -> bool:
        return self.index == 0


def _parse_all(raw: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    known = {spec.name: spec for spec in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for name, (origin, value) in raw.items():
        spec = known.get(name)
        if spec is None:
            raise ConfigError(f"{origin}: unknown setting")
        if spec.metadata["repeat"] and isinstance(value, list):
            value = [
                part
                for item in value
                for part in (item.split(",") if isinstance(item, str) else [item])
            ]
        try:
            values[name] = spec.metadata["parse"](value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: {exc}") from exc
    return values
