"""Fixtures: a real S3 server (SeaweedFS) on loopback as the upstream, and s3cache
started as a real process in front of it. Tests talk HTTP to both with real clients.

The AWS environment of the machine never leaks in: every ``AWS_*`` variable is
removed and the shared config and credentials files point at empty files.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

VIRTUAL_HOST_DOMAIN = "s3cache.test"


@pytest.fixture(scope="session", autouse=True)
def isolated_aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    empty = tmp_path_factory.mktemp("aws")
    (empty / "config").write_text("")
    (empty / "credentials").write_text("")
    os.environ["AWS_CONFIG_FILE"] = str(empty / "config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty / "credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    with server:
        yield server


@pytest.fixture(scope="session")
def resolve_test_domain() -> Iterator[None]:
    """Resolve ``*.s3cache.test`` to 127.0.0.1 inside the test process, so that boto3
    can address s3cache virtual-host style. Only name resolution is redirected: the
    requests still cross a real socket with the real Host header."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(VIRTUAL_HOST_DOMAIN):
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    yield
    socket.getaddrinfo = real_getaddrinfo


@pytest.fixture(scope="session")
def s3cache(
    upstream: SeaweedS3, tmp_path_factory: pytest.TempPathFactory, resolve_test_domain: None
) -> Iterator[S3CacheProcess]:
    proxy = S3CacheProcess(
        tmp_path_factory.mktemp("s3cache"),
        upstream,
        extra_args=["--virtual-host-domain", VIRTUAL_HOST_DOMAIN],
        debug_blocking=True,
    )
    with proxy:
        yield proxy
    assert proxy.blocking_calls() == []


ClientFactory = Callable[..., Any]


@pytest.fixture(scope="session")
def make_client(s3cache: S3CacheProcess, upstream: SeaweedS3) -> ClientFactory:
    """boto3 S3 clients pointed at s3cache, path-style or virtual-host style."""

    def make(addressing: str = "path", **config: Any) -> Any:
        host = VIRTUAL_HOST_DOMAIN if addressing == "virtual" else "127.0.0.1"
        return client_of(
            f"http://{host}:{s3cache.port}",
            upstream,
            s3={"addressing_style": addressing},
            retries={"max_attempts": 1},
            **config,
        )

    return make


@pytest.fixture(params=["path", "virtual"])
def client(request: pytest.FixtureRequest, make_client: ClientFactory) -> Any:
    """A boto3 client of s3cache, once per addressing style."""
    return make_client(request.param)


@pytest.fixture
def bucket(upstream: SeaweedS3) -> Iterator[str]:
    """A fresh bucket on the upstream, emptied and removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    direct = upstream.client()
    direct.create_bucket(Bucket=name)
    yield name
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            direct.delete_object(Bucket=name, Key=item["Key"])
    for upload in direct.list_multipart_uploads(Bucket=name).get("Uploads", []):
        direct.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    direct.delete_bucket(Bucket=name)
    direct.close()
