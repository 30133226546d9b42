"""The real AWS CLI (v1, from the venv) against s3cache: listings, multipart upload,
ranged download, sync both ways, ranged get-object and delete. Every object that goes
up is checked on the upstream directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.seaweed import SeaweedS3

AWS = Path(sys.executable).parent / "aws"
TIMEOUT = 60
MIB = 1024 * 1024


def content(length: int, seed: int) -> bytes:
    return bytes((i * 31 + seed + i // 253) % 256 for i in range(length))


class AwsCli:
    def __init__(self, s3cache: S3CacheProcess, upstream: SeaweedS3, home: Path) -> None:
        self.s3cache = s3cache
        config = home / "config"
        credentials = home / "credentials"
        config.write_text("")
        credentials.write_text("")
        self.env = {
            name: value for name, value in os.environ.items() if not name.startswith("AWS_")
        }
        self.env.update(
            AWS_ACCESS_KEY_ID=upstream.access_key,
            AWS_SECRET_ACCESS_KEY=upstream.secret_key,
            AWS_DEFAULT_REGION=upstream.region,
            AWS_CONFIG_FILE=str(config),
            AWS_SHARED_CREDENTIALS_FILE=str(credentials),
            AWS_EC2_METADATA_DISABLED="true",
            HOME=str(home),
        )

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        command = [str(AWS), "--endpoint-url", self.s3cache.endpoint_url, *args]
        try:
            done = subprocess.run(
                command,
                env=self.env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"{' '.join(args)} timed out after {TIMEOUT}s\n"
                f"--- s3cache log ---\n{self.s3cache.log_tail()}"
            )
            raise AssertionError from exc  # not reached
        assert done.returncode == 0, (
            f"aws {' '.join(args)} -> exit {done.returncode}\n"
            f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr[-3000:]}\n"
            f"--- s3cache log ---\n{self.s3cache.log_tail()}"
        )
        return done.stdout


@pytest.fixture
def aws(s3cache: S3CacheProcess, upstream: SeaweedS3, tmp_path: Path) -> AwsCli:
    home = tmp_path / "home"
    home.mkdir()
    return AwsCli(s3cache, upstream, home)


def upstream_keys(upstream: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    pages = (
        upstream.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def upstream_bytes(upstream: SeaweedS3, bucket: str, key: str) -> bytes:
    body: bytes = upstream.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def test_ls_lists_the_bucket(aws: AwsCli, bucket: str) -> None:
    listed = [line.split()[-1] for line in aws("s3", "ls").splitlines()]
    assert bucket in listed


def test_cp_multipart_up_and_down(
    aws: AwsCli, upstream: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    data = content(9 * MIB + 123, seed=1)  # above the CLI's 8 MiB multipart threshold
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    aws("s3", "cp", str(source), f"s3://{bucket}/big/big.bin")
    assert upstream_bytes(upstream, bucket, "big/big.bin") == data
    head = upstream.client().head_object(Bucket=bucket, Key="big/big.bin")
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # two 8 MiB-sized parts
    target = tmp_path / "back.bin"
    aws("s3", "cp", f"s3://{bucket}/big/big.bin", str(target))
    assert target.read_bytes() == data


def test_sync_up_and_down_and_ls_prefix(
    aws: AwsCli, upstream: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    source = tmp_path / "up"
    files = {
        "a.txt": b"alpha\n",
        "b.bin": content(100_000, seed=2),
        "empty": b"",
        "nested/c.bin": content(1_500_000, seed=3),
        "nested/deeper/d name.txt": b"with a space\n",
    }
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
        # An hour old: S3 times have whole seconds, and sync uploads again any file
        # whose local time is later than the object's.
        hour_ago = time.time() - 3600
        os.utime(source / name, (hour_ago, hour_ago))
    aws("s3", "sync", str(source), f"s3://{bucket}/sync/")
    assert sorted(upstream_keys(upstream, bucket, "sync/")) == sorted(f"sync/{n}" for n in files)
    for name, data in files.items():
        assert upstream_bytes(upstream, bucket, f"sync/{name}") == data, name

    # Nothing changed: a second sync finds nothing to do (sizes and times listed right).
    assert aws("s3", "sync", str(source), f"s3://{bucket}/sync/").strip() == ""

    listing = aws("s3", "ls", f"s3://{bucket}/sync/").splitlines()
    entries = {
        line.split(None, 3)[-1] if "PRE" not in line else line.split()[-1] for line in listing
    }
    assert entries == {"a.txt", "b.bin", "empty", "nested/"}
    sizes = {
        line.split(None, 3)[3]: int(line.split(None, 3)[2]) for line in listing if "PRE" not in line
    }
    assert sizes == {"a.txt": 6, "b.bin": 100_000, "empty": 0}

    recursive = aws("s3", "ls", "--recursive", f"s3://{bucket}/sync/nested/").splitlines()
    assert sorted(line.split(None, 3)[3] for line in recursive) == [
        "sync/nested/c.bin",
        "sync/nested/deeper/d name.txt",
    ]

    target = tmp_path / "down"
    aws("s3", "sync", f"s3://{bucket}/sync/", str(target))
    got = {
        str(path.relative_to(target)): path.read_bytes()
        for path in target.rglob("*")
        if path.is_file()
    }
    assert got == files
    assert aws("s3", "sync", f"s3://{bucket}/sync/", str(target)).strip() == ""


def test_get_object_range(aws: AwsCli, upstream: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    data = content(50_000, seed=4)
    upstream.client().put_object(Bucket=bucket, Key="ranged", Body=data)
    out = tmp_path / "range.out"
    answer = json.loads(
        aws(
            "s3api",
            "get-object",
            "--bucket",
            bucket,
            "--key",
            "ranged",
            "--range",
            "bytes=0-9",
            str(out),
        )
    )
    assert out.read_bytes() == data[:10]
    assert answer["ContentLength"] == 10
    assert answer["ContentRange"] == f"bytes 0-9/{len(data)}"


def test_rm(aws: AwsCli, upstream: SeaweedS3, bucket: str) -> None:
    direct = upstream.client()
    for key in ("gone", "dir/one", "dir/two", "kept"):
        direct.put_object(Bucket=bucket, Key=key, Body=key.encode())
    aws("s3", "rm", f"s3://{bucket}/gone")
    assert sorted(upstream_keys(upstream, bucket)) == ["dir/one", "dir/two", "kept"]
    aws("s3", "rm", "--recursive", f"s3://{bucket}/dir/")
    assert upstream_keys(upstream, bucket) == ["kept"]
