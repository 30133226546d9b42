"""Settings: defaults < TOML < S3CACHE_* environment < flags, and one clear line for a
bad value."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from s3cache.config import (
    ConfigError,
    LiveSettings,
    Settings,
    add_arguments,
    flag_name,
    load_settings,
    parse_duration,
    parse_size,
)


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500GiB", 500 * 1024**3),
        ("8MiB", 8 * 1024**2),
        ("1TB", 10**12),
        ("123", 123),
        ("1.5KiB", 1536),
        (" 2 gib ", 2 * 1024**3),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10m", 600.0), ("30s", 30.0), ("500ms", 0.5), ("2h", 7200.0), ("7d", 604800.0), ("45", 45.0)],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["lots", "10 parsecs", "-5GiB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_defaults() -> None:
    settings = load_settings(flags(), environ={})
    assert settings == Settings()
    assert settings.listen == ("127.0.0.1", 8080)
    assert settings.block_size == 8 * 1024**2


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "s3cache.toml"
    config.write_text(
        'cache_size = "1GiB"\nblock_size = "1MiB"\nupstream_region = "eu-west-1"\n'
        'cache_dirs = ["/a", "/b"]\nlisten = "0.0.0.0:9000"\n'
    )
    env = {"S3CACHE_CACHE_SIZE": "2GiB", "S3CACHE_BLOCK_SIZE": "2MiB"}
    settings = load_settings(flags("--config", str(config), "--cache-size", "3GiB"), environ=env)
    assert settings.cache_size == 3 * 1024**3  # flag beats env beats TOML
    assert settings.block_size == 2 * 1024**2  # env beats TOML
    assert settings.upstream_region == "eu-west-1"  # TOML beats default
    assert settings.cache_dirs == (Path("/a"), Path("/b"))
    assert settings.listen == ("0.0.0.0", 9000)


def test_repeated_and_comma_separated_cache_dirs() -> None:
    settings = load_settings(
        flags("--cache-dir", "/nvme0", "--cache-dir", "/nvme1,/nvme2"), environ={}
    )
    assert settings.cache_dirs == (Path("/nvme0"), Path("/nvme1"), Path("/nvme2"))


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('upstream_endpoint = "http://minio:9000"\n')
    settings = load_settings(flags(), environ={"S3CACHE_CONFIG": str(config)})
    assert settings.upstream_endpoint == "http://minio:9000"


@pytest.mark.parametrize(
    ("argv", "env", "toml", "named"),
    [
        (["--cache-size", "lots"], {}, "", "--cache-size"),
        ([], {"S3CACHE_UPSTREAM_READ_TIMEOUT": "forever"}, "", "S3CACHE_UPSTREAM_READ_TIMEOUT"),
        ([], {}, "block_size = 'tiny'\n", "block_size in"),
        ([], {}, "no_such_setting = 1\n", "no_such_setting in"),
        (["--listen", "nowhere"], {}, "", "--listen"),
        (["--upstream-addressing", "sideways"], {}, "", "--upstream-addressing"),
        (["--workers", "0"], {}, "", "--workers"),
        (["--scrub-pause", "0s"], {}, "", "--scrub-pause"),
    ],
)
def test_bad_values_name_the_setting(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str, named: str
) -> None:
    if toml:
        config = tmp_path / "bad.toml"
        config.write_text(toml)
        argv = [*argv, "--config", str(config)]
    with pytest.raises(ConfigError, match=named):
        load_settings(flags(*argv), environ=env)


def test_workers_combine_with_peers() -> None:
    argv = ["--workers", "2", "--peers", "http://a:1,http://b:1", "--advertise-url", "http://a:1"]
    settings = load_settings(flags(*argv), environ={"S3CACHE_CLUSTER_SECRET": "s"})
    assert (settings.workers, settings.peers) == (2, ("http://a:1", "http://b:1"))


def test_bad_value_stops_start_up_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "s3cache", "serve", "--cache-size", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--cache-size" in lines[0]
    assert "lots" in lines[0]


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for spec in dataclasses.fields(Settings):
        if spec.metadata["toml_only"]:
            assert f"| `{spec.name}` | (TOML only)" in readme, spec.name
        else:
            assert f"| `{spec.name}` | `{flag_name(spec.name)}`" in readme, spec.name


def test_ttl_rules_longest_prefix_wins() -> None:
    settings = load_settings(
        flags("--cache-ttl", "1m", "--ttl-rule", "data=immutable", "--ttl-rule", "data/tmp/=5s"),
        environ={},
    )
    assert settings.ttl_for("data", "train/x") == math.inf
    assert settings.ttl_for("data", "tmp/x") == 5.0
    assert settings.ttl_for("other", "x") == 60.0


def test_allow_sigv2_defaults_on_turns_off_and_reloads(tmp_path: Path) -> None:
    assert Settings().allow_sigv2 is True
    config = tmp_path / "s3cache.toml"
    config.write_text("allow_sigv2 = false\n")
    assert load_settings(flags("--config", str(config)), environ={}).allow_sigv2 is False
    assert load_settings(flags(), environ={"S3CACHE_ALLOW_SIGV2": "false"}).allow_sigv2 is False
    assert load_settings(flags("--allow-sigv2", "false"), environ={}).allow_sigv2 is False
    live = LiveSettings(Settings())
    assert live.reload(Settings(allow_sigv2=False)) == []  # SIGHUP takes it, no restart
    assert live.current.allow_sigv2 is False
