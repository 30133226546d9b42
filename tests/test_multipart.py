"""Multipart uploads cached on the way (issue #16): parts spooled where they land in the
object, and every way a client's parts can differ from one size sent once in order
(sent out of order, sent again, a gap in the numbers, sizes that differ, a last part
bigger than the others) still gives exactly the object S3 makes of them - in the
cache (block hashes checked by verify) and, for write-back, upstream."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3cache.sandbox.relay import Fault
from s3cache.sandbox.seaweed import SeaweedS3
from tests.cached_proxy import Cached, get, running_cache

MIB = 1024 * 1024

# Each upload: the parts sent, in order (number, size), and the numbers completed.
UPLOADS: dict[str, tuple[list[tuple[int, int]], list[int]]] = {
    "in order": ([(1, 5 * MIB), (2, 5 * MIB), (3, 2 * MIB + 7)], [1, 2, 3]),
    "last first": ([(3, 2 * MIB + 7), (2, 5 * MIB), (1, 5 * MIB)], [1, 2, 3]),
    "sent again": ([(1, 5 * MIB), (2, 5 * MIB), (1, 5 * MIB), (2, 3 * MIB)], [1, 2]),
    "a gap": ([(1, 5 * MIB), (2, 5 * MIB), (3, 5 * MIB), (4, MIB + 1)], [1, 2, 4]),
    "sizes differ": ([(1, 6 * MIB), (2, 5 * MIB), (3, MIB)], [1, 2, 3]),
    "last bigger": ([(1, 5 * MIB), (2, 7 * MIB + 3)], [1, 2]),
    "one small part": ([(1, 300 * 1024)], [1]),
}


def _verify(cached: Cached) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{cached.proxy.endpoint_url}/_s3cache/verify", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        report: dict[str, Any] = json.load(answer)
    return report


def _upload(client: Any, bucket: str, key: str, name: str) -> tuple[bytes, str]:
    """Upload as UPLOADS[name] says; the object S3 makes of it and its ETag."""
    sent, completed = UPLOADS[name]
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    last: dict[int, tuple[bytes, str]] = {}
    for number, size in sent:
        body = os.urandom(size)
        answer = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        assert answer["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        last[number] = (body, answer["ETag"])
    client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": last[n][1]} for n in completed]
        },
    )
    md5s = b"".join(hashlib.md5(last[n][0]).digest() for n in completed)
    etag = f'"{hashlib.md5(md5s).hexdigest()}-{len(completed)}"'
    return b"".join(last[n][0] for n in completed), etag


@pytest.fixture(params=["through", "back"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["1MiB", "8MiB"], ids=["blocks-inside-parts", "blocks-across-parts"])
def block_size(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cached(
    tmp_path: Path, upstream: SeaweedS3, bucket: str, mode: str, block_size: str
) -> Iterator[Cached]:
    extra = ("--write-rule", f"{bucket}={mode}", "--block-size", block_size)
    with running_cache(tmp_path, upstream, *extra, cache_size="256MiB") as cached:
        yield cached


def test_every_way_of_sending_parts_makes_the_object_s3_makes(
    cached: Cached, bucket: str, mode: str
) -> None:
    if mode == "back":
        cached.relay.fault = Fault(status=503, match_method="PUT")  # upstream refuses: later
    objects = {}
    for number, name in enumerate(UPLOADS):
        key = f"mp/{number}.bin"
        objects[key] = _upload(cached.client, bucket, key, name)
    cached.relay.reset()
    for key, (body, _) in objects.items():
        assert get(cached.client, bucket, key) == body, key
        if len(body) <= 5243001:
            continue
        # A range across the first part boundary, through the blocks' hashes.
        ranged = cached.client.get_object(Bucket=bucket, Key=key, Range="bytes=5242000-5243000")
        assert ranged["Body"].read() == body[5242000:5243001], key
    if mode == "back":
        for key, (_, etag) in objects.items():
            assert cached.client.head_object(Bucket=bucket, Key=key)["ETag"] == etag, key
    assert [r.path for r in cached.gets()] == []
    report = _verify(cached)
    assert report["entries"] == len(objects)
    assert (report["corrupt_blocks"], report["truncated_files"], report["orphan_files"]) == (
        0,
        0,
        0,
    )
    cached.relay.fault = None
    if mode == "back":
        cached.settle()
        urllib.request.urlopen(
            urllib.request.Request(
                f"{cached.proxy.endpoint_url}/_s3cache/flush", data=b"", method="POST"
            ),
            timeout=120,
        ).read()
    for key, (body, etag) in objects.items():
        stored = cached.direct.get_object(Bucket=bucket, Key=key)
        assert stored["Body"].read() == body, key
        if mode == "back":
            assert stored["ETag"] == etag, key  # the ETag promised is the upstream's
    assert not cached.direct.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_write_back_checks_each_parts_digests_as_s3_does(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    with running_cache(tmp_path, upstream, "--write-rule", f"{bucket}=back") as cached:
        client = cached.client
        upload_id = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
        body = os.urandom(5 * MIB)
        part = {"Bucket": bucket, "Key": "k", "UploadId": upload_id, "PartNumber": 1}

        def refused(**extra: Any) -> tuple[str, int]:
            with pytest.raises(ClientError) as error:
                client.upload_part(**part, Body=body, **extra)
            answer = error.value.response
            return answer["Error"]["Code"], answer["ResponseMetadata"]["HTTPStatusCode"]

        wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        assert refused(ContentMD5=wrong_md5) == ("BadDigest", 400)
        assert refused(ChecksumCRC32="AAAAAA==") == ("BadDigest", 400)
        assert refused(ChecksumSHA256=base64.b64encode(b"\0" * 32).decode()) == (
            "BadDigest",
            400,
        )
        assert refused(ChecksumCRC32C="AAAAAA==") == ("InvalidRequest", 400)
        # None of them was kept: completing with part 1 finds no such part.
        with pytest.raises(ClientError, match="InvalidPart"):
            client.complete_multipart_upload(
                Bucket=bucket,
                Key="k",
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"PartNumber": 1, "ETag": f'"{hashlib.md5(body).hexdigest()}"'}]
                },
            )
        # Right digests are taken, and the part's checksum is answered back as S3 does.
        good = client.upload_part(
            **part, Body=body, ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode()
        )
        assert good["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        assert "ChecksumCRC32" in good
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="k",
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": good["ETag"]}]},
        )
        assert get(client, bucket, "k") == body
        assert _verify(cached)["orphan_files"] == 0


def test_a_write_back_upload_goes_on_after_a_sigkill(
    tmp_path: Path, upstream: SeaweedS3, bucket: str
) -> None:
    """Acknowledged parts are durable: s3cache killed between parts, started again on
    the same directory, takes the next parts and the completion of the same upload."""
    import signal

    extra = ("--write-rule", f"{bucket}=back", "--block-size", "1MiB")
    with running_cache(tmp_path, upstream, *extra, cache_size="256MiB") as cached:
        cached.relay.fault = Fault(status=503, match_method="PUT")  # nothing upstream yet
        client = cached.client
        upload_id = client.create_multipart_upload(Bucket=bucket, Key="ckpt.pt")["UploadId"]
        bodies = {n: os.urandom(5 * MIB) for n in (1, 2, 3)}
        bodies[4] = os.urandom(MIB + 5)
        etags = {}

        def send(number: int) -> None:
            etags[number] = client.upload_part(
                Bucket=bucket, Key="ckpt.pt", UploadId=upload_id, PartNumber=number,
                Body=bodies[number],
            )["ETag"]

        send(2)
        send(1)
        bodies[2] = os.urandom(5 * MIB)  # sent again: a file of its own
        send(2)
        cached.proxy.send_signal(signal.SIGKILL)
        cached.proxy.wait(10)
        cached.proxy.start()
        send(3)
        send(4)
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="ckpt.pt",
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            },
        )
        body = b"".join(bodies[n] for n in sorted(bodies))
        cached.relay.reset()
        assert get(client, bucket, "ckpt.pt") == body
        assert cached.relay.count("GET") == 0
        # An upload nobody completes is still there after a restart too; an aborted
        # one is gone, and its parts' files with it.
        other = client.create_multipart_upload(Bucket=bucket, Key="other")["UploadId"]
        client.upload_part(
            Bucket=bucket, Key="other", UploadId=other, PartNumber=1, Body=bodies[1]
        )
        cached.proxy.stop()
        cached.proxy.start()
        client.abort_multipart_upload(Bucket=bucket, Key="other", UploadId=other)
        cached.relay.fault = None  # (an UploadId s3cache does not know goes upstream)
        with pytest.raises(ClientError, match="NoSuchUpload"):
            client.upload_part(
                Bucket=bucket, Key="other", UploadId=other, PartNumber=2, Body=bodies[1]
            )
        report = _verify(cached)
        assert report["entries"] == 1 and report["orphan_files"] == 0
        assert report["corrupt_blocks"] == 0
        urllib.request.urlopen(
            urllib.request.Request(
                f"{cached.proxy.endpoint_url}/_s3cache/flush", data=b"", method="POST"
            ),
            timeout=120,
        ).read()
        stored = cached.direct.get_object(Bucket=bucket, Key="ckpt.pt")
        assert stored["Body"].read() == body
        md5s = b"".join(hashlib.md5(bodies[n]).digest() for n in sorted(bodies))
        assert stored["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-4"'
